"""Pretrained downloads, tested with the real download code against a local HTTP server.

The server (127.0.0.1, a daemon thread) serves the fixture model under the published allennlp
file names; its behaviour per test: normal, cut half-way, or a wrong ETag. Every client call has a
socket timeout and the server is shut down in the fixture, so nothing can hang."""
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from torch_elmo import ElmoError, hub, load


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}     # url path -> bytes
    mode = "ok"          # ok | cut | bad-etag
    requests: list = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        etag = hashlib.md5(body).hexdigest() if self.mode != "bad-etag" else "0" * 32
        self.send_header("ETag", f'"{etag}"')
        self.end_headers()
        if self.mode == "cut" and self.path.endswith("weights.hdf5"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(fixture_model_dir, tmp_path, monkeypatch):
    stem = hub.PRETRAINED["small"]
    files = {
        f"/{stem}/elmo_{stem}_options.json": (fixture_model_dir / "options.json").read_bytes(),
        f"/{stem}/elmo_{stem}_weights.hdf5": (fixture_model_dir / "lm_weights.hdf5").read_bytes(),
    }
    handler = type("Handler", (_Handler,), {"files": files, "mode": "ok", "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_ELMO_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "KNOWN_SHA256", {})
    try:
        yield handler, files
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []


def test_urls_are_the_published_allennlp_ones(monkeypatch):
    monkeypatch.delenv("TORCH_ELMO_URL", raising=False)
    urls = hub.pretrained_urls("original-5.5B")
    assert urls["weights.hdf5"] == ("https://allennlp.s3.amazonaws.com/models/elmo/"
                                    "2x4096_512_2048cnn_2xhighway_5.5B/"
                                    "elmo_2x4096_512_2048cnn_2xhighway_5.5B_weights.hdf5")
    assert hub.pretrained_urls("small")["options.json"].endswith(
        "2x1024_128_2048cnn_1xhighway/elmo_2x1024_128_2048cnn_1xhighway_options.json")
    assert set(hub.PRETRAINED) == {"small", "medium", "original", "original-5.5B"}
    monkeypatch.setenv("TORCH_ELMO_CACHE", "/x/y")
    assert hub.cache_dir() == Path("/x/y")


def test_download_once_then_cached(server, tmp_path, fixture_model_dir):
    handler, files = server
    elmo = load("small", state="zero")
    assert elmo(["a b"])["elmo"].shape == (1, 2, 32)
    assert len(handler.requests) == 2
    assert _cache_files(tmp_path) == ["small/options.json", "small/options.json.sha256",
                                      "small/weights.hdf5", "small/weights.hdf5.sha256"]
    weights = tmp_path / "cache" / "small" / "weights.hdf5"
    assert weights.read_bytes() == (fixture_model_dir / "lm_weights.hdf5").read_bytes()
    assert hub.verify_cache("small")
    load("small")
    assert len(handler.requests) == 2                      # second load: no download
    weights.write_bytes(weights.read_bytes()[:100])        # damaged cache: fetched again
    load("small")
    assert len(handler.requests) == 3 and hub.verify_cache("small")


def test_checksum_mismatch_leaves_nothing(server, tmp_path, monkeypatch):
    stem = hub.PRETRAINED["small"]
    monkeypatch.setattr(hub, "KNOWN_SHA256", {f"elmo_{stem}_weights.hdf5": "ab" * 32})
    with pytest.raises(ElmoError, match="sha256 mismatch") as e:
        load("small")
    assert "\n" not in str(e.value) and "weights.hdf5" in str(e.value)
    assert "small/weights.hdf5" not in _cache_files(tmp_path)
    assert not [f for f in _cache_files(tmp_path) if "weights" in f]   # no partial or temp file


def test_etag_mismatch_is_caught(server, tmp_path):
    handler, _ = server
    handler.mode = "bad-etag"
    with pytest.raises(ElmoError, match="ETag"):
        load("small")
    assert _cache_files(tmp_path) == []


def test_connection_cut_half_way_leaves_nothing(server, tmp_path):
    handler, files = server
    handler.mode = "cut"
    with pytest.raises(ElmoError, match="connection lost after") as e:
        load("small")
    assert "\n" not in str(e.value)
    assert not [f for f in _cache_files(tmp_path) if "weights" in f]
    handler.mode = "ok"                                    # the next run completes
    load("small")
    assert hub.verify_cache("small")


def test_unreachable_server_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_ELMO_URL", "http://127.0.0.1:9")   # discard port: refused
    with pytest.raises(ElmoError, match="cannot connect"):
        hub.download(hub.pretrained_urls("small")["options.json"], tmp_path / "x", timeout=5)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ElmoError, match="not a pretrained name"):
        load("tiny-but-not-published")


def test_missing_file_on_server_is_one_line(server, tmp_path):
    with pytest.raises(ElmoError, match="HTTP 404"):
        load("medium")                                     # the server only has "small"
    assert _cache_files(tmp_path) == []
