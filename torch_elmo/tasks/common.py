"""What the downstream tasks share: reading their data files, one-line format errors,
subsampling, the frozen biLM's layers for a list of sentences, the word-level inputs of the
BiLSTM task models (training vocabulary, casing classes) and the label scores of the
classifiers (accuracy, macro-F1, per-class F1).

ELMo vectors are computed with a deterministic initial LSTM state (embed.py's "warm" state by
default: the biLM's state after reading a fixed warm-up text, the same for every sentence), so a
sentence's features do not depend on which batch it lands in or what ran before. A carry-state
embedder is reset to zero before every batch for the same reason.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np

from ..config import ElmoError
from ..embed import ElmoEmbedder, length_sorted_batches
from ..progress import progress_bar
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
    order (`length_sorted_batches`); results come back in input order. `progress`: the label
    of the progress (progress.py: a bar on a terminal, periodic lines off it); None: none."""
    out: list = [None] * len(sentences)
    with progress_bar(len(sentences), desc=progress, unit="sent",
                      enabled=False if not progress else None, leave=False) as bar:
        for idx in length_sorted_batches([len(s) for s in sentences], batch_size):
            if embedder.state == "carry":
                embedder.states.reset()  # deterministic: every batch starts from the zero state
            vecs = embedder.embed_batch([list(sentences[i]) for i in idx])
            for i, v in zip(idx, vecs):
                out[i] = v.astype(dtype, copy=False)
            bar.update(len(idx))
    return out


# ------------------------------------------------------------ word inputs of the BiLSTM models
def casing(word: str) -> int:
    """The word's casing class, 1..7 (0 is padding): all digits, some digit, all upper, initial
    upper, all lower, no letter or digit, other (mixed)."""
    if word.isdigit():
        return 1
    if any(c.isdigit() for c in word):
        return 2
    if word.isupper():
        return 3
    if word[:1].isupper():
        return 4
    if word.islower():
        return 5
    if not any(c.isalnum() for c in word):
        return 6
    return 7


N_CASING = 8


def norm_word(word: str) -> str:
    """The vocabulary's form of a word: lowercased, every digit 0."""
    return re.sub(r"\d", "0", word.lower())


class WordVocab:
    """Word ids from the training sentences: 0 = padding, 1 = unknown; `singletons`: the ids of
    words seen once (the models' word dropout turns them into <unk> so that <unk> is learned)."""

    def __init__(self, sentences: Iterable[Sequence[str]], min_count: int = 1):
        counts = Counter(norm_word(w) for s in sentences for w in s)
        self.words = ["<pad>", "<unk>"] + sorted(w for w, c in counts.items() if c >= min_count)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.singletons = {self.index[w] for w, c in counts.items() if c == 1 and w in self.index}

    @classmethod
    def from_words(cls, words: Sequence[str]) -> "WordVocab":
        """The vocabulary of a saved model (its `words` list, id = position)."""
        if list(words[:2]) != ["<pad>", "<unk>"]:
            raise ElmoError(f"a word vocabulary starts with <pad>, <unk>, got {list(words[:2])}")
        vocab = cls([])
        vocab.words = list(words)
        vocab.index = {w: i for i, w in enumerate(vocab.words)}
        return vocab

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, sentence: Sequence[str]) -> list[int]:
        return [self.index.get(norm_word(w), 1) for w in sentence]

    def inputs(self, sentences: Iterable[Sequence[str]]) -> tuple[list, list]:
        """The BiLSTM models' word inputs of token lists: (word ids, casing classes) each."""
        sentences = list(sentences)
        return [self.ids(s) for s in sentences], [[casing(w) for w in s] for s in sentences]


# ------------------------------------------------------------------------ classification scores
def classification_scores(y_true, y_pred, labels) -> dict:
    """accuracy, macro_f1, per_class_f1 (label -> F1) and sklearn's text report."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": dict(zip(labels, map(float, f1_score(y_true, y_pred, labels=labels,
                                                             average=None, zero_division=0)))),
        "report": classification_report(y_true, y_pred, labels=labels, digits=4, zero_division=0),
    }
