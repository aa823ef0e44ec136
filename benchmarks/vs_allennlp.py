"""Inference speed against allennlp 2.10.1, side by side in one run: ratios, not absolute times.

    bash ../shared/tools/allennlp-venv/setup.sh /tmp/allennlp-venv       # once, ~2 min
    .venv/bin/python benchmarks/vs_allennlp.py [--allennlp-python /tmp/allennlp-venv/bin/python]
        [--presets original small] [--sentences 256] [--rounds 4] [--batch-size 64] [--threads 2]

For each preset: a random-weight biLM (seed 0) is exported (options.json + weights.hdf5) and
loaded by both sides, so both compute the same model. The sentences are the first N of
CoNLL-2003's eng.testa (real text, ../shared/data), sorted by length and cut into batches of
--batch-size (allennlp's best case; ours sorts inside anyway). Each side runs in its own process
(ours in this venv, allennlp's `_ElmoBiLm` in the side venv), both with the same threads and
OMP_WAIT_POLICY; the parent asks them for rounds in turn (ours, allennlp, allennlp, ours, ...),
so a change of the machine's load hits both alike. A round embeds every batch from the zero
state (allennlp's carried LSTM state is reset before each batch). Printed: words/s of each side
per round, the ratio per pair of rounds, and the median and range of the ratios; the top layers
of the two sides are compared once (max |d|: the same model, so ~1e-6 in fp32).
allennlp is used from here only: never in tests, CI or the package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ELMO_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
CONLL = os.path.join(SHARED, "data", "conll2003", "eng.testa")


def read_sentences(path: str, n: int) -> list[list[str]]:
    """The first n sentences of a CoNLL-2003 file (one token per line, blank line between
    sentences, -DOCSTART- lines skipped)."""
    out, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if not parts:
                if cur:
                    out.append(cur)
                    cur = []
                    if len(out) == n:
                        break
            elif parts[0] != "-DOCSTART-":
                cur.append(parts[0])
    if cur and len(out) < n:
        out.append(cur)
    return out


def batches_of(sentences: list[list[str]], size: int) -> list[list[list[str]]]:
    s = sorted(sentences, key=len, reverse=True)
    return [s[i:i + size] for i in range(0, len(s), size)]


# ============================================================================ the workers
def worker(side: str, model_dir: str, sentences_file: str, batch_size: int) -> None:
    """Load the model, then answer each "run" line on stdin with one round's JSON; "top" with the
    top layer of the first batch (a list, for the equality check)."""
    import torch
    with open(sentences_file) as f:
        batches = batches_of(json.load(f), batch_size)
    opt, wts = os.path.join(model_dir, "options.json"), os.path.join(model_dir, "weights.hdf5")
    if side == "ours":
        sys.path.insert(0, ROOT)
        from torch_elmo import batch_to_ids
        from torch_elmo.export import load_bilm
        model = load_bilm(opt, wts).eval()

        def run(batch):
            return model(batch_to_ids(batch, add_boundaries=True))["layers"][-1][:, 1:-1]
    else:
        import warnings
        warnings.filterwarnings("ignore")
        from allennlp.modules.elmo import _ElmoBiLm, batch_to_ids
        model = _ElmoBiLm(opt, wts).eval()

        def run(batch):
            model._elmo_lstm.reset_states()
            out = model(batch_to_ids(batch))
            return out["activations"][-1][:, 1:-1]
    words = sum(len(s) for b in batches for s in b)
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        with torch.no_grad():
            if cmd == "top":
                print(json.dumps(run(batches[0]).tolist()), flush=True)
                continue
            t = time.perf_counter()
            for b in batches:
                run(b)
            seconds = time.perf_counter() - t
        print(json.dumps({"seconds": seconds, "words": words}), flush=True)


class Side:
    def __init__(self, name: str, python: str, args: list[str], env: dict):
        self.name = name
        self.p = subprocess.Popen([python, os.path.abspath(__file__), "--worker", name, *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)
        self.info = self.read()

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker exited ({self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd: str):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def compare(preset_name: str, args, sentences_file: str, env: dict) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from torch_elmo import BiLM, export_model, preset
    torch.manual_seed(0)
    model_dir = tempfile.mkdtemp(prefix=f"vs_allennlp_{preset_name}_")
    export_model(BiLM(preset(preset_name)).eval(), model_dir)
    wargs = [model_dir, sentences_file, str(args.batch_size)]
    ours = Side("ours", sys.executable, wargs, env)
    theirs = Side("allennlp", args.allennlp_python, wargs, env)
    try:
        a, b = torch.tensor(ours.ask("top")), torch.tensor(theirs.ask("top"))
        max_diff = float((a - b).abs().max())
        ours.ask("run")                    # warm-up round each (prepacking, allocator)
        theirs.ask("run")
        rows = []
        for r in range(args.rounds):
            order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
            res = {s.name: s.ask("run") for s in order}
            rows.append({k: v["words"] / v["seconds"] for k, v in res.items()})
            ours_w, theirs_w = rows[-1]["ours"], rows[-1]["allennlp"]
            print(f"  {preset_name} round {r + 1}: ours {ours_w:,.0f} words/s, allennlp "
                  f"{theirs_w:,.0f} words/s, x{ours_w / theirs_w:.2f}", flush=True)
    finally:
        ours.close()
        theirs.close()
    ratios = [r["ours"] / r["allennlp"] for r in rows]
    return {"preset": preset_name, "max_abs_diff_top_layer": max_diff, "rounds": rows,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--allennlp-python", default="/tmp/allennlp-venv/bin/python")
    ap.add_argument("--presets", nargs="+", default=["original", "small"])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rest[0], args.rest[1], int(args.rest[2]))
        return 0
    if not os.path.exists(args.allennlp_python):
        print(f"{args.allennlp_python} not found: build the side venv with "
              f"`bash ../shared/tools/allennlp-venv/setup.sh /tmp/allennlp-venv`", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from speed import _cpu_name, _loadavg as loadavg      # (our venv only: not in the workers)
    sentences = read_sentences(CONLL, args.sentences)
    fd, sentences_file = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(sentences, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    t0 = time.time()
    print(f"{len(sentences)} sentences of {CONLL} ({sum(map(len, sentences)):,} words), batches "
          f"of {args.batch_size} sorted by length, {args.threads} threads, OMP_WAIT_POLICY="
          f"{env['OMP_WAIT_POLICY']}, cpu {_cpu_name()}, load average at start {loadavg()}",
          flush=True)
    results = [compare(p, args, sentences_file, env) for p in args.presets]
    os.unlink(sentences_file)
    print("\n== ours / allennlp 2.10.1, inference words/s (same weights, same sentences)")
    for r in results:
        print(f"  {r['preset']:9s} x{r['ratio_median']:.2f} median (x{r['ratio_min']:.2f}-"
              f"x{r['ratio_max']:.2f} over {len(r['rounds'])} rounds); top layers max |d| "
              f"{r['max_abs_diff_top_layer']:.1e}")
    print(f"total {time.time() - t0:.0f} s, load average at end {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
