"""`elmo serve` under closed-loop load on loopback: requests/s, tokens/s, p50/p95/p99 latency
and the server's mean batch size at concurrency 1, 8, 32, 128, against (a) the offline
throughput of `encode` over the same sentences in one process (the ceiling; measured before and
after the servers ran, their mean used) and (b) the same server with batching off
(--max-batch-tokens of the largest request, --max-wait-ms 0), in ONE run; then the issue's
targets as ratios.

    .venv/bin/python benchmarks/serve.py [--model DIR] [--requests 160] [--time-limit 20]

Without --model a random-weight `small` preset model (2x1024 LSTM, 128 projection) is exported
to a temp dir. Requests are 1-3 real sentences of the Gutenberg books in ../shared (a fixed
seed), each sentence one text of an OpenAI-style `input` list. Each level runs
max(--requests, 4 x concurrency) requests or --time-limit seconds, whichever ends first, after a
few warm-up requests; a closed loop: each of the c clients (asyncio + httpx, one process) sends
its next request when its answer came. "bare forward" is encode() of one request's sentences in
this process (the server's work for a lone request, without HTTP). OMP_WAIT_POLICY=PASSIVE (set
here, inherited by the server): the load generator shares the cores with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BOOKS = ("austen-emma.txt", "chesterton-brown.txt", "melville-moby_dick.txt")
TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def gutenberg_sentences(folder: Path, n: int, seed: int) -> list[str]:
    """n sentences of 4-40 tokens (punctuation split off, as 1B-Word text is), sampled."""
    out = []
    for book in BOOKS:
        text = " ".join((folder / book).read_text(encoding="utf-8").split()[5:])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text):
            tokens = TOKEN.findall(s)
            if 4 <= len(tokens) <= 40:
                out.append(" ".join(tokens))
    random.Random(seed).shuffle(out)
    return out[:n]


def make_requests(sentences: list[str], n: int, rng: random.Random) -> list[list[str]]:
    return [[rng.choice(sentences) for _ in range(rng.randint(1, 3))] for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, flags: list[str], log) -> subprocess.Popen:
    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "torch_elmo", "serve", "--model", model,
                             "--port", str(port), "--log-level", "warning", *flags],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up (exit {proc.poll()}); see {log.name}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime


def batch_sizes(url: str) -> tuple[float, float]:
    """(sum, count) of elmo_batch_size in /metrics."""
    import httpx
    total = {"elmo_batch_size_sum": 0.0, "elmo_batch_size_count": 0.0}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name = line.split("{", 1)[0]
        if name in total:
            total[name] += float(line.rsplit(" ", 1)[1])
    return total["elmo_batch_size_sum"], total["elmo_batch_size_count"]


async def closed_loop(url: str, requests: list[list[str]], concurrency: int,
                      time_limit: float) -> dict:
    import httpx
    latencies, tokens, failures, queue = [], 0, {}, list(reversed(requests))
    stop_at = time.monotonic() + time_limit

    async def client(c: httpx.AsyncClient):
        nonlocal tokens
        while queue and time.monotonic() < stop_at:
            texts = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/embeddings", json={"input": texts})
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            if status == 200:
                latencies.append(time.perf_counter() - t0)
                tokens += sum(len(t.split()) for t in texts)
            else:
                failures[status] = failures.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "rps": len(latencies) / wall, "tps": tokens / wall,
            "p50": q[49], "p95": q[94], "p99": q[98], "failures": failures}


def run_levels(url: str, levels: list[int], requests: list[list[str]], args,
               server_pid: int) -> dict:
    """Each level's closed loop; besides the HTTP figures, the CPU seconds the server process
    and this load generator spent (they share the cores: the client's share is CPU the
    offline ceiling has and the server has not)."""
    out = {}
    asyncio.run(closed_loop(url, requests[:8], 4, 30))                  # connections, caches
    for c in levels:
        n = max(args.requests, 4 * c)
        s0, n0 = batch_sizes(url)
        srv0, cli0 = cpu_seconds(server_pid), time.process_time()
        res = asyncio.run(closed_loop(url, requests[:n], c, args.time_limit))
        srv1, cli1 = cpu_seconds(server_pid), time.process_time()
        s1, n1 = batch_sizes(url)
        res["batch"] = (s1 - s0) / max(n1 - n0, 1)
        res["server_cpu"], res["client_cpu"] = srv1 - srv0, cli1 - cli0
        out[c] = res
        print(f"  c={c:<4d} {res['requests']:5d} req  {res['rps']:8.1f} req/s  "
              f"{res['tps']:9.0f} tok/s  p50 {1e3 * res['p50']:7.1f}  p95 {1e3 * res['p95']:7.1f}  "
              f"p99 {1e3 * res['p99']:7.1f} ms  mean batch {res['batch']:5.2f} texts  "
              f"failed {sum(res['failures'].values())} {res['failures'] or ''}  "
              f"CPU s: server {res['server_cpu']:.1f}, client {res['client_cpu']:.1f}",
              flush=True)
    return out


def offline_ceiling(elmo, pool: list[str], requests: list[list[str]]
                    ) -> tuple[float, float, float]:
    """(tokens/s of encode over `pool`, median seconds of encode of one request's sentences,
    tokens per CPU second of that encode)."""
    t0, c0 = time.perf_counter(), time.process_time()
    elmo.encode(pool, batch_size=32)
    n_tokens = sum(len(t.split()) for t in pool)
    offline = n_tokens / (time.perf_counter() - t0)
    per_cpu = n_tokens / (time.process_time() - c0)
    bare = []
    for texts in requests:                          # one forward per request, as served
        t0 = time.perf_counter()
        elmo.encode(texts, batch_size=32)
        bare.append(time.perf_counter() - t0)
    print(f"offline encode: {offline:.0f} tok/s over {len(pool)} sentences; bare forward of one "
          f"request p50 {1e3 * statistics.median(bare):.1f} ms; {per_cpu:.0f} tokens per CPU "
          f"second", flush=True)
    return offline, statistics.median(bare), per_cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model dir (default: random `small` preset)")
    p.add_argument("--requests", type=int, default=160, help="requests per level (at least 4 x c)")
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds per level at most")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gutenberg-nltk"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-flags", default="",
                   help="more `elmo serve` flags for both servers, e.g. '--threads 1'")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # server and clients share the cores
    import torch

    import torch_elmo
    rng = random.Random(args.seed)
    sentences = gutenberg_sentences(Path(args.data), 4000, args.seed)
    requests = make_requests(sentences, max(args.requests, 4 * max(levels)) + 8, rng)
    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            model = os.path.join(d, "small")
            torch_elmo.export_model(torch_elmo.BiLM(torch_elmo.preset("small")).eval(), model)
        elmo = torch_elmo.load(model)
        print(f"model {args.model or 'random small preset'}; {torch.get_num_threads()} torch "
              f"threads; {os.cpu_count()} cores", flush=True)

        # (a) the ceiling: encode() of the same sentences in this process, batch_size 32,
        # measured before and after the servers ran (a shared machine drifts); their mean counts
        pool = [t for r in requests[:max(args.requests, 4 * 32)] for t in r]
        elmo.encode(pool[:64])
        before = offline_ceiling(elmo, pool, requests[:60])
        off_tokens = max(len(r) * max(len(t.split()) for t in r) for r in requests)
        results = {}
        for name, flags in (("batching on", []),
                            (f"batching off (--max-batch-tokens {off_tokens} --max-wait-ms 0)",
                             ["--max-batch-tokens", str(off_tokens), "--max-wait-ms", "0"])):
            port = free_port()
            with open(os.path.join(d, "server.log"), "ab") as log:
                proc = start_server(model, port, flags + args.server_flags.split(), log)
                print(f"server, {name}:", flush=True)
                try:
                    results[name] = run_levels(f"http://127.0.0.1:{port}", levels, requests, args,
                                               proc.pid)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
        after = offline_ceiling(elmo, pool, requests[:60])
        offline, bare_p50 = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        offline_per_cpu = (before[2] + after[2]) / 2
        on, off = results.values()
        if 32 in levels:
            print(f"c=32 tokens/s: {on[32]['tps'] / offline:.2f} x offline (target >= 0.80), "
                  f"{on[32]['tps'] / off[32]['tps']:.2f} x batching off (target >= 3)")
            r = on[32]
            wall = r["requests"] / r["rps"]
            print(f"c=32 per CPU second: the server {r['tps'] * wall / r['server_cpu']:.0f} "
                  f"tokens ({r['tps'] * wall / r['server_cpu'] / offline_per_cpu:.2f} x offline's "
                  f"{offline_per_cpu:.0f}); the load generator used {r['client_cpu']:.1f} of the "
                  f"{os.cpu_count() * wall:.1f} CPU seconds of the level "
                  f"({r['client_cpu'] / wall:.2f} cores)")
        if 1 in levels:
            print(f"c=1 p50 {1e3 * on[1]['p50']:.1f} ms vs 1.2 x bare forward + 2 ms = "
                  f"{1e3 * (1.2 * bare_p50 + 0.002):.1f} ms "
                  f"({'met' if on[1]['p50'] <= 1.2 * bare_p50 + 0.002 else 'NOT met'})")
        lost = sum(sum(r["failures"].values()) for r in on.values())
        print(f"failed or lost requests below the admission limit (batching on): {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
