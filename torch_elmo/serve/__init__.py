"""`elmo serve`: ELMo embeddings and saved task models over HTTP (the `[serve]` extra: FastAPI,
uvicorn, prometheus_client; `import torch_elmo` never imports this package).

config.py  ServeConfig, the limits (no web framework imported)
schemas.py the request bodies and their one-line validation errors
batcher.py the queue and the one inference worker thread per model (dynamic batching)
metrics.py the Prometheus metrics
app.py     create_app: the routes, admission control, error answers
server.py  uvicorn with a graceful drain on SIGTERM / SIGINT; --workers N processes
"""
from .app import create_app
from .config import ServeConfig

__all__ = ["create_app", "ServeConfig"]
