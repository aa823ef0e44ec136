"""Vocabulary: the bilm-tf vocabulary file, read, validated, built and written; corpus counts.

One token per line, whitespace-stripped, ids in line order from 0, the line `!!!MAXTERMID`
skipped. Training needs `<S>`, `</S>`, `<UNK>` and a file sorted by descending corpus frequency
(the log-uniform sampler assumes id 0 is the most frequent class). Out-of-vocabulary words map to
`<UNK>`; the vocabulary only gives softmax targets, inputs are always characters.

This module also owns counting a corpus: `count_words` (token frequencies, for building a
vocabulary) and `count_tokens` (bilm-tf's n_train_tokens: words only, no `<S>`/`</S>`).
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Optional, Sequence

from .chars import BOS_TOKEN as BOS
from .chars import EOS_TOKEN as EOS
from .errors import ElmoError
from .outputs import atomic_text
from .textio import BadLines, as_files, iter_text

UNK = "<UNK>"
SPECIALS = (BOS, EOS, UNK)
_MAXTERMID = "!!!MAXTERMID"


class Vocabulary:
    """Token <-> id map. `Vocabulary.read(path)` validates; `word_to_id` maps OOV to `<UNK>`."""

    def __init__(self, tokens: list[str], source: str = "vocabulary", require_specials: bool = True):
        self.tokens = list(tokens)
        self.source = source
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            if tok in self._ids:
                raise ElmoError(f"{source}: token {tok!r} appears twice "
                                f"(lines {self._ids[tok] + 1} and {i + 1})")
            self._ids[tok] = i
        if require_specials:
            missing = [s for s in SPECIALS if s not in self._ids]
            if missing:
                raise ElmoError(f"{source}: missing special token(s) {', '.join(missing)} "
                                f"(a training vocabulary must contain <S>, </S> and <UNK>)")
        self.bos = self._ids.get(BOS, -1)
        self.eos = self._ids.get(EOS, -1)
        self.unk = self._ids.get(UNK, -1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def word_to_id(self, token: str) -> int:
        return self._ids.get(token, self.unk)

    def id_to_word(self, i: int) -> str:
        return self.tokens[i]

    def encode(self, sentence: list[str], reverse: bool = False) -> list[int]:
        """`[<S>] + ids + [</S>]`; reversed: `[</S>] + reversed ids + [<S>]`."""
        ids = [self.word_to_id(t) for t in sentence]
        if reverse:
            return [self.eos, *reversed(ids), self.bos]
        return [self.bos, *ids, self.eos]

    # ------------------------------------------------------------------------------- file I/O
    @classmethod
    def read(cls, path: str | os.PathLike, require_specials: bool = True,
             check_sorted_counts: Optional[dict] = None) -> "Vocabulary":
        path = os.fspath(path)
        tokens = []
        try:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                    except UnicodeDecodeError:
                        raise ElmoError(f"{path}:{lineno}: not valid UTF-8") from None
                    if not line or line == _MAXTERMID:
                        continue
                    if any(c.isspace() for c in line):
                        raise ElmoError(
                            f"{path}:{lineno}: {line[:40]!r} has whitespace inside; a vocabulary "
                            f"file has one token per line (a 'word count' file? keep only the "
                            f"first column: cut -d' ' -f1)")
                    tokens.append(line)
        except FileNotFoundError:
            raise ElmoError(f"{path}: vocabulary file not found") from None
        if not tokens:
            raise ElmoError(f"{path}: vocabulary file is empty")
        return cls(tokens, source=path, require_specials=require_specials)

    def write(self, path: str | os.PathLike) -> None:
        with atomic_text(path) as f:
            for tok in self.tokens:
                f.write(tok + "\n")

    def check_frequency_sorted(self, counts: dict[str, int]) -> bool:
        """Warn (not fail) if non-special tokens are not in descending count order."""
        prev = None
        for i, tok in enumerate(self.tokens):
            if tok in SPECIALS:
                continue
            c = counts.get(tok, 0)
            if prev is not None and c > prev:
                warnings.warn(f"{self.source}:{i + 1}: vocabulary is not sorted by descending "
                              f"frequency ({tok!r} has {c} > {prev}); the log-uniform sampler "
                              f"assumes it is", stacklevel=2)
                return False
            prev = c
        return True


def count_words(files: Sequence[str] | str, bad: Optional[BadLines] = None) -> collections.Counter:
    """Token frequencies of `files` (a glob or a list), streamed; non-UTF-8 lines are skipped and
    reported to `bad`."""
    bad = bad if bad is not None else BadLines()
    counts: collections.Counter = collections.Counter()
    for path in as_files(files):
        for text in iter_text(path, bad):
            counts.update(text.split())
    return counts


def count_tokens(files: Sequence[str] | str, bad: Optional[BadLines] = None) -> int:
    """Number of training tokens in `files` (a glob or a list): words only, no `<S>`/`</S>`
    (bilm-tf's n_train_tokens). Streams; non-UTF-8 lines are skipped and reported to `bad`."""
    bad = bad if bad is not None else BadLines()
    return sum(len(text.split()) for path in as_files(files) for text in iter_text(path, bad))


def build_vocabulary(counts: collections.Counter, min_count: int = 1,
                     max_size: Optional[int] = None, unk_words: Sequence[str] = ()) -> Vocabulary:
    """Specials first (`<S>`, `</S>`, `<UNK>`), then tokens by descending count, ties by token,
    so the same corpus always gives the same file. `unk_words`: the corpus's own markers of
    out-of-vocabulary words (WikiText's `<unk>`), left out so that they map to `<UNK>` and the
    model learns that class; kept as a word, `<UNK>` is never a training target."""
    skip = set(SPECIALS) | set(unk_words)
    items = sorted(((t, c) for t, c in counts.items() if c >= min_count and t not in skip),
                   key=lambda tc: (-tc[1], tc[0]))
    if max_size is not None:
        items = items[: max(0, max_size - len(SPECIALS))]
    return Vocabulary([*SPECIALS, *(t for t, _ in items)], source="built vocabulary")
