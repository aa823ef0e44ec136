"""The BiLSTM text classifier (`elmo classify --classifier bilstm`): ELMo added to a task model's
input, the paper's way, rather than used alone as a pooled vector.

    [ word embedding (train vocab) ; casing embedding ; gamma * sum_j softmax(w)_j * ELMo layer j ]
    -> dropout -> BiLSTM -> max-pool over time -> dropout -> linear -> softmax over the labels

The biLM is frozen: each sentence's 3 layers are computed ONCE up front (common.embed_layers, kept
in memory as float16), so an epoch costs only the small model; the scalar mix (w, gamma) is trained
with it. Without layers (`--no-elmo`; classify's features="words") it is the same model without the
ELMo part. Words and casing are the NER tagger's inputs (common.WordVocab, common.casing): the
train vocabulary lowercased with digits as 0, learned from scratch, a training singleton replaced
by <unk> half of the time. Adam (5e-3), batches of 32 sentences, gradient norm clipped at 5,
cross-entropy. With a dev set, epochs are ranked by dev (macro-F1, accuracy, then the lower dev
loss: a small dev set ties on the first two); the best one is kept and training stops after
`patience` epochs without a better one. Without a dev set all epochs run and the last is kept.
Seeded: the same seed gives the same predictions on the same machine.

Saved with the classifier (classify.save_classifier): the network's tensors, its vocabulary and
sizes (`bilstm_parts`); `load_bilstm` rebuilds it and `bilstm_predict` runs it on new text (the
ELMo layers rounded to float16 as in training, predictor.py).
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..embed import ElmoEmbedder, length_sorted_batches
from ..modules import ScalarMix
from . import saved
from .common import N_CASING, WordVocab, classification_scores, embed_layers


class BiLSTMClassifier(nn.Module):
    """[word emb ; casing emb ; ScalarMix of the ELMo layers] -> dropout -> BiLSTM -> max-pool over
    time -> dropout -> linear. `elmo_dim=0`: no ELMo part."""

    def __init__(self, n_words: int, n_labels: int, elmo_dim: int = 0, n_elmo_layers: int = 3,
                 word_dim: int = 100, case_dim: int = 8, hidden: int = 100, dropout: float = 0.5):
        super().__init__()
        self.word = nn.Embedding(n_words, word_dim, padding_idx=0)
        self.case = nn.Embedding(N_CASING, case_dim, padding_idx=0)
        self.mix = ScalarMix(n_elmo_layers) if elmo_dim else None
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(word_dim + case_dim + elmo_dim, hidden, batch_first=True,
                            bidirectional=True)
        self.out = nn.Linear(2 * hidden, n_labels)

    def forward(self, words, case, elmo, lengths) -> torch.Tensor:
        """(B, T) words, case; (B, 3, T, 2P) elmo or None; (B,) lengths -> (B, n_labels) logits."""
        x = [self.word(words), self.case(case)]
        if self.mix is not None:
            x.append(self.mix([elmo[:, j] for j in range(elmo.shape[1])]))
        x = self.drop(torch.cat(x, dim=2))         # (B, T, word_dim + case_dim + elmo_dim)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        # (B, T, 2H); padding must never win the max, so it is -inf before pooling
        pad = torch.arange(x.shape[1], device=y.device)[None, :] >= lengths.to(y.device)[:, None]
        pooled = y.masked_fill(pad[:, :, None], float("-inf")).max(dim=1).values   # (B, 2H)
        return self.out(self.drop(pooled))

    def mix_summary(self) -> str:
        """`  mix s=[...] gamma=...` for the log, or "" without ELMo."""
        if self.mix is None:
            return ""
        s = self.mix.weights().detach().flatten().tolist()
        g = float(self.mix.gamma.detach().flatten()[0])
        return f"  mix s=[{', '.join(f'{x:.2f}' for x in s)}] gamma={g:.2f}"


def make_batch(idx, words, cases, elmo, unk_singletons=None, rng=None) -> dict:
    """Padded CPU tensors for sentences `idx`: words, case (B, T), lengths (B,), elmo
    (B, 3, T, 2P) when cached layers are given; `unk_singletons` turns on word dropout."""
    lengths = [len(words[i]) for i in idx]
    B, T = len(idx), max(lengths)
    w = np.zeros((B, T), np.int64)
    c = np.zeros((B, T), np.int64)
    for b, i in enumerate(idx):
        n = lengths[b]
        wi = np.asarray(words[i])
        if unk_singletons is not None:  # word dropout: a singleton becomes <unk> half the time
            drop = np.array([x in unk_singletons for x in words[i]]) & (rng.rand(n) < 0.5)
            wi = np.where(drop, 1, wi)
        w[b, :n], c[b, :n] = wi, cases[i]
    batch = {"words": torch.from_numpy(w), "case": torch.from_numpy(c),
             "lengths": torch.tensor(lengths)}
    if elmo is not None:
        L, _, D = elmo[idx[0]].shape
        e = np.zeros((B, L, T, D), np.float32)
        for b, i in enumerate(idx):
            e[b, :, :lengths[b]] = elmo[i]
        batch["elmo"] = torch.from_numpy(e)
    return batch


def logits_of(model: BiLSTMClassifier, batch: dict, device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(batch["words"], batch["case"], batch.get("elmo"), batch["lengths"])


@torch.no_grad()
def batched_logits(model: BiLSTMClassifier, words, cases, elmo, device, batch_size: int = 128):
    """(indices, (B, n_labels) logits) per length-sorted batch of sentences."""
    model.eval()
    for idx in length_sorted_batches([len(w) for w in words], batch_size):
        yield idx, logits_of(model, make_batch(idx, words, cases, elmo), device)


@torch.no_grad()
def predict_labels(model: BiLSTMClassifier, words, cases, elmo, labels: list[str], device,
                   batch_size: int = 128, y: Optional[list[int]] = None):
    """The arg-max label per sentence, batched in length order, returned in input order; with
    gold label ids `y`, also the mean cross-entropy: (labels, loss)."""
    pred: list = [None] * len(words)
    total = 0.0
    for idx, logits in batched_logits(model, words, cases, elmo, device, batch_size):
        for i, k in zip(idx, logits.argmax(dim=1).tolist()):
            pred[i] = labels[k]
        if y is not None:
            target = torch.tensor([y[i] for i in idx], device=logits.device)
            total += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return pred if y is None else (pred, total / len(words))


def train_epoch(model: BiLSTMClassifier, opt, words, cases, y, elmo, singletons, rng,
                batch_size: int, device) -> float:
    """One pass over the training sentences in a random order; the mean loss per sentence."""
    model.train()
    perm = rng.permutation(len(words))
    total = 0.0
    for start in range(0, len(perm), batch_size):
        idx = list(perm[start:start + batch_size])
        batch = make_batch(idx, words, cases, elmo, singletons, rng)
        target = torch.tensor([y[i] for i in idx], device=device)
        loss = nn.functional.cross_entropy(logits_of(model, batch, device), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(words)


def train_bilstm_classifier(train: Sequence, test: Sequence, dev: Optional[Sequence] = None,
                            embedder: Optional[ElmoEmbedder] = None,
                            layers: Optional[dict] = None, epochs: int = 10, patience: int = 3,
                            hidden: int = 100, lr: float = 5e-3, batch_size: int = 32,
                            word_dim: int = 100, dropout: float = 0.5, seed: int = 0,
                            embed_batch_size: int = 64, device: str | torch.device = "cpu",
                            log: Optional[Callable] = None) -> dict:
    """Train on `train` (examples with .tokens and .label), keep the best dev epoch, label `test`.
    ELMo: `layers` (split name -> (3, n, 2P) arrays per sentence, e.g. cached by the caller) or
    computed here from `embedder`; neither: the word-only model. Returns the dict shape of
    classify.fit_and_score (scores, predictions, labels, reg=None, dev_scores = epoch ->
    (dev macro-F1, dev accuracy)) plus best_epoch, epochs_run, history, mix, elmo, the sizes
    and times."""
    log = log or (lambda *a: None)
    splits = {"train": train, "test": test}
    if dev is not None:
        splits["dev"] = dev
    t0 = time.time()
    if layers is None and embedder is not None:
        layers = {name: embed_layers(embedder, [e.tokens for e in exs], embed_batch_size,
                                     dtype=np.float16) for name, exs in splits.items()}
    features_seconds = time.time() - t0
    elmo = layers or {}
    elmo_dim = elmo["train"][0].shape[-1] if layers else 0

    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    label_set = sorted({e.label for e in train})
    label_index = {l: i for i, l in enumerate(label_set)}
    vocab = WordVocab(e.tokens for e in train)
    inputs = {name: vocab.inputs(e.tokens for e in exs) for name, exs in splits.items()}
    words = {name: w for name, (w, _) in inputs.items()}
    cases = {name: c for name, (_, c) in inputs.items()}
    y_train = [label_index[e.label] for e in train]
    # a dev label unseen in training can never be predicted; it only counts in the scores
    y_dev = [label_index.get(e.label, -100) for e in dev] if dev is not None else None
    head = dict(n_words=len(vocab), n_labels=len(label_set), elmo_dim=elmo_dim, n_elmo_layers=3,
                word_dim=word_dim, case_dim=8, hidden=hidden, dropout=dropout)
    model = BiLSTMClassifier(**head).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    scored = sorted(set(label_set) | {e.label for e in test})   # the labels scores are over

    best, best_dev, best_epoch, bad, epoch = None, None, 0, 0, 0
    dev_scores, history = {}, []
    for epoch in range(1, epochs + 1):
        t_epoch = time.time()
        loss = train_epoch(model, opt, words["train"], cases["train"], y_train, elmo.get("train"),
                           vocab.singletons, rng, batch_size, device)
        entry = {"epoch": epoch, "loss": loss}
        if dev is not None:
            pred, dev_loss = predict_labels(model, words["dev"], cases["dev"], elmo.get("dev"),
                                            label_set, device, y=y_dev)
            s = classification_scores([e.label for e in dev], pred, scored)
            dev_scores[epoch] = (s["macro_f1"], s["accuracy"])
            entry.update(dev_macro_f1=s["macro_f1"], dev_accuracy=s["accuracy"],
                         dev_loss=dev_loss)
        entry["seconds"] = time.time() - t_epoch
        history.append(entry)
        log(f"epoch {epoch}: loss {loss:.4f}"
            + (f"  dev macro-F1 {entry['dev_macro_f1']:.4f} accuracy {entry['dev_accuracy']:.4f}"
               if dev is not None else "")
            + f"  {entry['seconds']:.1f} s{model.mix_summary()}")
        if dev is None:
            continue
        key = dev_scores[epoch] + (-dev_loss,)   # ties (a small dev set) go to the lower loss
        if best_dev is None or key > best_dev:
            best_dev, best_epoch, bad = key, epoch, 0
            best = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                log(f"early stop: no dev gain for {patience} epochs")
                break
    if best is not None:
        model.load_state_dict(best)
    else:
        best_epoch = epoch                                     # no dev: the last epoch
    pred = predict_labels(model, words["test"], cases["test"], elmo.get("test"), label_set, device)
    result = classification_scores([e.label for e in test], pred, scored)
    result.update(predictions=pred, labels=scored, reg=None, dev_scores=dev_scores,
                  best_epoch=best_epoch, epochs_run=epoch, history=history,
                  mix=model.mix_summary().strip(), elmo=bool(layers),
                  features_seconds=features_seconds, fit_seconds=time.time() - t0,
                  dim=model.lstm.input_size, n_train=len(train), n_test=len(test),
                  n_dev=len(dev) if dev is not None else 0,
                  trained=dict(model=model, vocab=vocab, labels=label_set, head=head))
    return result


# ------------------------------------------------------------------------------------- saved
def bilstm_parts(trained: dict) -> tuple[dict, Callable]:
    """task.json's entries of a trained BiLSTM classifier (labels, head sizes, words, the scalar
    mix) and the function writing its files (head tensors, vocabulary) into a directory."""
    model = trained["model"]
    meta = {"labels": trained["labels"], "head": trained["head"], "words": saved.words_meta(),
            "elmo": saved.scalar_mix_meta(model.mix) if model.mix is not None else None}
    return meta, saved.head_writer(model, trained["vocab"].words)


def load_bilstm(path, meta: dict, device) -> tuple[BiLSTMClassifier, WordVocab]:
    """The saved BiLSTM classifier (eval mode, on `device`) and its vocabulary."""
    model = BiLSTMClassifier(**meta["head"])
    saved.load_head(model, saved.part(path, meta, saved.HEAD_FILE), device)
    return model, WordVocab.from_words(saved.read_json(saved.part(path, meta, saved.WORDS_FILE)))


def bilstm_predict(model: BiLSTMClassifier, vocab: WordVocab, tokens: list[list[str]],
                   elmo: Optional[list], device, batch_size: int) -> tuple[list[int], np.ndarray]:
    """Per (non-empty) token list the arg-max label id and the softmax probabilities
    (n, n_labels) float64, in input order."""
    words, cases = vocab.inputs(tokens)
    pred = [0] * len(tokens)
    proba = np.zeros((len(tokens), model.out.out_features))
    for idx, logits in batched_logits(model, words, cases, elmo, device, batch_size):
        for i, k, p in zip(idx, logits.argmax(dim=1).tolist(),
                           torch.softmax(logits, dim=1).cpu().numpy()):
            pred[i] = k
            proba[i] = p
    return pred, proba
