"""What the saved task models' predictors share (ner.Tagger, classify.TextClassifier, both from
`torch_elmo.load_task`): new texts read as tokens with their character offsets, the frozen
biLM's layers for them, the chunks a call is processed in (with its progress bar), and the
attributes every predictor has (kind, labels, path, device).

A text is a string, split on whitespace as everywhere in the package (character offsets then
point into that string), or a list of tokens (offsets then point into `" ".join(tokens)`).

ELMo layers for new text are computed the way `elmo embed` computes them (embed.embedded_lines:
length-sorted batches, a text longer than embed.DEFAULT_MAX_TOKENS in overlapping windows joined
back) from the biLM's deterministic state, and rounded to the dtype the model's training used
(float16 for the BiLSTM models, whose training cached the layers as float16; float32 for the
pooled logreg / mlp features), so a reloaded model sees the features it was trained and scored
on. A call is processed in chunks of 32 batches (the ELMo layers of one chunk in memory at a
time), and the results come back in input order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from ..config import ElmoError
from ..embed import DEFAULT_MAX_TOKENS, embedded_lines

Text = Union[str, Sequence[str]]
CHUNK_BATCHES = 32
_TOKEN = re.compile(r"\S+")


@dataclass
class Texts:
    """Texts as token lists, with each token's (start, end) character offsets in `sources`
    (the input string, or the token list joined by single spaces)."""
    tokens: list[list[str]]
    spans: list[list[tuple[int, int]]]
    sources: list[str]
    single: bool                       # one string was given (not a list of texts)


def read_texts(texts: Union[Text, Sequence[Text]], who: str) -> Texts:
    """A string, or a list of strings and/or token lists -> Texts."""
    single = isinstance(texts, str)
    items = [texts] if single else texts
    if not isinstance(items, Sequence) and not hasattr(items, "__iter__"):
        raise ElmoError(f"{who}: texts must be a list of strings or token lists, "
                        f"got {type(texts).__name__}")
    out = Texts([], [], [], single)
    for i, t in enumerate(items):
        if isinstance(t, str):
            spans = [(m.start(), m.end()) for m in _TOKEN.finditer(t)]
            tokens = [t[a:b] for a, b in spans]
            source = t
        elif isinstance(t, Sequence) and all(isinstance(w, str) for w in t):
            tokens, spans, at = list(t), [], 0
            for w in tokens:
                spans.append((at, at + len(w)))
                at += len(w) + 1
            source = " ".join(tokens)
        else:
            raise ElmoError(f"{who}: text {i} must be a string or a list of str tokens, "
                            f"got {type(t).__name__}")
        out.tokens.append(tokens)
        out.spans.append(spans)
        out.sources.append(source)
    return out


def progress_chunks(n: int, batch_size: int, show_progress_bar: bool, desc: str
                    ) -> Iterator[list[int]]:
    """0..n-1 in consecutive chunks of CHUNK_BATCHES * batch_size; the bar (in texts) moves
    when a chunk is done."""
    if batch_size < 1:
        raise ElmoError(f"batch_size must be >= 1, got {batch_size}")
    size = batch_size * CHUNK_BATCHES
    with tqdm(total=n, disable=not show_progress_bar, unit="text", desc=desc) as bar:
        for start in range(0, n, size):
            idx = list(range(start, min(start + size, n)))
            yield idx
            bar.update(len(idx))


def elmo_layers(embedder, tokens: Sequence[Sequence[str]], batch_size: int, dtype
                ) -> list[np.ndarray]:
    """(3, n, 2P) layers per (non-empty) token list in `dtype`, in input order; windowed and
    batched like `elmo embed` (module doc)."""
    out: list = [None] * len(tokens)
    for i, emb in embedded_lines(embedder, tokens, batch_size, DEFAULT_MAX_TOKENS):
        out[i] = emb.astype(dtype, copy=False)
    return out


class TaskPredictor:
    """The attributes of every saved task model's predictor: `kind` ("ner" / "classify"),
    `labels` (in the order of the model's outputs), `path` (the directory it was loaded from),
    `device`, `meta` (its task.json) and `embedder` (the biLM, None without ELMo)."""

    kind = ""

    def __init__(self, path, meta: dict, labels: Sequence[str], device, embedder=None):
        self.path = str(path)
        self.meta = meta
        self.labels = list(labels)
        self.device = device
        self.embedder = embedder

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, model={self.meta.get('model')!r}, "
                f"features={self.meta.get('features')!r}, labels={self.labels!r}, "
                f"device={str(self.device)!r})")

    def check_texts(self, texts, batch_size: int, show_progress_bar: bool, who: str
                    ) -> tuple[Texts, Iterator[list[int]]]:
        """The texts read (read_texts) and the chunks to process them in."""
        t = read_texts(texts, f"{type(self).__name__}.{who}")
        return t, progress_chunks(len(t.tokens), batch_size, show_progress_bar,
                                  f"{self.kind} {who}")


def nonempty(tokens: Sequence[Sequence[str]], idx: Sequence[int]) -> list[int]:
    """The indices in `idx` whose text has at least one token."""
    return [i for i in idx if tokens[i]]


def maybe_layers(embedder, tokens: list[list[str]], batch_size: int, dtype
                 ) -> Optional[list[np.ndarray]]:
    """elmo_layers, or None for a model without ELMo."""
    return None if embedder is None else elmo_layers(embedder, tokens, batch_size, dtype)
