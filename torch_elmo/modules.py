"""The nn.Module front doors onto a trained biLM: `ScalarMix`, `Elmo` (allennlp), `ElmoModel`
(called like the TF-Hub module) and `load`.

* `load(model)` -> `ElmoModel`, called like the TF-Hub module: `elmo(["a sentence"])` or
  `elmo(tokens=[[...]])` -> dict of tensors `elmo`, `default`, `word_emb`, `lstm_outputs1`,
  `lstm_outputs2`, `sequence_len`.
* `Elmo` (allennlp nn.Module): char ids (B, T, 50) without boundaries (`batch_to_ids`, as
  allennlp's) -> `elmo_representations` (K scalar mixes) + `mask`; allennlp's parameter and
  state_dict layout (`allennlp_names`), so allennlp checkpoints load; `requires_grad=True`
  fine-tunes the biLM; `save_weights` writes it back in the bilm-tf layout.

Both run the biLM through embed.py's `run_bilm` / `InitialState`, so the inference-state choice
(`state=`: carry, zero, warm) means the same as for `ElmoEmbedder`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .chars import BOS_TOKEN, EOS_TOKEN, batch_to_ids, check_batch
from .config import ElmoError
from .device import device_of, resolve_device
from .embed import (DEFAULT_STATE, POOLINGS, ElmoEmbedder, InitialState, check_char_ids,
                    check_state, layer_tokens, length_sorted_batches, pool_tokens,
                    remove_sentence_boundaries, resolve_bilm, run_bilm, run_bilm_ids,
                    select_layers)
from .export import export_model, load_bilm, save_weights
from .hub import resolve_model
from .model import FORGET_BIAS, BiLM
from .token_cache import TokenEmbeddingCache


# ------------------------------------------------------------------------------------ ScalarMix
class ScalarMix(nn.Module):
    """ELMo_task = gamma * sum_j softmax(w)_j * h_j, the task-specific mix of the biLM layers.

    allennlp's layout: `scalar_parameters` is a ParameterList of one-element parameters w_j
    (state_dict keys `scalar_parameters.0`, ...), `gamma` has shape (1,). w starts at 0
    (uniform), gamma at 1; `initial_scalar_parameters` + `trainable=False` give a fixed mix
    (allennlp `scalar_mix_parameters`). `do_layer_norm`: each layer is normalised with ONE
    scalar mean and variance over all unmasked elements of the batch (batch x time x dim).
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
        self.scalar_parameters = nn.ParameterList(
            nn.Parameter(torch.tensor([v]), requires_grad=trainable) for v in init)
        self.gamma = nn.Parameter(torch.tensor([1.0]), requires_grad=trainable)

    def weights(self) -> torch.Tensor:
        """softmax(w), shape (mixture_size,)."""
        return torch.softmax(torch.cat(list(self.scalar_parameters)), dim=0)

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
        return coef * (torch.cat(list(self.scalar_parameters)) ** 2).sum()


# ------------------------------------------------------------------ allennlp's biLM key names
ALLENNLP_CHARS = "_elmo_lstm._token_embedder."
ALLENNLP_LSTM = "_elmo_lstm._elmo_lstm."


def _same(*ours: torch.Tensor) -> torch.Tensor:
    return ours[0]


def _split_one(theirs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (theirs,)


def allennlp_names(bilm: BiLM) -> Iterator[tuple[str, tuple[str, ...], Callable, Callable]]:
    """allennlp's `Elmo` state_dict names for our biLM: (allennlp key, the BiLM state_dict keys
    it holds, ours -> allennlp, allennlp -> ours). allennlp keeps a zero padding row in the char
    table, one (2F, F) Linear per highway layer ([transform; -carry]: its gate multiplies x),
    the forget bias inside the LSTM bias; gates are i, f, j, o in both."""
    names = []
    names.append((ALLENNLP_CHARS + "_char_embedding_weights", ("char_cnn.char_embed",),
                  lambda w: torch.cat([w.new_zeros(1, w.shape[1]), w]), lambda a: (a[1:],)))
    for i in range(len(bilm.char_cnn.convs)):
        for p in ("weight", "bias"):
            names.append((ALLENNLP_CHARS + f"char_conv_{i}.{p}", (f"char_cnn.convs.{i}.{p}",),
                          _same, _split_one))
    for k in range(len(bilm.char_cnn.highways)):
        for p in ("weight", "bias"):
            hw = f"char_cnn.highways.{k}."
            names.append((ALLENNLP_CHARS + f"_highways._layers.{k}.{p}",
                          (hw + f"transform.{p}", hw + f"carry.{p}"),
                          lambda t, c: torch.cat([t, -c]),
                          lambda a: (a[:a.shape[0] // 2], -a[a.shape[0] // 2:])))
    for p in ("weight", "bias"):
        names.append((ALLENNLP_CHARS + f"_projection.{p}", (f"char_cnn.projection.{p}",),
                      _same, _split_one))
    H = bilm.hidden_dim
    forget = torch.zeros(4 * H)
    forget[H:2 * H] = FORGET_BIAS                              # i, f, j, o: block 1
    for d in ("forward", "backward")[:bilm.n_dirs]:
        for l in range(bilm.n_layers):
            a, o = ALLENNLP_LSTM + f"{d}_layer_{l}.", f"{d}_layers.{l}."
            names.append((a + "input_linearity.weight", (o + "input_weight",), _same, _split_one))
            names.append((a + "state_linearity.weight", (o + "state_weight",), _same, _split_one))
            names.append((a + "state_linearity.bias", (o + "bias",),
                          lambda b: b + forget.to(b), lambda a: (a - forget.to(a),)))
            names.append((a + "state_projection.weight", (o + "proj_weight",), _same, _split_one))
    return iter(names)


@torch.no_grad()
def bilm_to_allennlp(bilm: BiLM, ours: dict) -> dict:
    """Our BiLM state_dict entries -> allennlp's `Elmo` keys (`_elmo_lstm....`). A biLM without
    a CNN projection (filters == projection_dim) gets allennlp's identity `_projection`."""
    F = bilm.char_cnn.output_dim
    out = {}
    for key, parts, to_theirs, _ in allennlp_names(bilm):
        if parts[0].startswith("char_cnn.projection.") and bilm.char_cnn.projection is None:
            out[key] = torch.eye(F) if key.endswith("weight") else torch.zeros(F)
            continue
        out[key] = to_theirs(*(ours[p] for p in parts))
    return out


@torch.no_grad()
def bilm_from_allennlp(bilm: BiLM, theirs: dict, where: str) -> dict:
    """allennlp `Elmo` keys (`_elmo_lstm....`, prefix removed) -> our BiLM state_dict entries.
    Keys left over (vocab_to_cache's `_word_embedding`, ...) stay in `theirs`; a missing key is
    left to load_state_dict's own missing-key report."""
    ours = {}
    for key, parts, _, to_ours in allennlp_names(bilm):
        if key not in theirs:
            continue
        value = theirs.pop(key)
        if parts[0].startswith("char_cnn.projection.") and bilm.char_cnn.projection is None:
            F = bilm.char_cnn.output_dim
            ident = torch.eye(F) if key.endswith("weight") else torch.zeros(F)
            if value.shape != ident.shape or not torch.allclose(value.float().cpu(), ident):
                raise ElmoError(f"{where}{key}: this biLM has no CNN projection, but the "
                                f"checkpoint's is not the identity")
            continue
        ours.update(zip(parts, to_ours(value)))
    return ours


# ----------------------------------------------------------------------------- Elmo (allennlp)
class Elmo(nn.Module):
    """allennlp's `Elmo`: K scalar mixes over one biLM run; allennlp's positional parameters.

    forward(inputs, word_inputs=None): char ids (B, T, 50) WITHOUT `<S>`/`</S>` (as from
    `batch_to_ids(batch)`; more leading dims allowed), or a list of token lists. Returns
    {"elmo_representations": K tensors (B, T, 2P), "mask": (B, T)}; with
    `keep_sentence_boundaries` both include the boundary positions. Padding positions are zero.
    As in allennlp the mix (and its layer-norm statistics) sees the boundary positions.
    `vocab_to_cache`: the char-CNN output of these tokens is computed once; `word_inputs`
    (B, T) are indices into that list (0 = padding, as allennlp's) and replace the char CNN.
    `requires_grad=True` fine-tunes the biLM (kept in eval mode: no dropout inside it);
    `save_weights(path)` writes it back as a bilm-tf weights.hdf5.

    The mixes are submodules `scalar_mix_0`, ... and `state_dict()` uses allennlp's keys for
    the biLM too (`_elmo_lstm._token_embedder...`, `_elmo_lstm._elmo_lstm...`), so allennlp
    checkpoints of an Elmo (or of a model holding one) load with `load_state_dict`, and ours
    load into allennlp; our own `bilm.*` keys are accepted too. Ours, keyword only: `state=`
    (embed.py; allennlp's is "carry"), `max_batch_size` (rows of carried state)."""

    def __init__(self, options_file: Optional[str | os.PathLike], weight_file: Optional[str | os.PathLike],
                 num_output_representations: int, requires_grad: bool = False,
                 do_layer_norm: bool = False, dropout: float = 0.5,
                 vocab_to_cache: Optional[Sequence[str]] = None,
                 keep_sentence_boundaries: bool = False,
                 scalar_mix_parameters: Optional[Sequence[float]] = None,
                 module: Optional[BiLM] = None, *, state: str = DEFAULT_STATE,
                 max_batch_size: int = 128):
        super().__init__()
        if module is not None and (options_file is not None or weight_file is not None):
            raise ElmoError("Elmo: give options_file + weight_file or module, not both")
        self.bilm = resolve_bilm(options_file, weight_file, module).eval()
        self.requires_grad = requires_grad
        for p in self.bilm.parameters():
            p.requires_grad_(requires_grad)
        self.keep_sentence_boundaries = keep_sentence_boundaries
        self.initial_state = InitialState(self.bilm, state, max_batch_size)
        self.token_cache = None if vocab_to_cache is None else \
            TokenEmbeddingCache(self.bilm, vocab_to_cache, grow=False)
        n = self.bilm.n_layers + 1
        self.num_output_representations = num_output_representations
        for k in range(num_output_representations):
            self.add_module(f"scalar_mix_{k}", ScalarMix(
                n, do_layer_norm, scalar_mix_parameters,
                trainable=scalar_mix_parameters is None, eps=1e-13))
        self.dropout = nn.Dropout(dropout)

    @property
    def scalar_mixes(self) -> list[ScalarMix]:
        return [getattr(self, f"scalar_mix_{k}") for k in range(self.num_output_representations)]

    def train(self, mode: bool = True) -> "Elmo":
        super().train(mode)
        self.bilm.eval()
        return self

    def get_output_dim(self) -> int:
        return 2 * self.bilm.proj_dim

    def forward(self, inputs: Union[torch.Tensor, Sequence[Sequence[str]]],
                word_inputs: Optional[torch.Tensor] = None) -> dict:
        C = self.bilm.options.char_cnn.max_characters_per_token
        if not isinstance(inputs, torch.Tensor):
            inputs = batch_to_ids(check_batch(inputs), C)
        check_char_ids(self.bilm, inputs, "Elmo")
        lead = inputs.shape[:-2]
        ids = inputs.reshape(-1, *inputs.shape[-2:])                 # (B, T, C)
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            if word_inputs is not None and self.token_cache is not None:
                out = self._run_cached(word_inputs.reshape(-1, word_inputs.shape[-1]))
            else:
                out = run_bilm_ids(self.bilm, self.initial_state, ids)
        mask = out["mask"]                                           # (B, T+2)
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

    def _run_cached(self, word_inputs: torch.Tensor) -> dict:
        """word ids (B, T) into vocab_to_cache (0 = padding) -> the biLM run from the cached
        token vectors, `<S>`/`</S>` vectors added around each row."""
        cache = self.token_cache
        device = device_of(self.bilm)
        word_inputs = word_inputs.to(device)
        B, T = word_inputs.shape
        lengths = (word_inputs > 0).sum(dim=1)
        rows = torch.zeros(B, T + 2, dtype=torch.long, device=device)   # cache row + 1, 0 = pad
        rows[:, 0] = cache.index[BOS_TOKEN] + 1
        rows[:, 1:T + 1] = torch.where(word_inputs > 0, word_inputs + 1, 0)
        rows[torch.arange(B, device=device), lengths + 1] = cache.index[EOS_TOKEN] + 1
        state = self.initial_state.read(B)
        out = self.bilm(state=state, token_embedding=cache.lookup(rows), mask=rows > 0)
        self.initial_state.write(out["state"])
        return out

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix,
                                 keep_vars=keep_vars)
        mine = prefix + "bilm."
        ours = {k[len(mine):]: out.pop(k) for k in list(out) if k.startswith(mine)}
        rest = {k: out.pop(k) for k in list(out) if k.startswith(prefix)}
        for key, value in bilm_to_allennlp(self.bilm, ours).items():   # allennlp's order:
            out[prefix + key] = value                                   # biLM, then the mixes
        out.update(rest)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        theirs = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict)
                  if k.startswith(prefix + "_elmo_lstm.")}
        if theirs:
            for key, value in bilm_from_allennlp(self.bilm, theirs, prefix).items():
                state_dict[prefix + "bilm." + key] = value
            state_dict.update({prefix + k: v for k, v in theirs.items()})  # reported unexpected
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def save_weights(self, weight_file: str | os.PathLike) -> None:
        save_weights(self.bilm, weight_file)


# --------------------------------------------------------------------- TF-Hub style ElmoModel
class ElmoModel(nn.Module):
    """What `load()` returns: the biLM + one trainable ScalarMix, called like the TF-Hub module.

        elmo(["Nothing suits me like suit", "A b"])         # strings, split on whitespace
        elmo(tokens=[["Nothing", "suits"], ["A"]])           # token lists (ragged is fine)
        elmo(inputs={"tokens": padded, "sequence_len": lens}, signature="tokens")  # TF-Hub form
        elmo(batch_to_ids(token_lists))                      # char ids, no boundaries (allennlp)

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
        ids = next((x for x in (strings, inputs) if isinstance(x, torch.Tensor)), None)
        if ids is not None:                    # char ids (B, T, C) from batch_to_ids(batch)
            check_char_ids(self.bilm, ids, "ElmoModel")
            if ids.dim() != 3 or (strings is not None and inputs is not None) or tokens is not None:
                raise ElmoError("ElmoModel: give char ids (B, T, C) alone")
        else:
            batch = self._batch(strings, tokens, sequence_len, inputs, signature)
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            out = run_bilm(self.bilm, self.initial_state, batch) if ids is None \
                else run_bilm_ids(self.bilm, self.initial_state, ids)
        # boundaries removed first, then mixed: bilm-tf's weight_layers (layer-norm statistics
        # over the real tokens only; allennlp's Elmo below includes <S>/</S> in them)
        stripped = [remove_sentence_boundaries(x, out["mask"]) for x in out["layers"]]
        layers, mask = [x for x, _ in stripped], stripped[0][1]
        # plain tensors unless something is being trained (the mix in train mode, or the biLM)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.training or self.requires_grad)):
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
        batch = check_batch(tokens)
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
                                          device=device_of(self.bilm), initial=self.initial_state)
        return self._embedder

    def embed_sentence(self, sentence: Sequence[str]) -> np.ndarray:
        return self.embedder.embed_sentence(sentence)

    def embed_batch(self, batch: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return self.embedder.embed_batch(batch)

    def embed_sentences(self, sentences: Iterable[Sequence[str]], batch_size: int = 64):
        return self.embedder.embed_sentences(sentences, batch_size)

    def embed_file(self, *args, **kwargs) -> int:
        return self.embedder.embed_file(*args, **kwargs)

    def encode(self, sentences: Union[str, Sequence[Union[str, Sequence[str]]]], batch_size: int = 32,
               pooling: str = "mean", layers: Union[str, Sequence[int]] = "average",
               convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, show_progress_bar: bool = False):
        """One vector per sentence, the way sentence-transformers' `encode` gives them: (n, 2P)
        numpy float32 (or a tensor with convert_to_tensor / convert_to_numpy=False), in input
        order, computed in length-sorted batches. A sentence is a whitespace-tokenized string or
        a list of tokens; one string gives one vector. `layers` and `pooling` as ElmoVectorizer's
        (embed.select_layers / pool_tokens): "average" (the mean of the 3 layers, 2P wide, the
        default), "top", "all" or layer indices side by side; "mean", "max", "first", "last",
        "mean+max" over the tokens (an empty sentence gives zeros). Deterministic unless the
        model's state is "carry"."""
        if pooling not in POOLINGS:
            raise ElmoError(f"encode: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        picks = select_layers(layers, self.bilm.n_layers + 1, "encode")
        single = isinstance(sentences, str)
        batch = [s.split() if isinstance(s, str) else list(s)
                 for s in ([sentences] if single else sentences)]
        width = (self.output_dim * (1 if picks is None else len(picks))
                 * (2 if pooling == "mean+max" else 1))
        out = np.zeros((len(batch), width), dtype=np.float32)
        order = list(length_sorted_batches([len(s) for s in batch], batch_size))
        for idx in tqdm(order, disable=not show_progress_bar, unit="batch", desc="encode"):
            for i, emb in zip(idx, self.embedder.embed_batch([batch[i] for i in idx])):
                if emb.shape[1]:                                   # (3, n, 2P) -> (D,)
                    out[i] = pool_tokens(layer_tokens(emb, picks), pooling)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if convert_to_tensor or not convert_to_numpy:
            result = torch.from_numpy(out)
            return result[0] if single else result
        return out[0] if single else out

    def save_weights(self, weight_file: str | os.PathLike) -> None:
        save_weights(self.bilm, weight_file)

    def export(self, out_dir: str | os.PathLike) -> tuple[str, str]:
        return export_model(self.bilm, out_dir)


def load(model: Union[str, os.PathLike, BiLM], state: str = DEFAULT_STATE,
         device: Optional[str | torch.device] = None, requires_grad: bool = False,
         do_layer_norm: bool = False, max_batch_size: int = 128,
         progress: Optional[bool] = None) -> ElmoModel:
    """A model directory (options.json + weights.hdf5), a pretrained name (`small`, `medium`,
    `original`, `original-5.5B`: downloaded once, see torch_elmo.hub), or a BiLM -> ElmoModel."""
    check_state(state)
    if isinstance(model, BiLM):
        bilm = model
    else:
        bilm = load_bilm(*resolve_model(model, progress=progress))
    if bilm.n_dirs != 2:
        raise ElmoError(f"{model}: ELMo embeddings need a bidirectional model")
    out = ElmoModel(bilm, state, requires_grad, do_layer_norm, max_batch_size).eval()
    return out.to(resolve_device(device, "device=")) if device is not None else out
