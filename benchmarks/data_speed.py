"""Batch stream speed: milliseconds per LMBatchStream batch (both directions, 128 x 20 x 50 chars).

    .venv/bin/python benchmarks/data_speed.py

Prints the median over 30 batches after a warm-up of 20 (the char cache and the first block warm),
and the ratio to one training step's budget: at 1,000 tokens/s a 128 x 20 batch has 2.56 s, so the
stream should stay far below 1% of it.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_elmo.data import LMBatchStream  # noqa: E402
from torch_elmo.vocab import Vocabulary  # noqa: E402


def main() -> int:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    lines = [" ".join(rng.choice(words, size=rng.integers(5, 50))) for _ in range(3000)]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.txt"
        p.write_text("\n".join(lines) + "\n")
        s = LMBatchStream(str(p), Vocabulary(["<S>", "</S>", "<UNK>", *words[:2000]]), 128, 20)
        for _ in range(20):
            s.next_batch()
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            s.next_batch()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"LMBatchStream 128 x 20, both directions: median {med * 1e3:.2f} ms per batch "
          f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f}); "
          f"{100 * med / 2.56:.3f}% of a 2.56 s step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
