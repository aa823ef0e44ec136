"""Is automatic bf16 ever slower than fp32?  precision.py's timed check against real training steps.

    .venv/bin/python benchmarks/precision.py [--presets small original] [--rounds 5] [--threads 2]

For each preset, with the fast recipe (AdamW, dense softmax gradient, 4,096 negatives) on random
weights and synthetic text (speed.py's Corpus, V = 100,000), at a batch that keeps a step to
seconds (small 64 x 20, original 16 x 10; the check is timed at the same shapes):

  check     precision.measure: the token encoder's forward + backward (the part of a step that
            bf16 autocast changes), fp32 vs bf16 (what `elmo train` times once per machine and
            shapes; run afresh here, not from the cache), and the decision precision.choose
            would take from it
  training  whole training steps (forward, backward, clip, AdamW) in fp32 and under bf16
            autocast, alternating, best (and median) of --rounds each: an original step at
            16 x 10 varied 1.9-3.7 s from round to round even at load 1.6

Printed per preset: the check's bf16 / fp32 speed, the real steps' bf16 / fp32 speed, and
whether the decision was right (bf16 chosen only where the steps are faster too). Inference
bf16 / fp32 is in speed.py's output.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from speed import Corpus, _cpu_name, _loadavg  # noqa: E402
from torch_elmo import batch_to_ids, precision, preset  # noqa: E402
from torch_elmo.config import with_recipe  # noqa: E402
from torch_elmo.lm import LanguageModel, LogUniformSampler  # noqa: E402
from torch_elmo.train import clip_by_global_norm, recipe_optimizer  # noqa: E402

SHAPES = {"small": (64, 20), "original": (16, 10)}
V = 100_000


def bench(name: str, corpus: Corpus, rounds: int) -> dict:
    B, T = SHAPES.get(name, (32, 10))
    o = with_recipe(preset(name), "fast").replace(batch_size=B, unroll_steps=T)
    S = o.n_negative_samples_batch
    check = precision.measure(o)
    chooses_bf16 = check["speedup"] >= precision.MARGIN
    torch.manual_seed(0)
    lm = LanguageModel(o, V, sparse_softmax=False).train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = recipe_optimizer(params, o)
    sampler = LogUniformSampler(V, seed=0)
    C = o.char_cnn.max_characters_per_token

    def chars():
        w = [corpus.words[i] for i in corpus.ids(B * T)]
        return batch_to_ids([w[r * T:(r + 1) * T] for r in range(B)], C)
    batch = {"fwd_chars": chars(), "bwd_chars": chars(), "n_tokens": B * T,
             "fwd_targets": torch.tensor(corpus.ids(B * T)).reshape(B, T),
             "bwd_targets": torch.tensor(corpus.ids(B * T)).reshape(B, T)}
    state = lm.bilm.zero_state(B)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = lm.training_loss(batch, state, sampler, S)
        opt.zero_grad(set_to_none=True)
        (loss * T).backward()
        clip_by_global_norm(params, o.all_clip_norm_val)
        opt.step()
    times = {False: [], True: []}
    for bf16 in (False, True):                   # warm-up
        step(bf16)
    for _ in range(rounds):
        for bf16 in (False, True):
            t = time.perf_counter()
            step(bf16)
            times[bf16].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    real = best[False] / best[True]
    median = statistics.median(times[False]) / statistics.median(times[True])
    # right: bf16 chosen and the steps are not slower, or fp32 chosen and bf16 would not pay
    right = (real >= 1.0) if chooses_bf16 else (real < precision.MARGIN)
    print(f"  {name:9s} B x T = {B} x {T}: check bf16 x{check['speedup']:.2f} of fp32 "
          f"({check['fp32_ms']:.0f} vs {check['bf16_ms']:.0f} ms) -> "
          f"{'bf16' if chooses_bf16 else 'fp32'}; real steps: fp32 {B * T / best[False]:,.0f} "
          f"tok/s, bf16 {B * T / best[True]:,.0f} tok/s, bf16 x{real:.2f} "
          f"(medians: x{median:.2f}); "
          f"decision {'right' if right else 'WRONG'}; seconds fp32 "
          f"{[round(t, 2) for t in times[False]]}, bf16 {[round(t, 2) for t in times[True]]}",
          flush=True)
    return {"check": check, "real": real, "median": median, "right": right}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small", "original"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu {_cpu_name()}, "
          f"native bf16 {precision.bf16_native(torch.device('cpu'))}, load average at start "
          f"{_loadavg()}")
    corpus = Corpus(V)
    for name in args.presets:
        bench(name, corpus, args.rounds)
    print(f"total {time.time() - t0:.0f} s, load average at end {_loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
