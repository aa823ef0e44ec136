"""Configuration: dataclasses that mirror bilm-tf's options.json, and the model presets.

Field names equal the options.json keys, so a file round-trips through
`Options.from_dict(json.load(f)).to_dict()` unchanged. This module owns:

* `Options` (top level: bilm-tf's training keys) holding `CharCNNOptions` and `LSTMOptions`;
* reading/writing options.json with one-line errors that name the file and the key;
* the presets as plain data: `tiny` (tests), `wt2` (a small model a 2-core CPU trains on
  WikiText-2 or the quickstart corpus in minutes, with its training keys), and the released
  shapes `small`, `medium`, `original`;
* `n_characters`: the ONE place where 261 (training files) vs 262 (inference files) is resolved.
  Inside torch_elmo every char id carries the +1 offset (0 = padding token), so the model always
  uses a 262-row table; 261 is only a number written into training-form options files.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ElmoError, quote
from .outputs import atomic_text




# 256 bytes + BOS/EOS/BOW/EOW/pad chars = 261 trained char ids; +1 for the padding token.
N_CHARACTERS_TRAIN = 261
N_CHARACTERS_INFERENCE = 262


def resolve_n_characters(value: Any, source: str = "options") -> int:
    """Accept 261 (bilm-tf training form) or 262 (inference form); return 262, the table size
    torch_elmo uses everywhere. bilm-tf issues 156/181: users edit this number by hand."""
    if value not in (N_CHARACTERS_TRAIN, N_CHARACTERS_INFERENCE):
        raise ElmoError(f"{source}: char_cnn.n_characters must be 261 or 262, got {value!r}")
    return N_CHARACTERS_INFERENCE


@dataclass
class EmbeddingOptions:
    dim: int = 16


@dataclass
class CharCNNOptions:
    activation: str = "relu"
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)
    filters: list = field(default_factory=lambda: [[1, 32], [2, 32], [3, 64], [4, 128],
                                                   [5, 256], [6, 512], [7, 1024]])
    max_characters_per_token: int = 50
    n_characters: int = N_CHARACTERS_INFERENCE
    n_highway: int = 2

    @property
    def n_filters(self) -> int:
        return sum(n for _, n in self.filters)


@dataclass
class LSTMOptions:
    dim: int = 4096
    projection_dim: int = 512
    n_layers: int = 2
    cell_clip: Optional[float] = 3.0
    proj_clip: Optional[float] = 3.0
    use_skip_connections: bool = True


@dataclass
class Options:
    """bilm-tf options dict. Inference needs `lstm` and `char_cnn`; the rest drive training."""
    lstm: LSTMOptions = field(default_factory=LSTMOptions)
    char_cnn: CharCNNOptions = field(default_factory=CharCNNOptions)
    bidirectional: bool = True
    dropout: float = 0.1
    all_clip_norm_val: float = 10.0
    n_epochs: int = 10
    n_train_tokens: Optional[int] = None  # counted from the data when None (never a 1B-Word default)
    batch_size: int = 128
    n_gpus: int = 1
    unroll_steps: int = 20
    n_tokens_vocab: Optional[int] = None
    n_negative_samples_batch: int = 8192
    learning_rate: float = 0.2
    sample_softmax: bool = True
    # Not in bilm-tf (0 = its recipe): before each batch, zero each row's carried LSTM state with
    # this probability, so the model also learns from the zero state that evaluation and
    # embedding start from. Without it a small model trained on WikiText-2 can fall from the
    # zero state into a saturated, absorbing LSTM state (held-out perplexity in the 10^4s).
    state_reset_prob: float = 0.0
    # Not in bilm-tf: the training procedure, "bilm-tf" (its recipe, exactly) or "fast" (RECIPES).
    recipe: str = "bilm-tf"

    # ----------------------------------------------------------------------------- conversion
    def to_dict(self, inference: bool = False) -> dict:
        """The options.json dict. `inference=True` writes only the keys an embedder needs
        (the form of the released files), with n_characters 262."""
        d = dataclasses.asdict(self)
        if inference:
            d = {"lstm": d["lstm"], "char_cnn": d["char_cnn"]}
        d["char_cnn"]["n_characters"] = N_CHARACTERS_INFERENCE
        for k in ("cell_clip", "proj_clip"):
            if d["lstm"][k] is None:
                del d["lstm"][k]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "options") -> "Options":
        if not isinstance(d, dict):
            raise ElmoError(f"{source}: expected a JSON object, got {type(d).__name__}")
        lstm = _section(d, "lstm", source)
        cnn = _section(d, "char_cnn", source)
        emb = _section(cnn, "embedding", source, prefix="char_cnn.")
        lstm_o = LSTMOptions(
            dim=_req(lstm, "dim", int, source, "lstm."),
            projection_dim=_req(lstm, "projection_dim", int, source, "lstm."),
            n_layers=_req(lstm, "n_layers", int, source, "lstm."),
            cell_clip=_opt(lstm, "cell_clip", float, source, "lstm."),
            proj_clip=_opt(lstm, "proj_clip", float, source, "lstm."),
            use_skip_connections=_req(lstm, "use_skip_connections", bool, source, "lstm."),
        )
        filters = _req(cnn, "filters", list, source, "char_cnn.")
        if not filters or not all(isinstance(f, (list, tuple)) and len(f) == 2
                                  and all(isinstance(v, int) and v > 0 for v in f) for f in filters):
            raise ElmoError(f"{source}: char_cnn.filters must be a non-empty list of [width, count] "
                            f"pairs of positive integers, got {filters!r}")
        cnn_o = CharCNNOptions(
            activation=_req(cnn, "activation", str, source, "char_cnn."),
            embedding=EmbeddingOptions(dim=_req(emb, "dim", int, source, "char_cnn.embedding.")),
            filters=[list(f) for f in filters],
            max_characters_per_token=_req(cnn, "max_characters_per_token", int, source, "char_cnn."),
            n_characters=resolve_n_characters(_req(cnn, "n_characters", int, source, "char_cnn."),
                                              source),
            n_highway=_req(cnn, "n_highway", int, source, "char_cnn."),
        )
        if cnn_o.activation not in ("relu", "tanh"):
            raise ElmoError(f"{source}: char_cnn.activation must be 'relu' or 'tanh', "
                            f"got {cnn_o.activation!r}")
        if cnn_o.max_characters_per_token < 3:
            raise ElmoError(f"{source}: char_cnn.max_characters_per_token must be >= 3")
        if max(w for w, _ in cnn_o.filters) > cnn_o.max_characters_per_token:
            raise ElmoError(f"{source}: a char_cnn filter is wider than max_characters_per_token")
        if lstm_o.n_layers < 1 or lstm_o.dim < 1 or lstm_o.projection_dim < 1:
            raise ElmoError(f"{source}: lstm.dim, lstm.projection_dim and lstm.n_layers must be >= 1")
        if lstm_o.projection_dim >= lstm_o.dim:
            raise ElmoError(f"{source}: lstm.projection_dim ({lstm_o.projection_dim}) must be smaller "
                            f"than lstm.dim ({lstm_o.dim}); cells without projection are not supported")
        o = cls(lstm=lstm_o, char_cnn=cnn_o)
        if d.get("recipe", "bilm-tf") not in RECIPES:
            raise ElmoError(f"{source}: recipe must be one of {', '.join(RECIPES)}, "
                            f"got {d.get('recipe')!r}")
        if d.get("share_embedding_softmax"):
            raise ElmoError(f"{source}: share_embedding_softmax needs word inputs; "
                            "torch_elmo models read characters")
        for f in dataclasses.fields(cls):
            if f.name in ("lstm", "char_cnn") or f.name not in d:
                continue
            value = d[f.name]
            default = getattr(o, f.name)
            if value is not None and default is not None and not isinstance(value, type(default)) \
                    and not (isinstance(default, float) and isinstance(value, int)):
                raise ElmoError(f"{source}: {f.name} must be {type(default).__name__}, got {value!r}")
            setattr(o, f.name, float(value) if isinstance(default, float) else value)
        return o

    def replace(self, **changes) -> "Options":
        o = copy.deepcopy(self)
        for k, v in changes.items():
            if not hasattr(o, k):
                raise ElmoError(f"unknown option {k!r}")
            setattr(o, k, v)
        return o


def _section(d: dict, key: str, source: str, prefix: str = "") -> dict:
    if key not in d:
        raise ElmoError(f"{source}: missing key '{prefix}{key}'")
    if not isinstance(d[key], dict):
        raise ElmoError(f"{source}: '{prefix}{key}' must be an object")
    return d[key]


def _req(d: dict, key: str, typ, source: str, prefix: str):
    if key not in d:
        raise ElmoError(f"{source}: missing key '{prefix}{key}'")
    return _check(d[key], key, typ, source, prefix)


def _opt(d: dict, key: str, typ, source: str, prefix: str):
    if d.get(key) is None:
        return None
    return _check(d[key], key, typ, source, prefix)


def _check(value, key, typ, source, prefix):
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is not bool and isinstance(value, bool) or not isinstance(value, typ):
        raise ElmoError(f"{source}: '{prefix}{key}' must be {typ.__name__}, got {value!r}")
    return value


def read_options(path: str | os.PathLike) -> Options:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ElmoError(f"{path}: options file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ElmoError(f"{path}: not valid JSON ({quote(e)})") from None
    return Options.from_dict(d, source=path)


def write_options(options: Options, path: str | os.PathLike, inference: bool = False) -> None:
    with atomic_text(path) as f:
        json.dump(options.to_dict(inference=inference), f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------- recipes
# How a run trains (the architecture and data are the same): the optimizer, its schedule, and the
# option values the recipe sets ("options"; flags given by the user still win, `with_recipe`).
# "bilm-tf" is its train_elmo.py exactly (Adagrad, accumulator 1.0, constant learning rate, the
# learning_rate option). "fast": AdamW with a linear warm-up and a cosine decay to
# final_lr_fraction over the run's horizon (its planned updates, or --max-tokens / --max-time,
# whichever ends first), no dropout (a budget of minutes underfits), 4,096 sampled negatives, bf16
# autocast where the device has native bf16 (device.bf16_native; fp32 elsewhere); the softmax
# gradient is dense (AdamW keeps no sparse state). Chosen by measurement (benchmarks/README.md).
RECIPES: dict[str, dict] = {
    "bilm-tf": {"optimizer": "adagrad", "schedule": "constant", "options": {"learning_rate": 0.2}},
    "fast": {"optimizer": "adamw", "betas": (0.9, 0.98), "eps": 1e-8,
             "weight_decay": 0.0, "warmup_steps": 100, "schedule": "cosine",
             "final_lr_fraction": 0.1, "bf16": True,
             "options": {"learning_rate": 1e-2, "dropout": 0.0, "n_negative_samples_batch": 4096}},
}


def with_recipe(options: "Options", name: str) -> "Options":
    """`options` with recipe `name` and the option values it sets (RECIPES[name]["options"])."""
    if name not in RECIPES:
        raise ElmoError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return options.replace(recipe=name, **RECIPES[name]["options"])


# ------------------------------------------------------------------------------------- presets
_RELEASED_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]

PRESETS: dict[str, dict] = {
    # Fast tests: the bilm-tf fixture's shapes, with residual connections like every released model.
    "tiny": {
        "lstm": {"dim": 64, "projection_dim": 16, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                 "use_skip_connections": True},
        "char_cnn": {"activation": "relu", "embedding": {"dim": 4},
                     "filters": [[1, 4], [2, 8], [3, 16], [4, 32], [5, 64]],
                     "max_characters_per_token": 50, "n_characters": 262, "n_highway": 1},
    },
    # A 2-core CPU trains this in minutes (the quickstart, benchmarks/train_wikitext2.py): char CNN
    # 512 filters -> 64, 2 layers x LSTM 256 units with a 64-dim projection per direction.
    "wt2": {
        "lstm": {"dim": 256, "projection_dim": 64, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                 "use_skip_connections": True},
        "char_cnn": {"activation": "relu", "embedding": {"dim": 16},
                     "filters": [[1, 16], [2, 16], [3, 32], [4, 64], [5, 128], [6, 256]],
                     "max_characters_per_token": 50, "n_characters": 262, "n_highway": 1},
        "batch_size": 32, "unroll_steps": 20, "n_negative_samples_batch": 1024,
        "state_reset_prob": 0.1,  # see Options.state_reset_prob: the zero-state attractor
    },
    # elmo_2x1024_128_2048cnn_1xhighway
    "small": {
        "lstm": {"dim": 1024, "projection_dim": 128, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                 "use_skip_connections": True},
        "char_cnn": {"activation": "relu", "embedding": {"dim": 16}, "filters": _RELEASED_FILTERS,
                     "max_characters_per_token": 50, "n_characters": 262, "n_highway": 1},
    },
    # elmo_2x2048_256_2048cnn_1xhighway
    "medium": {
        "lstm": {"dim": 2048, "projection_dim": 256, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                 "use_skip_connections": True},
        "char_cnn": {"activation": "relu", "embedding": {"dim": 16}, "filters": _RELEASED_FILTERS,
                     "max_characters_per_token": 50, "n_characters": 262, "n_highway": 1},
    },
    # elmo_2x4096_512_2048cnn_2xhighway (the 1B Word Benchmark model)
    "original": {
        "lstm": {"dim": 4096, "projection_dim": 512, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                 "use_skip_connections": True},
        "char_cnn": {"activation": "relu", "embedding": {"dim": 16}, "filters": _RELEASED_FILTERS,
                     "max_characters_per_token": 50, "n_characters": 262, "n_highway": 2},
    },
}


def preset(name: str) -> Options:
    if name not in PRESETS:
        raise ElmoError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Options.from_dict(copy.deepcopy(PRESETS[name]), source=f"preset {name}")
