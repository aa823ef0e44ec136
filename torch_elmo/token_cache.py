"""The token-embedding cache: the char-CNN vector of every vocabulary token computed once
(bilm-tf's `dump_token_embeddings` / allennlp's `vocab_to_cache`), saved and loaded as HDF5
(`embedding` (V, P) + `tokens`, docs/formats.md), looked up by token id instead of running the
char CNN."""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from .chars import BOS_TOKEN, EOS_TOKEN, batch_to_ids, check_batch
from .config import ElmoError
from .errors import quote
from .device import device_of
from .export import load_bilm
from .model import BiLM
from .vocab import Vocabulary


class TokenEmbeddingCache:
    """The char-CNN output of a vocabulary, computed once (bilm-tf `dump_token_embeddings`).

    Row k of `embedding` (V, P) is the token representation of `tokens[k]`; `<S>`/`</S>` rows are
    the boundary encodings (appended when the vocabulary lacks them). Token ids carry the +1
    offset, 0 = padding (bilm-tf `TokenBatcher`). Tokens missing from the cache are encoded on
    first use and appended (`grow=True`), so outputs never depend on the vocabulary."""

    def __init__(self, model: BiLM, tokens: Iterable[str] = (),
                 embedding: Optional[torch.Tensor] = None, grow: bool = True,
                 batch_size: int = 1024):
        self.model, self.grow, self.batch_size = model, grow, batch_size
        self.tokens: list[str] = []
        self.index: dict[str, int] = {}
        self.embedding = torch.zeros(0, model.proj_dim, device=device_of(model))
        tokens = list(tokens)
        if embedding is not None:
            if embedding.shape != (len(tokens), model.proj_dim):
                raise ElmoError(f"token cache: embedding has shape {tuple(embedding.shape)}, "
                                f"expected ({len(tokens)}, {model.proj_dim})")
            self.tokens = tokens
            self.index = {t: i for i, t in enumerate(tokens)}
            self.embedding = embedding.to(device_of(model), torch.float32)
        else:
            self.add(tokens)
        self.add([BOS_TOKEN, EOS_TOKEN])

    def __len__(self) -> int:
        return len(self.tokens)

    @torch.no_grad()
    def add(self, tokens: Iterable[str]) -> None:
        new = [t for t in dict.fromkeys(tokens) if t not in self.index]
        if not new:
            return
        was_training = self.model.training
        self.model.eval()
        rows = []
        try:
            C = self.model.options.char_cnn.max_characters_per_token
            for i in range(0, len(new), self.batch_size):
                chunk = new[i:i + self.batch_size]
                ids = batch_to_ids([[t] for t in chunk], C)
                rows.append(self.model.char_cnn(ids.to(device_of(self.model)))[:, 0])
        finally:
            self.model.train(was_training)
        for t in new:
            self.index[t] = len(self.tokens)
            self.tokens.append(t)
        self.embedding = torch.cat([self.embedding, *rows])

    def token_ids(self, batch: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, T+2) LongTensor `<S> w1..wn </S>` as cache row + 1, right-padded with 0."""
        batch = check_batch(batch)
        missing = [t for s in batch for t in s if t not in self.index]
        if missing:
            if not self.grow:
                raise ElmoError(f"token cache: {len(set(missing))} token(s) not in the cache, "
                                f"e.g. {missing[0]!r} (make it with grow=True)")
            self.add(missing)
        width = max((len(s) for s in batch), default=0) + 2
        out = np.zeros((len(batch), width), dtype=np.int64)
        for b, s in enumerate(batch):
            row = [self.index[BOS_TOKEN], *(self.index[t] for t in s), self.index[EOS_TOKEN]]
            out[b, :len(row)] = np.asarray(row) + 1
        return torch.from_numpy(out)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids (+1, 0 = padding) -> (B, T, P); padding rows are zero."""
        table = torch.cat([self.embedding.new_zeros(1, self.embedding.shape[1]), self.embedding])
        return F.embedding(ids.to(table.device), table)

    def save(self, path: str | os.PathLike) -> None:
        """HDF5 with bilm-tf's `embedding` (V, P) dataset, plus the `tokens` (one string each)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embedding", data=self.embedding.detach().cpu().numpy().astype(np.float32))
            f.create_dataset("tokens", data=self.tokens, dtype=h5py.string_dtype())
        os.replace(tmp, path)

    @classmethod
    def load(cls, model: BiLM, path: str | os.PathLike, vocab_file: Optional[str] = None,
             grow: bool = True) -> "TokenEmbeddingCache":
        """Read a cache written by `save` or by bilm-tf's dump_token_embeddings (then the vocab
        file that made it is needed for the token order)."""
        path = os.fspath(path)
        try:
            with h5py.File(path, "r") as f:
                if "embedding" not in f:
                    raise ElmoError(f"{path}: no 'embedding' dataset (not a token-embedding cache)")
                emb = torch.from_numpy(np.asarray(f["embedding"][...], dtype=np.float32))
                tokens = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
                          for t in f["tokens"][...]] if "tokens" in f else None
        except (FileNotFoundError, OSError) as e:
            if isinstance(e, FileNotFoundError) or not os.path.exists(path):
                raise ElmoError(f"{path}: token cache not found") from None
            raise ElmoError(f"{path}: cannot read as HDF5 ({quote(e)})") from None
        if vocab_file is not None:
            tokens = Vocabulary.read(vocab_file, require_specials=False).tokens
        if tokens is None:
            raise ElmoError(f"{path}: stores no token list; pass the vocab_file it was made from")
        return cls(model, tokens, emb, grow=grow)


def dump_token_embeddings(vocab_file: str | os.PathLike, options_file: str | os.PathLike,
                          weight_file: str | os.PathLike, outfile: str | os.PathLike) -> None:
    """bilm-tf's function of the same name: HDF5 `embedding` (V, P), row k = the char-CNN output
    of vocabulary line k (`<S>`/`</S>` as boundary encodings), plus `tokens`."""
    model = load_bilm(options_file, weight_file)
    tokens = Vocabulary.read(vocab_file, require_specials=False).tokens
    cache = TokenEmbeddingCache(model, tokens)
    cache.save(outfile)
