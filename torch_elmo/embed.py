"""Embedding: use a trained biLM the way people do (spec sections 2, 6, 7, 8).

Three front doors onto one biLM run (`_run`), all with the same inference-state choice:

* `ElmoEmbedder` (allennlp 0.9): `embed_sentence(tokens)` -> np.ndarray (3, n, 2P) float32,
  `embed_batch`, `embed_sentences`, `embed_file` (the removed `allennlp elmo` command, also
  `elmo embed`).
* `load(model)` -> `ElmoModel`, called like the TF-Hub module: `elmo(["a sentence"])` or
  `elmo(tokens=[[...]])` -> dict of tensors `elmo`, `default`, `word_emb`, `lstm_outputs1`,
  `lstm_outputs2`, `sequence_len`.
* `Elmo` (allennlp nn.Module): char ids (B, T, 50) without boundaries -> `elmo_representations`
  (K scalar mixes) + `mask`; `requires_grad=True` fine-tunes the biLM; `save_weights` writes it
  back in the bilm-tf layout.

Inference state (`state=`, `STATE_MODES`):

* `"carry"`: the LSTM state is carried between calls keyed by batch row, as bilm-tf, allennlp
  and TF-Hub do (section 6); reproduces their outputs exactly, but a sentence's vectors depend on
  what ran before it in the same row.
* `"zero"`: every sentence starts from the zero state.
* `"warm"` (default): every sentence starts from one fixed state, the biLM's state after reading
  `WARMUP_TEXT` the way it reads text in training (sentences packed, `</S>` never an input);
  computed once per model. Deterministic like "zero", but in the distribution the LM was trained
  in. README "Inference state" and benchmarks/state_modes.py give the measurements.

Token-embedding cache (bilm-tf `dump_token_embeddings` + `TokenBatcher`): `TokenEmbeddingCache`
holds the char-CNN output of a vocabulary; `ElmoEmbedder(..., token_cache=cache)` then runs the
LSTMs from token ids (+1, 0 = padding) with the cached vectors instead of the character CNN
(`BiLM.forward(token_embedding=..., mask=...)`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .chars import BOS_TOKEN, EOS_TOKEN, batch_to_ids, char_ids
from .config import ElmoError
from .export import load_bilm, save_weights
from .model import BiLM, RowStateBuffer

STATE_MODES = ("carry", "zero", "warm")
DEFAULT_STATE = "warm"
DEFAULT_MAX_TOKENS = 1000

# A fixed, plain warm-up text (1B-Word-style tokenisation). The biLM reads it once from zero state;
# its final state is the "warm" initial state of every sentence. Changing it changes "warm" outputs.
WARMUP_TEXT = (
    "The city council met on Tuesday evening to discuss the new budget .",
    "Officials said the plan would pay for two schools and a public library over the next three years .",
    "Some residents were worried about higher taxes , but most of the people who spoke supported it .",
    "\" We have waited a long time for this , \" said one teacher , who has lived in the town since 1998 .",
    "The final vote is expected next month , after a second public meeting .",
    "In other news , the local football team won its third game in a row on Saturday .",
    "The weather service said the rain would move east overnight and the weekend should be dry and warm .",
    "Shares of the company rose 4 percent in early trading after it reported higher profits .",
)


def _check_state(state: str) -> str:
    if state not in STATE_MODES:
        raise ElmoError(f"state must be one of {', '.join(STATE_MODES)}, got {state!r}")
    return state


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


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _resolve_bilm(options_file, weight_file, model: Optional[BiLM]) -> BiLM:
    """A BiLM from (options, weights), or (model dir | pretrained name, None), or a given model."""
    if model is not None:
        return model
    if options_file is None:
        raise ElmoError("give options_file + weight_file, a model directory, or a pretrained name")
    if weight_file is None:
        from .hub import resolve_model
        options_file, weight_file = resolve_model(options_file)
    return load_bilm(options_file, weight_file)


# ---------------------------------------------------------------------------- inference state
@torch.no_grad()
def warm_state(model: BiLM, text: Sequence[str] = WARMUP_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, h) of shape (n_dirs, n_layers, 1, H|P): the state after reading `text` from zero state
    the way the biLM reads text in training (spec section 9): forward `<S> s1 <S> s2 ... <S> sk`
    (`</S>` is never an input), backward `</S> rev(sk) ... </S> rev(s1)`. So a sentence that
    starts from it sees `<S>` (forward) / `</S>` (backward) right after a complete previous
    sentence, exactly as in training. No dropout (the model is put in eval mode for this)."""
    sentences = [s.split() for s in text]
    orders = [[t for s in sentences for t in (BOS_TOKEN, *s)],
              [t for s in reversed(sentences) for t in (EOS_TOKEN, *reversed(s))]]
    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        c0, h0 = model.zero_state(1)
        cs, hs = [], []
        for d in range(model.n_dirs):
            ids = batch_to_ids([orders[d]], model.options.char_cnn.max_characters_per_token,
                               add_boundaries=False).to(device)
            x = model.char_cnn(ids)
            valid = torch.ones(ids.shape[:2], dtype=torch.bool, device=device)
            _, c, h = model.run_direction(d, x, valid, c0[d], h0[d])
            cs.append(c)
            hs.append(h)
    finally:
        model.train(was_training)
    return torch.stack(cs), torch.stack(hs)


_WARM_CACHE: "weakref.WeakKeyDictionary[BiLM, tuple]" = weakref.WeakKeyDictionary()


class InitialState:
    """The initial LSTM state of each batch under one of `STATE_MODES` (see the module doc).

    `read(b)` -> (c, h) for a batch of b rows; `write(state)` stores a batch's final state
    (carry only). In carry mode `c`, `h` are the row buffers (section 6). The warm state is
    recomputed when the model's parameters change (fine-tuning) or move to another device."""

    def __init__(self, model: BiLM, mode: str = DEFAULT_STATE, max_batch_size: int = 128):
        self.model = model
        self.mode = _check_state(mode)
        self.max_batch_size = max_batch_size
        self.buffer = RowStateBuffer(model, max_batch_size) if mode == "carry" else None

    @property
    def c(self) -> torch.Tensor:
        return self.buffer.c

    @property
    def h(self) -> torch.Tensor:
        return self.buffer.h

    def _warm_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        # one computation per model, shared by every InitialState on it; redone when a parameter
        # changed in place (an optimizer step bumps the tensor's version) or moved
        params = list(self.model.parameters())
        key = (params[0].device, params[0].dtype, tuple(p._version for p in params))
        cached = _WARM_CACHE.get(self.model)
        if cached is None or cached[0] != key:
            cached = _WARM_CACHE[self.model] = (key, warm_state(self.model))
        return cached[1]

    def read(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "zero":
            return self.model.zero_state(batch_size)
        if self.mode == "warm":
            c, h = self._warm_state()
            return (c.expand(-1, -1, batch_size, -1).contiguous(),
                    h.expand(-1, -1, batch_size, -1).contiguous())
        device = _device_of(self.model)
        if self.buffer.c.device != device:
            self.buffer.c, self.buffer.h = self.buffer.c.to(device), self.buffer.h.to(device)
        return self.buffer.read(batch_size)

    def write(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.buffer is not None:
            self.buffer.write(state)

    def reset(self) -> None:
        if self.buffer is not None:
            self.buffer.reset()


# --------------------------------------------------------------------------------- boundaries
def add_sentence_boundaries(ids: torch.Tensor) -> torch.Tensor:
    """allennlp's step: char ids (B, T, C) of right-padded sentences WITHOUT boundaries ->
    (B, T+2, C) with `<S>` at 0 and `</S>` right after each row's own last token (section 7).
    An all-padding row becomes `<S> </S>`."""
    B, T, C = ids.shape
    lengths = (ids > 0).any(dim=2).sum(dim=1)
    out = ids.new_zeros(B, T + 2, C)
    out[:, 1:T + 1] = ids
    out[:, 0] = torch.tensor(char_ids(BOS_TOKEN, C), device=ids.device)
    out[torch.arange(B, device=ids.device), lengths + 1] = torch.tensor(char_ids(EOS_TOKEN, C),
                                                                        device=ids.device)
    return out


def remove_sentence_boundaries(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+2, D) with boundaries + its (B, T+2) mask -> (B, T, D) of positions 1..L-2 of each
    row, left-aligned, padding exactly zero, and the (B, T) mask."""
    lengths = mask.sum(dim=1) - 2
    T = x.shape[1] - 2
    new_mask = torch.arange(max(T, 0), device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
    return x[:, 1:T + 1] * new_mask.unsqueeze(2).to(x.dtype), new_mask


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
        self.embedding = torch.zeros(0, model.proj_dim, device=_device_of(model))
        tokens = list(tokens)
        if embedding is not None:
            if embedding.shape != (len(tokens), model.proj_dim):
                raise ElmoError(f"token cache: embedding has shape {tuple(embedding.shape)}, "
                                f"expected ({len(tokens)}, {model.proj_dim})")
            self.tokens = tokens
            self.index = {t: i for i, t in enumerate(tokens)}
            self.embedding = embedding.to(_device_of(model), torch.float32)
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
                ids = batch_to_ids([[t] for t in chunk], C, add_boundaries=False)
                rows.append(self.model.char_cnn(ids.to(_device_of(self.model)))[:, 0])
        finally:
            self.model.train(was_training)
        for t in new:
            self.index[t] = len(self.tokens)
            self.tokens.append(t)
        self.embedding = torch.cat([self.embedding, *rows])

    def token_ids(self, batch: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, T+2) LongTensor `<S> w1..wn </S>` as cache row + 1, right-padded with 0."""
        batch = _check_batch(batch)
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
            raise ElmoError(f"{path}: cannot read as HDF5 ({e})") from None
        if vocab_file is not None:
            from .vocab import Vocabulary
            tokens = Vocabulary.read(vocab_file, require_specials=False).tokens
        if tokens is None:
            raise ElmoError(f"{path}: stores no token list; pass the vocab_file it was made from")
        return cls(model, tokens, emb, grow=grow)


def dump_token_embeddings(vocab_file: str | os.PathLike, options_file: str | os.PathLike,
                          weight_file: str | os.PathLike, outfile: str | os.PathLike) -> None:
    """bilm-tf's function of the same name: HDF5 `embedding` (V, P), row k = the char-CNN output
    of vocabulary line k (`<S>`/`</S>` as boundary encodings), plus `tokens`."""
    from .vocab import Vocabulary
    model = load_bilm(options_file, weight_file)
    tokens = Vocabulary.read(vocab_file, require_specials=False).tokens
    cache = TokenEmbeddingCache(model, tokens)
    cache.save(outfile)


# ------------------------------------------------------------------------------------- the run
def _run(model: BiLM, initial: InitialState, batch: list[list[str]],
         token_cache: Optional[TokenEmbeddingCache] = None) -> dict:
    """One biLM run over token lists with boundaries added; the state policy applied."""
    device = _device_of(model)
    state = initial.read(len(batch))
    if token_cache is not None:
        ids = token_cache.token_ids(batch).to(device)
        out = model(state=state, token_embedding=token_cache.lookup(ids), mask=ids > 0)
    else:
        out = model(batch_to_ids(batch, model.options.char_cnn.max_characters_per_token).to(device),
                    state)
    initial.write(out["state"])
    return out


# -------------------------------------------------------------------------------- ElmoEmbedder
class ElmoEmbedder:
    """allennlp 0.9's ElmoEmbedder. `options_file` may also be a model directory or a pretrained
    name (then `weight_file=None`)."""

    def __init__(self, options_file: Optional[str | os.PathLike] = None,
                 weight_file: Optional[str | os.PathLike] = None,
                 state: str = DEFAULT_STATE, max_batch_size: int = 128,
                 device: str | torch.device = "cpu", model: Optional[BiLM] = None,
                 token_cache: Optional[TokenEmbeddingCache] = None,
                 initial: Optional[InitialState] = None):
        _check_state(state)
        self.model = _resolve_bilm(options_file, weight_file, model)
        if self.model.n_dirs != 2:
            raise ElmoError(f"{options_file}: ELMo embeddings need a bidirectional model")
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.state = state
        self.max_chars = self.model.options.char_cnn.max_characters_per_token
        self.states = initial if initial is not None else InitialState(self.model, state,
                                                                       max_batch_size)
        self.token_cache = token_cache

    @property
    def output_dim(self) -> int:
        return 2 * self.model.proj_dim

    @torch.no_grad()
    def batch_to_layers(self, batch: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, T+2, 2P) layers with boundaries and the (B, T+2) mask."""
        out = _run(self.model, self.states, _check_batch(batch), self.token_cache)
        return torch.stack(out["layers"]), out["mask"]

    def embed_batch(self, batch: Sequence[Sequence[str]]) -> list[np.ndarray]:
        batch = _check_batch(batch)
        if not batch:
            return []
        layers, _ = self.batch_to_layers(batch)
        layers = layers.float().cpu().numpy()
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

    def embed_file(self, input_file: str | os.PathLike, output_file: str | os.PathLike,
                   layers: str = "all", batch_size: int = 64, dtype: str = "float32",
                   max_tokens: Optional[int] = DEFAULT_MAX_TOKENS, progress: Optional[bool] = None,
                   warn: Optional[Callable[[str], None]] = None) -> int:
        """See `embed_file`."""
        return embed_file(self, input_file, output_file, layers, batch_size, dtype, max_tokens,
                          progress, warn)


# ------------------------------------------------------------------------------------ ScalarMix
class ScalarMix(nn.Module):
    """ELMo_task = gamma * sum_j softmax(w)_j * h_j (spec section 8).

    w starts at 0 (uniform), gamma at 1; `initial_scalar_parameters` + `trainable=False` give a
    fixed mix (allennlp `scalar_mix_parameters`). `do_layer_norm`: each layer is normalised with
    ONE scalar mean and variance over all unmasked elements of the batch (batch x time x dim).
    `l2_penalty(coef)` = coef * sum(w^2) (bilm-tf `l2_coef`; paper / allennlp: 0.001)."""

    def __init__(self, mixture_size: int, do_layer_norm: bool = False,
                 initial_scalar_parameters: Optional[Sequence[float]] = None,
                 trainable: bool = True, eps: float = 1e-12):
        super().__init__()
        init = [0.0] * mixture_size if initial_scalar_parameters is None \
            else [float(v) for v in initial_scalar_parameters]
        if len(init) != mixture_size:
            raise ElmoError(f"scalar mix: {len(init)} initial parameters for {mixture_size} layers")
        self.mixture_size, self.do_layer_norm, self.eps = mixture_size, do_layer_norm, eps
        self.scalar_parameters = nn.Parameter(torch.tensor(init), requires_grad=trainable)
        self.gamma = nn.Parameter(torch.tensor([1.0]), requires_grad=trainable)

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.scalar_parameters, dim=0)

    def forward(self, tensors: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(tensors) != self.mixture_size:
            raise ElmoError(f"scalar mix: got {len(tensors)} layers, built for {self.mixture_size}")
        s = self.weights()
        if self.do_layer_norm:
            if mask is None:
                raise ElmoError("scalar mix: do_layer_norm needs the mask")
            m = mask.unsqueeze(-1).to(tensors[0].dtype)
            n = (m.sum() * tensors[0].shape[-1]).clamp(min=1)
            tensors = [self._norm(t, m, n) for t in tensors]
        return self.gamma * sum(w * t for w, t in zip(s, tensors))

    def _norm(self, t: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        mean = (t * m).sum() / n
        var = (((t - mean) * m) ** 2).sum() / n
        return (t - mean) / torch.sqrt(var + self.eps)

    def l2_penalty(self, coef: float = 1e-3) -> torch.Tensor:
        return coef * (self.scalar_parameters ** 2).sum()


# ----------------------------------------------------------------------------- Elmo (allennlp)
class Elmo(nn.Module):
    """allennlp's `Elmo`: K scalar mixes over one biLM run.

    forward(inputs): char ids (B, T, 50) WITHOUT `<S>`/`</S>` (as from
    `batch_to_ids(batch, add_boundaries=False)`; more leading dims allowed), or a list of token
    lists. Returns {"elmo_representations": K tensors (B, T, 2P), "mask": (B, T)}; with
    `keep_sentence_boundaries` both include the boundary positions. Padding positions are zero.
    As in allennlp the mix (and its layer-norm statistics) sees the boundary positions.
    `requires_grad=True` fine-tunes the biLM (kept in eval mode: no dropout inside it);
    `save_weights(path)` writes it back as a bilm-tf weights.hdf5."""

    def __init__(self, options_file: Optional[str | os.PathLike], weight_file: Optional[str | os.PathLike],
                 num_output_representations: int, dropout: float = 0.5, requires_grad: bool = False,
                 do_layer_norm: bool = False, keep_sentence_boundaries: bool = False,
                 scalar_mix_parameters: Optional[Sequence[float]] = None,
                 state: str = DEFAULT_STATE, max_batch_size: int = 128,
                 module: Optional[BiLM] = None):
        super().__init__()
        self.bilm = _resolve_bilm(options_file, weight_file, module).eval()
        self.requires_grad = requires_grad
        for p in self.bilm.parameters():
            p.requires_grad_(requires_grad)
        self.keep_sentence_boundaries = keep_sentence_boundaries
        self.initial_state = InitialState(self.bilm, state, max_batch_size)
        n = self.bilm.n_layers + 1
        self.scalar_mixes = nn.ModuleList(
            ScalarMix(n, do_layer_norm, scalar_mix_parameters, trainable=scalar_mix_parameters is None,
                      eps=1e-13)
            for _ in range(num_output_representations))
        self.dropout = nn.Dropout(dropout)

    def train(self, mode: bool = True) -> "Elmo":
        super().train(mode)
        self.bilm.eval()
        return self

    def get_output_dim(self) -> int:
        return 2 * self.bilm.proj_dim

    def forward(self, inputs: Union[torch.Tensor, Sequence[Sequence[str]]]) -> dict:
        C = self.bilm.options.char_cnn.max_characters_per_token
        if not isinstance(inputs, torch.Tensor):
            inputs = batch_to_ids(_check_batch(inputs), C, add_boundaries=False)
        if inputs.dim() < 3 or inputs.shape[-1] != C:
            raise ElmoError(f"Elmo: expected char ids (..., T, {C}), got shape {tuple(inputs.shape)}")
        lead = inputs.shape[:-2]
        ids = inputs.reshape(-1, *inputs.shape[-2:]).to(_device_of(self.bilm))
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            out = self.bilm(add_sentence_boundaries(ids), self.initial_state.read(ids.shape[0]))
        self.initial_state.write(out["state"])
        mask = out["mask"]
        reps = []
        for mix in self.scalar_mixes:
            r = mix(out["layers"], mask)
            if self.keep_sentence_boundaries:
                r = r * mask.unsqueeze(2).to(r.dtype)
            else:
                r = remove_sentence_boundaries(r, mask)[0]
            reps.append(self.dropout(r).reshape(*lead, *r.shape[1:]))
        if not self.keep_sentence_boundaries:
            mask = remove_sentence_boundaries(out["layers"][0], mask)[1]
        return {"elmo_representations": reps, "mask": mask.reshape(*lead, mask.shape[1])}

    def save_weights(self, weight_file: str | os.PathLike) -> None:
        save_weights(self.bilm, weight_file)


# --------------------------------------------------------------------- TF-Hub style ElmoModel
class ElmoModel(nn.Module):
    """What `load()` returns: the biLM + one trainable ScalarMix, called like the TF-Hub module.

        elmo(["Nothing suits me like suit", "A b"])         # strings, split on whitespace
        elmo(tokens=[["Nothing", "suits"], ["A"]])           # token lists (ragged is fine)
        elmo(inputs={"tokens": padded, "sequence_len": lens}, signature="tokens")  # TF-Hub form

    Returns a dict of tensors: `elmo` (B, T, 2P) the mix of the three layers, `default` (B, 2P)
    the mean of `elmo` over the real tokens, `word_emb` (B, T, P), `lstm_outputs1`,
    `lstm_outputs2` (B, T, 2P), `sequence_len` (B,); padding positions exactly zero. `as_dict=False`
    returns `default` (TF-Hub). Also `embed_sentence` / `embed_batch` / `embed_sentences` /
    `embed_file` (numpy, ElmoEmbedder's) and `save_weights` / `export` after fine-tuning."""

    def __init__(self, bilm: BiLM, state: str = DEFAULT_STATE, requires_grad: bool = False,
                 do_layer_norm: bool = False, max_batch_size: int = 128):
        super().__init__()
        self.bilm = bilm.eval()
        self.requires_grad = requires_grad
        for p in self.bilm.parameters():
            p.requires_grad_(requires_grad)
        self.scalar_mix = ScalarMix(bilm.n_layers + 1, do_layer_norm)
        self.initial_state = InitialState(bilm, state, max_batch_size)
        self._embedder: Optional[ElmoEmbedder] = None

    @property
    def state(self) -> str:
        return self.initial_state.mode

    @property
    def output_dim(self) -> int:
        return 2 * self.bilm.proj_dim

    def train(self, mode: bool = True) -> "ElmoModel":
        super().train(mode)
        self.bilm.eval()
        return self

    def forward(self, strings=None, *, tokens=None, sequence_len=None, inputs=None,
                signature: Optional[str] = None, as_dict: bool = True):
        batch = self._batch(strings, tokens, sequence_len, inputs, signature)
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            out = _run(self.bilm, self.initial_state, batch)
        # boundaries removed first, then mixed: bilm-tf's weight_layers (layer-norm statistics
        # over the real tokens only; allennlp's Elmo below includes <S>/</S> in them)
        stripped = [remove_sentence_boundaries(x, out["mask"]) for x in out["layers"]]
        layers, mask = [x for x, _ in stripped], stripped[0][1]
        elmo = self.scalar_mix(layers, mask) * mask.unsqueeze(2).to(layers[0].dtype)
        lengths = mask.sum(dim=1)
        default = elmo.sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(elmo.dtype)
        P = self.bilm.proj_dim
        result = {"elmo": elmo, "default": default, "word_emb": layers[0][..., :P]}
        for l in range(1, self.bilm.n_layers + 1):
            result[f"lstm_outputs{l}"] = layers[l]
        result["sequence_len"] = lengths
        result["mask"] = mask
        return result if as_dict else default

    @staticmethod
    def _batch(strings, tokens, sequence_len, inputs, signature) -> list[list[str]]:
        if isinstance(strings, dict):
            inputs, strings = strings, None
        if inputs is not None:
            if strings is not None or tokens is not None:
                raise ElmoError("give one of strings, tokens= or inputs=")
            tokens, sequence_len = inputs.get("tokens"), inputs.get("sequence_len")
            if tokens is None:
                raise ElmoError("inputs= needs a 'tokens' entry (TF-Hub signature 'tokens')")
        if (strings is None) == (tokens is None):
            raise ElmoError("give either a list of strings or tokens=[[...], ...]")
        if signature not in (None, "default", "tokens"):
            raise ElmoError(f"unknown signature {signature!r}; use 'default' or 'tokens'")
        if strings is not None:
            if isinstance(strings, str):
                raise ElmoError("expected a list of strings, got one string (wrap it in a list)")
            batch = []
            for i, s in enumerate(strings):
                if not isinstance(s, str):
                    raise ElmoError(f"string {i}: expected str, got {type(s).__name__}")
                batch.append(s.split())
            return batch
        batch = _check_batch(tokens)
        if sequence_len is not None:
            lens = [int(n) for n in (sequence_len.tolist() if hasattr(sequence_len, "tolist")
                                     else sequence_len)]
            if len(lens) != len(batch):
                raise ElmoError(f"sequence_len has {len(lens)} entries for {len(batch)} sentences")
            batch = [s[:n] for s, n in zip(batch, lens)]
        return batch

    # numpy conveniences, sharing this model and its state policy
    @property
    def embedder(self) -> ElmoEmbedder:
        if self._embedder is None:
            self._embedder = ElmoEmbedder(model=self.bilm, state=self.state,
                                          device=_device_of(self.bilm), initial=self.initial_state)
        return self._embedder

    def embed_sentence(self, sentence: Sequence[str]) -> np.ndarray:
        return self.embedder.embed_sentence(sentence)

    def embed_batch(self, batch: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return self.embedder.embed_batch(batch)

    def embed_sentences(self, sentences: Iterable[Sequence[str]], batch_size: int = 64):
        return self.embedder.embed_sentences(sentences, batch_size)

    def embed_file(self, *args, **kwargs) -> int:
        return self.embedder.embed_file(*args, **kwargs)

    def save_weights(self, weight_file: str | os.PathLike) -> None:
        save_weights(self.bilm, weight_file)

    def export(self, out_dir: str | os.PathLike) -> tuple[str, str]:
        from .export import export_model
        return export_model(self.bilm, out_dir)


def load(model: Union[str, os.PathLike, BiLM], state: str = DEFAULT_STATE,
         device: Optional[str | torch.device] = None, requires_grad: bool = False,
         do_layer_norm: bool = False, max_batch_size: int = 128,
         progress: Optional[bool] = None) -> ElmoModel:
    """A model directory (options.json + weights.hdf5), a pretrained name (`small`, `medium`,
    `original`, `original-5.5B`: downloaded once, see torch_elmo.hub), or a BiLM -> ElmoModel."""
    _check_state(state)
    if isinstance(model, BiLM):
        bilm = model
    else:
        from .hub import resolve_model
        bilm = load_bilm(*resolve_model(model, progress=progress))
    if bilm.n_dirs != 2:
        raise ElmoError(f"{model}: ELMo embeddings need a bidirectional model")
    out = ElmoModel(bilm, state, requires_grad, do_layer_norm, max_batch_size)
    return out.to(device) if device is not None else out


# -------------------------------------------------------------------------- embedding a file
def token_windows(n: int, max_tokens: Optional[int]) -> list[tuple[int, int, int, int]]:
    """Split n tokens into windows of at most max_tokens: [(start, end, keep_from, keep_to)].

    Overlap rule: margin m = max_tokens // 4, step = max_tokens - 2m. Window k covers
    [k*step, k*step + max_tokens); from it we keep [k*step + m, k*step + max_tokens - m), except
    that the first window keeps from 0 and the last keeps to n. The kept ranges tile [0, n)
    exactly, and every kept token has at least m tokens of real context on each side inside its
    window (apart from the true ends of the line), so neither LSTM direction restarts right
    next to it. Cost: about max_tokens / step = 2x the tokens for lines that need windows."""
    if max_tokens is None or n <= max_tokens:
        return [(0, n, 0, n)]
    m = max_tokens // 4
    step = max_tokens - 2 * m
    out, start = [], 0
    while True:
        end = min(start + max_tokens, n)
        out.append((start, end, start if start == 0 else start + m, end if end == n else end - m))
        if end == n:
            return out
        start += step


def _read_lines(path: str, warn: Callable[[str], None]) -> list[str]:
    """Lines split on b'\\n' only (line i = key str(i)); undecodable bytes replaced by U+FFFD with
    one warning naming the first bad file:line and the count (keys stay aligned with lines)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ElmoError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise ElmoError(f"{path}: is a directory, expected a text file") from None
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines, bad = [], []
    for i, b in enumerate(raw):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(b.decode("utf-8", errors="replace"))
            bad.append(i + 1)
    if bad:
        warn(f"{path}:{bad[0]}: not valid UTF-8; undecodable bytes replaced by U+FFFD "
             f"({len(bad)} line{'s' if len(bad) > 1 else ''} affected)")
    return lines


def embed_file(embedder: ElmoEmbedder, input_file: str | os.PathLike, output_file: str | os.PathLike,
               layers: str = "all", batch_size: int = 64, dtype: str = "float32",
               max_tokens: Optional[int] = DEFAULT_MAX_TOKENS, progress: Optional[bool] = None,
               warn: Optional[Callable[[str], None]] = None) -> int:
    """One whitespace-tokenised sentence a line -> HDF5: dataset str(i) per line i, shape
    (3, n, 2P) (`layers="all"`) or (n, 2P) (`top`: layer 2, `average`: mean of the 3 layers),
    plus `sentence_to_index` (a (1,) string dataset holding JSON {line text: "i"}), the format of
    the removed `allennlp elmo` command. Empty lines give (3, 0, 2P). Lines longer than
    `max_tokens` are embedded in overlapping windows (`token_windows`) and rejoined. In carry state
    batches are taken in input order (that is what the state depends on); in zero and warm state
    lines are sorted by length inside chunks (less padding), and every chunk is written in input
    order. The file is written to a temp file and renamed when complete. Returns the line count."""
    if layers not in ("all", "top", "average"):
        raise ElmoError(f"layers must be all, top or average, got {layers!r}")
    if dtype not in ("float32", "float16"):
        raise ElmoError(f"dtype must be float32 or float16, got {dtype!r}")
    if batch_size < 1:
        raise ElmoError(f"batch size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ElmoError(f"max tokens must be >= 1, got {max_tokens}")
    if warn is None:
        def warn(msg):
            warnings.warn(msg, stacklevel=3)
    from tqdm import tqdm

    input_file, output_file = os.fspath(input_file), os.fspath(output_file)
    lines = _read_lines(input_file, warn)
    sentences = [line.split() for line in lines]
    # pieces: (line, start, end, keep_from, keep_to)
    pieces = [(i, *w) for i, s in enumerate(sentences) for w in token_windows(len(s), max_tokens)]
    sort = embedder.states.mode != "carry"
    chunk_size = batch_size * 32 if sort else batch_size
    out_dir = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(out_dir):
        raise ElmoError(f"{output_file}: folder {out_dir} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output_file)}.", suffix=".tmp",
                                   dir=out_dir)
    except OSError as e:
        raise ElmoError(f"{output_file}: cannot write in {out_dir} ({e.strerror})") from None
    os.close(fd)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    try:
        with h5py.File(tmp, "w") as fout, tqdm(total=len(lines), unit="line", desc="embed",
                                               disable=(None if progress is None else not progress),
                                               file=sys.stderr) as bar:
            partial: dict[int, list[np.ndarray]] = {}
            for c0 in range(0, len(pieces), chunk_size):
                chunk = pieces[c0:c0 + chunk_size]
                order = sorted(range(len(chunk)), key=lambda k: chunk[k][2] - chunk[k][1]) \
                    if sort else list(range(len(chunk)))
                results: dict[int, np.ndarray] = {}
                for b0 in range(0, len(order), batch_size):
                    idx = order[b0:b0 + batch_size]
                    batch = [sentences[chunk[k][0]][chunk[k][1]:chunk[k][2]] for k in idx]
                    for k, emb in zip(idx, embedder.embed_batch(batch)):
                        _, start, _, keep_from, keep_to = chunk[k]
                        results[k] = emb[:, keep_from - start:keep_to - start]
                for k in range(len(chunk)):           # input order
                    line, _, end, _, _ = chunk[k]
                    partial.setdefault(line, []).append(results[k])
                    if end == len(sentences[line]):  # the line's last piece
                        parts = partial.pop(line)
                        emb = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
                        if layers == "top":
                            emb = emb[-1]
                        elif layers == "average":
                            emb = emb.mean(axis=0)
                        fout.create_dataset(str(line), data=emb.astype(np_dtype))
                        bar.update(1)
            index = {line.strip(): str(i) for i, line in enumerate(lines)}
            ds = fout.create_dataset("sentence_to_index", (1,), dtype=h5py.string_dtype())
            ds[0] = json.dumps(index)
        os.replace(tmp, output_file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(lines)


def cli_embed(args) -> int:
    """`elmo embed`: see cli._embed_parser."""
    state = args.state or DEFAULT_STATE
    _check_state(state)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .hub import resolve_model
    options_file, weight_file = resolve_model(args.model)
    embedder = ElmoEmbedder(options_file, weight_file, state=state, device=device,
                            max_batch_size=args.batch_size)

    def warn(msg: str) -> None:
        print(f"elmo embed: warning: {msg}", file=sys.stderr)

    max_tokens = None if args.max_tokens == 0 else args.max_tokens
    n = embedder.embed_file(args.input, args.output, layers=args.layers,
                            batch_size=args.batch_size, dtype=args.dtype,
                            max_tokens=max_tokens, warn=warn,
                            progress=False if args.no_progress else None)
    print(f"embedded {n} lines -> {args.output} ({args.layers}, {args.dtype}, state {state})",
          file=sys.stderr)
    return 0
