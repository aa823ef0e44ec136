"""ELMo at work: text classification (`elmo classify`) and CoNLL-2003 NER (`elmo ner`).

Classification follows the seed's recipe: each sentence becomes one fixed vector, the mean over
its tokens of an ELMo representation, and a scikit-learn classifier is fitted on those vectors.

* `elmo`   : per token the plain average of the 3 ELMo layers (layer 0 = char-CNN token vector
             duplicated, layers 1 and 2 = biLSTM outputs; no learned scalar mix), then the mean
             over the sentence's tokens -> 2P dims. This is allennlp's `--average` layer, pooled.
* `layer0` : the context-free char-CNN vector (the first P dims of layer 0), mean-pooled -> P dims.
             The baseline that measures what context adds.
* `tfidf`  : sklearn TfidfVectorizer over the same tokens (lowercased unigrams + bigrams,
             sublinear tf), the bag-of-words baseline.

Dense ELMo features are standardised (StandardScaler) before the classifier. With --dev, the
regularisation strength (C for logreg, alpha for mlp) is chosen by dev macro-F1, and the final
classifier is fitted on train only.

Tokenisation: every reader strips the line, applies its format's own rule for splitting off the
label (below), and the text is split on whitespace. The shared data sets are already tokenised
(SST: PTB-tokenised and lowercased; TREC: tokenised; emotion: lowercased, no punctuation), so
nothing else is done; a plain `text<TAB>label` file is split on whitespace as it is.

ELMo vectors are computed with a deterministic initial LSTM state, embed.py's "warm" state (the
biLM's state after reading a fixed warm-up text, the same for every sentence), so a sentence's
features do not depend on which batch it lands in or what ran before (the `carry` state of the
bilm-tf fixtures would make them depend on history).

NER: a CoNLL-2003 reader/writer (IOB1 -> BIO), and a tagger
    [ word embedding (train vocab) ; casing embedding ; gamma * sum_j softmax(w)_j * ELMo layer j ]
    -> dropout -> BiLSTM -> linear -> CRF (pytorch-crf)
The biLM is frozen: each sentence's 3 layers are computed ONCE and cached in memory (float16),
only the scalar mix (w, gamma) and the tagger train. `--no-elmo` is the same tagger without the
ELMo part. Words: the train vocabulary lowercased with digits as 0, 100 dims, learned from scratch;
a training singleton becomes <unk> half of the time (so <unk> is learned); casing: 7 classes, 8
dims. Dropout 0.5 on the input and the BiLSTM output, 100 units per direction, Adam 5e-3, batches
of 32 sentences, gradient norm clipped at 5. Early stopping on dev entity F1 (patience); the best
epoch's weights are scored on test with seqeval (entity level, default conlleval-like mode, BIO).
"""
from __future__ import annotations

import copy
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .config import ElmoError

FORMATS = ("auto", "tsv", "emotion", "sst", "trec")


# ------------------------------------------------------------------------------------ file access
def _read_lines(path: str | os.PathLike) -> list[str]:
    """All lines of a UTF-8 text file (without line ends); user errors as ElmoError."""
    p = Path(path)
    if not p.exists():
        raise ElmoError(f"{path}: no such file")
    if p.is_dir():
        raise ElmoError(f"{path}: is a directory, expected a file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ElmoError(f"{path}:{line}: not valid UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.splitlines()


# ---------------------------------------------------------------------------- classification data
@dataclass
class Example:
    tokens: list[str]
    label: str


def _bad(path, lineno: int, what: str, line: str) -> ElmoError:
    shown = line if len(line) <= 60 else line[:57] + "..."
    return ElmoError(f"{path}:{lineno}: {what}, got {shown!r}")


def _make(path, lineno, line, text: str, label: str, what: str) -> Example:
    tokens = text.split()
    label = label.strip()
    if not tokens or not label:
        raise _bad(path, lineno, what + " with non-empty text and label", line)
    return Example(tokens, label)


def read_tsv(path) -> list[Example]:
    """`text<TAB>label` per line (the label is the text after the last tab). A first line whose
    label field is `label` or `label_name` is a header and skipped; blank lines are skipped."""
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise _bad(path, i, "expected 'text<TAB>label'", line)
        text, label = line.rsplit("\t", 1)
        if not out and label.strip().lower() in ("label", "label_name"):
            continue  # header
        out.append(_make(path, i, line, text, label, "expected 'text<TAB>label'"))
    return out


def read_emotion(path) -> list[Example]:
    """dair-ai emotion: `text;label` (label after the LAST `;`), optional header `text;label_name`."""
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        if ";" not in line:
            raise _bad(path, i, "expected 'text;label'", line)
        text, label = line.rsplit(";", 1)
        if not out and text.strip() == "text" and label.strip() in ("label", "label_name"):
            continue
        out.append(_make(path, i, line, text, label, "expected 'text;label'"))
    return out


def read_sst(path) -> list[Example]:
    """SST in the shared copies' three layouts: sst2-sentence (`sentence<TAB>label` with a header),
    SentEval binary (`sentence <TAB>label`, trailing space) and SentEval fine (`label sentence`,
    label 0-4 first). A line with a tab is read as text<TAB>label, otherwise as `label text`."""
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        if "\t" in line:
            text, label = line.rsplit("\t", 1)
            if not out and label.strip().lower() == "label":
                continue
            out.append(_make(path, i, line, text, label, "expected 'sentence<TAB>label'"))
        else:
            parts = line.strip().split(None, 1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise _bad(path, i, "expected 'sentence<TAB>label' or 'label sentence'", line)
            out.append(_make(path, i, line, parts[1], parts[0], "expected 'label sentence'"))
    return out


_TREC = re.compile(r"^([A-Z]+):(\S+)\s+(.*)$")


def read_trec(path, fine: bool = False) -> list[Example]:
    """TREC (UIUC) `COARSE:fine question ...`; the label is COARSE (or COARSE:fine with fine=True)."""
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        m = _TREC.match(line.strip())
        if not m:
            raise _bad(path, i, "expected 'COARSE:fine question'", line)
        label = f"{m.group(1)}:{m.group(2)}" if fine else m.group(1)
        out.append(_make(path, i, line, m.group(3), label, "expected 'COARSE:fine question'"))
    return out


READERS = {"tsv": read_tsv, "emotion": read_emotion, "sst": read_sst, "trec": read_trec}


def detect_format(path) -> str:
    """Guess the format from the first non-blank line: TREC's `ABC:xyz `, a tab (tsv), a header
    `text;label_name` or a `;` (emotion), a leading digit (SentEval fine = sst)."""
    first = next((l for l in _read_lines(path) if l.strip()), None)
    if first is None:
        raise ElmoError(f"{path}: file is empty")
    if _TREC.match(first.strip()):
        return "trec"
    if "\t" in first:
        return "tsv"
    if ";" in first:
        return "emotion"
    if re.match(r"^\d+\s+\S", first):
        return "sst"
    raise ElmoError(f"{path}:1: cannot tell the format (text<TAB>label, text;label, "
                    f"'COARSE:fine question' or 'label sentence'); pass --format")


def read_examples(path, fmt: str = "auto") -> list[Example]:
    if fmt not in FORMATS:
        raise ElmoError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    examples = READERS[fmt](path)
    if not examples:
        raise ElmoError(f"{path}: no examples")
    return examples


def subsample(items: list, n: Optional[int], seed: int = 0) -> list:
    """A random subset of n items (order kept), or all of them."""
    if n is None or n >= len(items):
        return items
    if n <= 0:
        raise ElmoError(f"subsample size must be positive, got {n}")
    rng = np.random.RandomState(seed)
    keep = np.sort(rng.choice(len(items), n, replace=False))
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------------- the embedder
def load_embedder(model, device: str = "cpu", bilm=None, state: str = "warm"):
    """An ElmoEmbedder for a model dir or pretrained name (hub.resolve_model), or an in-memory
    BiLM, with a deterministic state: "warm" (embed.py's default) or "zero"."""
    from . import embed
    from .hub import resolve_model
    if bilm is not None:
        return embed.ElmoEmbedder(None, None, model=bilm, device=device, state=state)
    if model is None:
        raise ElmoError("--model is required (a dir with options.json + weights.hdf5)")
    options, weights = resolve_model(model)
    return embed.ElmoEmbedder(options, weights, device=device, state=state)


def embed_layers(embedder, sentences: Sequence[Sequence[str]], batch_size: int = 64,
                 dtype=np.float32, progress: Optional[str] = None) -> list[np.ndarray]:
    """(3, n, 2P) layers per sentence, batch-independent (the embedder's warm/zero state, or a
    carry-state embedder reset to zero before every batch).

    Sentences are batched in length order (less padding); results come back in input order."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: list = [None] * len(sentences)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sentences), desc=progress, unit="sent", leave=False,
                   disable=not sys.stderr.isatty())
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if getattr(embedder, "state", "carry") == "carry":
            embedder.states.reset()  # deterministic: every batch starts from the zero state
        vecs = embedder.embed_batch([list(sentences[i]) for i in idx])
        for i, v in zip(idx, vecs):
            out[i] = v.astype(dtype, copy=False)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def pool_features(layers: Sequence[np.ndarray], proj_dim: int) -> dict[str, np.ndarray]:
    """Mean-pooled sentence vectors: `elmo` (average of the 3 layers, 2P) and `layer0` (P)."""
    elmo = np.stack([l.astype(np.float32).mean(axis=0).mean(axis=0) for l in layers])
    layer0 = np.stack([l[0, :, :proj_dim].astype(np.float32).mean(axis=0) for l in layers])
    return {"elmo": elmo, "layer0": layer0}


def sentence_features(embedder, sentences, kind: str, batch_size: int = 64,
                      progress: Optional[str] = None) -> np.ndarray:
    layers = embed_layers(embedder, sentences, batch_size, progress=progress)
    return pool_features(layers, embedder.model.proj_dim)[kind]


# ----------------------------------------------------------------------------------- classifiers
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
ALPHA_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def make_classifier(kind: str, dense: bool, reg: Optional[float] = None, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if kind == "logreg":
        clf = LogisticRegression(C=1.0 if reg is None else reg, max_iter=5000, random_state=seed)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-4 if reg is None else reg,
                            max_iter=500, early_stopping=True, n_iter_no_change=10,
                            random_state=seed)
    else:
        raise ElmoError(f"--classifier must be logreg or mlp, got {kind!r}")
    return make_pipeline(StandardScaler(), clf) if dense else clf


def _scores(y_true, y_pred, labels) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, f1_score
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": dict(zip(labels, map(float, f1_score(y_true, y_pred, labels=labels,
                                                             average=None, zero_division=0)))),
        "report": classification_report(y_true, y_pred, labels=labels, digits=4, zero_division=0),
    }


def fit_and_score(X_train, y_train, X_test, y_test, X_dev=None, y_dev=None,
                  classifier: str = "logreg", dense: bool = True, seed: int = 0) -> dict:
    """Fit on train (regularisation chosen on dev by macro-F1 when dev is given), score on test."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    labels = sorted(set(y_train) | set(y_test))
    grid = C_GRID if classifier == "logreg" else ALPHA_GRID
    chosen, dev_scores = None, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if X_dev is not None:
            for reg in grid:
                clf = make_classifier(classifier, dense, reg, seed).fit(X_train, y_train)
                s = _scores(y_dev, clf.predict(X_dev), labels)
                dev_scores[reg] = (s["macro_f1"], s["accuracy"])
            chosen = max(grid, key=lambda r: dev_scores[r])
        clf = make_classifier(classifier, dense, chosen, seed).fit(X_train, y_train)
    pred = clf.predict(X_test)
    result = _scores(y_test, pred, labels)
    result.update(predictions=list(pred), reg=chosen, dev_scores=dev_scores, labels=labels)
    return result


def tfidf_features(train_tokens, other_tokens: list):
    from sklearn.feature_extraction.text import TfidfVectorizer
    vec = TfidfVectorizer(analyzer=lambda toks: _ngrams([t.lower() for t in toks]),
                          sublinear_tf=True)
    X = vec.fit_transform(train_tokens)
    return X, [vec.transform(t) if t is not None else None for t in other_tokens]


def _ngrams(tokens: list[str]) -> list[str]:
    return tokens + [a + " " + b for a, b in zip(tokens, tokens[1:])]


def run_classification(train: list[Example], test: list[Example], dev: Optional[list] = None,
                       features: str = "elmo", classifier: str = "logreg", embedder=None,
                       batch_size: int = 64, seed: int = 0, feature_cache: Optional[dict] = None,
                       progress: bool = False) -> dict:
    """Features + classifier + scores. `feature_cache` (a dict) may hold pooled ELMo features
    keyed by split name so that several feature kinds share one embedding pass."""
    splits = {"train": train, "test": test}
    if dev is not None:
        splits["dev"] = dev
    t0 = time.time()
    if features == "tfidf":
        Xtr, (Xte, Xdv) = tfidf_features([e.tokens for e in train],
                                         [[e.tokens for e in test],
                                          [e.tokens for e in dev] if dev is not None else None])
        X = {"train": Xtr, "test": Xte, "dev": Xdv}
        dense = False
    elif features in ("elmo", "layer0"):
        if embedder is None:
            raise ElmoError(f"--features {features} needs --model")
        X = {}
        for name, exs in splits.items():
            key = (name, id(exs))
            if feature_cache is not None and key in feature_cache:
                pooled = feature_cache[key]
            else:
                layers = embed_layers(embedder, [e.tokens for e in exs], batch_size,
                                      progress=f"embed {name}" if progress else None)
                pooled = pool_features(layers, embedder.model.proj_dim)
                if feature_cache is not None:
                    feature_cache[key] = pooled
            X[name] = pooled[features]
        dense = True
    else:
        raise ElmoError(f"--features must be elmo, layer0 or tfidf, got {features!r}")
    t_feat = time.time() - t0
    t0 = time.time()
    result = fit_and_score(X["train"], [e.label for e in train], X["test"],
                           [e.label for e in test],
                           X.get("dev"), [e.label for e in dev] if dev is not None else None,
                           classifier=classifier, dense=dense, seed=seed)
    result.update(features_seconds=t_feat, fit_seconds=time.time() - t0,
                  dim=X["train"].shape[1], n_train=len(train), n_test=len(test),
                  n_dev=len(dev) if dev is not None else 0)
    return result


FEATURE_DOC = {
    "elmo": "mean over tokens of the average of the 3 ELMo layers (no scalar mix)",
    "layer0": "mean over tokens of the context-free char-CNN vector (first P dims of layer 0)",
    "tfidf": "TF-IDF of lowercased unigrams + bigrams (sublinear tf)",
}


def cli_classify(args) -> int:
    train = read_examples(args.train, args.format)
    test = read_examples(args.test, args.format)
    dev = read_examples(args.dev, args.format) if args.dev else None
    train = subsample(train, args.max_train, args.seed)
    test = subsample(test, getattr(args, "max_test", None), args.seed)
    if len({e.label for e in train}) < 2:
        raise ElmoError(f"{args.train}: need at least 2 labels to classify, found "
                        f"{sorted({e.label for e in train})}")
    embedder = None
    if args.features != "tfidf":
        embedder = load_embedder(args.model, device=args.device or "cpu")
    result = run_classification(train, test, dev, args.features, args.classifier, embedder,
                                batch_size=args.batch_size, seed=args.seed, progress=True)
    reg_name = "C" if args.classifier == "logreg" else "alpha"
    reg = result["reg"]
    print(f"features {args.features}: {FEATURE_DOC[args.features]}, {result['dim']} dims")
    if dev is not None:
        tried = "  ".join(f"{r:g}: {f:.4f}" for r, (f, _) in result["dev_scores"].items())
        print(f"classifier {args.classifier}, {reg_name}={reg:g} chosen on dev macro-F1 ({tried})")
    else:
        print(f"classifier {args.classifier}, default {reg_name} (no --dev)")
    print(f"train {result['n_train']}  dev {result['n_dev']}  test {result['n_test']} sentences; "
          f"features {result['features_seconds']:.1f} s, fit {result['fit_seconds']:.1f} s")
    print(f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")
    print(result["report"].rstrip())
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            f.write("text\tgold\tpredicted\n")
            for e, p in zip(test, result["predictions"]):
                f.write(f"{' '.join(e.tokens)}\t{e.label}\t{p}\n")
        print(f"predictions written to {args.predictions}")
    return 0


# --------------------------------------------------------------------------------------- CoNLL
@dataclass
class ConllSentence:
    rows: list[list[str]]            # the file's columns per token; the NER tag is the last one
    tags: list[str] = field(default_factory=list)   # NER tags in BIO (converted from the file)

    @property
    def tokens(self) -> list[str]:
        return [r[0] for r in self.rows]

    @property
    def is_docstart(self) -> bool:
        return len(self.rows) == 1 and self.rows[0][0] == "-DOCSTART-"


_TAG = re.compile(r"^(O|[BI]-\S+)$")


def iob1_to_bio(tags: Sequence[str]) -> list[str]:
    """IOB1 (I- inside any entity, B- only between two adjacent entities of one type) -> BIO
    (every entity starts with B-). An I-X starts an entity unless the previous tag is I-X/B-X."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-"):
            typ = tag[2:]
            if prev == "O" or prev[2:] != typ:
                tag = "B-" + typ
        out.append(tag)
        prev = tag
    return out


def read_conll(path, scheme: str = "iob1", keep_docstart: bool = False) -> list[ConllSentence]:
    """CoNLL-2003: one token per line (`word POS chunk NER`, any number >= 2 of space-separated
    columns, the NER tag last), a blank line after each sentence, `-DOCSTART-` lines between
    documents. `tags` holds the NER tags converted to BIO (scheme="iob1", the original files) or
    taken as they are (scheme="bio"). -DOCSTART- "sentences" are dropped unless keep_docstart."""
    if scheme not in ("iob1", "bio"):
        raise ElmoError(f"scheme must be iob1 or bio, got {scheme!r}")
    sentences: list[ConllSentence] = []
    rows: list[list[str]] = []
    width = None

    def flush():
        nonlocal rows
        if rows:
            raw = [r[-1] for r in rows]
            s = ConllSentence(rows, iob1_to_bio(raw) if scheme == "iob1" else list(raw))
            if keep_docstart or not s.is_docstart:
                sentences.append(s)
        rows = []

    for i, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            flush()
            continue
        if parts[0] == "-DOCSTART-":
            flush()
            rows = [parts]
            flush()
            continue
        if len(parts) < 2:
            raise _bad(path, i, "expected 'word ... NER-tag' (at least 2 columns)", line)
        if width is None:
            width = len(parts)
        elif len(parts) != width:
            raise _bad(path, i, f"expected {width} columns like the first token line", line)
        if not _TAG.match(parts[-1]):
            raise _bad(path, i, "NER tag (last column) must be O, B-TYPE or I-TYPE", line)
        rows.append(parts)
    flush()
    return sentences


def write_conll(sentences: Iterable[ConllSentence], path, extra: Optional[list] = None,
                bio: bool = False) -> None:
    """Write sentences back in the same layout (columns joined by one space, a blank line after
    each sentence; read_conll(keep_docstart=True) + write_conll reproduces a file whose sentences
    are separated by single blank lines). bio=True writes the BIO tags in place of the file's NER
    column. `extra`: per sentence a list of tags appended as one more column (e.g. predictions,
    giving conlleval's `word POS chunk gold predicted` layout)."""
    with open(path, "w", encoding="utf-8") as f:
        for k, s in enumerate(sentences):
            for j, row in enumerate(s.rows):
                cols = list(row)
                if bio and not s.is_docstart:
                    cols[-1] = s.tags[j]
                if extra is not None and not s.is_docstart:
                    cols.append(extra[k][j])
                f.write(" ".join(cols) + "\n")
            f.write("\n")


def ner_scores(y_true: list[list[str]], y_pred: list[list[str]]) -> dict:
    """Entity-level precision / recall / F1 with seqeval (default conlleval-like mode)."""
    import warnings
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    with warnings.catch_warnings():  # no predicted entities yet: seqeval warns and gives 0
        warnings.simplefilter("ignore")
        return {"f1": float(f1_score(y_true, y_pred)),
                "precision": float(precision_score(y_true, y_pred)),
                "recall": float(recall_score(y_true, y_pred)),
                "report": classification_report(y_true, y_pred, digits=4)}


# ---------------------------------------------------------------------------------------- tagger
def _torch():
    import torch
    return torch


def _casing(word: str) -> int:
    if word.isdigit():
        return 1
    if any(c.isdigit() for c in word):
        return 2
    if word.isupper():
        return 3
    if word[:1].isupper():
        return 4
    if word.islower():
        return 5
    if not any(c.isalnum() for c in word):
        return 6
    return 7


N_CASING = 8


def _norm_word(word: str) -> str:
    return re.sub(r"\d", "0", word.lower())


class WordVocab:
    """Word ids from the training sentences: 0 = padding, 1 = unknown."""

    def __init__(self, sentences: Iterable[Sequence[str]], min_count: int = 1):
        from collections import Counter
        counts = Counter(_norm_word(w) for s in sentences for w in s)
        self.words = ["<pad>", "<unk>"] + sorted(w for w, c in counts.items() if c >= min_count)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.singletons = {self.index[w] for w, c in counts.items() if c == 1 and w in self.index}

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, sentence: Sequence[str]) -> list[int]:
        return [self.index.get(_norm_word(w), 1) for w in sentence]


def _scalar_mix_class():
    """embed.py's ScalarMix (spec section 8) when it exists, else the same few lines here."""
    try:
        from .embed import ScalarMix  # type: ignore
        return ScalarMix
    except ImportError:
        pass
    torch = _torch()

    class ScalarMix(torch.nn.Module):
        """gamma * sum_j softmax(w)_j * h_j; w = 0 (uniform), gamma = 1 at the start."""

        def __init__(self, n_layers: int):
            super().__init__()
            self.scalar_parameters = torch.nn.Parameter(torch.zeros(n_layers))
            self.gamma = torch.nn.Parameter(torch.ones(1))

        def forward(self, layers):
            s = torch.softmax(self.scalar_parameters, dim=0)
            return self.gamma * sum(w * h for w, h in zip(s, layers))

    return ScalarMix


def build_tagger(n_words: int, n_tags: int, elmo_dim: int = 0, n_elmo_layers: int = 3,
                 word_dim: int = 100, case_dim: int = 8, hidden: int = 100, dropout: float = 0.5):
    torch = _torch()
    nn = torch.nn
    from torchcrf import CRF
    ScalarMix = _scalar_mix_class()

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(n_words, word_dim, padding_idx=0)
            self.case = nn.Embedding(N_CASING, case_dim, padding_idx=0)
            self.elmo_dim = elmo_dim
            self.mix = ScalarMix(n_elmo_layers) if elmo_dim else None
            self.drop = nn.Dropout(dropout)
            self.lstm = nn.LSTM(word_dim + case_dim + elmo_dim, hidden, batch_first=True,
                                bidirectional=True)
            self.out = nn.Linear(2 * hidden, n_tags)
            self.crf = CRF(n_tags, batch_first=True)

        def emissions(self, words, case, elmo, lengths):
            x = [self.word(words), self.case(case)]
            if self.mix is not None:
                x.append(self.mix([elmo[:, j] for j in range(elmo.shape[1])]))
            x = self.drop(torch.cat(x, dim=2))
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            y, _ = self.lstm(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
            return self.out(self.drop(y))

        def loss(self, batch):
            em = self.emissions(batch["words"], batch["case"], batch.get("elmo"), batch["lengths"])
            return -self.crf(em, batch["tags"], mask=batch["mask"], reduction="mean")

        def decode(self, batch) -> list[list[int]]:
            em = self.emissions(batch["words"], batch["case"], batch.get("elmo"), batch["lengths"])
            return self.crf.decode(em, mask=batch["mask"])

    return Tagger()


def _make_batch(idx, words, cases, tags, elmo, unk_singletons=None, rng=None):
    torch = _torch()
    lengths = [len(words[i]) for i in idx]
    B, T = len(idx), max(lengths)
    w = np.zeros((B, T), np.int64)
    c = np.zeros((B, T), np.int64)
    t = np.zeros((B, T), np.int64)
    m = np.zeros((B, T), bool)
    for b, i in enumerate(idx):
        n = lengths[b]
        wi = np.asarray(words[i])
        if unk_singletons is not None:  # word dropout: a singleton becomes <unk> half the time
            drop = np.array([x in unk_singletons for x in words[i]]) & (rng.rand(n) < 0.5)
            wi = np.where(drop, 1, wi)
        w[b, :n], c[b, :n], t[b, :n], m[b, :n] = wi, cases[i], tags[i], True
    batch = {"words": torch.from_numpy(w), "case": torch.from_numpy(c),
             "tags": torch.from_numpy(t), "mask": torch.from_numpy(m),
             "lengths": torch.tensor(lengths)}
    if elmo is not None:
        L, _, D = elmo[idx[0]].shape
        e = np.zeros((B, L, T, D), np.float32)
        for b, i in enumerate(idx):
            e[b, :, :lengths[b]] = elmo[i]
        batch["elmo"] = torch.from_numpy(e)
    return batch


@dataclass
class NerResult:
    dev_f1: float
    test: dict
    best_epoch: int
    epochs_run: int
    epoch_seconds: list
    embed_seconds: float
    history: list
    test_predictions: list


def train_tagger(train: list[ConllSentence], dev: list[ConllSentence], test: list[ConllSentence],
                 embedder=None, epochs: int = 10, patience: int = 3, batch_size: int = 32,
                 lr: float = 5e-3, hidden: int = 100, word_dim: int = 100, dropout: float = 0.5,
                 seed: int = 0, embed_batch_size: int = 64, log=print) -> NerResult:
    """Train the ELMo (or, with embedder=None, word-only) BiLSTM-CRF; early stopping on dev F1."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    tagset = sorted({t for s in train for t in s.tags} | {"O"})
    tag_index = {t: i for i, t in enumerate(tagset)}
    vocab = WordVocab(s.tokens for s in train)

    def encode(sents):
        return ([vocab.ids(s.tokens) for s in sents],
                [[_casing(w) for w in s.tokens] for s in sents],
                [[tag_index.get(t, tag_index["O"]) for t in s.tags] for s in sents])

    data = {"train": encode(train), "dev": encode(dev), "test": encode(test)}
    elmo = {"train": None, "dev": None, "test": None}
    embed_seconds = 0.0
    if embedder is not None:
        t0 = time.time()
        for name, sents in (("train", train), ("dev", dev), ("test", test)):
            elmo[name] = embed_layers(embedder, [s.tokens for s in sents], embed_batch_size,
                                      dtype=np.float16, progress=f"ELMo {name}")
        embed_seconds = time.time() - t0
        n_tok = sum(len(s.rows) for s in train + dev + test)
        mb = sum(a.nbytes for v in elmo.values() for a in v) / 2**20
        log(f"ELMo layers for {len(train) + len(dev) + len(test)} sentences ({n_tok} tokens) "
            f"computed once in {embed_seconds:.1f} s, cached in memory as float16 ({mb:.0f} MiB)")
    elmo_dim = 0 if embedder is None else 2 * embedder.model.proj_dim
    model = build_tagger(len(vocab), len(tagset), elmo_dim, hidden=hidden, word_dim=word_dim,
                         dropout=dropout)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def predict(name, sents):
        words, cases, tags = data[name]
        model.eval()
        order = sorted(range(len(sents)), key=lambda i: len(words[i]))
        pred: list = [None] * len(sents)
        with torch.no_grad():
            for start in range(0, len(order), 128):
                idx = order[start:start + 128]
                for i, p in zip(idx, model.decode(_make_batch(idx, words, cases, tags, elmo[name]))):
                    pred[i] = [tagset[k] for k in p]
        return pred

    best, best_f1, best_epoch, bad = None, -1.0, 0, 0
    epoch_seconds, history = [], []
    words, cases, tags = data["train"]
    epoch = 0
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        perm = rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = list(perm[start:start + batch_size])
            batch = _make_batch(idx, words, cases, tags, elmo["train"], vocab.singletons, rng)
            loss = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
        train_s = time.time() - t0
        dev_f1 = ner_scores([s.tags for s in dev], predict("dev", dev))["f1"]
        epoch_seconds.append(time.time() - t0)
        history.append({"epoch": epoch, "loss": total / len(train), "dev_f1": dev_f1,
                        "train_seconds": train_s, "seconds": epoch_seconds[-1]})
        mix = ""
        if model.mix is not None:
            s = torch.softmax(model.mix.scalar_parameters.detach().flatten(), 0).tolist() \
                if hasattr(model.mix, "scalar_parameters") else []
            g = float(model.mix.gamma.detach().flatten()[0]) if hasattr(model.mix, "gamma") else 1
            mix = f"  mix s=[{', '.join(f'{x:.2f}' for x in s)}] gamma={g:.2f}"
        log(f"epoch {epoch}: loss {total / len(train):.3f}  dev F1 {dev_f1:.4f}  "
            f"{epoch_seconds[-1]:.1f} s (train {train_s:.1f} s){mix}")
        if dev_f1 > best_f1:
            best_f1, best_epoch, bad = dev_f1, epoch, 0
            best = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                log(f"early stop: no dev improvement for {patience} epochs")
                break
    model.load_state_dict(best)
    test_pred = predict("test", test)
    scores = ner_scores([s.tags for s in test], test_pred)
    return NerResult(best_f1, scores, best_epoch, epoch, epoch_seconds, embed_seconds, history,
                     test_pred)


def cli_ner(args) -> int:
    train = read_conll(args.train)
    dev = read_conll(args.dev)
    test = read_conll(args.test)
    for name, s in (("--train", train), ("--dev", dev), ("--test", test)):
        if not s:
            raise ElmoError(f"{getattr(args, name[2:])}: no sentences")
    train = subsample(train, args.max_train, args.seed)
    dev = subsample(dev, getattr(args, "max_eval", None), args.seed)
    test = subsample(test, getattr(args, "max_eval", None), args.seed)
    embedder = None
    if not args.no_elmo:
        embedder = load_embedder(args.model, device="cpu")
    elif args.model:
        print("--no-elmo: --model is ignored")
    torch = _torch()
    print(f"train {len(train)}  dev {len(dev)}  test {len(test)} sentences; "
          f"{'ELMo (frozen, scalar mix) + ' if embedder else ''}words + casing -> BiLSTM "
          f"({args.hidden}) -> CRF; {torch.get_num_threads()} torch threads")
    res = train_tagger(train, dev, test, embedder, epochs=args.epochs, patience=args.patience,
                       batch_size=args.batch_size, lr=args.lr, hidden=args.hidden, seed=args.seed)
    mean_epoch = float(np.mean(res.epoch_seconds))
    print(f"best dev F1 {res.dev_f1:.4f} at epoch {res.best_epoch} of {res.epochs_run}; "
          f"{mean_epoch:.1f} s per epoch (train + dev decode)"
          + (f"; ELMo caching {res.embed_seconds:.1f} s" if embedder else ""))
    t = res.test
    print(f"test entity F1 {t['f1']:.4f}  precision {t['precision']:.4f}  recall {t['recall']:.4f}"
          f"  (seqeval, BIO)")
    print(t["report"].rstrip())
    if args.predictions:
        write_conll(test, args.predictions, extra=res.test_predictions, bio=True)
        print(f"predictions written to {args.predictions} (last column; tags in BIO)")
    return 0
