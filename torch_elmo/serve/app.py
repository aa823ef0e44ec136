"""The HTTP API of `elmo serve`: `create_app(model, tasks=..., config=...)`, a FastAPI app any ASGI
server can run (`elmo serve` runs it under uvicorn, server.py).

Endpoints (README "Serve it"):

* POST /v1/embeddings: OpenAI's embeddings API; each vector is `torch_elmo.load(M).encode([text])
  [0]` (the mean over tokens of the mean of the layers, warm state), as float lists or base64
  float32 (what the `openai` client asks for by default).
* POST /v1/embed: token-level vectors as `ElmoEmbedder(M).embed_batch` gives them, `layers`
  all / top / average (embed.reduce_layers), float32 or float16; JSON, or with
  `Accept: application/x-npy` one .npy body: (n, [3,] T, 2P) padded with zeros, the token counts
  (what splitting each input on whitespace gives) in the `X-Elmo-Lengths` header.
* POST /v1/tasks/{name}/predict: a model saved by `elmo ner/classify --save` (`--task NAME=DIR`):
  the tagger's tokens / tags / entities (`Tagger.predict`), or the classifier's label and
  probabilities (`TextClassifier.predict_proba`, the label its argmax, as `predict`; an empty
  text has neither: null).
* GET /health (200 once every model ran its warm-up batch; 503 before, and while draining),
  GET /metrics (metrics.py), GET /v1/models, OpenAPI docs at /docs.

Every answer but a 200 is `{"error": {"message": ONE line, "type", "code"}}` (OpenAI's shape):
401 missing/wrong API key (hmac.compare_digest), 400/422 bad input, 404 unknown task or path,
413 too many tokens or too big a body, 429 + Retry-After over --max-concurrent-requests,
503 + Retry-After when the queue timed out or the server is draining, 500 for a model error with
an id that the server log prints beside the traceback. Inference runs on the batchers' worker
threads (batcher.py), never on the event loop.

Test hook: with the environment variable TORCH_ELMO_SERVE_FAIL_TOKEN=T set when the app is
created, the embedding worker raises on any batch holding the token T (tests/test_serve.py uses
it to see a model error become a 500 and the server serve on).
"""
from __future__ import annotations

import base64
import hmac
import io
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..config import ElmoError
from ..device import resolve_device
from ..embed import layer_tokens, pool_tokens, reduce_layers
from ..modules import ElmoModel, load
from .batcher import Batcher, ModelError, QueueTimeout, Stopped
from .config import ServeConfig
from .metrics import Metrics
from .schemas import (ApiError, EmbeddingsRequest, EmbedRequest, PredictRequest, openapi_body,
                      parse_body)

log = logging.getLogger("torch_elmo.serve")

FAIL_TOKEN_ENV = "TORCH_ELMO_SERVE_FAIL_TOKEN"
WARMUP_TOKENS = ["The", "server", "is", "warming", "up", "."]
NPY = "application/x-npy"
SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class Admission:
    """Admitted inference requests (on the event loop only); refuses over the limit or when
    draining. `in_flight` is read by the worker threads to know whether company is coming."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics = limit, metrics
        self.in_flight = 0
        self.draining = False

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.draining:
            raise ApiError(503, SHUTTING_DOWN, {"Retry-After": "5"})
        if self.in_flight >= self.limit:
            raise ApiError(429, f"too many requests in flight (limit {self.limit}); retry later",
                           {"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)


class Served:
    """What one app serves: the embedding model, the task models, their batchers, the limits."""

    def __init__(self, elmo: ElmoModel, name: str, tasks: Mapping[str, Any], config: ServeConfig):
        self.elmo, self.name, self.tasks, self.config = elmo, name, dict(tasks), config
        self.metrics = Metrics()
        self.admission = Admission(config.max_concurrent_requests, self.metrics)
        self.dim = elmo.output_dim
        kw = dict(max_batch_tokens=config.max_batch_tokens, max_wait_ms=config.max_wait_ms,
                  metrics=self.metrics, others=lambda: self.admission.in_flight)
        self.batchers = {"": Batcher(name, self.embed_batch, WARMUP_TOKENS, **kw)}
        for task, model in self.tasks.items():
            self.batchers[task] = Batcher(f"task:{task}", self.task_runner(model),
                                          " ".join(WARMUP_TOKENS), **kw)
        self.fail_token = os.environ.get(FAIL_TOKEN_ENV) or None      # test hook (module doc)
        device = next(elmo.bilm.parameters()).device
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
            if config.dtype == "bfloat16" else nullcontext

    def embed_batch(self, batch: list[list[str]]) -> list[np.ndarray]:
        """Worker thread: token lists -> (3, n, 2P) float32 each (ElmoEmbedder.embed_batch)."""
        if self.fail_token is not None and any(self.fail_token in s for s in batch):
            raise RuntimeError(f"{FAIL_TOKEN_ENV} test hook: the batch holds {self.fail_token!r}")
        with self.autocast():
            return self.elmo.embed_batch(batch)

    def task_runner(self, model):
        def run(texts: list[str]) -> list:
            with self.autocast():
                if model.kind == "ner":
                    return model.predict(texts, batch_size=len(texts))
                return list(model.predict_proba(texts))
        return run

    async def infer(self, key: str, inputs: list, lengths: list[int]) -> list:
        cost = sum(max(n, 1) for n in lengths)            # an empty text still costs a row
        if cost > self.config.max_request_tokens:
            raise ApiError(413, f"the request has {cost} tokens (an empty text counts 1), over "
                                f"the limit of {self.config.max_request_tokens} "
                                f"(--max-request-tokens)")
        try:
            return await self.batchers[key].submit(inputs, lengths, self.config.queue_timeout)
        except QueueTimeout:
            raise ApiError(503, f"the request waited over {self.config.queue_timeout:g} s for "
                                f"the model (--queue-timeout); retry later",
                           {"Retry-After": "2"}) from None
        except Stopped:
            raise ApiError(503, SHUTTING_DOWN, {"Retry-After": "5"}) from None
        except ModelError as e:
            raise ApiError(500, f"the model failed on this request (error id {e.error_id}; "
                                f"the server log has the details)", error_id=e.error_id) from None

    def health(self) -> tuple[int, dict]:
        if self.admission.draining:
            return 503, {"status": "draining"}
        failed = [f"{b.name}: {b.warmup_error}" for b in self.batchers.values() if b.warmup_error]
        if failed:
            return 503, {"status": "error", "detail": "; ".join(failed)}
        if not all(b.ready.is_set() for b in self.batchers.values()):
            return 503, {"status": "loading"}
        return 200, {"status": "ok", "model": self.name, "tasks": sorted(self.tasks)}


# --------------------------------------------------------------------------- error answers
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def error_response(status: int, message: str, headers: Optional[dict] = None,
                   error_id: Optional[str] = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "error"), "code": status}
    if error_id is not None:
        body["id"] = error_id
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def unexpected_error(exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error id=%s", error_id, exc_info=exc)
    return error_response(500, f"internal server error (error id {error_id}; the server log has "
                               f"the details)", error_id=error_id)


# ------------------------------------------------------------------------- ASGI middleware
class RequestLimits:
    """Pure ASGI: a body over `max_body_bytes` is refused with 413 (by its Content-Length before a
    byte is read, else once the received bytes pass it), and every request is counted in the
    metrics under its route template."""

    def __init__(self, app, served: Served, routes):
        self.app, self.served, self.routes = app, served, routes

    def endpoint(self, scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        limit = self.served.config.max_body_bytes
        too_big = ApiError(413, f"the request body is over {limit} bytes (--max-body-bytes)")

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        seen = [0]

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise too_big
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await error_response(413, too_big.message)(scope, receive, send_status)
            else:
                await self.app(scope, receive_limited, send_status)
        finally:
            self.served.metrics.observe_request(self.endpoint(scope), status[0],
                                                time.perf_counter() - t0)


# ------------------------------------------------------------------------------ the app
def load_tasks(tasks: Optional[Mapping[str, Any]], device) -> dict:
    """name -> a loaded task model (a path is loaded with torch_elmo.load_task)."""
    out = {}
    for name, model in (tasks or {}).items():
        if not name or "/" in name:
            raise ElmoError(f"--task {name!r}: the name must be non-empty without '/'")
        if isinstance(model, (str, os.PathLike)):
            from .. import load_task                  # tasks/load.py (imports the task extras)
            model = load_task(model, device=device)
        out[name] = model
    return out


def model_name(model, config: ServeConfig) -> str:
    if config.model_name:
        return config.model_name
    if isinstance(model, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(os.fspath(model))) or "elmo"
    return "elmo"


def create_app(model: Union[str, os.PathLike, ElmoModel, Any],
               tasks: Optional[Mapping[str, Any]] = None,
               config: Optional[ServeConfig] = None, **settings) -> FastAPI:
    """`model`: anything `torch_elmo.load` takes (a directory, a pretrained name, a BiLM) or a
    loaded ElmoModel; `tasks`: name -> a `--save`d task directory or a loaded Tagger /
    TextClassifier; `config` (ServeConfig) and/or its fields as keywords. Models load here (an
    ElmoError names a bad path); the worker threads start with the app (ASGI lifespan)."""
    config = replace(config or ServeConfig(), **settings).check()
    device = resolve_device(config.device)                     # cuda when available
    elmo = model if isinstance(model, ElmoModel) else load(model, device=device)
    if elmo.state == "carry":
        raise ElmoError("elmo serve needs the warm or zero state: carry depends on batch history")
    served = Served(elmo.eval(), model_name(model, config), load_tasks(tasks, device),
                    config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for b in served.batchers.values():
            b.start()
        yield
        for b in served.batchers.values():
            await run_in_threadpool(b.stop)

    app = FastAPI(title="torch-elmo", version=__import__("torch_elmo").__version__,
                  summary="ELMo embeddings and saved task models over HTTP", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers, exc.error_id)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: "
                                               f"{exc.detail}", exc.headers)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        return unexpected_error(exc)

    def check_key(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(token.strip().encode(), key.encode())):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})

    @app.post("/v1/embeddings", openapi_extra=openapi_body(EmbeddingsRequest),
              summary="OpenAI-compatible sentence vectors (torch_elmo's encode)")
    async def embeddings(request: Request):
        check_key(request)
        with served.admission.admit():
            body = parse_body(await request.body(), EmbeddingsRequest)
            if body.dimensions is not None and body.dimensions != served.dim:
                raise ApiError(422, f"dimensions: this model's vectors have {served.dim} "
                                    f"dimensions, got {body.dimensions}")
            texts = [body.input] if isinstance(body.input, str) else body.input
            tokens = [t.split() for t in texts]
            lengths = [len(t) for t in tokens]
            layers = await served.infer("", tokens, lengths)
        data = []
        for i, emb in enumerate(layers):               # (3, n, 2P) -> (2P,), as encode does
            vec = pool_tokens(layer_tokens(emb, None), "mean") if emb.shape[1] \
                else np.zeros(served.dim, dtype=np.float32)
            vec = vec.astype(np.float32)
            data.append({"object": "embedding", "index": i, "embedding":
                         base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
                         if body.encoding_format == "base64" else vec.tolist()})
        n = sum(lengths)
        return JSONResponse({"object": "list", "data": data, "model": body.model or served.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.post("/v1/embed", openapi_extra=openapi_body(EmbedRequest),
              summary="token-level vectors (ElmoEmbedder's embed_batch); JSON or .npy")
    async def embed(request: Request):
        check_key(request)
        with served.admission.admit():
            body = parse_body(await request.body(), EmbedRequest)
            if body.tokens is not None:
                tokens = body.tokens
            else:
                texts = [body.input] if isinstance(body.input, str) else body.input
                tokens = [t.split() for t in texts]
            lengths = [len(t) for t in tokens]
            layers = await served.infer("", tokens, lengths)
        dtype = np.float16 if body.dtype == "float16" else np.float32
        arrays = [reduce_layers(emb, body.layers).astype(dtype) for emb in layers]
        if NPY in request.headers.get("accept", ""):
            return Response(await run_in_threadpool(npy_bytes, arrays, lengths), media_type=NPY,
                            headers={"X-Elmo-Lengths": ",".join(map(str, lengths))})
        n = sum(lengths)
        head = {"object": "list", "model": served.name, "layers": body.layers,
                "dtype": body.dtype, "usage": {"prompt_tokens": n, "total_tokens": n}}
        # large bodies: built and JSON-encoded off the event loop
        return await run_in_threadpool(lambda: JSONResponse({**head, "data": [
            {"object": "embedding", "index": i, "tokens": t, "embedding": a.tolist()}
            for i, (t, a) in enumerate(zip(tokens, arrays))]}))

    @app.post("/v1/tasks/{name}/predict", openapi_extra=openapi_body(PredictRequest),
              summary="a saved tagger's entities or classifier's labels (elmo ner/classify --save)")
    async def predict(name: str, request: Request):
        check_key(request)
        if name not in served.tasks:
            raise ApiError(404, f"unknown task {name!r}; this server has "
                                f"{', '.join(sorted(served.tasks)) or 'no tasks'}")
        model = served.tasks[name]
        with served.admission.admit():
            body = parse_body(await request.body(), PredictRequest)
            texts = [body.input] if isinstance(body.input, str) else body.input
            lengths = [len(t.split()) for t in texts]
            outs = await served.infer(name, texts, lengths)
        if model.kind == "ner":
            data = [{"index": i, **out} for i, out in enumerate(outs)]
        else:
            classes = [str(c) for c in getattr(model, "classes_", model.labels)]
            data = [{"index": i, "label": None, "probabilities": None} if np.isnan(p).any()
                    else {"index": i, "label": classes[int(np.argmax(p))],   # predict's label
                          "probabilities": dict(zip(classes, map(float, p)))}
                    for i, p in enumerate(outs)]              # an empty text: no label (NaN)
        n = sum(lengths)
        return JSONResponse({"object": "list", "task": name, "kind": model.kind, "data": data,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    @app.get("/v1/models", summary="the served models (OpenAI's list shape)")
    async def models(request: Request):
        check_key(request)
        names = [served.name] + [f"task:{t}" for t in sorted(served.tasks)]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "torch-elmo"}
                                           for n in names]}

    @app.get("/health", summary="200 when ready; 503 while loading or draining")
    async def health():
        status, body = served.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type=served.metrics.content_type)

    app.add_middleware(RequestLimits, served=served, routes=app.router.routes)
    return app


def npy_bytes(arrays: list[np.ndarray], lengths: list[int]) -> bytes:
    """(n, [3,] T, 2P) of the texts' arrays, each zero-padded to the longest T, as a .npy file."""
    T = max(lengths)
    first = arrays[0]
    tail = first.shape[:-2] + (T, first.shape[-1])            # ([3,] T, 2P)
    out = np.zeros((len(arrays),) + tail, dtype=first.dtype)
    for i, a in enumerate(arrays):
        out[i, ..., :a.shape[-2], :] = a
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()
