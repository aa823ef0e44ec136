"""`ServeConfig`: the limits and choices of one `elmo serve` server (every flag of the command but
the model paths, host and port), with the defaults the CLI shows. No web framework is imported
here, so `elmo serve --help` and the CLI's checks stay light."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ElmoError

DTYPES = ("float32", "bfloat16")


@dataclass
class ServeConfig:
    """Limits are per server process.

    max_batch_tokens: a batch's padded size (rows x longest text), what one forward costs.
    max_wait_ms: how long the worker waits for company once a request is queued (only while
        other admitted requests are still on their way, those answered by the last batch
        counted for max_wait after it: a lone request runs at once).
    max_concurrent_requests: admitted requests at once (queued, running or being answered);
        one more gets 429.
    max_request_tokens: whitespace tokens in one request; more gets 413.
    max_body_bytes: request body size; more gets 413.
    queue_timeout: seconds a request may wait for the worker to take it; then 503.
    drain_timeout: seconds SIGTERM/SIGINT waits for admitted requests before the server stops.
    api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (401 otherwise).
    dtype: bfloat16 runs the biLM under autocast (worth it only where bf16 is native).
    model_name: the name /v1/embeddings answers with (default: the model's directory name)."""
    max_batch_tokens: int = 4096
    max_wait_ms: float = 50.0
    max_concurrent_requests: int = 256
    max_request_tokens: int = 16384
    max_body_bytes: int = 16 * 1024 * 1024
    queue_timeout: float = 30.0
    drain_timeout: float = 30.0
    api_key: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "float32"
    model_name: Optional[str] = None

    def check(self) -> "ServeConfig":
        """Itself, or a one-line ElmoError naming the bad setting."""
        for name in ("max_batch_tokens", "max_concurrent_requests", "max_request_tokens",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ElmoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "queue_timeout", "drain_timeout"):
            if not getattr(self, name) >= 0:
                raise ElmoError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ElmoError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.api_key is not None and not self.api_key:
            raise ElmoError("--api-key is empty")
        return self
