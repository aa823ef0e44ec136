"""scikit-learn: `ElmoVectorizer`, a transformer from texts to one ELMo vector per text.

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    from torch_elmo.sklearn import ElmoVectorizer

    clf = make_pipeline(ElmoVectorizer(model="small"), LogisticRegression(max_iter=1000))
    clf.fit(train_texts, train_labels)

Texts are whitespace-tokenized strings (or lists of tokens). Each is run through the biLM by an
`ElmoEmbedder` (so `state` and `device` mean what they mean there); `layers` picks the biLM
layers and `pooling` turns the token vectors into one float32 row of `n_features_out_` values:

* layers: "all" (the L + 1 layers concatenated, (L + 1) * 2P), "average" (their mean, 2P),
  "top" (the last LSTM layer, 2P), an int (that layer) or a list of ints (those, concatenated);
  the names of `elmo embed --layers`;
* pooling: "mean", "max", "first" or "last" over the text's tokens, or "mean+max" (the two
  concatenated). An empty text gives a row of zeros.

The estimator holds only its parameters and `n_features_out_`. `fit` loads the model (a model
directory, a pretrained name or an hf:// address: see torch_elmo.hub) and keeps it out of the
parameters; pickling drops it and the first `transform` after unpickling loads it again from the
same `model`. So clone, Pipeline, cross_val_score and GridSearchCV (n_jobs > 1 too) work, and a
pickled pipeline holds no tensors. Loaded biLMs are shared within a process (keyed by files,
their mtime and the device), so clones fitted one after another load the weights once.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
import torch

from .config import ElmoError
from .embed import POOLINGS, ElmoEmbedder, layer_tokens, pool_tokens, select_layers
from .export import load_bilm
from .hub import resolve_model

try:
    from sklearn.base import BaseEstimator, TransformerMixin
    from sklearn.utils.validation import check_is_fitted
except ImportError:
    raise ElmoError("torch_elmo.sklearn needs scikit-learn: pip install 'torch-elmo[sklearn]'") \
        from None



@functools.lru_cache(maxsize=2)
def _cached_bilm(options_file: str, weight_file: str, mtime_ns: int, device: str):
    return load_bilm(options_file, weight_file).to(device)


def text_tokens(X) -> list[list[str]]:
    """A list (array, Series, one-column frame) of texts or token lists -> token lists."""
    if isinstance(X, (str, bytes)):
        raise ElmoError("ElmoVectorizer: expected a list of texts, got one string (wrap it in a "
                        "list)")
    if getattr(X, "ndim", 1) == 2:  # a one-column DataFrame or (n, 1) array
        if X.shape[1] != 1:
            raise ElmoError(f"ElmoVectorizer: expected one column of texts, got shape {X.shape}")
        X = X.iloc[:, 0] if hasattr(X, "iloc") else np.asarray(X)[:, 0]
    out = []
    for i, text in enumerate(X):
        if isinstance(text, str):
            out.append(text.split())
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            out.append(list(text))
        else:
            raise ElmoError(f"ElmoVectorizer: text {i}: expected a string or a list of token "
                            f"strings, got {type(text).__name__}")
    return out


class ElmoVectorizer(TransformerMixin, BaseEstimator):
    """Texts -> (n_texts, n_features_out_) float32 ELMo vectors; see the module doc."""

    def __init__(self, model: str | os.PathLike = "small", layers="all", pooling: str = "mean",
                 batch_size: int = 32, device: Optional[str] = None, state: str = "warm"):
        self.model = model
        self.layers = layers
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = device
        self.state = state

    # ------------------------------------------------------------------------------ parameters
    def _layer_indices(self, n: int) -> Optional[list[int]]:
        """The chosen layer indices of the n = L + 1 layers; None for "average"."""
        return select_layers(self.layers, n, "ElmoVectorizer")

    def _check_params(self) -> None:
        if self.pooling not in POOLINGS:
            raise ElmoError(f"ElmoVectorizer: pooling must be one of {', '.join(POOLINGS)}, got "
                            f"{self.pooling!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ElmoError(f"ElmoVectorizer: batch_size must be a positive int, got "
                            f"{self.batch_size!r}")
        if not isinstance(self.model, (str, os.PathLike)):
            raise ElmoError("ElmoVectorizer: model must be a model directory, a pretrained name "
                            "or an hf:// address (it is reloaded from there after pickling)")

    # ---------------------------------------------------------------------------------- model
    def _load_embedder(self) -> ElmoEmbedder:
        options_file, weight_file = resolve_model(self.model)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bilm = _cached_bilm(options_file, weight_file, os.stat(weight_file).st_mtime_ns,
                            str(device))
        return ElmoEmbedder(model=bilm, state=self.state, device=device,
                            max_batch_size=max(int(self.batch_size), 1))

    def _get_embedder(self) -> ElmoEmbedder:
        if getattr(self, "_embedder", None) is None:
            self._embedder = self._load_embedder()
        return self._embedder

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_embedder", None)  # never pickle the biLM: transform reloads it from `model`
        return state

    # -------------------------------------------------------------------------------- sklearn
    def fit(self, X=None, y=None):
        """Load the model and fix `n_features_out_`; X and y are not used."""
        self._check_params()
        self._embedder = self._load_embedder()
        bilm = self._embedder.model
        picks = self._layer_indices(bilm.n_layers + 1)
        per_layer = 2 * bilm.proj_dim
        self.n_features_out_ = per_layer * (1 if picks is None else len(picks)) \
            * (2 if self.pooling == "mean+max" else 1)
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        texts = text_tokens(X)
        embedder = self._get_embedder()
        out = np.zeros((len(texts), self.n_features_out_), dtype=np.float32)
        # longest first batches texts of similar length together (less padding); rows keep
        # their input order
        order = sorted((i for i, t in enumerate(texts) if t), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            for i, layers in zip(rows, embedder.embed_batch([texts[i] for i in rows])):
                out[i] = self._pool(layers)
        return out

    def _pool(self, layers: np.ndarray) -> np.ndarray:
        # layers: (L + 1, n, 2P) of one text
        return pool_tokens(layer_tokens(layers, self._layer_indices(layers.shape[0])),
                           self.pooling)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return np.asarray([f"elmo{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
