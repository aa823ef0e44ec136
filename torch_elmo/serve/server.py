"""Running the app under uvicorn with a graceful drain (`elmo serve`).

The first SIGTERM or SIGINT does not stop the server at once (uvicorn's own handling would close
the listening socket and give no /health signal): it sets the app draining, so /health answers
503 (a load balancer stops sending) and new inference requests get 503 + Retry-After, while every
admitted request is answered; when none is left, or after `drain_timeout` seconds, uvicorn shuts
down (connections closed, worker threads stopped) and the process exits 0. A second signal
stops at once."""
from __future__ import annotations

import logging
import socket
import time

import uvicorn

from ..config import ElmoError
from .app import Served

log = logging.getLogger("torch_elmo.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, served: Served, drain_timeout: float):
        super().__init__(config)
        self.served, self.drain_timeout = served, drain_timeout
        self.drain_deadline = None

    def handle_exit(self, sig, frame) -> None:
        # replaces uvicorn's handler, which would also re-raise the signal after shutdown
        # (the process would then die of it instead of exiting 0)
        if self.drain_deadline is not None:
            self.should_exit = self.force_exit = True          # a second signal: stop now
            return
        self.served.admission.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout
        log.info("draining: %d request(s) in flight, at most %g s (signal %d)",
                 self.served.admission.in_flight, self.drain_timeout, sig)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.served.admission.in_flight == 0:
                log.info("drained: every admitted request was answered")
                return True
            if time.monotonic() > self.drain_deadline:
                log.warning("drain timeout: %d request(s) still in flight",
                            self.served.admission.in_flight)
                return True
        return await super().on_tick(counter)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the models load (a taken port is one line at once).
    SO_REUSEADDR: a killed server's port is free again at once (its connections in TIME_WAIT
    do not block it)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ElmoError(f"cannot listen on {host}:{port} (--host, --port): "
                        f"{e.strerror or e}") from None
    return sock


def run(app, sock: socket.socket, drain_timeout: float, log_level: str = "info") -> None:
    config = uvicorn.Config(app, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(drain_timeout, 1.0))
    DrainingServer(config, app.state.served, drain_timeout).run(sockets=[sock])
