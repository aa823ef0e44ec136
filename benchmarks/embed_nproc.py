"""`elmo embed` on several processes: lines/s of N one-thread processes (`--nproc N`, torchrun,
gloo) against one one-thread process, same model, same input, in ONE run; and the two outputs'
largest difference.

    .venv/bin/python benchmarks/embed_nproc.py [--preset wt2] [--lines 2000] [--nproc 2]

A random-weight model of --preset is exported first; the input is the first --lines non-empty
lines of --data (WikiText-2's train.txt: 36k lines). Times are wall clock of the whole command
(process start, torchrun, model load and the output's layout included), alternated one / N / one
/ N to cancel drift.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wt2")
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2" / "train.txt"))
    args = p.parse_args(argv)
    import h5py
    import numpy as np
    import torch

    from torch_elmo import BiLM, export_model, preset
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        export_model(BiLM(preset(args.preset)), d / "m")
        lines = [ln for ln in Path(args.data).read_text(encoding="utf-8").splitlines() if ln.strip()]
        (d / "in.txt").write_text("\n".join(lines[:args.lines]) + "\n", encoding="utf-8")
        n_words = sum(len(ln.split()) for ln in lines[:args.lines])
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
        base = [sys.executable, "-m", "torch_elmo", "embed", "--model", str(d / "m"), "--input",
                str(d / "in.txt"), "--no-progress", "--device", "cpu"]
        times = {1: [], args.nproc: []}
        for _ in range(args.rounds):
            for n in (1, args.nproc):
                extra = ["--nproc", str(n)] if n > 1 else []
                t0 = time.perf_counter()
                r = subprocess.run(base + ["--output", str(d / f"out{n}.hdf5"), *extra], env=env,
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    return 1
                times[n].append(time.perf_counter() - t0)
        with h5py.File(d / "out1.hdf5") as a, h5py.File(d / f"out{args.nproc}.hdf5") as b:
            diff = max(float(np.abs(a[k][...] - b[k][...]).max(initial=0.0))
                       for k in a if k != "sentence_to_index")
    one, many = min(times[1]), min(times[args.nproc])
    print(f"{args.lines} lines ({n_words:,} words), preset {args.preset}, one thread per process")
    print(f"1 process: {one:.1f} s ({n_words / one:,.0f} words/s); {args.nproc} processes: "
          f"{many:.1f} s ({n_words / many:,.0f} words/s); speed-up x{one / many:.2f}")
    print(f"largest difference between the outputs: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
