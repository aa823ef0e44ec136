"""CoNLL-2003 NER (`elmo ner`): the CoNLL reader/writer (IOB1 -> BIO), seqeval scoring, a
BiLSTM-CRF tagger over frozen ELMo layers, and that tagger saved (`elmo ner --save DIR`,
save_tagger) and reloaded as the `Tagger` predictor (torch_elmo.load_task) that tags new text.

    [ word embedding (train vocab) ; casing embedding ; gamma * sum_j softmax(w)_j * ELMo layer j ]
    -> dropout -> BiLSTM -> linear -> CRF (pytorch-crf)

The biLM is frozen: each sentence's 3 layers are computed ONCE and cached in memory (float16),
only the scalar mix (w, gamma) and the tagger train. `--no-elmo` is the same tagger without the
ELMo part. Words: the train vocabulary lowercased with digits as 0, 100 dims, learned from scratch;
a training singleton becomes <unk> half of the time (so <unk> is learned); casing: 7 classes, 8
dims. Dropout 0.5 on the input and the BiLSTM output, 100 units per direction, Adam 5e-3, batches
of 32 sentences, gradient norm clipped at 5. Early stopping on dev entity F1 (patience); the best
epoch's weights are scored on test with seqeval (entity level, default conlleval-like mode, BIO).

`Tagger.predict` runs the same network on new text: words and casing from the saved vocabulary,
the ELMo layers rounded to float16 as in training (predictor.py), Viterbi decoding in
length-sorted batches, entities read from the BIO tags as seqeval reads them.
"""
from __future__ import annotations

import copy
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config import ElmoError
from ..embed import ElmoEmbedder, length_sorted_batches
from ..outputs import atomic_text
from ..modules import ScalarMix
from . import saved
from .common import (N_CASING, WordVocab, bad_line, embed_layers, read_data_lines,
                     subsample)
from .predictor import TaskPredictor, maybe_layers, nonempty


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

    for i, line in enumerate(read_data_lines(path), 1):
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
            raise bad_line(path, i, "expected 'word ... NER-tag' (at least 2 columns)", line)
        if width is None:
            width = len(parts)
        elif len(parts) != width:
            raise bad_line(path, i, f"expected {width} columns like the first token line", line)
        if not _TAG.match(parts[-1]):
            raise bad_line(path, i, "NER tag (last column) must be O, B-TYPE or I-TYPE", line)
        rows.append(parts)
    flush()
    return sentences


def looks_like_conll(lines: Sequence[str]) -> bool:
    """Do a file's first lines look like CoNLL (elmo predict's input guess)? A `-DOCSTART-`
    first line, or first non-blank lines that all have the same number (>= 2) of columns and
    end in an NER tag (O, B-X, I-X). A one-column CoNLL file is not told from text this way."""
    rows = [l.split() for l in lines if l.strip()][:10]
    if not rows:
        return False
    if rows[0][0] == "-DOCSTART-":
        return True
    return len(rows[0]) >= 2 and all(len(r) == len(rows[0]) and _TAG.match(r[-1]) for r in rows)


def iter_conll_tokens(lines: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    """CoNLL sentences streamed from (line, position) pairs (textio.iter_lines): (the first
    column of each token line, the position after the sentence). Blank lines end a sentence;
    -DOCSTART- lines are document separators and are dropped, as read_conll drops them."""
    tokens: list[str] = []
    at = 0
    for line, at in lines:
        parts = line.split()
        if parts and parts[0] != "-DOCSTART-":
            tokens.append(parts[0])
        elif tokens:
            yield tokens, at
            tokens = []
    if tokens:
        yield tokens, at


def write_conll(sentences: Iterable[ConllSentence], path, extra: Optional[list] = None,
                bio: bool = False) -> None:
    """Write sentences back in the same layout (columns joined by one space, a blank line after
    each sentence; read_conll(keep_docstart=True) + write_conll reproduces a file whose sentences
    are separated by single blank lines). bio=True writes the BIO tags in place of the file's NER
    column. `extra`: per sentence a list of tags appended as one more column (e.g. predictions,
    giving conlleval's `word POS chunk gold predicted` layout)."""
    with atomic_text(path) as f:
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
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    with warnings.catch_warnings():  # no predicted entities yet: seqeval warns and gives 0
        warnings.simplefilter("ignore")
        return {"f1": float(f1_score(y_true, y_pred)),
                "precision": float(precision_score(y_true, y_pred)),
                "recall": float(recall_score(y_true, y_pred)),
                "report": classification_report(y_true, y_pred, digits=4)}


# ---------------------------------------------------------------------------------------- tagger
def _make_batch(idx, words, cases, tags, elmo, unk_singletons=None, rng=None) -> dict:
    """Padded CPU tensors for sentences `idx`: words, case, tags, mask (B, T), lengths (B,),
    elmo (B, 3, T, 2P) when cached layers are given; `unk_singletons` turns on word dropout."""
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
    trained: Optional[dict] = None   # model (best epoch), vocab, tagset, head: for save_tagger


class BiLSTMCRF(nn.Module):
    """[word emb ; casing emb ; ScalarMix of the ELMo layers] -> dropout -> BiLSTM -> dropout ->
    linear -> CRF. `elmo_dim=0`: no ELMo part."""

    def __init__(self, n_words: int, n_tags: int, elmo_dim: int = 0, n_elmo_layers: int = 3,
                 word_dim: int = 100, case_dim: int = 8, hidden: int = 100, dropout: float = 0.5):
        super().__init__()
        from torchcrf import CRF  # optional dependency: pytorch-crf (the `tasks` extra)
        self.word = nn.Embedding(n_words, word_dim, padding_idx=0)
        self.case = nn.Embedding(N_CASING, case_dim, padding_idx=0)
        self.elmo_dim = elmo_dim
        self.mix = ScalarMix(n_elmo_layers) if elmo_dim else None
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(word_dim + case_dim + elmo_dim, hidden, batch_first=True,
                            bidirectional=True)
        self.out = nn.Linear(2 * hidden, n_tags)
        self.crf = CRF(n_tags, batch_first=True)

    def emissions(self, words, case, elmo, lengths) -> torch.Tensor:
        """(B, T) words, case; (B, 3, T, 2P) elmo or None; (B,) lengths -> (B, T, n_tags)."""
        x = [self.word(words), self.case(case)]
        if self.mix is not None:
            x.append(self.mix([elmo[:, j] for j in range(elmo.shape[1])]))
        x = self.drop(torch.cat(x, dim=2))         # (B, T, word_dim + case_dim + elmo_dim)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return self.out(self.drop(y))

    def loss(self, batch: dict) -> torch.Tensor:
        em = self.emissions(batch["words"], batch["case"], batch.get("elmo"), batch["lengths"])
        return -self.crf(em, batch["tags"], mask=batch["mask"], reduction="mean")

    def decode(self, batch: dict) -> list[list[int]]:
        em = self.emissions(batch["words"], batch["case"], batch.get("elmo"), batch["lengths"])
        return self.crf.decode(em, mask=batch["mask"])

    def mix_summary(self) -> str:
        """`  mix s=[...] gamma=...` for the log, or "" without ELMo."""
        if self.mix is None:
            return ""
        s = self.mix.weights().detach().flatten().tolist()
        g = float(self.mix.gamma.detach().flatten()[0])
        return f"  mix s=[{', '.join(f'{x:.2f}' for x in s)}] gamma={g:.2f}"


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def encode(sentences: Sequence[ConllSentence], vocab: WordVocab, tag_index: dict[str, int]):
    """(word ids, casing classes, tag ids) per sentence; a tag unseen in training counts as O."""
    words, cases = vocab.inputs(s.tokens for s in sentences)
    return words, cases, [[tag_index.get(t, tag_index["O"]) for t in s.tags] for s in sentences]


def cache_elmo_layers(embedder: ElmoEmbedder, splits: dict[str, list[ConllSentence]],
                      batch_size: int, log: Callable) -> tuple[dict, float]:
    """Each split's (3, n, 2P) float16 layers per sentence, computed once; and the seconds."""
    t0 = time.time()
    elmo = {name: embed_layers(embedder, [s.tokens for s in sents], batch_size,
                               dtype=np.float16, progress=f"ELMo {name}")
            for name, sents in splits.items()}
    seconds = time.time() - t0
    n_sent = sum(len(v) for v in splits.values())
    n_tok = sum(len(s.rows) for v in splits.values() for s in v)
    mb = sum(a.nbytes for v in elmo.values() for a in v) / 2**20
    log(f"ELMo layers for {n_sent} sentences ({n_tok} tokens) "
        f"computed once in {seconds:.1f} s, cached in memory as float16 ({mb:.0f} MiB)")
    return elmo, seconds


def train_epoch(model: BiLSTMCRF, opt, data, elmo, singletons, rng, batch_size: int,
                device) -> float:
    """One pass over the training sentences in a random order; the mean loss per sentence."""
    words, cases, tags = data
    model.train()
    perm = rng.permutation(len(words))
    total = 0.0
    for start in range(0, len(perm), batch_size):
        idx = list(perm[start:start + batch_size])
        batch = _make_batch(idx, words, cases, tags, elmo, singletons, rng)
        loss = model.loss(to_device(batch, device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(words)


@torch.no_grad()
def predict_tags(model: BiLSTMCRF, data, elmo, tagset: list[str], device,
                 batch_size: int = 128) -> list[list[str]]:
    """Viterbi tags per sentence, batched in length order, returned in input order."""
    words, cases, tags = data
    model.eval()
    pred: list = [None] * len(words)
    for idx in length_sorted_batches([len(w) for w in words], batch_size):
        batch = to_device(_make_batch(idx, words, cases, tags, elmo), device)
        for i, p in zip(idx, model.decode(batch)):
            pred[i] = [tagset[k] for k in p]
    return pred


def train_tagger(train: list[ConllSentence], dev: list[ConllSentence], test: list[ConllSentence],
                 embedder: Optional[ElmoEmbedder] = None, epochs: int = 10, patience: int = 3,
                 batch_size: int = 32, lr: float = 5e-3, hidden: int = 100, word_dim: int = 100,
                 dropout: float = 0.5, seed: int = 0, embed_batch_size: int = 64, log=print,
                 device: str | torch.device = "cpu") -> NerResult:
    """Train the ELMo (or, with embedder=None, word-only) BiLSTM-CRF; early stopping on dev F1;
    the best epoch's weights tag test."""
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    tagset = sorted({t for s in train for t in s.tags} | {"O"})
    tag_index = {t: i for i, t in enumerate(tagset)}
    vocab = WordVocab(s.tokens for s in train)
    splits = {"train": train, "dev": dev, "test": test}
    data = {name: encode(sents, vocab, tag_index) for name, sents in splits.items()}
    elmo, embed_seconds = {"train": None, "dev": None, "test": None}, 0.0
    if embedder is not None:
        elmo, embed_seconds = cache_elmo_layers(embedder, splits, embed_batch_size, log)
    elmo_dim = 0 if embedder is None else embedder.output_dim
    head = dict(n_words=len(vocab), n_tags=len(tagset), elmo_dim=elmo_dim, n_elmo_layers=3,
                word_dim=word_dim, case_dim=8, hidden=hidden, dropout=dropout)
    model = BiLSTMCRF(**head).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    best, best_f1, best_epoch, bad = None, -1.0, 0, 0
    epoch_seconds, history = [], []
    epoch = 0
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        loss = train_epoch(model, opt, data["train"], elmo["train"], vocab.singletons, rng,
                           batch_size, device)
        train_s = time.time() - t0
        dev_f1 = ner_scores([s.tags for s in dev],
                            predict_tags(model, data["dev"], elmo["dev"], tagset, device))["f1"]
        epoch_seconds.append(time.time() - t0)
        history.append({"epoch": epoch, "loss": loss, "dev_f1": dev_f1,
                        "train_seconds": train_s, "seconds": epoch_seconds[-1]})
        log(f"epoch {epoch}: loss {loss:.3f}  dev F1 {dev_f1:.4f}  "
            f"{epoch_seconds[-1]:.1f} s (train {train_s:.1f} s){model.mix_summary()}")
        if dev_f1 > best_f1:
            best_f1, best_epoch, bad = dev_f1, epoch, 0
            best = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                log(f"early stop: no dev improvement for {patience} epochs")
                break
    model.load_state_dict(best)
    test_pred = predict_tags(model, data["test"], elmo["test"], tagset, device)
    scores = ner_scores([s.tags for s in test], test_pred)
    return NerResult(best_f1, scores, best_epoch, epoch, epoch_seconds, embed_seconds, history,
                     test_pred, dict(model=model, vocab=vocab, tagset=tagset, head=head))


# ------------------------------------------------------------------------------------ `elmo ner`
def read_ner_data(train_file, dev_file, test_file, max_train: Optional[int] = None,
                  max_eval: Optional[int] = None, seed: int = 0):
    """(train, dev, test) CoNLL sentences, each file non-empty; train subsampled to max_train,
    dev and test to max_eval sentences."""
    splits = []
    for path in (train_file, dev_file, test_file):
        sents = read_conll(path)
        if not sents:
            raise ElmoError(f"{path}: no sentences")
        splits.append(sents)
    train, dev, test = splits
    if not any(t != "O" for s in train for t in s.tags):
        raise ElmoError(f"{train_file}: every tag is O (no entities to learn); is the last "
                        f"column the NER tag?")
    return (subsample(train, max_train, seed), subsample(dev, max_eval, seed),
            subsample(test, max_eval, seed))


def ner_summary(res: NerResult, with_elmo: bool) -> str:
    """The lines `elmo ner` prints after training: dev, timing, test scores, seqeval report."""
    t = res.test
    return "\n".join([
        f"best dev F1 {res.dev_f1:.4f} at epoch {res.best_epoch} of {res.epochs_run}; "
        f"{float(np.mean(res.epoch_seconds)):.1f} s per epoch (train + dev decode)"
        + (f"; ELMo caching {res.embed_seconds:.1f} s" if with_elmo else ""),
        f"test entity F1 {t['f1']:.4f}  precision {t['precision']:.4f}  recall {t['recall']:.4f}"
        f"  (seqeval, BIO)",
        t["report"].rstrip()])


# --------------------------------------------------------------------------- saved: the Tagger
def save_tagger(res: NerResult, path, embedder: Optional[ElmoEmbedder] = None,
                options: Optional[dict] = None) -> str:
    """The trained tagger of `res` (train_tagger's best epoch) as a saved task model directory
    (saved.py), with the biLM of `embedder` (None: a --no-elmo tagger). `options`: the training
    command's options, kept in task.json."""
    model, vocab, tagset, head = (res.trained[k] for k in ("model", "vocab", "tagset", "head"))
    if (embedder is None) != (model.mix is None):
        raise ElmoError("save_tagger: give the embedder the tagger was trained with (and none "
                        "for a tagger without ELMo)")
    meta = {"kind": "ner", "model": "bilstm-crf",
            "features": "words" if embedder is None else "elmo",
            "labels": tagset, "tag_scheme": "BIO",
            "elmo": saved.scalar_mix_meta(model.mix) if embedder is not None else None,
            "words": saved.words_meta(), "head": head,
            "training": {"command": "elmo ner", "options": options or {},
                         "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                         "dev_f1": res.dev_f1, "test_f1": res.test["f1"]}}
    return saved.save_task(path, meta, saved.head_writer(model, vocab.words), embedder)


class Tagger(TaskPredictor):
    """A saved NER tagger (`elmo ner --save DIR`; `torch_elmo.load_task(DIR)` returns it): BIO
    tags and entities for new text. `labels`: the tag set (BIO)."""

    kind = "ner"

    def __init__(self, path, meta: dict, model: BiLSTMCRF, vocab: WordVocab, device,
                 embedder: Optional[ElmoEmbedder] = None):
        super().__init__(path, meta, meta["labels"], device, embedder)
        self.model = model
        self.vocab = vocab

    def predict(self, texts, batch_size: int = 64, show_progress_bar: bool = False):
        """Per text `{"tokens": [...], "tags": [BIO tags], "entities": [{"text", "label",
        "start", "end", "start_char", "end_char"}]}`, in input order. A text is a string (split
        on whitespace; character offsets into that string) or a list of tokens (character
        offsets into `" ".join(tokens)`); one string gives one dict. Token offsets `start`/`end`
        and character offsets are end-exclusive; an entity is a B- tag and the I- tags of its
        type that follow (an I- tag after another type starts one, as seqeval reads BIO). An
        empty text gives empty tokens, tags and entities. Batched in length order (`batch_size`
        texts), deterministic; a text longer than 1,000 tokens gets its ELMo layers in
        overlapping windows, as `elmo embed`."""
        from seqeval.metrics.sequence_labeling import get_entities
        t, chunks = self.check_texts(texts, batch_size, show_progress_bar, "predict")
        tags: list = [[] for _ in t.tokens]
        for idx in chunks:
            idx = nonempty(t.tokens, idx)
            if not idx:
                continue
            tokens = [t.tokens[i] for i in idx]
            words, cases = self.vocab.inputs(tokens)
            data = (words, cases, [[0] * len(s) for s in words])
            elmo = maybe_layers(self.embedder, tokens, batch_size, np.float16)
            for i, p in zip(idx, predict_tags(self.model, data, elmo, self.labels, self.device,
                                              batch_size)):
                tags[i] = p
        out = []
        for tokens, spans, source, tg in zip(t.tokens, t.spans, t.sources, tags):
            ents = []
            for label, start, last in get_entities(tg):
                a, b = spans[start][0], spans[last][1]
                ents.append({"text": source[a:b], "label": label, "start": start,
                             "end": last + 1, "start_char": a, "end_char": b})
            out.append({"tokens": tokens, "tags": tg, "entities": ents})
        return out[0] if t.single else out


def load_tagger(path, meta: dict, device) -> Tagger:
    """The Tagger of a saved model directory whose task.json (`meta`) read_task checked."""
    model = BiLSTMCRF(**meta["head"])
    saved.load_head(model, saved.part(path, meta, saved.HEAD_FILE), device)
    vocab = WordVocab.from_words(saved.read_json(saved.part(path, meta, saved.WORDS_FILE)))
    return Tagger(path, meta, model, vocab, device, saved.load_embedder(path, meta, device))
