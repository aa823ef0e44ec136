"""Training throughput: 2 processes (torchrun, gloo on CPU) against 1 process, on WikiText-2.

    .venv/bin/python benchmarks/ddp_throughput.py [--seconds 45] [--config wt2] [--batch-size 32]

Runs `elmo train` three times for --seconds each, same model (benchmarks/train_wikitext2.py's
config, default `wt2`), same per-process batch:
  1. one process, 1 thread            (OMP_NUM_THREADS=1)
  2. one process, all threads         (OMP_NUM_THREADS = the number of cores)
  3. `elmo train --nproc 2`           (torchrun, 2 processes x 1 thread, gloo all-reduce)
and prints for each the training tokens per second (tokens / seconds spent in updates, from the
run's checkpoint: start-up, vocabulary and checkpoint writing excluded; for 2 processes both
ranks' tokens and rank 0's clock, which includes waiting in the all-reduce), and the ratios.
Run 3 processes twice the tokens per update (global batch = batch x 2). A benchmark, not a test:
on a shared machine the numbers move with the other load (report `uptime` beside them).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from torch_elmo.checkpoint import load_checkpoint  # noqa: E402
from train_wikitext2 import CONFIGS, build_vocab  # noqa: E402


def _run(label: str, cmd: list[str], threads: int, save_dir: Path, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    ckpt = load_checkpoint(str(save_dir))
    tok_s = ckpt["tokens"] / max(float(ckpt["step_time"]), 1e-9)
    return {"label": label, "steps": int(ckpt["step"]), "tokens": int(ckpt["tokens"]),
            "update_seconds": round(float(ckpt["step_time"]), 1), "tokens_per_s": round(tok_s, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=45.0, help="training time per run")
    p.add_argument("--config", choices=sorted(CONFIGS), default="wt2")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default: config's)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2" / "train.txt"))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ddp_bench_") as tmp:
        tmp = Path(tmp)
        vocab = str(tmp / "vocab.txt")
        build_vocab(args.data, vocab)
        options = dict(CONFIGS[args.config])
        if args.batch_size:
            options["batch_size"] = args.batch_size
        opts = tmp / "options.json"
        opts.write_text(json.dumps(options))
        n_tokens = sum(len(line.split()) for line in open(args.data, encoding="utf-8"))

        def train_args(save: Path) -> list[str]:
            return ["--train", args.data, "--vocab", vocab, "--save-dir", str(save),
                    "--options", str(opts), "--max-time", str(args.seconds), "--epochs", "100",
                    "--n-train-tokens", str(n_tokens), "--log-every", "1000000",
                    "--checkpoint-every", "1000000", "--no-progress", "--device", "cpu"]

        elmo = [sys.executable, "-m", "torch_elmo", "train"]
        limit = args.seconds + 300
        runs = [_run("1 process x 1 thread", elmo + train_args(tmp / "a"), 1, tmp / "a", limit),
                _run(f"1 process x {cores} threads", elmo + train_args(tmp / "b"), cores,
                     tmp / "b", limit),
                _run("2 processes x 1 thread (torchrun, gloo)",
                     elmo + ["--nproc", "2"] + train_args(tmp / "c"), 1, tmp / "c", limit)]
    print(f"config {args.config}, per-process batch {options['batch_size']} x unroll "
          f"{options['unroll_steps']}, {args.seconds:g} s per run, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for r in runs:
        print(f"  {r['label']:<40} {r['tokens_per_s']:>9,.0f} tokens/s  ({r['steps']} updates, "
              f"{r['tokens']:,} tokens in {r['update_seconds']} s of updates)")
    two = runs[2]["tokens_per_s"]
    print(f"2 processes / 1 process x 1 thread: {two / runs[0]['tokens_per_s']:.2f}x; "
          f"2 processes / 1 process x {cores} threads: {two / runs[1]['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
