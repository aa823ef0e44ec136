"""Embedding with a trained biLM: the inference state, sentence boundaries, the token-embedding
cache, `ElmoEmbedder`, and embedding a text file into HDF5.

* `ElmoEmbedder` (allennlp 0.9's signature): `embed_sentence(tokens)` -> (3, n, 2P) float32,
  `embed_batch`, `embed_sentences`, `batch_to_embeddings`, `embed_file` (the removed `allennlp
  elmo` command, also `elmo embed`). modules.py's `Elmo`, `ElmoModel`, `load` run the biLM through
  the same `run_bilm` (token lists) / `run_bilm_ids` (char ids) / `InitialState`.
* `length_sorted_batches`: the one place that batches sentences in length order (less padding);
  `embed_file`, the tasks' feature extraction and the NER tagger's decoding use it.

Inference state (`state=`, `STATE_MODES`):

* `"carry"`: the LSTM state is carried between calls keyed by batch row, as bilm-tf, allennlp
  and TF-Hub do; reproduces their outputs exactly, but a sentence's vectors depend on what ran
  before it in the same row.
* `"zero"`: every sentence starts from the zero state.
* `"warm"` (default): every sentence starts from one fixed state, the biLM's state after reading
  `WARMUP_TEXT` the way it reads text in training (sentences packed, `</S>` never an input);
  computed once per model. Deterministic like "zero", but in the distribution the LM was trained
  in. README "Inference state" and benchmarks/state_modes.py compare the three.

Token-embedding cache (bilm-tf `dump_token_embeddings` + `TokenBatcher`): `TokenEmbeddingCache`
holds the char-CNN output of a vocabulary; `ElmoEmbedder(..., token_cache=cache)` runs the LSTMs
from token ids (+1, 0 = padding) with the cached vectors instead of the character CNN.
"""
from __future__ import annotations

import itertools
import json
import os
import warnings
import weakref
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from .chars import BOS_TOKEN, EOS_TOKEN, batch_to_ids, char_ids
from .config import ElmoError
from .errors import quote
from .chars import check_batch
from .device import device_of, resolve_device
from .export import load_bilm
from .token_cache import TokenEmbeddingCache
from .outputs import atomic_path, check_free_space, write_error
from .progress import progress_bar
from .hub import resolve_model
from .model import BiLM, RowStateBuffer
from .textio import read_lines

STATE_MODES = ("carry", "zero", "warm")
DEFAULT_STATE = "warm"
DEFAULT_MAX_TOKENS = 1000
DEFAULT_PRETRAINED = "original"  # allennlp 0.9's default ElmoEmbedder model (2x4096_512_2048cnn)

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


def check_state(state: str) -> str:
    """`state` itself when it is one of STATE_MODES, else a one-line ElmoError."""
    if state not in STATE_MODES:
        raise ElmoError(f"state must be one of {', '.join(STATE_MODES)}, got {state!r}")
    return state


def resolve_bilm(options_file, weight_file, model: Optional[BiLM]) -> BiLM:
    """A BiLM from (options, weights), or (model dir | pretrained name, None), or a given model."""
    if model is not None:
        return model
    if options_file is None:
        raise ElmoError("give options_file + weight_file, a model directory, or a pretrained name")
    if weight_file is None:
        options_file, weight_file = resolve_model(options_file)
    return load_bilm(options_file, weight_file)


# ---------------------------------------------------------------------------- inference state
@torch.no_grad()
def warm_state(model: BiLM, text: Sequence[str] = WARMUP_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, h) of shape (n_dirs, n_layers, 1, H|P): the state after reading `text` from zero state
    the way the biLM reads text in training: forward `<S> s1 <S> s2 ... <S> sk`
    (`</S>` is never an input), backward `</S> rev(sk) ... </S> rev(s1)`. So a sentence that
    starts from it sees `<S>` (forward) / `</S>` (backward) right after a complete previous
    sentence, exactly as in training. No dropout (the model is put in eval mode for this)."""
    sentences = [s.split() for s in text]
    orders = [[t for s in sentences for t in (BOS_TOKEN, *s)],
              [t for s in reversed(sentences) for t in (EOS_TOKEN, *reversed(s))]]
    was_training = model.training
    model.eval()
    try:
        device = device_of(model)
        c0, h0 = model.zero_state(1)
        cs, hs = [], []
        for d in range(model.n_dirs):
            ids = batch_to_ids([orders[d]],
                               model.options.char_cnn.max_characters_per_token).to(device)
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
    (carry only). In carry mode `c`, `h` are the row buffers. The warm state is
    recomputed when the model's parameters change (fine-tuning) or move to another device."""

    def __init__(self, model: BiLM, mode: str = DEFAULT_STATE, max_batch_size: int = 128):
        self.model = model
        self.mode = check_state(mode)
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
        device = device_of(self.model)
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
    (B, T+2, C) with `<S>` at 0 and `</S>` right after each row's own last token.
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


# ------------------------------------------------------------------------------------- the run
def run_bilm(model: BiLM, initial: InitialState, batch: list[list[str]],
         token_cache: Optional[TokenEmbeddingCache] = None) -> dict:
    """One biLM run over token lists with boundaries added; the state policy applied."""
    device = device_of(model)
    state = initial.read(len(batch))
    if token_cache is not None:
        ids = token_cache.token_ids(batch).to(device)
        out = model(state=state, token_embedding=token_cache.lookup(ids), mask=ids > 0)
    else:
        out = model(batch_to_ids(batch, model.options.char_cnn.max_characters_per_token,
                                 add_boundaries=True).to(device), state)
    initial.write(out["state"])
    return out


def check_char_ids(model: BiLM, ids: torch.Tensor, who: str) -> None:
    """One-line ElmoError unless `ids` is a (..., T, C) integer tensor for this model."""
    C = model.options.char_cnn.max_characters_per_token
    if ids.dim() < 3 or ids.shape[-1] != C or ids.is_floating_point():
        raise ElmoError(f"{who}: expected integer char ids (..., T, {C}) as from batch_to_ids, "
                        f"got {ids.dtype} of shape {tuple(ids.shape)}")


def run_bilm_ids(model: BiLM, initial: InitialState, ids: torch.Tensor) -> dict:
    """One biLM run over char ids (B, T, C) WITHOUT boundaries (`batch_to_ids`' default, as
    allennlp's); `<S>`/`</S>` are added here, so the outputs are (B, T+2, ...)."""
    ids = ids.to(device_of(model))
    out = model(add_sentence_boundaries(ids), initial.read(ids.shape[0]))
    initial.write(out["state"])
    return out


# -------------------------------------------------------------------------------- ElmoEmbedder
class ElmoEmbedder:
    """allennlp 0.9's ElmoEmbedder: `ElmoEmbedder(options_file, weight_file, cuda_device)`
    (`cuda_device` -1 = CPU, k >= 0 = GPU k; no arguments = the `original` pretrained model, as
    allennlp's defaults). `options_file` may also be a model directory or a pretrained name (then
    `weight_file=None`). Ours, keyword only: `state=` (module doc; allennlp's is "carry"),
    `device=` (any torch device, instead of cuda_device), `model=` (a BiLM), `token_cache=`."""

    def __init__(self, options_file: Optional[str | os.PathLike] = None,
                 weight_file: Optional[str | os.PathLike] = None, cuda_device: int = -1, *,
                 state: str = DEFAULT_STATE, max_batch_size: int = 128,
                 device: Optional[str | torch.device] = None, model: Optional[BiLM] = None,
                 token_cache: Optional[TokenEmbeddingCache] = None,
                 initial: Optional[InitialState] = None):
        check_state(state)
        device = allennlp_device(cuda_device, device)
        if options_file is None and model is None:
            options_file = DEFAULT_PRETRAINED
        self.model = resolve_bilm(options_file, weight_file, model)
        if self.model.n_dirs != 2:
            raise ElmoError(f"{options_file}: ELMo embeddings need a bidirectional model")
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.cuda_device = (self.device.index or 0) if self.device.type == "cuda" else -1
        self.state = state
        self.max_chars = self.model.options.char_cnn.max_characters_per_token
        self.states = initial if initial is not None else InitialState(self.model, state,
                                                                       max_batch_size)
        self.token_cache = token_cache

    @property
    def output_dim(self) -> int:
        return 2 * self.model.proj_dim

    @torch.no_grad()
    def batch_to_layers(self, batch: Sequence[Sequence[str]] | torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists, or char ids (B, T, C) without boundaries (`batch_to_ids`) -> the
        (3, B, T+2, 2P) layers WITH `<S>`/`</S>` and their (B, T+2) mask."""
        if isinstance(batch, torch.Tensor):
            check_char_ids(self.model, batch, "batch_to_layers")
            out = run_bilm_ids(self.model, self.states, batch)
        else:
            out = run_bilm(self.model, self.states, check_batch(batch), self.token_cache)
        return torch.stack(out["layers"]), out["mask"]

    def batch_to_embeddings(self, batch: Sequence[Sequence[str]] | torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """allennlp 0.9: (activations (B, 3, T, 2P), mask (B, T)) with the boundaries removed,
        padding positions zero; tensors on the embedder's device."""
        layers, mask = self.batch_to_layers(batch)
        stripped = [remove_sentence_boundaries(x, mask) for x in layers]
        return torch.stack([x for x, _ in stripped], dim=1), stripped[0][1]

    def embed_batch(self, batch: Sequence[Sequence[str]]) -> list[np.ndarray]:
        batch = check_batch(batch)
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
        it = iter(sentences)
        while batch := list(itertools.islice(it, batch_size)):
            yield from self.embed_batch(batch)

    def embed_file(self, input_file, output_file: Optional[str | os.PathLike] = None,
                   layers: str = "all", batch_size: int = 64, forget_sentences: bool = False,
                   use_sentence_keys: bool = False, *, dtype: str = "float32",
                   max_tokens: Optional[int] = DEFAULT_MAX_TOKENS, progress: Optional[bool] = None,
                   warn: Optional[Callable[[str], None]] = None,
                   output_file_path: Optional[str | os.PathLike] = None,
                   output_format: Optional[str] = None) -> int:
        """See `embed_file`; the positional order is allennlp 0.9's (input file or path, output
        path, output format, batch size, forget_sentences, use_sentence_keys), and its keyword
        names `output_file_path` / `output_format` are accepted too."""
        if (output_file is None) == (output_file_path is None):
            raise ElmoError("give one output file: output_file or output_file_path, not both")
        return embed_file(self, input_file, output_file or output_file_path,
                          output_format or layers, batch_size, forget_sentences,
                          use_sentence_keys, dtype=dtype, max_tokens=max_tokens,
                          progress=progress, warn=warn)


def allennlp_device(cuda_device, device: Optional[str | torch.device]) -> torch.device:
    """allennlp's `cuda_device` (-1 = CPU, k = cuda:k) or our `device=` -> one torch device."""
    if not isinstance(cuda_device, int):
        raise ElmoError(f"the third argument of ElmoEmbedder is cuda_device (an int, -1 = CPU, as "
                        f"allennlp's), got {cuda_device!r}; pass state= and device= by keyword")
    if device is None:
        return resolve_device(f"cuda:{cuda_device}" if cuda_device >= 0 else "cpu", "cuda_device")
    dev = resolve_device(device, "device=")
    if cuda_device >= 0 and (dev.type, dev.index or 0) != ("cuda", cuda_device):
        raise ElmoError(f"cuda_device={cuda_device} and device={device!r} disagree; give one")
    return dev


# ---------------------------------------------------------------------------------- batching
def length_sorted_batches(lengths: Sequence[int], batch_size: int,
                          max_tokens: Optional[int] = None) -> Iterator[list[int]]:
    """Indices into `lengths` in batches of at most `batch_size`, shortest first (stable for
    equal lengths), so a batch pads little. Callers put results back by index. `max_tokens`
    also caps a batch's padded size, rows x its longest length (an empty row counts 1); a row
    longer than that on its own still gets a batch of its own (`elmo serve`'s batcher)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if max_tokens is None:
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]
        return
    batch: list[int] = []
    for i in order:      # ascending: the row being added is the batch's longest
        if batch and (len(batch) == batch_size or (len(batch) + 1) * max(lengths[i], 1) > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def input_order_batches(n: int, batch_size: int) -> Iterator[list[int]]:
    """0..n-1 in consecutive batches of at most `batch_size` (carry state: the order matters)."""
    for start in range(0, n, batch_size):
        yield list(range(start, min(start + batch_size, n)))


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


def line_pieces(sentences: Sequence[Sequence[str]], max_tokens: Optional[int]
                ) -> list[tuple[int, int, int, int, int]]:
    """Every line's windows as pieces (line, start, end, keep_from, keep_to), in input order."""
    return [(i, *w) for i, s in enumerate(sentences) for w in token_windows(len(s), max_tokens)]


def embed_pieces(embedder: ElmoEmbedder, sentences: Sequence[Sequence[str]],
                 pieces: Sequence[tuple[int, int, int, int, int]], batch_size: int
                 ) -> list[np.ndarray]:
    """The kept part (3, keep_to - keep_from, 2P) of each piece, in the order of `pieces`.
    Batches go in input order in carry state (the state depends on it), else in length order."""
    if embedder.states.mode == "carry":
        batches = input_order_batches(len(pieces), batch_size)
    else:
        batches = length_sorted_batches([end - start for _, start, end, _, _ in pieces], batch_size)
    out: list = [None] * len(pieces)
    for idx in batches:
        batch = [sentences[pieces[k][0]][pieces[k][1]:pieces[k][2]] for k in idx]
        for k, emb in zip(idx, embedder.embed_batch(batch)):
            _, start, _, keep_from, keep_to = pieces[k]
            out[k] = emb[:, keep_from - start:keep_to - start]
    return out


def embedded_lines(embedder: ElmoEmbedder, sentences: Sequence[Sequence[str]],
                   batch_size: int, max_tokens: Optional[int]
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """(line, (3, n, 2P)) for every line, in input order. Pieces are embedded a chunk at a time
    (32 batches in zero/warm state, so sorting has room; one batch in carry state), and a long
    line's pieces are joined back along the token axis once its last piece is done."""
    pieces = line_pieces(sentences, max_tokens)
    chunk_size = batch_size if embedder.states.mode == "carry" else batch_size * 32
    partial: dict[int, list[np.ndarray]] = {}
    for c0 in range(0, len(pieces), chunk_size):
        chunk = pieces[c0:c0 + chunk_size]
        for (line, _, end, _, _), emb in zip(chunk, embed_pieces(embedder, sentences, chunk,
                                                                 batch_size)):
            partial.setdefault(line, []).append(emb)
            if end == len(sentences[line]):  # the line's last piece
                parts = partial.pop(line)
                yield line, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


LAYER_NAMES = ("all", "average", "top")
POOLINGS = ("mean", "max", "first", "last", "mean+max")


def select_layers(spec, n: int, who: str) -> Optional[list[int]]:
    """The layer indices a `layers=` argument picks out of n = L + 1 layers ("all", "top", an
    int or a list of ints, negative counting from the top; concatenated by `layer_tokens`), or
    None for "average" (the layers' mean). One-line errors name `who`."""
    if isinstance(spec, str):
        if spec not in LAYER_NAMES:
            raise ElmoError(f"{who}: layers must be one of {', '.join(LAYER_NAMES)}, an int or a "
                            f"list of ints, got {spec!r}")
        return {"all": list(range(n)), "average": None, "top": [n - 1]}[spec]
    picks = [spec] if isinstance(spec, (int, np.integer)) else list(spec)
    for k in picks:
        if not isinstance(k, (int, np.integer)) or not -n <= k < n:
            raise ElmoError(f"{who}: layer {k!r} out of range for a model with {n} layers "
                            f"(0 = the token layer)")
    if not picks:
        raise ElmoError(f"{who}: layers is an empty list")
    return [int(k) % n for k in picks]


def layer_tokens(layers: np.ndarray, picks: Optional[list[int]]) -> np.ndarray:
    """(L + 1, n, 2P) -> (n, D): the mean of the layers (picks None) or the picked layers side by
    side (D = len(picks) * 2P)."""
    if picks is None:
        return layers.mean(axis=0)
    return layers[picks].transpose(1, 0, 2).reshape(layers.shape[1], -1)


def pool_tokens(tokens: np.ndarray, pooling: str) -> np.ndarray:
    """(n, D) -> (D,) (`mean+max`: (2D,)); n >= 1."""
    if pooling == "mean":
        return tokens.mean(axis=0)
    if pooling == "max":
        return tokens.max(axis=0)
    if pooling == "first":
        return tokens[0]
    if pooling == "last":
        return tokens[-1]
    return np.concatenate([tokens.mean(axis=0), tokens.max(axis=0)])


def reduce_layers(emb: np.ndarray, layers: str) -> np.ndarray:
    """(3, n, 2P) -> itself (`all`), layer 2 (`top`, (n, 2P)) or the layers' mean (`average`)."""
    if layers == "top":
        return emb[-1]
    if layers == "average":
        return emb.mean(axis=0)
    return emb


def write_sentence_index(fout: h5py.File, lines: Sequence[str]) -> None:
    """`sentence_to_index`: (1,) string dataset, JSON {line text: "i"} (allennlp's; last wins)."""
    ds = fout.create_dataset("sentence_to_index", (1,), dtype=h5py.string_dtype())
    ds[0] = json.dumps({line.strip(): str(i) for i, line in enumerate(lines)})


def sentence_keys(lines: Sequence[str], use_sentence_keys: bool) -> list[str]:
    """The HDF5 key of each line: str(i), or (`use_sentence_keys`) the stripped line text, which
    must be unique and non-empty: else an ElmoError naming the lines, before anything is embedded.
    (A `/` in a key makes HDF5 groups on the way; the dataset still reads back as f[sentence].)"""
    if not use_sentence_keys:
        return [str(i) for i in range(len(lines))]
    keys = [line.strip() for line in lines]
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in ("", "."):
            raise ElmoError(f"line {i + 1}: {repr(key) if key else 'empty'} cannot be an HDF5 "
                            f"key; drop --use-sentence-keys (use_sentence_keys)")
        if key in seen:
            raise ElmoError(f"lines {seen[key] + 1} and {i + 1} are the same sentence: sentence "
                            f"keys must be unique; to embed duplicate sentences drop "
                            f"--use-sentence-keys (use_sentence_keys)")
        seen[key] = i
    return keys


def read_input(input_file, warn: Optional[Callable[[str], None]]) -> tuple[str, list[str]]:
    """(name, lines without line ends) of a path or an open text/binary file object (allennlp's
    embed_file takes one; it is not closed here)."""
    if not hasattr(input_file, "read"):
        path = os.fspath(input_file)
        return path, read_lines(path, errors="replace", warn=warn, what="input file")
    name = str(getattr(input_file, "name", "<input file>"))
    data = input_file.read()
    if isinstance(data, bytes):
        text = data.decode("utf-8", errors="replace")
        if text.count("\ufffd") != data.decode("utf-8", errors="ignore").count("\ufffd"):
            (warn or warnings.warn)(f"{name}: bytes that are not UTF-8 became U+FFFD")
        data = text
    lines = data.removeprefix("\ufeff").split("\n")            # a leading BOM dropped
    if lines and lines[-1] == "":
        lines.pop()
    return name, lines


def check_embed_file_args(layers: str, batch_size: int, dtype: str,
                          max_tokens: Optional[int]) -> None:
    if layers not in ("all", "top", "average"):
        raise ElmoError(f"layers must be all, top or average, got {layers!r}")
    if dtype not in ("float32", "float16"):
        raise ElmoError(f"dtype must be float32 or float16, got {dtype!r}")
    if batch_size < 1:
        raise ElmoError(f"batch size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ElmoError(f"max tokens must be >= 1, got {max_tokens}")


def embed_file(embedder: ElmoEmbedder, input_file, output_file: str | os.PathLike,
               layers: str = "all", batch_size: int = 64, forget_sentences: bool = False,
               use_sentence_keys: bool = False, *, dtype: str = "float32",
               max_tokens: Optional[int] = DEFAULT_MAX_TOKENS, progress: Optional[bool] = None,
               warn: Optional[Callable[[str], None]] = None) -> int:
    """One whitespace-tokenised sentence a line (path or open file) -> HDF5: dataset str(i) per
    line i, (3, n, 2P) (`layers="all"`) or (n, 2P) (`top`: layer 2, `average`: the layers' mean),
    plus `sentence_to_index`: the removed `allennlp elmo` command's format and options
    (`use_sentence_keys`: datasets named by their stripped line, no `sentence_to_index`;
    `forget_sentences`: no `sentence_to_index`). Empty lines give (3, 0, 2P). Undecodable bytes
    become U+FFFD, one warning to `warn`. Lines longer than `max_tokens` are embedded in
    overlapping windows (`token_windows`) and rejoined. Written atomically, as the layout (HDF5's
    metadata, after a check that the whole file fits on the disk) and then the vectors in place
    (`write_lines_at`), so a disk that fills is one line; returns the count."""
    check_embed_file_args(layers, batch_size, dtype, max_tokens)
    output_file = os.fspath(output_file)
    _, lines = read_input(input_file, warn)
    keys = sentence_keys(lines, use_sentence_keys)
    sentences = [line.split() for line in lines]
    np_dtype = np.dtype("<f2" if dtype == "float16" else "<f4")
    shapes = line_shapes(sentences, layers, embedder.output_dim)
    check_free_space(output_file, output_bytes(shapes, np_dtype, lines), "embeddings")
    with atomic_path(output_file) as tmp:
        write_layout(tmp, keys, shapes, np_dtype,
                     None if (forget_sentences or use_sentence_keys) else lines)
        with progress_bar(len(lines), desc="embed", unit="line", enabled=progress) as bar:
            write_lines_at(tmp, output_file, embedder, sentences, range(len(lines)), keys, layers,
                           batch_size, max_tokens, np_dtype, bar)
    return len(lines)


def embed_file_distributed(embedder: ElmoEmbedder, input_file: str, output_file: str,
                           rank: int, world_size: int, layers: str = "all", batch_size: int = 64,
                           forget_sentences: bool = False, use_sentence_keys: bool = False, *,
                           dtype: str = "float32",
                           max_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
                           progress: Optional[bool] = None,
                           warn: Optional[Callable[[str], None]] = None) -> int:
    """`embed_file` by `world_size` torchrun processes (torch.distributed initialised), with no
    join step. Every line's output shape is known from its token count, so rank 0 first writes
    the whole output's layout to a temp file beside the output (`write_layout`: each dataset with
    its storage allocated, and `sentence_to_index`) and closes it; then rank r embeds lines r,
    r + world, r + 2 world, ... and writes each line's bytes straight to its dataset's place in
    that file (h5py's DatasetID.get_offset), in parallel with the other ranks; after a barrier
    rank 0 renames the file onto the output. It equals the one-process output (same keys, same
    vectors: warm and zero states do not depend on the batch). A rank that fails makes the
    others' barrier fail: one line each, no output, no temp file left. `carry` is refused (it
    depends on batch history)."""
    import torch.distributed as dist

    from .distributed import collective
    if embedder.state == "carry":
        raise ElmoError("--state carry depends on batch history; several processes need warm "
                        "or zero")
    check_embed_file_args(layers, batch_size, dtype, max_tokens)
    output_file = os.fspath(output_file)
    _, lines = read_input(input_file, warn if rank == 0 else (lambda msg: None))
    keys = sentence_keys(lines, use_sentence_keys)
    sentences = [line.split() for line in lines]
    np_dtype = np.dtype("<f2" if dtype == "float16" else "<f4")
    shapes = line_shapes(sentences, layers, embedder.output_dim)
    mine = list(range(rank, len(lines), world_size))
    with (atomic_path(output_file) if rank == 0 else nullcontext()) as tmp:
        if rank == 0:
            check_free_space(output_file, output_bytes(shapes, np_dtype, lines), "embeddings")
            write_layout(tmp, keys, shapes, np_dtype,
                         None if (forget_sentences or use_sentence_keys) else lines)
        box = [tmp]
        collective(rank, lambda: dist.broadcast_object_list(box, src=0))   # the layout is written
        with progress_bar(len(mine), desc=f"embed (rank 0 of {world_size})", unit="line",
                          enabled=False if rank != 0 else progress) as bar:
            write_lines_at(box[0], output_file, embedder, sentences, mine, keys, layers,
                           batch_size, max_tokens, np_dtype, bar)
        collective(rank, dist.barrier)                        # every rank's lines are written
    return len(lines)


def line_shapes(sentences: Sequence[Sequence[str]], layers: str, dim: int) -> list[tuple]:
    """Each line's dataset shape: (3, n, 2P) for `all`, (n, 2P) for `top` / `average`."""
    return [(len(s), dim) if layers in ("top", "average") else (3, len(s), dim)
            for s in sentences]


def output_bytes(shapes: Sequence[tuple], dtype: np.dtype, lines: Sequence[str]) -> int:
    """A bound on the output file's size: the vectors, 1 KB of HDF5 metadata a line (a dataset's
    header and link take a few hundred bytes), the sentence index (the text + 16 bytes a line)
    and 64 KB for the file's own structures."""
    return (sum(int(np.prod(shape)) for shape in shapes) * dtype.itemsize
            + sum(1024 + 16 + len(line.encode("utf-8")) for line in lines) + (64 << 10))


def write_lines_at(layout: str, output_file: str, embedder: ElmoEmbedder,
                   sentences: Sequence[Sequence[str]], lines: Sequence[int], keys: Sequence[str],
                   layers: str, batch_size: int, max_tokens: Optional[int], dtype: np.dtype,
                   bar) -> None:
    """Embed the given `lines` (input line numbers) and write each one's bytes straight to its
    dataset's place in the `layout` file (os.pwrite: a disk that fills midway is an OSError, so
    one line, where HDF5 itself can crash the process on a failed write)."""
    with h5py.File(layout, "r") as f:
        offsets = {i: f[keys[i]].id.get_offset() for i in lines}
    fd = os.open(layout, os.O_WRONLY)
    try:
        for j, emb in embedded_lines(embedder, [sentences[i] for i in lines], batch_size,
                                     max_tokens):
            data = np.ascontiguousarray(reduce_layers(emb, layers), dtype=dtype)
            if data.size:
                write_at(fd, memoryview(data).cast("B"), offsets[lines[j]], output_file)
            bar.update(1)
    finally:
        os.close(fd)


def create_line_dataset(f: h5py.File, key: str, line: int, **kwargs) -> None:
    """f.create_dataset(key, **kwargs) for input line `line` (0-based); a sentence key HDF5
    cannot take (a path clash) is one line naming the input line."""
    try:
        f.create_dataset(key, **kwargs)
    except (ValueError, TypeError) as e:   # h5py: TypeError where a dataset blocks the path
        raise ElmoError(f"line {line + 1}: cannot store under the key {key!r} ({quote(e)}); drop "
                        f"--use-sentence-keys") from None


def write_layout(path: str, keys: Sequence[str], shapes: Sequence[tuple], dtype: np.dtype,
                 index_lines: Optional[Sequence[str]]) -> None:
    """An HDF5 file of one dataset per key, of its shape, contiguous, its storage allocated now
    and left unfilled (the ranks write the bytes), plus `sentence_to_index` of `index_lines`."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    with h5py.File(path, "w") as f:
        for line, (key, shape) in enumerate(zip(keys, shapes)):
            create_line_dataset(f, key, line, shape=shape, dtype=dtype, dcpl=dcpl)
        if index_lines is not None:
            write_sentence_index(f, index_lines)


def write_at(fd: int, data: memoryview, offset: int, output_file: str) -> None:
    """All of `data` at `offset` of the open file `fd` (os.pwrite may write less than asked)."""
    try:
        while len(data):
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
    except OSError as e:
        raise write_error(output_file, e) from None

