"""Does the kernel autotune pick what is fastest in the whole model?  (issue 21)

    .venv/bin/python benchmarks/kernel_choices.py [--presets original small] [--rounds 3]
        [--threads 2]

For each preset: autotune.measure (the <= 2 s micro-timings, run here afresh, not from the
cache) and its choices; then BiLM.forward in fp32 on one batch of 64 synthetic sentences
(speed.py's Corpus) with the defaults (kernels.DEFAULT), with each single field flipped to its
other candidate, and with the autotuned choices, in alternating rounds (best of --rounds per
variant). Printed: each variant's speed relative to the defaults (x1.10 = 10% faster), and
whether the autotune's pick agrees with the whole-model ranking. Every variant's output is
checked against the defaults' (fp32 candidates are exact to 1e-5).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from speed import Corpus, _cpu_name, _loadavg  # noqa: E402
from torch_elmo import BiLM, autotune, batch_to_ids, kernels, preset  # noqa: E402


def bench(name: str, corpus: Corpus, rounds: int) -> None:
    torch.manual_seed(0)
    model = BiLM(preset(name)).eval()
    cell = model.forward_layers[0]
    shape = kernels.shape_class(cell)
    tuned = autotune.measure(cell.input_weight.shape[1], cell.hidden_dim, cell.proj_dim)
    print(f"\n== {name} ({shape}): autotune took {tuned['seconds']:.2f} s, chose "
          f"{kernels.Choices(**tuned['choices']).describe()}")
    for field, t in tuned["timings_ms"].items():
        print(f"  micro {field}: " + ", ".join(f"{c} {ms:.2f} ms" for c, ms in t.items()))
    variants = {"defaults": kernels.DEFAULT}
    for field, values in kernels.CANDIDATES.items():
        for v in values[1:]:
            variants[f"{field}={v}"] = replace(kernels.DEFAULT, **{field: v})
    variants["autotuned"] = kernels.Choices(**tuned["choices"])
    ids = batch_to_ids(corpus.batch(64), add_boundaries=True)
    words = int((ids > 0).any(-1).sum()) - 2 * ids.shape[0]

    def run(ch):
        kernels.TUNED[shape] = ch
        with torch.no_grad():
            return model(ids)["layers"][-1]
    want = run(kernels.DEFAULT)
    for ch in variants.values():                      # warm-up: packs each variant's weights
        assert (run(ch) - want).abs().max() < 1e-5
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for k, ch in variants.items():
            t = time.perf_counter()
            run(ch)
            best[k] = min(best[k], time.perf_counter() - t)
    base = best["defaults"]
    print(f"  whole model, batch 64 ({words} words), best of {rounds} alternating rounds:")
    for k, s in best.items():
        print(f"    {k:22s} {words / s:8.0f} words/s  x{base / s:.2f} vs defaults")
    for field, values in kernels.CANDIDATES.items():
        flip = f"{field}={values[1]}"
        model_pick = values[1] if best[flip] < base else values[0]
        print(f"  {field}: autotune picked {tuned['choices'][field]}, the whole model favours "
              f"{model_pick} (x{base / best[flip]:.2f} for {values[1]})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["original", "small"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu {_cpu_name()}, "
          f"load average at start {_loadavg()}")
    corpus = Corpus()
    for name in args.presets:
        bench(name, corpus, args.rounds)
    print(f"\ntotal {time.time() - t0:.0f} s, load average at end {_loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
