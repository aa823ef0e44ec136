"""Running the app under uvicorn with a graceful drain (`elmo serve`), in one process or in
`--workers N` processes sharing one listening socket.

The first SIGTERM or SIGINT does not stop the server at once (uvicorn's own handling would close
the listening socket and give no /health signal): it sets the app draining, so /health answers
503 (a load balancer stops sending) and new inference requests get 503 + Retry-After, while every
admitted request is answered; when none is left, or after `drain_timeout` seconds, uvicorn shuts
down (connections closed, worker threads stopped) and the process exits 0. A second signal
stops at once.

`--workers N`: the parent binds the port, then runs N `elmo serve` processes on that socket (the
kernel spreads the connections among them), each loading the model with its own inference
worker; it passes SIGTERM / SIGINT on once (the workers are in their own session, so a terminal's
Ctrl-C reaches only the parent), and when one worker dies the others are drained too: a
supervisor (systemd, Kubernetes) restarts the whole. A worker whose parent is gone drains and
exits. Limits and /metrics are per worker process.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import uvicorn

from ..config import ElmoError
from .app import Served

log = logging.getLogger("torch_elmo.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, served: Served, drain_timeout: float,
                 parent: Optional[int] = None):
        super().__init__(config)
        self.served, self.drain_timeout, self.parent = served, drain_timeout, parent
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
        if self.parent is not None and self.drain_deadline is None and os.getppid() != self.parent:
            log.warning("the parent process is gone")
            self.handle_exit(signal.SIGTERM, None)
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


def run(app, sock: socket.socket, drain_timeout: float, log_level: str = "info",
        parent: Optional[int] = None) -> None:
    """Serve `app` on `sock` until drained. `parent`: drain when that process is gone."""
    config = uvicorn.Config(app, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(drain_timeout, 1.0))
    DrainingServer(config, app.state.served, drain_timeout, parent).run(sockets=[sock])


def run_workers(argv: list[str], sock: socket.socket, n: int) -> int:
    """N `elmo serve <argv> --listen-fd FD` processes on `sock`; 0 when every one exited 0."""
    sock.listen(2048)                 # connections queue while the workers load the model
    fd = sock.fileno()
    cmd = [sys.executable, "-m", "torch_elmo", "serve", *argv, "--listen-fd", str(fd)]
    procs = [subprocess.Popen(cmd, pass_fds=[fd], start_new_session=True) for _ in range(n)]
    signals: list[int] = []

    def forward(sig, frame=None):
        signals.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            dead = [p for p in procs if p.returncode not in (None, 0)]
            if dead and failed is None:
                failed = dead[0].returncode
                log.error("worker %d exited with %d; stopping the others", dead[0].pid, failed)
                if not signals:
                    forward(signal.SIGTERM)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    bad = [p.returncode for p in procs if p.returncode != 0]
    return 0 if not bad else bad[0] if bad[0] > 0 else 1          # < 0: killed by a signal
