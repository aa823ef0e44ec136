"""Characters: a token -> its fixed-width character ids (the char-CNN's input).

This module owns the character alphabet and the +1 offset. Every id returned here carries the
offset (real ids 1..261, 0 = padding token), in training as in inference: the model's char table
is (262, D) with a zero row 0, which is bilm-tf's 261-row training table shifted by one, so the
two conventions give identical numbers (config.resolve_n_characters explains the options key).
`raw_char_ids` gives the un-offset bilm-tf training ids, for comparison with its fixtures.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import ElmoError

BOS_CHAR = 256  # begin of sentence
EOS_CHAR = 257  # end of sentence
BOW_CHAR = 258  # begin of word
EOW_CHAR = 259  # end of word
PAD_CHAR = 260  # within-word padding

BOS_TOKEN = "<S>"
EOS_TOKEN = "</S>"


def raw_char_ids(token: str, max_chars: int = 50) -> list[int]:
    """bilm-tf raw ids (no offset): [BOW] + first max_chars-2 UTF-8 bytes + [EOW] + pads.

    Truncation is by bytes (a multi-byte character may be cut); code points that cannot be
    encoded (lone surrogates) are dropped. `<S>`/`</S>` are the special blocks, not spelled."""
    if token == BOS_TOKEN:
        ids = [BOW_CHAR, BOS_CHAR, EOW_CHAR]
    elif token == EOS_TOKEN:
        ids = [BOW_CHAR, EOS_CHAR, EOW_CHAR]
    else:
        ids = [BOW_CHAR, *token.encode("utf-8", errors="ignore")[: max_chars - 2], EOW_CHAR]
    return ids + [PAD_CHAR] * (max_chars - len(ids))


def char_ids(token: str, max_chars: int = 50) -> list[int]:
    """Ids as the model consumes them: raw ids + 1 (0 is reserved for the padding token)."""
    return [c + 1 for c in raw_char_ids(token, max_chars)]


def batch_to_ids(batch: Sequence[Sequence[str]], max_chars: int = 50,
                 add_boundaries: bool = False) -> torch.Tensor:
    """List of token lists -> LongTensor (B, T, max_chars) of char ids, rows right-padded with
    all-zero padding tokens (T = longest sentence), as allennlp's `batch_to_ids`: no `<S>`/`</S>`,
    which `Elmo`, `ElmoModel` and `ElmoEmbedder` add themselves. `add_boundaries=True` gives the
    rows `<S> w1..wn </S>`, (B, T+2, max_chars), the form `BiLM.forward` reads directly.
    Empty batch -> (0, 0, max_chars) ((0, 2, max_chars) with boundaries)."""
    extra = 2 if add_boundaries else 0
    width = max((len(s) for s in batch), default=0) + extra
    out = np.zeros((len(batch), width, max_chars), dtype=np.int64)
    cache: dict[str, list[int]] = {}
    for b, sentence in enumerate(batch):
        tokens = [BOS_TOKEN, *sentence, EOS_TOKEN] if add_boundaries else list(sentence)
        for t, token in enumerate(tokens):
            ids = cache.get(token)
            if ids is None:
                ids = cache[token] = char_ids(token, max_chars)
            out[b, t] = ids
    return torch.from_numpy(out)


def mask_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, T, C) char ids -> (B, T) bool: a position is a real token iff any id > 0."""
    return (ids > 0).any(dim=-1)


def check_batch(batch: Sequence[Sequence[str]]) -> list[list[str]]:
    """A batch of token lists as lists of str; a string where a token list belongs is an error."""
    out = []
    for i, sentence in enumerate(batch):
        if isinstance(sentence, str):
            raise ElmoError(f"sentence {i}: expected a list of tokens, got a string "
                            f"(split it first, e.g. text.split())")
        tokens = list(sentence)
        for token in tokens:
            if not isinstance(token, str):
                raise ElmoError(f"sentence {i}: tokens must be str, got {type(token).__name__}")
        out.append(tokens)
    return out
