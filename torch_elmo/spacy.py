"""spacy: torch-elmo as spaCy pipeline components (the `spacy` extra; `import torch_elmo` never
imports this module or spaCy).

    import spacy
    nlp = spacy.blank("en")                                   # no spaCy model download
    nlp.add_pipe("torch_elmo_ner", config={"model": "runs/ner"})       # elmo ner --save runs/ner
    nlp.add_pipe("torch_elmo_textcat", config={"model": "runs/sst"})   # elmo classify --save
    nlp.add_pipe("torch_elmo", config={"model": "runs/lm/export", "layers": "average"})
    doc = nlp("EU rejects German call to boycott British lamb .")
    doc.ents, doc.cats, doc.tensor, doc[0].vector
    docs = list(nlp.pipe(texts, batch_size=256))            # batched across documents

The three factories are registered through spaCy's `spacy_factories` entry points (pyproject.toml),
so `add_pipe` finds them without importing this module first, and `nlp.to_disk(path)` +
`spacy.load(path)` rebuild them from the pipeline's config.cfg. (So every `spacy.blank` /
`spacy.load` where torch-elmo is installed imports this module, and torch with it, as any package
registering spaCy components through entry points makes it import that package.)

* `torch_elmo_ner` (a saved `Tagger`, torch_elmo.load_task): sets `doc.ents` (all of them: entities
  an earlier component set are replaced).
* `torch_elmo_textcat` (a saved `TextClassifier`): sets `doc.cats` to the label probabilities
  (`predict_proba`, one entry per label of the model, summing to 1); a doc without words (empty,
  or whitespace only) gets none, as `predict` gives such a text no label.
* `torch_elmo` (an ELMo biLM: anything `torch_elmo.load` takes, a model directory, a pretrained
  name or an hf:// address): sets `doc.tensor` (n_tokens, D) float32 to the ELMo vectors and
  makes `token.vector` / `span.vector` / `doc.vector` read them (user hooks, so they win over
  the vocabulary's static vectors; span and doc vectors are the mean over their tokens, and
  `similarity` is the cosine of these vectors).
  `layers` as `elmo embed --layers` / torch_elmo.flair: "average" (the L + 1 layers' mean, 2P
  wide; the default), "top", "all" (side by side), a layer index or a list of indices.

Which tokens the models read: spaCy's tokens of the doc, whitespace tokens (`token.is_space`:
newlines, runs of spaces) left out, since the biLM and the task models were trained on
whitespace-split text that never holds one. So the ELMo vectors line up one-to-one with spaCy's
tokens (a whitespace token's row of `doc.tensor` is zero), and a tagger reads the text split the
way spaCy splits it (punctuation and clitics apart, close to CoNLL-2003's tokenisation). The NER
and textcat components take `tokens="whitespace"` instead: the model then reads `doc.text` split
on whitespace, exactly what `elmo predict` and `Tagger.predict(text)` read, and each entity is
put on spaCy's tokens through its character offsets. An entity whose characters do not fall on
spaCy token boundaries (a tokenizer or an earlier component merged tokens across whitespace, e.g.
`merge_noun_chunks`) is left out with a one-line warning naming it; nothing crashes. A text over
1,000 tokens (torch_elmo: `max_tokens`) is read in overlapping windows, as `elmo embed` does.

Batching: `nlp.pipe(texts, batch_size=N)` hands each component N docs at a time, and a component
runs its model over all of them at once in length-sorted batches of the component's own
`batch_size` sentences (default 64, the batch `elmo ner` / `elmo classify` compute ELMo layers
in: a small biLM's cost is mostly per batch and time step); `nlp(text)` is one doc. Outputs do
not depend on batching (the default "warm" inference state). With `nlp.pipe(..., n_process=N)`
each forked worker runs torch on one thread (BatchedComponent.forked).

The pipeline's config keeps `model` as given. A relative path is resolved against the current
directory when the component is created (as spaCy resolves every path in a config), so a saved
pipeline that names a relative model path loads only where that path still leads (from the same
working directory); give an absolute path (or a pretrained name) for a pipeline that loads from
anywhere. The model files are not copied into the pipeline directory.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Iterable, Iterator, List, Optional, Union

import numpy as np
import torch

from .config import ElmoError
from .embed import (DEFAULT_MAX_TOKENS, DEFAULT_STATE, embedded_lines, layer_tokens,
                    select_layers)
from .modules import load

try:
    from spacy.language import Language
    from spacy.pipeline import Pipe
    from spacy.tokens import Doc, Span, Token
    from spacy.util import minibatch
except ImportError:
    raise ElmoError("torch_elmo.spacy needs spaCy: pip install 'torch-elmo[spacy]'") from None

TOKEN_MODES = ("spacy", "whitespace")
BATCH_SIZE = 64   # sentences per biLM batch (module doc)
_WORD = re.compile(r"\S+")


def check_tokens_mode(tokens: str, who: str) -> str:
    if tokens not in TOKEN_MODES:
        raise ElmoError(f"{who}: tokens must be one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
    return tokens


def doc_words(doc: Doc, tokens: str = "spacy") -> tuple[list[str], list[tuple[int, int]]]:
    """The words a model reads from `doc` and their (start_char, end_char) in doc.text: spaCy's
    non-whitespace tokens ("spacy") or doc.text split on whitespace ("whitespace")."""
    if tokens == "spacy":
        words = [t for t in doc if not t.is_space]
        return [t.text for t in words], [(t.idx, t.idx + len(t.text)) for t in words]
    spans = [m.span() for m in _WORD.finditer(doc.text)]
    return [doc.text[s:e] for s, e in spans], spans


def missing_path_note(model: str) -> str:
    """Said after a model that did not load: where a relative path was looked for."""
    if os.path.isabs(model) or os.path.exists(model):
        return ""
    return f" (a relative path is resolved against the current directory, {os.getcwd()})"


class BatchedComponent(Pipe):
    """A component that annotates a list of docs with one model run: `annotate(docs)`.
    `nlp(text)` annotates one doc; `nlp.pipe` hands over `batch_size` docs at a time. A failing
    batch goes to spaCy's error handler (`nlp.set_error_handler`), as spaCy's own pipes do."""

    def __init__(self, nlp: Language, name: str):
        self.name = name
        self.vocab = nlp.vocab
        self.pid = os.getpid()

    def annotate(self, docs: list[Doc]) -> None:
        raise NotImplementedError

    def forked(self) -> None:
        """In a worker that `nlp.pipe(n_process=N)` forked, torch runs on one thread: the
        parent's thread pools (OpenMP's, the biLM's direction thread) do not survive fork, so
        a worker of a parent that already ran the model would wait on them forever; and N
        workers share the cores anyway."""
        if os.getpid() != self.pid:
            torch.set_num_threads(1)
            self.pid = os.getpid()

    def __call__(self, doc: Doc) -> Doc:
        self.forked()
        self.annotate([doc])
        return doc

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        self.forked()
        error_handler = self.get_error_handler()
        for docs in minibatch(stream, size=batch_size):
            try:
                self.annotate(docs)
                yield from docs
            except Exception as e:  # spaCy's contract: the handler re-raises or skips the batch
                error_handler(self.name, self, docs, e)


# ------------------------------------------------------------------------------------ torch_elmo
def token_vector(token: Token) -> np.ndarray:
    return token.doc.tensor[token.i]


def span_vector(span: Span) -> np.ndarray:
    rows = span.doc.tensor[span.start:span.end]   # (n, D)
    return rows.mean(axis=0) if len(rows) else np.zeros(span.doc.tensor.shape[1], np.float32)


def doc_vector(doc: Doc) -> np.ndarray:
    return span_vector(doc[:])


def cosine(a, b) -> float:
    """The cosine of two tokens', spans' or docs' vectors (0 when one is zero): their
    `similarity`, from the ELMo vectors rather than spaCy's static ones."""
    u, v = a.vector, b.vector
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.dot(u, v)) / norm if norm else 0.0


class ElmoVectors(BatchedComponent):
    """`torch_elmo`: doc.tensor and token/span/doc vectors from a frozen biLM; see the module
    doc."""

    def __init__(self, nlp: Language, name: str, model: str,
                 layers: Union[str, int, List[int]] = "average", state: str = DEFAULT_STATE,
                 batch_size: int = BATCH_SIZE, max_tokens: int = DEFAULT_MAX_TOKENS,
                 device: Optional[str] = None):
        super().__init__(nlp, name)
        self.model = model
        try:
            self.elmo = load(model, state=state, device=device)
        except ElmoError as e:
            raise ElmoError(f"{e}{missing_path_note(model)}") from None
        self.embedder = self.elmo.embedder
        self.picks = select_layers(layers, self.elmo.bilm.n_layers + 1, name)
        self.width = self.elmo.output_dim * (1 if self.picks is None else len(self.picks))
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def annotate(self, docs: list[Doc]) -> None:
        keep = [[t.i for t in doc if not t.is_space] for doc in docs]
        sentences = [[doc[i].text for i in idx] for doc, idx in zip(docs, keep)]
        tensors = [np.zeros((len(doc), self.width), np.float32) for doc in docs]
        full = [k for k, s in enumerate(sentences) if s]
        for j, layers in embedded_lines(self.embedder, [sentences[k] for k in full],
                                        self.batch_size, self.max_tokens):
            k = full[j]
            tensors[k][keep[k]] = layer_tokens(layers, self.picks)   # (L + 1, n, 2P) -> (n, D)
        for doc, tensor in zip(docs, tensors):
            doc.tensor = tensor
            doc.user_token_hooks["vector"] = token_vector
            doc.user_span_hooks["vector"] = span_vector
            doc.user_hooks["vector"] = doc_vector
            for hooks in (doc.user_token_hooks, doc.user_span_hooks, doc.user_hooks):
                hooks["similarity"] = cosine


@Language.factory("torch_elmo", default_config={
    "layers": "average", "state": DEFAULT_STATE, "batch_size": BATCH_SIZE,
    "max_tokens": DEFAULT_MAX_TOKENS, "device": None})
def make_elmo(nlp: Language, name: str, model: str, layers: Union[str, int, List[int]],
              state: str, batch_size: int, max_tokens: int, device: Optional[str]) -> ElmoVectors:
    return ElmoVectors(nlp, name, model, layers, state, batch_size, max_tokens, device)


# ------------------------------------------------------------------------- saved task models
class TaskComponent(BatchedComponent):
    """A component around a saved task model (torch_elmo.load_task) of kind `kind`."""
    kind = ""
    factory = {"ner": "torch_elmo_ner", "classify": "torch_elmo_textcat"}

    def __init__(self, nlp: Language, name: str, model: str, tokens: str = "spacy",
                 batch_size: int = BATCH_SIZE, device: Optional[str] = None):
        from .tasks import load_task   # here: spacy.blank() imports this module (entry points)
        super().__init__(nlp, name)
        self.tokens = check_tokens_mode(tokens, name)
        self.model = model
        try:
            self.task = load_task(model, device=device)
        except ElmoError as e:
            raise ElmoError(f"{e}{missing_path_note(model)}") from None
        if self.task.kind != self.kind:
            raise ElmoError(f"{model}: a saved {self.task.kind!r} model, but {name} needs a "
                            f"{self.kind!r} one (use {self.factory[self.task.kind]})")
        self.batch_size = batch_size


class EntityTagger(TaskComponent):
    """`torch_elmo_ner`: doc.ents from a saved NER tagger; see the module doc."""
    kind = "ner"

    @property
    def labels(self) -> tuple[str, ...]:
        """The entity types (as spaCy's `ner` labels), from the tagger's BIO tags."""
        return tuple(sorted({tag[2:] for tag in self.task.labels if tag != "O"}))

    def annotate(self, docs: list[Doc]) -> None:
        words = [doc_words(doc, self.tokens) for doc in docs]
        results = self.task.predict([w for w, _ in words], batch_size=self.batch_size)
        for doc, (tokens, offsets), result in zip(docs, words, results):
            doc.ents = self.spans(doc, tokens, offsets, result)

    def spans(self, doc: Doc, tokens: list[str], offsets: list[tuple[int, int]],
              result: dict) -> list[Span]:
        """The result's entities as spans of `doc`, via the character offsets of the words."""
        if list(result["tokens"]) != tokens:
            warnings.warn(f"{self.name}: the tagger returned {len(result['tokens'])} tokens for "
                          f"the {len(tokens)} of {shorten(doc.text)}; no entities set",
                          stacklevel=3)
            return []
        out = []
        for ent in result["entities"]:
            start, end = offsets[ent["start"]][0], offsets[ent["end"] - 1][1]
            span = doc.char_span(start, end, label=ent["label"])
            if span is None:
                warnings.warn(f"{self.name}: entity {doc.text[start:end]!r} ({ent['label']}, "
                              f"characters {start}-{end}) does not fall on spaCy token "
                              f"boundaries in {shorten(doc.text)}; left out", stacklevel=3)
                continue
            out.append(span)
        return out


def shorten(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")


@Language.factory("torch_elmo_ner", default_config={
    "tokens": "spacy", "batch_size": BATCH_SIZE, "device": None})
def make_ner(nlp: Language, name: str, model: str, tokens: str, batch_size: int,
             device: Optional[str]) -> EntityTagger:
    return EntityTagger(nlp, name, model, tokens, batch_size, device)


class TextCategorizer(TaskComponent):
    """`torch_elmo_textcat`: doc.cats from a saved text classifier; see the module doc."""
    kind = "classify"

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.task.classes_)

    def annotate(self, docs: list[Doc]) -> None:
        words = [doc_words(doc, self.tokens)[0] for doc in docs]
        proba = self.task.predict_proba(words, batch_size=self.batch_size)  # (n, n_labels)
        for doc, row in zip(docs, proba):
            if not np.isnan(row).any():        # NaN: a doc without words has no label
                doc.cats = dict(zip(self.labels, map(float, row)))


@Language.factory("torch_elmo_textcat", default_config={
    "tokens": "spacy", "batch_size": BATCH_SIZE, "device": None})
def make_textcat(nlp: Language, name: str, model: str, tokens: str, batch_size: int,
                 device: Optional[str]) -> TextCategorizer:
    return TextCategorizer(nlp, name, model, tokens, batch_size, device)
