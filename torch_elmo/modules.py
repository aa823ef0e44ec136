"""The nn.Module front doors onto a trained biLM: `ScalarMix`, `Elmo` (allennlp), `ElmoModel`
(called like the TF-Hub module) and `load`.

* `load(model)` -> `ElmoModel`, called like the TF-Hub module: `elmo(["a sentence"])` or
  `elmo(tokens=[[...]])` -> dict of tensors `elmo`, `default`, `word_emb`, `lstm_outputs1`,
  `lstm_outputs2`, `sequence_len`.
* `Elmo` (allennlp nn.Module): char ids (B, T, 50) without boundaries -> `elmo_representations`
  (K scalar mixes) + `mask`; `requires_grad=True` fine-tunes the biLM; `save_weights` writes it
  back in the bilm-tf layout.

Both run the biLM through embed.py's `run_bilm` / `InitialState`, so the inference-state choice
(`state=`: carry, zero, warm) means the same as for `ElmoEmbedder`.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .chars import batch_to_ids
from .config import ElmoError
from .embed import (DEFAULT_STATE, ElmoEmbedder, InitialState, add_sentence_boundaries,
                    check_batch, check_state, device_of, remove_sentence_boundaries, resolve_bilm,
                    run_bilm)
from .export import export_model, load_bilm, save_weights
from .hub import resolve_model
from .model import BiLM


# ------------------------------------------------------------------------------------ ScalarMix
class ScalarMix(nn.Module):
    """ELMo_task = gamma * sum_j softmax(w)_j * h_j, the task-specific mix of the biLM layers.

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
        self.bilm = resolve_bilm(options_file, weight_file, module).eval()
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
            inputs = batch_to_ids(check_batch(inputs), C, add_boundaries=False)
        if inputs.dim() < 3 or inputs.shape[-1] != C:
            raise ElmoError(f"Elmo: expected char ids (..., T, {C}), got shape {tuple(inputs.shape)}")
        lead = inputs.shape[:-2]
        ids = inputs.reshape(-1, *inputs.shape[-2:]).to(device_of(self.bilm))
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
            out = run_bilm(self.bilm, self.initial_state, batch)
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
    out = ElmoModel(bilm, state, requires_grad, do_layer_norm, max_batch_size)
    return out.to(device) if device is not None else out
