"""ELMo at work: downstream scores of one model, as a Markdown table.

    .venv/bin/python benchmarks/downstream.py [--model runs/wikitext2/model] [--data ../shared/data]
        [--max-train N] [--max-test N] [--ner-max-train N] [--ner-epochs E] [--tasks ...]
        [--elmo-only]

The model dir is the one benchmarks/train_wikitext2.py exports (options.json + weights.hdf5).

Classification (`elmo classify`'s recipe, torch_elmo.tasks): each sentence's tokens are embedded
once (zero LSTM state per batch, so features do not depend on batching), then three feature sets
are compared with the same logistic regression (StandardScaler for the dense ones, C chosen on dev
by macro-F1 from 0.01..100, refitted on train):
  tfidf   lowercased unigram + bigram TF-IDF (no model)
  layer0  mean over tokens of the context-free char-CNN vector (P dims)
  elmo    mean over tokens of the average of the 3 ELMo layers (2P dims)
Tasks and splits (../shared/data):
  emotion   dair-ai emotion, 6 classes, train 16,000 / dev val 2,000 / test 2,000
  sst2      SST-2 sentence level (sst2-sentence), train 6,920 / dev 872 / test 1,821
  trec      TREC coarse (6 classes), train 5,452 / test 500; no official dev, so a fixed random
            10% of train is held out for choosing C and the rest (4,907) is train
NER (CoNLL-2003, eng.train / eng.testa for early stopping / eng.testb): the tagger of `elmo ner`
(words + casing [+ ELMo scalar mix] -> BiLSTM -> CRF), with and without ELMo; entity F1 (seqeval).

--max-train subsamples each classification train split (random, seed 0); --max-test the tests;
--ner-max-train the CoNLL train sentences. Full data is the default. Every row prints its times so
the budget is visible; the run's wall time and its settings are printed under the table.

Budget (2-core CPU; estimates scaled from subsample runs, to be replaced by the measured wall time
the script prints): the classification part embeds about 1.1M tokens once per model and fits 9
logistic regressions with a 5-value C grid (a few minutes; TF-IDF on emotion is the slowest fit);
the NER part costs about 7 s per 1,000 training sentences per epoch without ELMo (a little more
with it), i.e. roughly 1.5 min per full epoch, up to --ner-epochs 10 for each of the 2 taggers.
`--ner-max-train 5000 --ner-epochs 6` keeps the whole run near 15 minutes. Run it with
OMP_WAIT_POLICY=PASSIVE when anything else uses the CPU (spinning OpenMP threads collapse).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torch_elmo import ElmoEmbedder, ElmoError, tasks  # noqa: E402
from torch_elmo.hub import resolve_model  # noqa: E402

CLASSIFICATION = {
    "emotion": ("emotion-dair-ai/train.txt", "emotion-dair-ai/val.txt", "emotion-dair-ai/test.txt",
                "emotion"),
    "sst2": ("sst/sst2-sentence/train.tsv", "sst/sst2-sentence/dev.tsv",
             "sst/sst2-sentence/test.tsv", "tsv"),
    "trec": ("trec/train_5500.label", None, "trec/TREC_10.label", "trec"),
}
# (column, features, classifier): each baseline beside the same model + ELMo
RUNS = (("tfidf", "tfidf", "logreg"), ("tfidf+elmo", "tfidf+elmo", "logreg"),
        ("layer0", "layer0", "logreg"), ("elmo", "elmo", "logreg"),
        ("bilstm", "words", "bilstm"), ("bilstm+elmo", "elmo", "bilstm"))
FEATURES = tuple(label for label, _, _ in RUNS)


def _split_dev(train, frac=0.1, seed=0):
    rng = np.random.RandomState(seed)
    idx = rng.permutation(len(train))
    n_dev = int(round(frac * len(train)))
    dev_idx = set(idx[:n_dev].tolist())
    return ([e for i, e in enumerate(train) if i not in dev_idx],
            [e for i, e in enumerate(train) if i in dev_idx])


def run_classification_task(name, data, embedder, args, log):
    tr, dv, te, fmt = CLASSIFICATION[name]
    train = tasks.read_examples(data / tr, fmt)
    test = tasks.read_examples(data / te, fmt)
    if dv is None:
        train, dev = _split_dev(train)
    else:
        dev = tasks.read_examples(data / dv, fmt)
    train = tasks.subsample(train, args.max_train, args.seed)
    dev = tasks.subsample(dev, args.max_test, args.seed)
    test = tasks.subsample(test, args.max_test, args.seed)
    cache: dict = {}
    rows = {}
    for label, feat, classifier in RUNS:
        if feat not in ("tfidf", "words") and embedder is None:
            continue
        if feat in ("tfidf", "words") and args.elmo_only:
            continue
        t0 = time.time()
        r = tasks.run_classification(train, test, dev, feat, classifier, embedder,
                                     batch_size=args.batch_size, seed=args.seed,
                                     feature_cache=cache,
                                     bilstm={"epochs": args.bilstm_epochs, "log": None})
        r["seconds"] = time.time() - t0
        rows[label] = r
        reg = f"C={r['reg']:g}" if r.get("reg") is not None else f"epoch {r.get('best_epoch')}"
        log(f"  {name:8s} {label:11s} acc {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
            f"{reg}  {r['seconds']:.1f} s")
    return {"n_train": len(train), "n_dev": len(dev), "n_test": len(test),
            "n_classes": len(set(e.label for e in train)),
            "results": {k: {x: v.get(x) for x in ("accuracy", "macro_f1", "reg", "dim", "seconds",
                                                  "features_seconds", "per_class_f1")}
                        for k, v in rows.items()}}


def run_ner(data, embedder, args, log):
    d = data / "conll2003"
    train = tasks.subsample(tasks.read_conll(d / "eng.train"), args.ner_max_train, args.seed)
    dev = tasks.subsample(tasks.read_conll(d / "eng.testa"), args.ner_max_eval, args.seed)
    test = tasks.subsample(tasks.read_conll(d / "eng.testb"), args.ner_max_eval, args.seed)
    out = {"n_train": len(train), "n_dev": len(dev), "n_test": len(test), "results": {}}
    variants = ([] if args.elmo_only else [("no-elmo", None)]) \
        + ([("elmo", embedder)] if embedder is not None else [])
    for name, emb in variants:
        t0 = time.time()
        res = tasks.train_tagger(train, dev, test, emb, epochs=args.ner_epochs,
                                 patience=args.ner_patience, seed=args.seed,
                                 log=lambda m: log(f"    [{name}] {m}"))
        out["results"][name] = {"test_f1": res.test["f1"], "precision": res.test["precision"],
                                "recall": res.test["recall"], "dev_f1": res.dev_f1,
                                "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                                "seconds_per_epoch": float(np.mean(res.epoch_seconds)),
                                "embed_seconds": res.embed_seconds,
                                "seconds": time.time() - t0}
        log(f"  conll2003 {name:7s} test F1 {res.test['f1']:.4f}  dev F1 {res.dev_f1:.4f}  "
            f"{np.mean(res.epoch_seconds):.1f} s/epoch")
    return out


def markdown(results, model, settings) -> str:
    lines = []
    cls = {k: v for k, v in results.items() if k != "conll2003"}
    if cls:
        lines += ["| task | train / dev / test | classes | "
                  + " | ".join(f"{f} acc / macro-F1" for f in FEATURES) + " |",
                  "|---|---|---:|" + "---|" * len(FEATURES)]
        for name, r in cls.items():
            cells = []
            for f in FEATURES:
                x = r["results"].get(f)
                cells.append(f"{x['accuracy']:.3f} / {x['macro_f1']:.3f}" if x else "-")
            lines.append(f"| {name} | {r['n_train']:,} / {r['n_dev']:,} / {r['n_test']:,} | "
                         f"{r['n_classes']} | " + " | ".join(cells) + " |")
    if "conll2003" in results:
        r = results["conll2003"]
        if lines:
            lines.append("")
        lines += ["| CoNLL-2003 NER (BiLSTM-CRF) | train / dev / test sentences | test entity F1 | "
                  "dev F1 | epochs (best) | s / epoch |", "|---|---|---:|---:|---|---:|"]
        for name, x in r["results"].items():
            label = "words + casing" if name == "no-elmo" else "words + casing + ELMo (scalar mix)"
            lines.append(f"| {label} | {r['n_train']:,} / {r['n_dev']:,} / {r['n_test']:,} | "
                         f"{x['test_f1']:.4f} | {x['dev_f1']:.4f} | {x['epochs_run']} "
                         f"({x['best_epoch']}) | {x['seconds_per_epoch']:.1f} |")
    lines += ["", f"model: `{model}`; settings: {settings}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "runs" / "wikitext2" / "model"),
                    help="model dir with options.json + weights.hdf5 (or lm_weights.hdf5)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--tasks", default="emotion,sst2,trec,conll2003",
                    help="comma-separated subset of emotion, sst2, trec, conll2003")
    ap.add_argument("--max-train", type=int, default=None, help="classification train subsample")
    ap.add_argument("--max-test", type=int, default=None, help="classification dev/test subsample")
    ap.add_argument("--ner-max-train", type=int, default=None, help="CoNLL train sentences")
    ap.add_argument("--ner-max-eval", type=int, default=None,
                    help="CoNLL dev/test sentences (quick checks only; the table is then not "
                         "comparable to published numbers)")
    ap.add_argument("--ner-epochs", type=int, default=10)
    ap.add_argument("--ner-patience", type=int, default=3)
    ap.add_argument("--bilstm-epochs", type=int, default=10, help="BiLSTM classifier epochs")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per biLM batch")
    ap.add_argument("--device", default="cpu", help="device for the biLM (embedding only)")
    ap.add_argument("--no-elmo", action="store_true", help="baselines only (no model needed)")
    ap.add_argument("--elmo-only", action="store_true",
                    help="skip the rows that need no model (tfidf, bilstm, NER without ELMo): "
                         "for a second model beside a run that has them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in list(CLASSIFICATION) + ["conll2003"]]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}")
    data = Path(args.data)
    if not data.is_dir():
        ap.error(f"{data}: no such data directory (../shared/data)")

    def log(msg):
        print(msg, flush=True)

    t_start = time.time()
    embedder = None
    if not args.no_elmo:
        try:
            embedder = ElmoEmbedder(*resolve_model(args.model), device=args.device)
        except ElmoError as e:
            ap.error(str(e) + " (train one with benchmarks/train_wikitext2.py, or pass --model)")
        o = embedder.model.options
        log(f"model {args.model}: LSTM {o.lstm.dim}/{o.lstm.projection_dim} x{o.lstm.n_layers}, "
            f"ELMo dim {embedder.output_dim}")
    results = {}
    for name in wanted:
        log(f"{name} ...")
        if name == "conll2003":
            results[name] = run_ner(data, embedder, args, log)
        else:
            results[name] = run_classification_task(name, data, embedder, args, log)
    wall = time.time() - t_start
    import torch
    settings = (f"max-train {args.max_train or 'all'}, max-test {args.max_test or 'all'}, "
                f"ner-max-train {args.ner_max_train or 'all'}, ner-epochs {args.ner_epochs} "
                f"(patience {args.ner_patience}), seed {args.seed}; wall {wall / 60:.1f} min on "
                f"{os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
                f"biLM on {args.device}")
    print()
    print(markdown(results, args.model, settings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "settings": vars(args), "wall_seconds": wall,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
