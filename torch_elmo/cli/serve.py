"""`elmo serve`: ELMo embeddings and saved task models over HTTP (torch_elmo/serve/, the `[serve]`
extra). Models load and flags are checked before the port opens, so a bad path or flag is the
usual one-line error, exit 2."""
from __future__ import annotations

import argparse
import logging
import sys

from ..config import ElmoError
from .common import argv_from_args, at_least


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from ..serve.config import ServeConfig
    d = ServeConfig()
    p.add_argument("--model", required=True,
                   help="anything torch_elmo.load takes: a dir with options.json + weights.hdf5, "
                        "a pretrained name (small, medium, original, ...), hf://owner/name")
    p.add_argument("--task", action="append", default=[], metavar="NAME=DIR",
                   help="also serve a model saved by `elmo ner/classify --save DIR` at "
                        "/v1/tasks/NAME/predict (repeatable)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="(default %(default)s; 0: any free port)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="padded tokens (texts x longest) per forward (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a queued request waits for company while other requests are "
                        "on their way (default %(default)s)")
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="admitted requests at once; more get 429 + Retry-After (default "
                        "%(default)s)")
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                   help="whitespace tokens in one request; more get 413 (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="request body size; more gets 413 (default %(default)s)")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help="seconds a request may wait for the model; then 503 + Retry-After "
                        "(default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM/SIGINT, seconds to finish admitted requests (default "
                        "%(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (or set ELMO_API_KEY)")
    p.add_argument("--model-name", default=None,
                   help="the name /v1/embeddings answers with (default: the model dir's name)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype,
                   help="bfloat16: autocast (pays only where bf16 is native)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the inference worker (default: torch's, one per core; "
                        "with --workers N or N replicas on one machine: cores / N each)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port, each loading the model with its own "
                        "inference worker (limits and /metrics are per process; default 1)")
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # --workers'
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                   default="info")


def parse_tasks(specs: list[str]) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ElmoError(f"--task {spec!r}: expected NAME=DIR")
        if name in tasks:
            raise ElmoError(f"--task {name}: given twice")
        tasks[name] = path
    return tasks


def cmd_serve(args) -> int:
    import os
    try:
        from ..serve import ServeConfig, create_app
        from ..serve.server import listen, run
    except ImportError as e:
        raise ElmoError(f"needs the serve extra ({e.name} is missing): "
                        f"pip install 'torch-elmo[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ElmoError(f"--port must be 0..65535, got {args.port}")
    at_least("--threads", args.threads, 1)
    config = ServeConfig(
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_tokens=args.max_request_tokens, max_body_bytes=args.max_body_bytes,
        queue_timeout=args.queue_timeout, drain_timeout=args.drain_timeout,
        api_key=args.api_key or os.environ.get("ELMO_API_KEY") or None, device=args.device,
        dtype=args.dtype, model_name=args.model_name).check()
    tasks = parse_tasks(args.task)
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="elmo serve: %(levelname)s: %(message)s")
    at_least("--workers", args.workers, 1)
    if args.listen_fd is not None:               # one of --workers' processes
        import socket
        sock, parent = socket.socket(fileno=args.listen_fd), os.getppid()
    else:
        sock, parent = listen(args.host, args.port), None
    try:
        if args.workers > 1 and parent is None:
            from ..serve.server import run_workers
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
            argv = argv_from_args(args, add_serve_flags, drop=("workers", "threads", "task"))
            argv += ["--threads", str(threads)] + [a for t in args.task for a in ("--task", t)]
            return run_workers(argv, sock, args.workers)
        app = create_app(args.model, tasks, config)
        run(app, sock, config.drain_timeout, args.log_level, parent)
    finally:
        sock.close()
    return 0


COMMANDS = {
    "serve": ("serve ELMo embeddings (OpenAI-compatible) and saved task models over HTTP",
              add_serve_flags, cmd_serve),
}
