"""What the downstream tasks share: reading their data files, one-line format errors,
subsampling, and the frozen biLM's layers for a list of sentences.

ELMo vectors are computed with a deterministic initial LSTM state (embed.py's "warm" state by
default: the biLM's state after reading a fixed warm-up text, the same for every sentence), so a
sentence's features do not depend on which batch it lands in or what ran before. A carry-state
embedder is reset to zero before every batch for the same reason.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..config import ElmoError
from ..embed import ElmoEmbedder, length_sorted_batches
from ..textio import read_lines


def read_data_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a task data file. Strict UTF-8: examples are addressed by line number in
    the error messages, and a bad byte in labelled data is a user error, not noise."""
    return read_lines(path, errors="strict", not_found="no such file")


def bad_line(path, lineno: int, what: str, line: str) -> ElmoError:
    """`path:lineno: <what>, got '<the line, shortened>'`."""
    shown = line if len(line) <= 60 else line[:57] + "..."
    return ElmoError(f"{path}:{lineno}: {what}, got {shown!r}")


def subsample(items: list, n: Optional[int], seed: int = 0) -> list:
    """A random subset of n items (order kept), or all of them."""
    if n is None or n >= len(items):
        return items
    if n <= 0:
        raise ElmoError(f"subsample size must be positive, got {n}")
    rng = np.random.RandomState(seed)
    keep = np.sort(rng.choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def embed_layers(embedder: ElmoEmbedder, sentences: Sequence[Sequence[str]], batch_size: int = 64,
                 dtype=np.float32, progress: Optional[str] = None) -> list[np.ndarray]:
    """(3, n, 2P) layers per sentence, batch-independent (the embedder's warm/zero state, or a
    carry-state embedder reset to zero before every batch). Sentences are batched in length
    order (`length_sorted_batches`); results come back in input order. `progress`: a tqdm
    label (shown on a terminal only)."""
    out: list = [None] * len(sentences)
    with tqdm(total=len(sentences), desc=progress, unit="sent", leave=False,
              disable=not progress or not sys.stderr.isatty()) as bar:
        for idx in length_sorted_batches([len(s) for s in sentences], batch_size):
            if embedder.state == "carry":
                embedder.states.reset()  # deterministic: every batch starts from the zero state
            vecs = embedder.embed_batch([list(sentences[i]) for i in idx])
            for i, v in zip(idx, vecs):
                out[i] = v.astype(dtype, copy=False)
            bar.update(len(idx))
    return out
