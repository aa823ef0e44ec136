"""Embedding: turn sentences into the three ELMo layers with a loaded biLM.

`ElmoEmbedder` follows allennlp 0.9's class of the same name: `embed_sentence(tokens)` ->
np.ndarray (3, n, 2P) float32, `embed_batch(list of token lists)`, `embed_sentences(iterable,
batch_size)`. With `state="carry"` the LSTM state is carried across calls keyed by batch row, as
bilm-tf and allennlp do (spec section 6), which reproduces their outputs exactly.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .chars import batch_to_ids
from .config import ElmoError
from .export import load_bilm
from .model import BiLM, RowStateBuffer

STATE_MODES = ("carry",)


def _check_batch(batch: Sequence[Sequence[str]]) -> list[list[str]]:
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


class ElmoEmbedder:
    def __init__(self, options_file: str | os.PathLike, weight_file: str | os.PathLike,
                 state: str = "carry", max_batch_size: int = 128,
                 device: str | torch.device = "cpu", model: Optional[BiLM] = None):
        if state not in STATE_MODES:
            raise ElmoError(f"state must be one of {', '.join(STATE_MODES)}, got {state!r}")
        self.model = model if model is not None else load_bilm(options_file, weight_file)
        if self.model.n_dirs != 2:
            raise ElmoError(f"{options_file}: ELMo embeddings need a bidirectional model")
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.state = state
        self.max_chars = self.model.options.char_cnn.max_characters_per_token
        self.states = RowStateBuffer(self.model, max_batch_size)

    @property
    def output_dim(self) -> int:
        return 2 * self.model.proj_dim

    @torch.no_grad()
    def batch_to_layers(self, batch: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, T+2, 2P) layers with boundaries and the (B, T+2) mask, state carried."""
        ids = batch_to_ids(batch, self.max_chars).to(self.device)  # (B, T+2, C)
        out = self.model(ids, self.states.read(ids.shape[0]))
        self.states.write(out["state"])
        return torch.stack(out["layers"]), out["mask"]

    def embed_batch(self, batch: Sequence[Sequence[str]]) -> list[np.ndarray]:
        batch = _check_batch(batch)
        if not batch:
            return []
        layers, _ = self.batch_to_layers(batch)
        layers = layers.cpu().numpy()
        # drop <S> at 0 and </S> at n+1: keep positions 1..n of each row
        return [np.ascontiguousarray(layers[:, b, 1:len(s) + 1]) for b, s in enumerate(batch)]

    def embed_sentence(self, sentence: Sequence[str]) -> np.ndarray:
        return self.embed_batch([sentence])[0]

    def embed_sentences(self, sentences: Iterable[Sequence[str]],
                        batch_size: int = 64) -> Iterator[np.ndarray]:
        batch: list = []
        for sentence in sentences:
            batch.append(sentence)
            if len(batch) == batch_size:
                yield from self.embed_batch(batch)
                batch = []
        if batch:
            yield from self.embed_batch(batch)
