"""Text classification (`elmo classify`): readers for tsv / emotion / sst / trec files, sentence
features, scikit-learn classifiers, scores; `--classifier bilstm` hands over to bilstm.py (ELMo
in a task model's input, the paper's way: words + casing + a scalar mix of the frozen layers ->
BiLSTM -> max-pool -> linear, `features="words"` for the same model without ELMo).

For logreg / mlp each sentence becomes one fixed vector, and a scikit-learn classifier is fitted
on those vectors:

* `elmo`   : per token the plain average of the 3 ELMo layers (layer 0 = char-CNN token vector
             duplicated, layers 1 and 2 = biLSTM outputs; no learned scalar mix), then the mean
             over the sentence's tokens -> 2P dims. This is allennlp's `--average` layer, pooled.
* `layer0` : the context-free char-CNN vector (the first P dims of layer 0), mean-pooled -> P dims.
             The baseline that measures what context adds.
* `tfidf`  : sklearn TfidfVectorizer over the same tokens (lowercased unigrams + bigrams,
             sublinear tf), the bag-of-words baseline.
* `tfidf+elmo`: the TF-IDF row with the `elmo` vector appended (scipy.sparse.hstack), the
             dense part standardised on train and divided by sqrt(2P) so that both blocks have a
             norm of about 1 (hstack_tfidf_elmo).

Dense ELMo features are standardised (StandardScaler) before the classifier. With --dev, the
regularisation strength (C for logreg, alpha for mlp) is chosen by dev macro-F1, and the final
classifier is fitted on train only. ELMo layers come from common.embed_layers (deterministic
state, so features do not depend on batching).

Saved (`elmo classify --save DIR`, save_classifier) and reloaded (torch_elmo.load_task) as the
`TextClassifier` predictor: the fitted scikit-learn parts through skops.io (loaded with the
explicit TRUSTED list of types, so loading runs no code of the file's choosing), or the BiLSTM's
tensors (bilstm.py); the features of new text are computed as in training (predictor.py).

Tokenisation: every reader strips the line, applies its format's own rule for splitting off the
label (below), and the text is split on whitespace. The shared data sets are already tokenised
(SST: PTB-tokenised and lowercased; TREC: tokenised; emotion: lowercased, no punctuation), so
nothing else is done; a plain `text<TAB>label` file is split on whitespace as it is.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..config import ElmoError
from ..embed import DEFAULT_MAX_TOKENS
from ..outputs import atomic_text
from . import saved
from .bilstm import bilstm_parts, bilstm_predict, load_bilstm, train_bilstm_classifier
from .common import bad_line, classification_scores, embed_layers, read_data_lines, subsample
from .predictor import TaskPredictor, elmo_layers, maybe_layers, nonempty

FORMATS = ("auto", "tsv", "emotion", "sst", "trec")


# ---------------------------------------------------------------------------- classification data
@dataclass
class Example:
    tokens: list[str]
    label: str


def _make(path, lineno, line, text: str, label: str, what: str) -> Example:
    tokens = text.split()
    label = label.strip()
    if not tokens or not label:
        raise bad_line(path, lineno, what + " with non-empty text and label", line)
    return Example(tokens, label)


def read_tsv(path) -> list[Example]:
    """`text<TAB>label` per line (the label is the text after the last tab). A first line whose
    label field is `label` or `label_name` is a header and skipped; blank lines are skipped."""
    out = []
    for i, line in enumerate(read_data_lines(path), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise bad_line(path, i, "expected 'text<TAB>label'", line)
        if line.strip("\r\n").count("\t") > 1:
            raise bad_line(path, i, f"expected 'text<TAB>label', found "
                           f"{line.count(chr(9)) + 1} tab-separated columns (an id column? keep "
                           f"only text and label, e.g. cut -f2-)", line)
        text, label = line.rsplit("\t", 1)
        if not out and label.strip().lower() in ("label", "label_name"):
            continue  # header
        out.append(_make(path, i, line, text, label, "expected 'text<TAB>label'"))
    return out


def read_emotion(path) -> list[Example]:
    """dair-ai emotion: `text;label` (label after the LAST `;`), optional header `text;label_name`."""
    out = []
    for i, line in enumerate(read_data_lines(path), 1):
        if not line.strip():
            continue
        if ";" not in line:
            raise bad_line(path, i, "expected 'text;label'", line)
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
    for i, line in enumerate(read_data_lines(path), 1):
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
                raise bad_line(path, i, "expected 'sentence<TAB>label' or 'label sentence'", line)
            out.append(_make(path, i, line, parts[1], parts[0], "expected 'label sentence'"))
    return out


_TREC = re.compile(r"^([A-Z]+):(\S+)\s+(.*)$")


def read_trec(path, fine: bool = False) -> list[Example]:
    """TREC (UIUC) `COARSE:fine question ...`; the label is COARSE (or COARSE:fine with fine=True)."""
    out = []
    for i, line in enumerate(read_data_lines(path), 1):
        if not line.strip():
            continue
        m = _TREC.match(line.strip())
        if not m:
            raise bad_line(path, i, "expected 'COARSE:fine question'", line)
        label = f"{m.group(1)}:{m.group(2)}" if fine else m.group(1)
        out.append(_make(path, i, line, m.group(3), label, "expected 'COARSE:fine question'"))
    return out


READERS = {"tsv": read_tsv, "emotion": read_emotion, "sst": read_sst, "trec": read_trec}


def detect_format(path) -> str:
    """Guess the format from the first non-blank line: TREC's `ABC:xyz `, a tab (tsv), a header
    `text;label_name` or a `;` (emotion), a leading digit (SentEval fine = sst)."""
    first = next((l for l in read_data_lines(path) if l.strip()), None)
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


# ------------------------------------------------------------------------------------- features
def pool_features(layers: Sequence[np.ndarray], proj_dim: int) -> dict[str, np.ndarray]:
    """Mean-pooled sentence vectors: `elmo` (average of the 3 layers, 2P) and `layer0` (P)."""
    elmo = np.stack([l.astype(np.float32).mean(axis=0).mean(axis=0) for l in layers])
    layer0 = np.stack([l[0, :, :proj_dim].astype(np.float32).mean(axis=0) for l in layers])
    return {"elmo": elmo, "layer0": layer0}


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


def fit_and_score(X_train, y_train, X_test, y_test, X_dev=None, y_dev=None,
                  classifier: str = "logreg", dense: bool = True, seed: int = 0) -> dict:
    """Fit on train (regularisation chosen on dev by macro-F1 when dev is given), score on test."""
    from sklearn.exceptions import ConvergenceWarning
    labels = sorted(set(y_train) | set(y_test))
    grid = C_GRID if classifier == "logreg" else ALPHA_GRID
    chosen, dev_scores = None, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if X_dev is not None:
            for reg in grid:
                clf = make_classifier(classifier, dense, reg, seed).fit(X_train, y_train)
                s = classification_scores(y_dev, clf.predict(X_dev), labels)
                dev_scores[reg] = (s["macro_f1"], s["accuracy"])
            chosen = max(grid, key=lambda r: dev_scores[r])
        clf = make_classifier(classifier, dense, chosen, seed).fit(X_train, y_train)
    pred = clf.predict(X_test)
    result = classification_scores(y_test, pred, labels)
    result.update(predictions=list(pred), reg=chosen, dev_scores=dev_scores, labels=labels,
                  trained={"classifier": clf})
    return result


def tfidf_analyzer(tokens: list[str]) -> list[str]:
    """TF-IDF's terms of a token list: the lowercased unigrams and bigrams. Module-level (not a
    lambda) so that skops stores it by name in a saved classifier."""
    tokens = [t.lower() for t in tokens]
    return tokens + [a + " " + b for a, b in zip(tokens, tokens[1:])]


def tfidf_features(train_tokens, other_tokens: list):
    """(the fitted TfidfVectorizer, train's rows, the rows of each of `other_tokens` or None)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    vec = TfidfVectorizer(analyzer=tfidf_analyzer, sublinear_tf=True)
    X = vec.fit_transform(train_tokens)
    return vec, X, [vec.transform(t) if t is not None else None for t in other_tokens]


def pooled_elmo(embedder, splits: dict, batch_size: int, feature_cache: Optional[dict],
                progress: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per split the pool_features dict, from the cache when it holds the split."""
    out = {}
    for name, exs in splits.items():
        key = (name, id(exs))
        if feature_cache is not None and key in feature_cache:
            out[name] = feature_cache[key]
            continue
        layers = embed_layers(embedder, [e.tokens for e in exs], batch_size,
                              progress=f"embed {name}" if progress else None)
        out[name] = pool_features(layers, embedder.model.proj_dim)
        if feature_cache is not None:
            feature_cache[key] = out[name]
    return out


def split_layers(embedder, splits: dict, batch_size: int, feature_cache: Optional[dict],
                 progress: bool) -> dict[str, list[np.ndarray]]:
    """Per split the (3, n, 2P) float16 layers of each sentence (the BiLSTM's ELMo input),
    from the cache when it holds the split."""
    out = {}
    for name, exs in splits.items():
        key = ("layers", name, id(exs))
        if feature_cache is not None and key in feature_cache:
            out[name] = feature_cache[key]
            continue
        out[name] = embed_layers(embedder, [e.tokens for e in exs], batch_size, dtype=np.float16,
                                 progress=f"ELMo {name}" if progress else None)
        if feature_cache is not None:
            feature_cache[key] = out[name]
    return out


def hstack_tfidf_elmo(tfidf: dict, elmo: dict) -> tuple[dict, object]:
    """`tfidf+elmo`: per split the TF-IDF row next to the pooled ELMo vector, standardised with
    train's mean and std and divided by sqrt(dim) (tfidf_elmo_rows); and the fitted scaler."""
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(elmo["train"])
    return {name: tfidf_elmo_rows(X, elmo[name], scaler) for name, X in tfidf.items()}, scaler


def tfidf_elmo_rows(X, elmo: np.ndarray, scaler):
    """TF-IDF rows X next to the scaled pooled ELMo vectors. A TF-IDF row has norm 1
    (l2-normalised); a standardised dim-dimensional row has squared norm about dim, so after
    the division by sqrt(dim) each block contributes a norm of about 1 and neither dominates
    the classifier's penalty."""
    from scipy.sparse import csr_matrix, hstack
    scale = 1.0 / np.sqrt(elmo.shape[1])
    return hstack([X, csr_matrix(scaler.transform(elmo) * scale)], format="csr")


def run_classification(train: list[Example], test: list[Example], dev: Optional[list] = None,
                       features: str = "elmo", classifier: str = "logreg", embedder=None,
                       batch_size: int = 64, seed: int = 0, feature_cache: Optional[dict] = None,
                       progress: bool = False, bilstm: Optional[dict] = None) -> dict:
    """Features + classifier + scores. `feature_cache` (a dict) may hold ELMo features keyed by
    split so that several runs share one embedding pass. `classifier="bilstm"`: the BiLSTM
    (bilstm.py) over words + casing + ELMo layers (`features="elmo"`) or words + casing only
    (`features="words"`); `bilstm`: its keyword arguments (epochs, patience, hidden, lr,
    device, log, ...)."""
    splits = {"train": train, "test": test}
    if dev is not None:
        splits["dev"] = dev
    if classifier == "bilstm":
        if features not in ("elmo", "words"):
            raise ElmoError(f"--classifier bilstm reads the words (+ ELMo layers, or none with "
                            f"--no-elmo), not pooled features: --features {features} is for "
                            f"logreg / mlp")
        layers = None
        if features == "elmo":
            if embedder is None:
                raise ElmoError("--classifier bilstm with ELMo needs --model (or --no-elmo)")
            t0 = time.time()
            layers = split_layers(embedder, splits, batch_size, feature_cache, progress)
            t_feat = time.time() - t0
        kwargs = dict(bilstm or {})
        kwargs.setdefault("log", print if progress else None)
        result = train_bilstm_classifier(train, test, dev, layers=layers, seed=seed, **kwargs)
        if layers is not None:
            result["features_seconds"] = t_feat
        return result
    if classifier not in ("logreg", "mlp"):
        raise ElmoError(f"--classifier must be logreg, mlp or bilstm, got {classifier!r}")
    t0 = time.time()
    if features in ("tfidf", "tfidf+elmo"):
        vec, Xtr, (Xte, Xdv) = tfidf_features(
            [e.tokens for e in train],
            [[e.tokens for e in test], [e.tokens for e in dev] if dev is not None else None])
        X = {"train": Xtr, "test": Xte, **({"dev": Xdv} if dev is not None else {})}
        parts = {"vectorizer": vec}
        if features == "tfidf+elmo":
            if embedder is None:
                raise ElmoError(f"--features {features} needs --model")
            pooled = pooled_elmo(embedder, splits, batch_size, feature_cache, progress)
            X, parts["scaler"] = hstack_tfidf_elmo(X, {name: p["elmo"]
                                                       for name, p in pooled.items()})
        dense = False
    elif features in ("elmo", "layer0"):
        if embedder is None:
            raise ElmoError(f"--features {features} needs --model")
        pooled = pooled_elmo(embedder, splits, batch_size, feature_cache, progress)
        X = {name: p[features] for name, p in pooled.items()}
        parts = {}
        dense = True
    elif features == "words":
        raise ElmoError("--features words (no ELMo) is the BiLSTM's input: --classifier bilstm "
                        "--no-elmo")
    else:
        raise ElmoError(f"--features must be elmo, layer0, tfidf or tfidf+elmo, got {features!r}")
    t_feat = time.time() - t0
    t0 = time.time()
    result = fit_and_score(X["train"], [e.label for e in train], X["test"],
                           [e.label for e in test],
                           X.get("dev"), [e.label for e in dev] if dev is not None else None,
                           classifier=classifier, dense=dense, seed=seed)
    result.update(features_seconds=t_feat, fit_seconds=time.time() - t0,
                  dim=X["train"].shape[1], n_train=len(train), n_test=len(test),
                  n_dev=len(dev) if dev is not None else 0)
    result["trained"].update(parts)
    return result


FEATURE_DOC = {
    "elmo": "mean over tokens of the average of the 3 ELMo layers (no scalar mix)",
    "layer0": "mean over tokens of the context-free char-CNN vector (first P dims of layer 0)",
    "tfidf": "TF-IDF of lowercased unigrams + bigrams (sublinear tf)",
    "tfidf+elmo": "TF-IDF next to the pooled `elmo` vector (standardised, / sqrt(dim))",
}
BILSTM_DOC = {
    "elmo": "words + casing + trainable scalar mix of the 3 frozen ELMo layers",
    "words": "words + casing, no ELMo (--no-elmo)",
}


def read_classification_data(train_file, test_file, dev_file=None, fmt: str = "auto",
                             max_train: Optional[int] = None, max_test: Optional[int] = None,
                             seed: int = 0):
    """(train, test, dev or None) examples; train and test subsampled; train needs 2 labels."""
    train = read_examples(train_file, fmt)
    test = read_examples(test_file, fmt)
    dev = read_examples(dev_file, fmt) if dev_file else None
    train = subsample(train, max_train, seed)
    test = subsample(test, max_test, seed)
    labels = {e.label for e in train}
    if len(labels) < 2:
        raise ElmoError(f"{train_file}: need at least 2 labels to classify, found "
                        f"{sorted(labels)}")
    if len(train) >= 20 and len(labels) > len(train) / 2:
        multiword = sum(" " in label for label in labels)
        raise ElmoError(f"{train_file}: {len(labels)} different labels in {len(train)} examples"
                        + (f" ({multiword} of them several words long)" if multiword else "")
                        + "; the columns look swapped (expected text first, label last, e.g. "
                          "'text<TAB>label')")
    return train, test, dev


def classification_summary(result: dict, features: str, classifier: str) -> str:
    """The lines `elmo classify` prints: features, the chosen regularisation, sizes and times,
    accuracy and macro-F1, sklearn's per-class report."""
    if classifier == "bilstm":
        return bilstm_summary(result, features)
    reg_name = "C" if classifier == "logreg" else "alpha"
    lines = [f"features {features}: {FEATURE_DOC[features]}, {result['dim']} dims"]
    if result["n_dev"]:
        tried = "  ".join(f"{r:g}: {f:.4f}" for r, (f, _) in result["dev_scores"].items())
        lines.append(f"classifier {classifier}, {reg_name}={result['reg']:g} chosen on dev "
                     f"macro-F1 ({tried})")
    else:
        lines.append(f"classifier {classifier}, default {reg_name} (no --dev)")
    lines += [f"train {result['n_train']}  dev {result['n_dev']}  test {result['n_test']} "
              f"sentences; features {result['features_seconds']:.1f} s, "
              f"fit {result['fit_seconds']:.1f} s",
              f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}",
              result["report"].rstrip()]
    return "\n".join(lines)


def bilstm_summary(result: dict, features: str) -> str:
    """classification_summary's lines for the BiLSTM: its input, the kept epoch, the scores."""
    lines = [f"features {features}: {BILSTM_DOC[features]} -> BiLSTM -> max-pool -> linear, "
             f"{result['dim']} input dims per token"]
    if result["n_dev"]:
        f1, acc = result["dev_scores"][result["best_epoch"]]
        lines.append(f"classifier bilstm, epoch {result['best_epoch']} of "
                     f"{result['epochs_run']} kept (best dev macro-F1 {f1:.4f}, accuracy "
                     f"{acc:.4f})" + (f"; {result['mix']}" if result["mix"] else ""))
    else:
        lines.append(f"classifier bilstm, last of {result['epochs_run']} epochs (no --dev)"
                     + (f"; {result['mix']}" if result["mix"] else ""))
    lines += [f"train {result['n_train']}  dev {result['n_dev']}  test {result['n_test']} "
              f"sentences; ELMo layers {result['features_seconds']:.1f} s, "
              f"training {result['fit_seconds']:.1f} s",
              f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}",
              result["report"].rstrip()]
    return "\n".join(lines)


def write_predictions(path, test: list[Example], predictions: Sequence[str]) -> None:
    """TSV `text<TAB>gold<TAB>predicted` with a header line."""
    with atomic_text(path) as f:
        f.write("text\tgold\tpredicted\n")
        for e, p in zip(test, predictions):
            f.write(f"{' '.join(e.tokens)}\t{e.label}\t{p}\n")


# ------------------------------------------------------------------- saved: the TextClassifier
# The types a saved classifier's skops file may hold beyond those skops trusts by default
# (scikit-learn's estimators, numpy, scipy): our TF-IDF analyzer, and the MLP's Adam state.
TRUSTED = ["torch_elmo.tasks.classify.tfidf_analyzer",
           "sklearn.neural_network._stochastic_optimizers.AdamOptimizer"]
POOLED_ELMO = {"elmo": ("average", "mean"), "tfidf+elmo": ("average", "mean"),
               "layer0": ("0 (the char-CNN vector, first P dims)", "mean")}


def save_classifier(result: dict, path, features: str, classifier: str, embedder=None,
                    options: Optional[dict] = None) -> str:
    """The classifier run_classification trained (`result`) as a saved task model directory
    (saved.py), with the biLM of `embedder` when the features use ELMo. `options`: the training
    command's options, kept in task.json."""
    trained = result["trained"]
    uses_elmo = features not in ("tfidf", "words")
    if uses_elmo != (embedder is not None):
        raise ElmoError(f"save_classifier: features {features} "
                        + ("need the embedder they were computed with" if uses_elmo
                           else "use no ELMo: give no embedder"))
    meta = {"kind": "classify", "model": classifier, "features": features}
    if classifier == "bilstm":
        part_meta, write = bilstm_parts(trained)
        meta.update(part_meta)
    else:
        import skops.io as sio
        clf = trained["classifier"]
        meta["labels"] = [str(c) for c in clf.classes_]
        if uses_elmo:
            layers, pooling = POOLED_ELMO[features]
            meta["elmo"] = {"layers": layers, "pooling": pooling, "layer_dtype": "float32",
                            "max_tokens": DEFAULT_MAX_TOKENS}
        meta["sklearn"] = {"file": saved.SKLEARN_FILE, "parts": sorted(trained),
                           "reg": result.get("reg")}

        def write(tmp):
            sio.dump(dict(trained), tmp / saved.SKLEARN_FILE)
    meta["training"] = {"command": "elmo classify", "options": options or {},
                        "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
                        "best_epoch": result.get("best_epoch")}
    return saved.save_task(path, meta, write, embedder)


class TextClassifier(TaskPredictor):
    """A saved text classifier (`elmo classify --save DIR`; `torch_elmo.load_task(DIR)` returns
    it): labels and probabilities for new text, scikit-learn style. `classes_` (= `labels`):
    the order of predict_proba's columns."""

    kind = "classify"

    def __init__(self, path, meta: dict, device, embedder=None, sklearn_parts=None,
                 bilstm=None):
        super().__init__(path, meta, meta["labels"], device, embedder)
        self.sklearn_parts = sklearn_parts or {}
        self.bilstm = bilstm                      # (BiLSTMClassifier, WordVocab) or None

    @property
    def classes_(self) -> list[str]:
        return self.labels

    def predict(self, texts, batch_size: int = 64, show_progress_bar: bool = False):
        """The label of each text, in input order (one string gives one label). A text is a
        string (split on whitespace) or a list of tokens. An empty text has no label: None
        (its predict_proba row is NaN), rather than a guess made from no words at all.
        Batched in length order, deterministic; as the model predicted in training."""
        return self.scores(texts, batch_size, show_progress_bar, "predict")[0]

    def predict_proba(self, texts, batch_size: int = 64, show_progress_bar: bool = False
                      ) -> np.ndarray:
        """(n, len(classes_)) float64 probabilities, columns in `classes_` order (one string
        gives one row); a row of NaN for an empty text. logreg / mlp: scikit-learn's
        predict_proba; bilstm: the softmax of the logits."""
        return self.scores(texts, batch_size, show_progress_bar, "predict_proba")[1]

    def scores(self, texts, batch_size: int, show_progress_bar: bool, who: str
               ) -> tuple[list, np.ndarray]:
        """(labels, probabilities) of every text (predict, predict_proba)."""
        t, chunks = self.check_texts(texts, batch_size, show_progress_bar, who)
        labels: list = [None] * len(t.tokens)
        proba = np.full((len(t.tokens), len(self.labels)), np.nan)
        for idx in chunks:
            idx = nonempty(t.tokens, idx)
            if not idx:
                continue
            tokens = [t.tokens[i] for i in idx]
            if self.bilstm is not None:
                model, vocab = self.bilstm
                elmo = maybe_layers(self.embedder, tokens, batch_size, np.float16)
                pred, p = bilstm_predict(model, vocab, tokens, elmo, self.device, batch_size)
                pred = [self.labels[k] for k in pred]
            else:
                X = self.features(tokens, batch_size)
                clf = self.sklearn_parts["classifier"]
                pred, p = [str(x) for x in clf.predict(X)], clf.predict_proba(X)
            for k, i in enumerate(idx):
                labels[i] = pred[k]
                proba[i] = p[k]
        return (labels[0], proba[0]) if t.single else (labels, proba)

    def features(self, tokens: list[list[str]], batch_size: int):
        """The logreg / mlp input rows of (non-empty) token lists, as in run_classification."""
        features = self.meta["features"]
        pooled = None
        if features != "tfidf":
            layers = elmo_layers(self.embedder, tokens, batch_size, np.float32)
            pooled = pool_features(layers, self.embedder.model.proj_dim)
        if features in ("elmo", "layer0"):
            return pooled[features]
        X = self.sklearn_parts["vectorizer"].transform(tokens)
        if features == "tfidf":
            return X
        return tfidf_elmo_rows(X, pooled["elmo"], self.sklearn_parts["scaler"])


def load_classifier(path, meta: dict, device) -> TextClassifier:
    """The TextClassifier of a saved model directory whose task.json (`meta`) read_task
    checked."""
    embedder = saved.load_embedder(path, meta, device)
    if meta["model"] == "bilstm":
        return TextClassifier(path, meta, device, embedder,
                              bilstm=load_bilstm(path, meta, device))
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException
    file = saved.part(path, meta, saved.SKLEARN_FILE)
    try:
        parts = sio.load(file, trusted=TRUSTED)
    except UntrustedTypesFoundException:
        untrusted = [t for t in sio.get_untrusted_types(file=file) if t not in TRUSTED]
        raise ElmoError(f"{file}: holds types a saved torch-elmo classifier never has "
                        f"({', '.join(untrusted)}); not loaded (loading them could run code)"
                        ) from None
    return TextClassifier(path, meta, device, embedder, sklearn_parts=parts)
