"""Training recipes side by side: bilm-tf's and `--recipe fast`, same shape, same data, same machine,
same wall-clock budget, in ONE run.

    .venv/bin/python benchmarks/recipes.py --minutes 30          # WikiText-2, the `wt2` preset

Both runs start together, one thread each (a 2-core machine gives each recipe one core, so load
drift hits both alike), with `elmo train --preset wt2 --max-time`, held-out perplexity on the first
--eval-batches batches of valid.txt every --eval-every updates. Then, for each recipe: the full
valid.txt perplexity (full softmax, bilm-tf run_test), the curve of held-out perplexity against
seconds (a PNG and a table), and the time the fast recipe needed to reach the bilm-tf recipe's
final held-out perplexity. `--speed` adds training tokens/s of bf16 against fp32 autocast for this
shape (alternating timed bursts in this process, 2 threads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = ("bilm-tf", "fast")


def run_recipes(args, work: Path, vocab: Path) -> dict[str, subprocess.Popen]:
    data = Path(args.data)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    procs = {}
    for recipe in RECIPES:
        run = work / recipe
        cmd = [sys.executable, "-m", "torch_elmo", "train", "--train", str(data / "train.txt"),
               "--vocab", str(vocab), "--save-dir", str(run), "--preset", "wt2",
               "--recipe", recipe, "--max-time", str(args.minutes * 60), "--epochs", "100",
               "--heldout", str(data / "valid.txt"), "--eval-every", str(args.eval_every),
               "--heldout-max-batches", str(args.eval_batches), "--log-every", "200",
               "--seed", str(args.seed), "--no-progress"]
        if (run / "checkpoint.pt").exists():
            cmd.append("--resume")
        log = open(work / f"{recipe}.log", "w")
        procs[recipe] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return procs


def curve(run: Path) -> list[tuple[float, float, int]]:
    """(elapsed seconds, held-out average perplexity, tokens) of every evaluation."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("heldout_ppl_avg") is not None:
            out.append((m["elapsed"], m["heldout_ppl_avg"], m["tokens"]))
    return out


def time_to_reach(points: list[tuple[float, float, int]], target: float):
    """First time the curve is at or below `target`, interpolated between evaluations."""
    prev = None
    for t, p, _ in points:
        if p <= target:
            if prev is None or prev[1] == p:
                return t
            (t0, p0) = prev
            return t0 + (t - t0) * (p0 - target) / (p0 - p)
        prev = (t, p)
    return None


def full_perplexity(run: Path, valid: Path, vocab) -> dict:
    import torch
    from torch_elmo.checkpoint import load_language_model
    from torch_elmo.data import LMBatchStream
    from torch_elmo.evaluate import perplexity
    torch.set_num_threads(2)
    lm, _ = load_language_model(str(run))
    stream = LMBatchStream(str(valid), vocab, 256, 1, shuffle=False, loop=False)
    return perplexity(lm, stream)


def plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for recipe, pts in curves.items():
        if pts:
            ax.plot([t / 60 for t, _, _ in pts], [p for _, p, _ in pts], "o-", label=recipe)
    ax.set_xlabel("minutes of training (one core each)")
    ax.set_ylabel("held-out perplexity (full softmax)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("WikiText-2, wt2 shape: bilm-tf recipe vs --recipe fast")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def bf16_speed(vocab, train_file: Path, bursts: int = 3, steps: int = 8) -> dict:
    """Training tokens/s of one wt2 step in fp32 and bf16 autocast, alternating bursts."""
    import torch
    from torch_elmo.config import preset
    from torch_elmo.data import LMBatchStream
    from torch_elmo.lm import LanguageModel, LogUniformSampler
    from torch_elmo.train import batch_to, clip_by_global_norm, make_optimizer
    torch.set_num_threads(2)
    o = preset("wt2")
    lm = LanguageModel(o, len(vocab))
    opt = make_optimizer(list(lm.parameters()), o.learning_rate)
    sampler = LogUniformSampler(len(vocab))
    stream = LMBatchStream(str(train_file), vocab, o.batch_size, o.unroll_steps, seed=0)
    state = lm.zero_state(o.batch_size)
    rates = {"fp32": [], "bf16": []}

    def step(bf16: bool):
        nonlocal state
        batch = batch_to(stream.next_batch(), torch.device("cpu"))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss, _, new = lm.training_loss(batch, state, sampler, o.n_negative_samples_batch)
        state = (new[0].detach(), new[1].detach())
        opt.zero_grad()
        (loss * o.unroll_steps).backward()
        clip_by_global_norm(list(lm.parameters()), o.all_clip_norm_val)
        opt.step()
        return int(batch["n_tokens"])

    for name in ("fp32", "bf16"):
        step(name == "bf16")                                 # warm-up
    for _ in range(bursts):
        for name in ("fp32", "bf16"):
            t0, n = time.perf_counter(), 0
            for _ in range(steps):
                n += step(name == "bf16")
            rates[name].append(n / (time.perf_counter() - t0))
    return {k: sorted(v)[len(v) // 2] for k, v in rates.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per recipe")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "recipes"))
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=60, help="held-out batches of 256 per eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", action="store_true", help="also bf16 vs fp32 training tokens/s")
    args = p.parse_args(argv)
    from torch_elmo.vocab import Vocabulary, build_vocabulary, count_words
    data, work = Path(args.data), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    vocab_file = work / "vocab.txt"
    if not vocab_file.exists():
        # WikiText-2 writes its rare words as "<unk>": they train <UNK> (elmo vocab --unk-word)
        build_vocabulary(count_words(str(data / "train.txt")), unk_words=["<unk>"]).write(vocab_file)
    vocab = Vocabulary.read(vocab_file)
    t0 = time.time()
    procs = run_recipes(args, work, vocab_file)
    for recipe, proc in procs.items():
        if proc.wait() != 0:
            print(f"{recipe}: training failed, see {work / (recipe + '.log')}", file=sys.stderr)
            return 1
    print(f"both recipes trained in {(time.time() - t0) / 60:.1f} min (one core each)")
    curves = {r: curve(work / r) for r in RECIPES}
    finals = {r: full_perplexity(work / r, data / "valid.txt", vocab) for r in RECIPES}
    plot(curves, work / "recipes.png")
    print("\n| recipe | updates | tokens | held-out ppl (subset) by minute | valid.txt ppl (full) |")
    print("|---|---:|---:|---|---:|")
    for r in RECIPES:
        last = json.loads((work / r / "metrics.jsonl").read_text().splitlines()[-1])
        trail = ", ".join(f"{t / 60:.0f}: {p:.0f}" for t, p, _ in curves[r])
        print(f"| {r} | {last['step']:,} | {last['tokens']:,} | {trail} | "
              f"{finals[r]['average']:.1f} |")
    target = curves["bilm-tf"][-1][1]
    reach = time_to_reach(curves["fast"], target)
    print(f"\nbilm-tf's final held-out perplexity (subset) {target:.1f} after "
          f"{curves['bilm-tf'][-1][0] / 60:.1f} min; fast reached it after "
          + (f"{reach / 60:.1f} min ({curves['bilm-tf'][-1][0] / reach:.1f}x less time)"
             if reach else "never within the budget"))
    print(f"plot: {work / 'recipes.png'}")
    if args.speed:
        s = bf16_speed(vocab, data / "train.txt")
        print(f"training tokens/s, wt2 shape, 2 threads: fp32 {s['fp32']:,.0f}, bf16 "
              f"{s['bf16']:,.0f} (x{s['bf16'] / s['fp32']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
