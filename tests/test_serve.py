"""`elmo serve` over real HTTP: each server is `python -m torch_elmo serve` on a free loopback port,
started once per module where it can be, stopped by PID; every load loop is bounded in count and
time. Answers are compared with the offline library (encode, ElmoEmbedder) to 1e-6."""
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import REPO  # noqa: E402
from torch_elmo import BiLM, ElmoEmbedder, export_model, load, preset  # noqa: E402
from torch_elmo.embed import reduce_layers  # noqa: E402

TEXTS = ["The cat sat on the mat .", "Hello", "", "A much longer sentence , with commas , "
         "numbers like 1998 and words the model never saw : zyzzyva quixotic .",
         "Nothing suits me like a suit"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m torch_elmo serve --model DIR ...` as a subprocess; its log in a file."""

    def __init__(self, model_dir, log_path, *flags, port=None, env=None, wait=True, argv=None):
        """`argv`: the whole command after `elmo` (then `model_dir` and `flags` are unused and
        `port` must be the one in it)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        argv = argv or ["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port",
                        str(self.port), "--threads", "1", *flags]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "torch_elmo", *argv], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"server did not stop in {timeout} s:\n{self.log()[-3000:]}")
        return self.proc.returncode


def embeddings(url, texts, **kw):
    return httpx.post(url + "/v1/embeddings", json={"input": texts, **kw}, timeout=60)


def error_of(r) -> str:
    """The one-line message of an error answer (checked to be one line in OpenAI's shape)."""
    msg = r.json()["error"]["message"]
    assert "\n" not in msg and r.json()["error"]["code"] == r.status_code
    return msg


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in a /metrics text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1234)
    out = tmp_path_factory.mktemp("tiny")
    export_model(BiLM(preset("tiny")).eval(), out)
    return out


@pytest.fixture(scope="module")
def offline(model_dir, one_thread):
    return load(model_dir), ElmoEmbedder(str(model_dir))


def saved_tagger(model_dir, out) -> str:
    """A tagger trained for one epoch on a tiny CoNLL file and saved (`elmo ner --save`)."""
    from test_tasks_ner import CONLL_IOB1
    from torch_elmo import cli
    conll = Path(out).parent / "mini.conll"
    conll.write_text(CONLL_IOB1)
    assert cli.main(["ner", "--model", str(model_dir), "--train", str(conll), "--dev", str(conll),
                     "--test", str(conll), "--epochs", "1", "--save", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def task_dirs(model_dir, tmp_path_factory):
    pytest.importorskip("skops")
    from test_tasks_classify import separable_examples, write_tsv
    from torch_elmo import cli
    d = tmp_path_factory.mktemp("tasks")
    write_tsv(d / "train.tsv", separable_examples(30, 0))
    assert cli.main(["classify", "--model", str(model_dir), "--train", str(d / "train.tsv"),
                     "--test", str(d / "train.tsv"), "--save", str(d / "topic")]) == 0
    return {"ner": saved_tagger(model_dir, d / "ner"), "topic": str(d / "topic")}


@pytest.fixture(scope="module")
def server(model_dir, task_dirs, tmp_path_factory):
    tasks = [f for name, path in task_dirs.items() for f in ("--task", f"{name}={path}")]
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-wait-ms", "50",
               *tasks)
    yield s
    assert s.stop() == 0, s.log()[-3000:]


# ------------------------------------------------------------------------- same numbers
def test_embeddings_equal_offline_encode(server, offline):
    elmo, _ = offline
    r = embeddings(server.url, TEXTS, model="mine")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "mine"
    n = sum(len(t.split()) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    b64 = embeddings(server.url, TEXTS, encoding_format="base64").json()["data"]
    for i, text in enumerate(TEXTS):
        want = elmo.encode([text])[0]
        assert body["data"][i]["index"] == i and body["data"][i]["object"] == "embedding"
        np.testing.assert_allclose(np.array(body["data"][i]["embedding"], dtype=np.float32),
                                   want, atol=1e-6, rtol=0)
        got = np.frombuffer(base64.b64decode(b64[i]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    one = embeddings(server.url, TEXTS[0]).json()["data"]            # a string, not a list
    assert len(one) == 1
    np.testing.assert_allclose(one[0]["embedding"], elmo.encode([TEXTS[0]])[0], atol=1e-6, rtol=0)


def test_openai_client_works_unchanged(server, offline):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.embeddings.create(model="tiny", input=TEXTS[:2])     # base64 by default
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens == 8
    for d, text in zip(out.data, TEXTS[:2]):
        np.testing.assert_allclose(np.array(d.embedding, dtype=np.float32),
                                   offline[0].encode([text])[0], atol=1e-6, rtol=0)
    floats = client.embeddings.create(model="tiny", input=TEXTS[3], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, offline[0].encode([TEXTS[3]])[0],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers", ["all", "top", "average"])
def test_embed_equals_elmo_embedder(server, offline, layers):
    _, embedder = offline
    want = embedder.embed_batch([t.split() for t in TEXTS])
    r = httpx.post(server.url + "/v1/embed", json={"input": TEXTS, "layers": layers}, timeout=60)
    assert r.status_code == 200, r.text
    for d, w, text in zip(r.json()["data"], want, TEXTS):
        assert d["tokens"] == text.split()
        got = np.array(d["embedding"], dtype=np.float32).reshape(reduce_layers(w, layers).shape)
        np.testing.assert_allclose(got, reduce_layers(w, layers), atol=1e-6, rtol=0)
    tokens = [["A", "b", "c"], ["tokens", "with spaces", "kept"]]       # token lists as given
    r = httpx.post(server.url + "/v1/embed", json={"tokens": tokens, "layers": layers,
                                                  "dtype": "float16"},
                   headers={"Accept": "application/x-npy"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    assert r.headers["x-elmo-lengths"] == "3,3"
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.float16
    for got, w in zip(arr, embedder.embed_batch(tokens)):
        np.testing.assert_allclose(got, reduce_layers(w, layers).astype(np.float16),
                                   atol=1e-6, rtol=1e-3)              # float16: 1 ulp


def test_a_text_does_not_depend_on_its_batch_neighbours(server, offline):
    text = TEXTS[0]
    alone = np.array(embeddings(server.url, [text]).json()["data"][0]["embedding"])
    mixed = [TEXTS[3], "x " * 40, text, "a", TEXTS[4]] * 3           # one forward, padded
    for d in embeddings(server.url, mixed).json()["data"][2::5]:
        np.testing.assert_allclose(d["embedding"], alone, atol=1e-6, rtol=0)


def test_32_concurrent_clients_get_the_offline_answers(server, offline):
    elmo, embedder = offline
    texts = [" ".join(TEXTS[3].split()[:k + 1]) for k in range(24)] + TEXTS
    want = {t: elmo.encode([t])[0] for t in texts}
    want_tokens = {t: e for t, e in zip(texts, embedder.embed_batch([t.split() for t in texts]))}
    before = httpx.get(server.url + "/metrics").text

    def client(k):
        out = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for j in range(4):
                t = texts[(k * 4 + j) % len(texts)]
                if j % 2:
                    r = c.post("/v1/embed", json={"input": [t], "layers": "average"})
                    out.append(("embed", t, r.status_code, r.json()["data"][0]["embedding"]))
                else:
                    r = c.post("/v1/embeddings", json={"input": t})
                    out.append(("embeddings", t, r.status_code, r.json()["data"][0]["embedding"]))
        return out

    with ThreadPoolExecutor(32) as pool:
        results = [x for xs in pool.map(client, range(32)) for x in xs]
    assert len(results) == 128
    for kind, t, status, vec in results:
        assert status == 200
        expected = want[t] if kind == "embeddings" else want_tokens[t].mean(axis=0)
        np.testing.assert_allclose(np.array(vec, dtype=np.float32).reshape(expected.shape),
                                   expected, atol=1e-6, rtol=0)
    after = httpx.get(server.url + "/metrics").text
    batches = metric(after, "elmo_batch_size_count") - metric(before, "elmo_batch_size_count")
    assert 0 < batches < 128, "no two concurrent requests shared a batch"


def test_task_predict_equals_load_task(server, task_dirs, one_thread):
    from torch_elmo import load_task
    texts = ["EU rejects German call to boycott British lamb .", "Peter Blackburn", "",
             "the apple and a plum", "my hammer and saw"]
    tagger, clf = load_task(task_dirs["ner"]), load_task(task_dirs["topic"])
    r = httpx.post(server.url + "/v1/tasks/ner/predict", json={"input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "ner"
    assert [{k: v for k, v in d.items() if k != "index"} for d in r.json()["data"]] == \
        tagger.predict(texts)
    r = httpx.post(server.url + "/v1/tasks/topic/predict", json={"input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    data, proba = r.json()["data"], clf.predict_proba(texts)
    assert [d["label"] for d in data] == clf.predict(texts)
    assert data[2] == {"index": 2, "label": None, "probabilities": None}    # an empty text
    for d, p in zip(data, proba):
        if d["probabilities"] is not None:
            assert list(d["probabilities"]) == list(clf.classes_)
            np.testing.assert_allclose(list(d["probabilities"].values()), p, atol=1e-6, rtol=0)
    one = httpx.post(server.url + "/v1/tasks/topic/predict", json={"input": texts[3]}).json()
    assert one["data"][0]["label"] == clf.predict(texts[3])
    assert httpx.get(server.url + "/health").json()["tasks"] == ["ner", "topic"]


def test_health_metrics_and_docs(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("elmo_requests_total", "elmo_request_seconds_bucket", "elmo_queue_depth",
                 "elmo_batch_size_bucket", "elmo_batch_tokens_bucket", "elmo_tokens_total",
                 "elmo_tokens_per_second", "elmo_requests_in_flight"):
        assert name in text, name
    assert 'endpoint="/v1/embeddings",status="200"' in text
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "input" in str(spec["paths"]["/v1/embeddings"]["post"]["requestBody"])


# -------------------------------------------------------------- limits and bad requests
@pytest.fixture(scope="module")
def strict(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "strict.log", "--api-key", "s3cret",
               "--max-concurrent-requests", "2", "--max-request-tokens", "200",
               "--max-body-bytes", "20000", "--max-batch-tokens", "32", "--workers", "2",
               env={"TORCH_ELMO_SERVE_FAIL_TOKEN": "__boom__"})
    s.auth = {"Authorization": "Bearer s3cret"}
    yield s
    workers = children_of(s.proc.pid)
    assert s.stop() == 0, s.log()[-3000:]               # SIGTERM passed on, both drained
    assert s.log().count("drained: every admitted request was answered") == 2
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def post(s, path, content=None, **kw):
    headers = {**s.auth, **kw.pop("headers", {})}
    return httpx.post(s.url + path, content=content, headers=headers, timeout=60, **kw)


def children_of(pid: int) -> list[str]:
    """The pids whose parent is `pid` (/proc/N/stat: ppid is the 2nd field after the name)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(p.name)
        except OSError:
            pass
    return out


def test_two_workers_share_the_port(strict):
    children = children_of(strict.proc.pid)
    assert len(children) == 2
    for pid in children:
        assert "--listen-fd" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def test_api_key(strict):
    body = {"input": "a b"}
    assert httpx.post(strict.url + "/v1/embeddings", json=body).status_code == 401
    r = httpx.post(strict.url + "/v1/embeddings", json=body,
                   headers={"Authorization": "Bearer s3creT"})
    assert r.status_code == 401 and "API key" in error_of(r)
    assert post(strict, "/v1/embeddings", json=body).status_code == 200
    assert httpx.get(strict.url + "/health").status_code == 200    # open to load balancers
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict.url + "/v1", api_key="wrong", max_retries=0) \
            .embeddings.create(model="m", input="a")


@pytest.mark.parametrize("path,content,status,says", [
    ("/v1/embeddings", b'{"input": ["a", ', 400, "malformed JSON"),
    ("/v1/embeddings", b"", 400, "empty request body"),
    ("/v1/embeddings", b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    ("/v1/embeddings", b'{"input": "caf\xe9"}', 400, "not valid UTF-8"),
    ("/v1/embed", b'{"input": "a\\ud800b"}', 400, "lone surrogate"),
    ("/v1/embeddings", b'["a"]', 422, "must be a JSON object"),
    ("/v1/embeddings", b'{"input": []}', 422, "input: is an empty list"),
    ("/v1/embeddings", b'{"input": ["a", 3]}', 422, "input: item 1 must be a string"),
    ("/v1/embeddings", b'{"input": {"a": 1}}', 422, "input: must be a string or a list"),
    ("/v1/embeddings", b'{"texts": ["a"]}', 422, "input: Field required"),
    ("/v1/embeddings", b'{"input": "a", "encoding_format": "int8"}', 422, "encoding_format"),
    ("/v1/embeddings", b'{"input": "a", "dimensions": 7}', 422, "dimensions"),
    ("/v1/embed", b'{"input": "a", "layers": "middle"}', 422, "layers"),
    ("/v1/embed", b'{"input": "a", "tokens": [["a"]]}', 422, "either input"),
    ("/v1/embed", b'{"tokens": [["a", 1]]}', 422, "tokens: item 0, token 1 must be a string"),
    ("/v1/tasks/nope/predict", b'{"input": "a"}', 404, "unknown task 'nope'"),
    ("/v1/nothing", b'{}', 404, "Not Found"),
])
def test_bad_requests_get_one_line_4xx_and_the_server_serves_on(strict, path, content, status,
                                                                says):
    r = post(strict, path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert says in error_of(r)
    assert post(strict, "/v1/embeddings", json={"input": "still here"}).status_code == 200


def test_413_for_too_many_tokens_or_too_big_a_body(strict):
    r = post(strict, "/v1/embeddings", json={"input": ["w " * 150, "w " * 51]})
    assert r.status_code == 413 and "201 tokens" in error_of(r)
    assert post(strict, "/v1/embeddings", json={"input": ["w " * 150, "w " * 50]}).status_code == 200
    big = b'{"input": "' + b"x" * 30000 + b'"}'
    r = post(strict, "/v1/embeddings", content=big)                      # Content-Length
    assert r.status_code == 413 and "--max-body-bytes" in error_of(r)
    r = post(strict, "/v1/embeddings", content=iter([big[:15000], big[15000:]]))   # chunked
    assert r.status_code == 413 and "--max-body-bytes" in error_of(r)
    assert post(strict, "/v1/embeddings", json={"input": "ok"}).status_code == 200


def test_a_model_error_is_a_500_with_an_id_in_the_log(strict):
    r = post(strict, "/v1/embeddings", json={"input": ["fine", "this __boom__ fails"]})
    assert r.status_code == 500
    error_id = r.json()["error"]["id"]
    assert error_id in error_of(r)
    deadline = time.monotonic() + 10
    while error_id not in strict.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"model error id={error_id}" in strict.log()
    assert "TORCH_ELMO_SERVE_FAIL_TOKEN test hook" in strict.log()     # the traceback's cause
    assert post(strict, "/v1/embeddings", json={"input": "fine"}).status_code == 200


def test_overload_gets_429_with_retry_after_never_5xx_then_serves(strict, offline):
    text = " ".join(["word"] * 60)                                     # 2 forwards a request
    want = offline[0].encode([text])[0]
    statuses = []

    def client(k):
        with httpx.Client(base_url=strict.url, headers=strict.auth, timeout=60) as c:
            for _ in range(3):
                r = c.post("/v1/embeddings", json={"input": [text, text]})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert int(r.headers["retry-after"]) >= 1 and "too many" in error_of(r)
                else:
                    assert r.status_code == 200, r.text
                    np.testing.assert_allclose(r.json()["data"][1]["embedding"], want,
                                               atol=1e-6, rtol=0)

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(client, range(24)))
    assert len(statuses) == 72 and set(statuses) <= {200, 429}
    assert statuses.count(429) > 0 and statuses.count(200) >= 3
    for _ in range(3):                                                 # then serves normally
        assert post(strict, "/v1/embeddings", json={"input": text}).status_code == 200


# ----------------------------------------------------------------- timeouts and signals
def test_queue_timeout_503_and_a_sigkilled_server_restarts_on_its_port(model_dir, tmp_path,
                                                                       offline):
    log = tmp_path / "server.log"
    s = Server(model_dir, log, "--queue-timeout", "0.1", "--max-batch-tokens", "400")
    try:
        big = [" ".join(["word"] * 400)] * 8         # 8 forwards of 400 LSTM steps, >> 0.1 s
        box = {}
        t = threading.Thread(target=lambda: box.update(r=embeddings(s.url, big)))
        t.start()
        deadline = time.monotonic() + 30
        while (metric(httpx.get(s.url + "/metrics").text, "elmo_batch_size_count") < 2
               and time.monotonic() < deadline):                       # the big one is running
            time.sleep(0.01)
        r = embeddings(s.url, ["behind the big one"])
        t.join(60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "--queue-timeout" in error_of(r)
        assert box["r"].status_code == 200
        assert embeddings(s.url, ["after it"]).status_code == 200
        os.kill(s.proc.pid, signal.SIGKILL)
        assert s.proc.wait(30) == -signal.SIGKILL
        s = Server(model_dir, log, port=s.port)                        # the same port again
        r = embeddings(s.url, [TEXTS[0]])
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], offline[0].encode([TEXTS[0]])[0],
                                   atol=1e-6, rtol=0)
    finally:
        assert s.stop() == 0


def test_sigterm_drains_under_load_and_exits_0(model_dir, tmp_path):
    s = Server(model_dir, tmp_path / "server.log", "--max-batch-tokens", "8",
               "--drain-timeout", "60")
    request = ["a b c d e f"] * 20                                     # 20 forwards each
    log, stop_at = [], time.monotonic() + 60

    def client(k):
        with httpx.Client(base_url=s.url, timeout=60) as c:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/embeddings", json={"input": request})
                except httpx.TransportError as e:                       # the listener closed
                    log.append((t0, time.monotonic(), type(e).__name__))
                    return
                log.append((t0, time.monotonic(), r.status_code))
                if r.status_code != 200:
                    return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not log and time.monotonic() < deadline:                      # load is on
        time.sleep(0.05)
    t_sig = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)
    time.sleep(0.05)                                                     # the signal is handled
    health, refused = [], []
    while s.proc.poll() is None and time.monotonic() < t_sig + 60:
        try:
            health.append(httpx.get(s.url + "/health", timeout=5).status_code)
            refused.append(embeddings(s.url, ["new"]).status_code)
        except httpx.TransportError:
            break
        time.sleep(0.02)
    for t in threads:
        t.join(90)
    assert s.proc.wait(60) == 0, s.log()[-3000:]
    assert 503 in health and 200 not in health, health
    assert refused and set(refused) == {503}, refused
    in_flight_at_signal = [x for x in log if x[0] < t_sig < x[1]]
    assert in_flight_at_signal and all(x[2] in (200, 503) for x in in_flight_at_signal), log
    assert any(x[2] == 200 for x in in_flight_at_signal), "no admitted request was answered"
    assert all(x[2] in (200, 503) for x in log if x[0] < t_sig), log
    assert all(x[2] != 500 for x in log)
    assert "drained: every admitted request was answered" in s.log()


# ------------------------------------------------------------------- in process, no port
def test_cli_errors_are_one_line_before_anything_loads(model_dir, tmp_path, capsys):
    from torch_elmo import cli
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    base = ["serve", "--model", str(model_dir), "--port", "0"]
    try:
        for argv, says in [
                (["serve", "--model", str(tmp_path / "missing")], str(tmp_path / "missing")),
                (base + ["--max-batch-tokens", "0"], "--max-batch-tokens must be >= 1"),
                (base + ["--queue-timeout", "-1"], "--queue-timeout must be >= 0"),
                (base + ["--task", "ner"], "--task 'ner': expected NAME=DIR"),
                (base + ["--task", f"ner={tmp_path}"], str(tmp_path)),
                (["serve", "--model", str(model_dir), "--port", port], f"127.0.0.1:{port}")]:
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("elmo serve: error: ") and says in err[0], err
    finally:
        taken.close()


def test_create_app_health_waits_for_the_warmup_and_bfloat16_runs(model_dir, offline):
    from fastapi.testclient import TestClient

    from torch_elmo.serve import create_app
    app = create_app(str(model_dir), dtype="bfloat16", model_name="tiny-bf16")
    r = TestClient(app).get("/health")                      # no lifespan: no worker started
    assert r.status_code == 503 and r.json()["status"] == "loading"
    with TestClient(app) as client:                         # lifespan: workers + warm-up
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.post("/v1/embeddings", json={"input": TEXTS[0]})
    assert r.status_code == 200 and r.json()["model"] == "tiny-bf16"
    got, want = np.array(r.json()["data"][0]["embedding"]), offline[0].encode([TEXTS[0]])[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()        # bf16 rounding only
    assert np.abs(got - want).max() > 1e-6                               # and it is bf16
