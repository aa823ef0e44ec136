"""Which initial LSTM state should inference use?  carry vs zero vs warm (README "Inference state").

    .venv/bin/python benchmarks/state_modes.py [--minutes 20] [--work-dir runs/state_modes]

Run it on a committed tree (a clean clone): part B trains with model.py and evaluates later, so
both must be the same code.

Part A (the bilm-tf fixture model, seconds): vector drift. Each of the 30 fixture sentences is
embedded alone in a fresh embedder and again inside 4 random batches (random row, random other
sentences, 0-3 random batches run before). Reported: max |difference| of the top layer. carry
drifts (bilm-tf/allennlp behaviour); zero and warm must not (batching noise only).

Part B (a small biLM trained here, with its softmax): language-model quality at the start of a
sentence, which is where the initial state matters. The exported ELMo files carry no softmax, so
we train one quickly on wikitext-2 (bilm-tf recipe in miniature: packed sentence streams with
carried state, `</S>` only a target, Adagrad 0.2, full softmax over the 8k most frequent words)
and then score held-out wikitext-2 test sentences, each run inference-style (`<S> w1..wn </S>`,
both directions at once), from these initial states:
  zero      every sentence from zero
  warm      torch_elmo.embed.WARMUP_TEXT (the default) read training-style
  warm-alt  the same recipe on 3 other warm-up texts (8 random training sentences each), mean
  carry     bilm-tf/allennlp: the state row r left after the previous batch (batches of 32, in
            file order); the previous sentence was read WITH its `</S>`
  context   oracle: the state after the 3 real previous sentences (forward) / 3 real following
            sentences (backward) of the same article, read training-style
Reported: perplexity of the first word (fwd predicting w1, bwd predicting wn; mean of the two
directions' cross-entropies), of the first 3, and of the whole sentence incl. boundaries; and
the drift of the top-layer vectors from the oracle `context` vectors (mean relative L2 distance,
first 3 tokens and all tokens). The measured numbers and the choice they support are in README
"Inference state".
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning on a busy CPU
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torch_elmo import BiLM, ElmoEmbedder, batch_to_ids  # noqa: E402
from torch_elmo.config import Options  # noqa: E402
from torch_elmo.embed import WARMUP_TEXT, warm_state  # noqa: E402
from torch_elmo.export import load_bilm, save_weights  # noqa: E402

SHARED = Path(os.environ.get("ELMO_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "bilm-tf" / "model"
WIKI = SHARED / "data" / "wikitext-2"

BENCH_OPTIONS = {
    "lstm": {"dim": 256, "projection_dim": 64, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
             "use_skip_connections": True},
    "char_cnn": {"activation": "relu", "embedding": {"dim": 16},
                 "filters": [[1, 32], [2, 32], [3, 64], [4, 128]],
                 "max_characters_per_token": 50, "n_characters": 262, "n_highway": 1},
    "dropout": 0.1,
}


# ------------------------------------------------------------------------------------- part A
def part_a(n_trials: int = 4, seed: int = 0) -> dict:
    import json
    S = json.loads((FIXTURE / "lm_embeddings_sentences.json").read_text())
    sents = [s.strip().split() for group in S for s in group]
    rng = random.Random(seed)
    opts, weights = FIXTURE / "options.json", FIXTURE / "lm_weights.hdf5"
    model = load_bilm(opts, weights)
    res = {}
    for mode in ("carry", "zero", "warm"):
        worst = 0.0
        for i, s in enumerate(sents):
            alone = ElmoEmbedder(model=model, state=mode).embed_sentence(s)[2]
            for _ in range(n_trials):
                emb = ElmoEmbedder(model=model, state=mode)
                for _ in range(rng.randint(0, 3)):
                    emb.embed_batch(rng.sample(sents, rng.randint(1, 8)))
                others = rng.sample(sents, rng.randint(1, 7))
                row = rng.randint(0, len(others))
                batch = others[:row] + [s] + others[row:]
                got = emb.embed_batch(batch)[row][2]
                worst = max(worst, float(np.abs(got - alone).max()))
        res[mode] = worst
    return res


# ------------------------------------------------------------------------------------- data
def _articles(path: Path) -> list[list[list[str]]]:
    """wikitext file -> articles -> sentences (split after ' . ' / ' ? ' / ' ! ')."""
    arts, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        t = line.strip()
        if not t:
            continue
        if t.startswith("= ") and t.endswith(" =") and not t.startswith("= = "):
            if cur:
                arts.append(cur)
            cur = []
            continue
        if t.startswith("="):
            continue
        sent = []
        for w in t.split():
            sent.append(w)
            if w in (".", "?", "!"):
                cur.append(sent)
                sent = []
        if sent:
            cur.append(sent)
    if cur:
        arts.append(cur)
    return arts


class Words:
    """Every word seen -> index (chars come from these); targets: top-V words, else <UNK>."""

    def __init__(self, sentences, vocab_size: int):
        from collections import Counter
        counts = Counter(w for s in sentences for w in s)
        self.targets = ["<S>", "</S>", "<UNK>"] + [w for w, _ in counts.most_common(vocab_size)]
        self.tid = {w: i for i, w in enumerate(self.targets)}
        self.words, self.wid = [], {}
        for w in ["<S>", "</S>"] + list(counts):
            self.add(w)

    def add(self, w):
        if w not in self.wid:
            self.wid[w] = len(self.words)
            self.words.append(w)
        return self.wid[w]

    def char_table(self) -> torch.Tensor:
        return batch_to_ids([self.words])[0]  # (N, 50)


def packed_rows(sentences, words: Words, B: int, T: int, reverse: bool, rng: random.Random):
    """bilm-tf _get_batch: B rows, each an endless stream of shuffled sentences, `[<S>] + s` as
    inputs with `s + [</S>]` as targets (reversed: `</S>` first); yields (inputs, targets)."""
    def stream():
        order = list(range(len(sentences)))   # each row its own order (a shared list would
        while True:                            # make all rows read the same sentences)
            rng.shuffle(order)
            for k in order:
                s = sentences[k][::-1] if reverse else sentences[k]
                toks = ["</S>" if reverse else "<S>", *s, "<S>" if reverse else "</S>"]
                for a, b in zip(toks[:-1], toks[1:]):
                    yield words.wid[a], words.tid.get(b, 2)

    streams = [stream() for _ in range(B)]
    while True:
        x = torch.empty(B, T, dtype=torch.long)
        y = torch.empty(B, T, dtype=torch.long)
        for r in range(B):
            for t in range(T):
                x[r, t], y[r, t] = next(streams[r])
        yield x, y


# ------------------------------------------------------------------------------------- train
def train(work: Path, minutes: float, seed: int = 0):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_sents = [s for a in _articles(WIKI / "train.txt") for s in a]
    words = Words(train_sents, 8000)
    options = Options.from_dict(BENCH_OPTIONS)
    model = BiLM(options)
    softmax = nn.Linear(options.lstm.projection_dim, len(words.targets))
    nn.init.normal_(softmax.weight, 0.0, 1.0 / math.sqrt(options.lstm.projection_dim))
    nn.init.zeros_(softmax.bias)
    params = list(model.parameters()) + list(softmax.parameters())
    opt = torch.optim.Adagrad(params, lr=0.2, initial_accumulator_value=1.0)
    B, T = 32, 20
    table = words.char_table()
    gens = [packed_rows(train_sents, words, B, T, d == 1, rng) for d in range(2)]
    c, h = model.zero_state(B)
    model.train()
    t0, step, log, per_dir = time.time(), 0, [], []
    while time.time() - t0 < minutes * 60:
        losses, cs, hs = [], [], []
        for d in range(2):
            x, y = next(gens[d])
            tok = model.char_cnn(table[x])
            valid = torch.ones(B, T, dtype=torch.bool)
            outs, c_d, h_d = model.run_direction(d, tok, valid, c[d], h[d])
            top = F.dropout(outs[-1], options.dropout, training=True)
            losses.append(F.cross_entropy(softmax(top).reshape(B * T, -1), y.reshape(-1)))
            cs.append(c_d.detach())
            hs.append(h_d.detach())
        c, h = torch.stack(cs), torch.stack(hs)
        loss = 0.5 * (losses[0] + losses[1])
        opt.zero_grad()
        (loss * T).backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        step += 1
        log.append(float(loss.detach()))
        per_dir.append([float(x.detach()) for x in losses])
        if step % 100 == 0:
            print(f"  step {step}  train ppl {math.exp(np.mean(log[-100:])):.1f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    from torch_elmo.config import write_options
    write_options(options, work / "options.json", inference=True)
    save_weights(model, work / "weights.hdf5")
    last = np.mean(per_dir[-200:], axis=0)
    torch.save({"softmax": softmax.state_dict(), "targets": words.targets, "steps": step,
                "tokens": step * B * T, "train_ppl": [math.exp(v) for v in last]},
               work / "softmax.pt")
    return step


# ------------------------------------------------------------------------------------- part B
@torch.no_grad()
def training_style_ppl(model: BiLM, softmax: nn.Linear, targets: list, sentences,
                       batches: int = 40, B: int = 16, T: int = 20) -> list[float]:
    """Sanity line: held-out perplexity per direction the way the LM was trained (packed
    streams, carried state), so a broken direction shows before its numbers are read."""
    words = Words([], 0)
    words.targets, words.tid = targets, {w: i for i, w in enumerate(targets)}
    for w in {w for s in sentences for w in s}:
        words.add(w)
    table = words.char_table()
    gens = [packed_rows(sentences, words, B, T, d == 1, random.Random(1)) for d in range(2)]
    c, h = model.zero_state(B)
    nll = [[], []]
    valid = torch.ones(B, T, dtype=torch.bool)
    for step in range(batches):
        cs, hs = [], []
        for d in range(2):
            x, y = next(gens[d])
            outs, c_d, h_d = model.run_direction(d, model.char_cnn(table[x]), valid, c[d], h[d])
            if step >= 5:   # after a few batches of warm-up, as run_test's carried state
                nll[d].append(F.cross_entropy(softmax(outs[-1]).reshape(B * T, -1), y.reshape(-1)))
            cs.append(c_d)
            hs.append(h_d)
        c, h = torch.stack(cs), torch.stack(hs)
    return [math.exp(torch.stack(v).mean()) for v in nll]


def _context_state(model: BiLM, contexts: list[list[list[str]]], d: int):
    """Final (c, h) of direction d after reading each row's context sentences training-style."""
    seqs = []
    for ctx in contexts:
        if d == 0:
            seqs.append([t for s in ctx for t in ("<S>", *s)])
        else:
            seqs.append([t for s in reversed(ctx) for t in ("</S>", *reversed(s))])
    ids = batch_to_ids(seqs)
    valid = (ids > 0).any(dim=2)
    c0, h0 = model.zero_state(len(seqs))
    _, c, h = model.run_direction(d, model.char_cnn(ids) * valid.unsqueeze(2), valid, c0[d], h0[d])
    return c, h


@torch.no_grad()
def part_b(work: Path, n_sentences: int, seed: int = 0) -> dict:
    model = load_bilm(work / "options.json", work / "weights.hdf5").eval()
    ck = torch.load(work / "softmax.pt", weights_only=True)
    targets = ck["targets"]
    tid = {w: i for i, w in enumerate(targets)}
    P = model.proj_dim
    softmax = nn.Linear(P, len(targets))
    softmax.load_state_dict(ck["softmax"])
    # held-out sentences with 3 real neighbours on both sides inside their article
    items = []
    for art in _articles(WIKI / "test.txt"):
        for i in range(3, len(art) - 3):
            if 3 <= len(art[i]) <= 60:
                items.append((art[i], art[i - 3:i], art[i + 1:i + 4]))
    items = items[:n_sentences]
    rng = random.Random(seed)
    train_sents = [s for a in _articles(WIKI / "train.txt") for s in a]
    alt_texts = [[" ".join(s) for s in rng.sample(train_sents, 8)] for _ in range(3)]
    B = 32
    batches = [items[k:k + B] for k in range(0, len(items), B)]

    def score(batch, state):
        sents = [s for s, _, _ in batch]
        ids = batch_to_ids(sents, add_boundaries=True)
        out = model(ids, state)
        top = out["layers"][-1]
        nll_first, nll_3, nll_all, vecs = [], [], [], []
        for r, s in enumerate(sents):
            n = len(s)
            fwd = F.log_softmax(softmax(top[r, :n + 1, :P]), -1)          # predicts w1..wn, </S>
            fy = torch.tensor([tid.get(w, 2) for w in s] + [1])
            f_nll = -fwd.gather(1, fy[:, None])[:, 0]
            bwd = F.log_softmax(softmax(top[r, 1:n + 2, P:]), -1)         # predicts <S>, w1..wn
            by = torch.tensor([0] + [tid.get(w, 2) for w in s])
            b_nll = -bwd.gather(1, by[:, None])[:, 0].flip(0)               # wn first
            nll_first.append(0.5 * (f_nll[0] + b_nll[0]))
            nll_3.append(0.5 * (f_nll[:3].mean() + b_nll[:3].mean()))
            nll_all.append(0.5 * (f_nll.mean() + b_nll.mean()))
            vecs.append(top[r, 1:n + 1])
        return (torch.stack(nll_first), torch.stack(nll_3), torch.stack(nll_all), vecs,
                out["state"])

    def ctx_state(batch):
        cs, hs = zip(*(_context_state(model, [x[1 + d] for x in batch], d) for d in range(2)))
        return torch.stack(cs), torch.stack(hs)

    def warm(text):
        c, h = warm_state(model, text)
        return lambda b: (c.expand(-1, -1, b, -1).contiguous(), h.expand(-1, -1, b, -1).contiguous())

    modes = {"zero": lambda b: model.zero_state(b), "warm": warm(WARMUP_TEXT)}
    for k, text in enumerate(alt_texts):
        modes[f"warm-alt{k}"] = warm(text)
    sanity = training_style_ppl(model, softmax, targets,
                                [s for a in _articles(WIKI / "test.txt") for s in a])
    results, ref_vecs = {"_training_style_ppl": sanity}, []
    for batch in batches:
        ref_vecs.append(score(batch, ctx_state(batch))[3])
    for name in ["context", *modes, "carry"]:
        f1, f3, fa, drift3, drift_all = [], [], [], [], []
        carry = model.zero_state(B)
        for bi, batch in enumerate(batches):
            if name == "context":
                state = ctx_state(batch)
            elif name == "carry":
                state = (carry[0][:, :, :len(batch)], carry[1][:, :, :len(batch)])
            else:
                state = modes[name](len(batch))
            a, b3, c, vecs, final = score(batch, state)
            if name == "carry":
                carry = (carry[0].clone(), carry[1].clone())
                carry[0][:, :, :len(batch)], carry[1][:, :, :len(batch)] = final
            f1.append(a)
            f3.append(b3)
            fa.append(c)
            for v, ref in zip(vecs, ref_vecs[bi]):
                rel = (v - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-9)
                drift3.append(rel[:3].mean())
                drift_all.append(rel.mean())
        results[name] = {
            "ppl_first": math.exp(torch.cat(f1).mean()),
            "ppl_first3": math.exp(torch.cat(f3).mean()),
            "ppl_sentence": math.exp(torch.cat(fa).mean()),
            "drift_first3": float(torch.stack(drift3).mean()),
            "drift_all": float(torch.stack(drift_all).mean()),
        }
    alts = [results.pop(f"warm-alt{k}") for k in range(len(alt_texts))]
    results["warm-alt (mean of 3)"] = {k: float(np.mean([a[k] for a in alts])) for k in alts[0]}
    results["warm-alt (spread)"] = {k: float(np.ptp([a[k] for a in alts])) for k in alts[0]}
    return results, len(items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "state_modes"))
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget (part B)")
    ap.add_argument("--sentences", type=int, default=1600, help="held-out sentences (part B)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these small models on a busy machine)")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_a:
        print("Part A: max |top-layer difference| of a sentence alone vs in 4 random batches "
              "(fixture model)")
        for mode, v in part_a().items():
            print(f"  {mode:6s} {v:.2e}", flush=True)
    if args.skip_b:
        return 0
    work = Path(args.work_dir)
    if not (work / "softmax.pt").exists():
        print(f"Part B: training a small biLM on wikitext-2 for {args.minutes} min -> {work}", flush=True)
        train(work, args.minutes)
    ck = torch.load(work / "softmax.pt", weights_only=True)
    print(f"Part B: small biLM ({ck['steps']} steps, {ck['tokens']:,} tokens per direction)")
    res, n = part_b(work, args.sentences)
    fwd, bwd = res.pop("_training_style_ppl")
    print(f"  held-out perplexity read training-style (packed, carried state): forward {fwd:.1f}, "
          f"backward {bwd:.1f} (last 200 training batches, dropout on: "
          f"{ck['train_ppl'][0]:.1f}, {ck['train_ppl'][1]:.1f})")
    print(f"  {n} held-out wikitext-2 test sentences; perplexity (mean of fwd/bwd cross-entropy) "
          f"and top-layer drift from the real-context vectors")
    print(f"  {'state':22s} {'ppl w1':>8s} {'ppl w1-3':>9s} {'ppl sent':>9s} "
          f"{'drift 1-3':>10s} {'drift all':>10s}")
    for name, r in res.items():
        print(f"  {name:22s} {r['ppl_first']:8.1f} {r['ppl_first3']:9.1f} {r['ppl_sentence']:9.1f} "
              f"{r['drift_first3']:10.3f} {r['drift_all']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
