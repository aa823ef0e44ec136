"""flair: `ElmoEmbeddings`, torch-elmo vectors as a flair `TokenEmbeddings`.

    import flair.datasets, flair.models, flair.trainers
    from torch_elmo.flair import ElmoEmbeddings

    corpus = flair.datasets.CONLL_03(...)          # or any ColumnCorpus
    tagger = flair.models.SequenceTagger(hidden_size=256, embeddings=ElmoEmbeddings("small"),
                                         tag_dictionary=corpus.make_label_dictionary("ner"),
                                         tag_type="ner")
    flair.trainers.ModelTrainer(tagger, corpus).train("runs/ner", max_epochs=10)

`model` is a model directory, a pretrained name or an hf:// address (torch_elmo.hub). Each
token's vector comes from one biLM run over its sentence (an `ElmoEmbedder`, so `state` means what
it means there); `layers` picks what the vector holds, with the names of `elmo embed --layers`:
"all" (the L + 1 layers concatenated, as flair's own ELMoEmbeddings), "average", "top", an int
(that layer) or a list of ints (concatenated). The vectors are static (the biLM is frozen), so
flair computes them once per sentence and keeps them (`embeddings_storage_mode`).

A saved flair model holds the biLM's options and weights (its state dict), so
`SequenceTagger.load(path)` needs only `import torch_elmo.flair` first (that registers the class),
not the original model files.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from .config import ElmoError, Options
from .embed import ElmoEmbedder, select_layers
from .export import load_bilm
from .hub import resolve_model
from .model import BiLM

try:
    import flair
    from flair.data import Sentence
    from flair.embeddings import TokenEmbeddings
    from flair.embeddings.base import register_embeddings
except ImportError:
    raise ElmoError("torch_elmo.flair needs flair: pip install 'torch-elmo[flair]'") from None



@register_embeddings("torch_elmo.ElmoEmbeddings")  # the name saved flair models refer to
class ElmoEmbeddings(TokenEmbeddings):
    """Frozen torch-elmo token vectors for flair; see the module doc."""

    def __init__(self, model: Union[str, os.PathLike, BiLM] = "small",
                 layers: Union[str, int, Sequence[int]] = "all", state: str = "warm",
                 batch_size: int = 32, name: Optional[str] = None):
        super().__init__()
        self.model_name = "BiLM" if isinstance(model, BiLM) else str(model)
        self.name = name or f"torch-elmo-{os.path.basename(self.model_name.rstrip('/'))}-{layers}"
        self.static_embeddings = True
        self.bilm = model if isinstance(model, BiLM) else load_bilm(*resolve_model(model))
        if self.bilm.n_dirs != 2:
            raise ElmoError(f"{model}: ELMo embeddings need a bidirectional model")
        for p in self.bilm.parameters():
            p.requires_grad_(False)
        self.layers = layers if isinstance(layers, (str, int)) else [int(k) for k in layers]
        self.picks = self._layer_indices(self.bilm.n_layers + 1)
        self.state = state
        self.batch_size = batch_size
        self.embedder = ElmoEmbedder(model=self.bilm, state=state, max_batch_size=batch_size,
                                     device=next(self.bilm.parameters()).device)
        per_layer = 2 * self.bilm.proj_dim
        self._length = per_layer * (1 if self.picks is None else len(self.picks))
        self.to(flair.device)

    def _layer_indices(self, n: int) -> Optional[list[int]]:
        """The chosen layer indices of the n = L + 1 layers; None for "average"."""
        return select_layers(self.layers, n, "ElmoEmbeddings")

    @property
    def embedding_length(self) -> int:
        return self._length

    def train(self, mode: bool = True) -> "ElmoEmbeddings":
        super().train(mode)
        self.bilm.eval()  # frozen: never dropout inside the biLM
        return self

    def _add_embeddings_internal(self, sentences: list[Sentence]) -> list[Sentence]:
        nonempty = [s for s in sentences if len(s) > 0]
        for start in range(0, len(nonempty), self.batch_size):
            chunk = nonempty[start:start + self.batch_size]
            # layers: (L + 1, B, T + 2, 2P) with <S> at 0 and </S> after each sentence
            layers, _ = self.embedder.batch_to_layers([[t.text for t in s] for s in chunk])
            for b, sentence in enumerate(chunk):
                x = layers[:, b, 1:len(sentence) + 1]  # (L + 1, n, 2P)
                if self.picks is None:
                    vectors = x.mean(dim=0)  # (n, 2P)
                else:
                    vectors = x[self.picks].permute(1, 0, 2).reshape(len(sentence), -1)  # (n, k*2P)
                for token, vector in zip(sentence.tokens, vectors):
                    token.set_embedding(self.name, vector)
        return sentences

    # flair's (de)serialisation: the options go in the params, the weights in the state dict
    def to_params(self) -> dict[str, Any]:
        return {"options": self.bilm.options.to_dict(inference=True), "layers": self.layers,
                "state": self.state, "batch_size": self.batch_size, "name": self.name}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ElmoEmbeddings":
        # weights: random here, filled from the saved state dict by flair right after
        bilm = BiLM(Options.from_dict(params["options"])).eval()
        return cls(bilm, layers=params["layers"], state=params["state"],
                   batch_size=params["batch_size"], name=params["name"])

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, layers={self.layers!r}, state={self.state!r}"
