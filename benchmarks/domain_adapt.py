"""Domain adaptation, as the paper recommends: fine-tune a general biLM on the task's own unlabeled
text for a few minutes, then measure what it did.

    .venv/bin/python benchmarks/domain_adapt.py --general runs/recipes/fast --task emotion --minutes 4
    .venv/bin/python benchmarks/domain_adapt.py --general runs/recipes/fast --task conll2003 \
        --max-tokens 400000 --task-models adapted --ner-epochs 10

`--general` is a training run directory (its checkpoint.pt and the vocabulary it was trained
with, `--vocab`, default: vocab.txt in the run's parent, as benchmarks/recipes.py leaves it).
Steps, all printed with their times:
  1. the task's training sentences (labels dropped) become the unlabeled corpus; its dev
     sentences are the held-out text (never trained on);
  2. `elmo train --init-from GENERAL --preset wt2 --recipe fast --max-time MINUTES*60` (or
     `--max-tokens N`) on that
     corpus with the general model's vocabulary (so the softmax is kept and the perplexities
     compare: words outside it are <UNK> for both models), learning rate --lr;
  3. held-out perplexity (full softmax, bilm-tf run_test) of the general and the adapted model on
     the dev sentences, and on WikiText-2's valid.txt (what the adaptation costs in general text);
     and how much of the dev cross-entropy is words outside the vocabulary (<UNK> targets): a
     model trained on WikiText-2 never saw an <UNK> target (its rare words are the literal word
     `<unk>`, a vocabulary entry of its own), so each one costs it ~20 nats;
  4. the task with each model of --task-models: for a classification task `elmo classify`'s
     logistic regression on the pooled ELMo vector, and on TF-IDF + that vector (test accuracy
     and macro-F1); for conll2003 the NER tagger with ELMo (`elmo ner`, test entity F1), whose
     baseline without ELMo is downstream.py's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from downstream import CLASSIFICATION  # noqa: E402  (train, dev, test, format) of each task

TASKS = {k: v for k, v in CLASSIFICATION.items() if v[1] is not None}   # the ones with a dev split
TASKS["conll2003"] = ("conll2003/eng.train", "conll2003/eng.testa", "conll2003/eng.testb", "conll")


def read_task(data: Path, task: str):
    """(train, dev, test) examples of the task; each has .tokens."""
    from torch_elmo import tasks
    tr, dv, te, fmt = TASKS[task]
    read = tasks.read_conll if fmt == "conll" else (lambda f: tasks.read_examples(f, fmt))
    return tuple(read(data / f) for f in (tr, dv, te))


def perplexity_on(run: Path, text: Path, vocab) -> float:
    import torch
    from torch_elmo.checkpoint import load_language_model
    from torch_elmo.data import LMBatchStream
    from torch_elmo.evaluate import perplexity
    torch.set_num_threads(2)
    lm, _ = load_language_model(str(run))
    return perplexity(lm, LMBatchStream(str(text), vocab, 64, 1, shuffle=False, loop=False))["average"]


def unk_split(run: Path, text: Path, vocab) -> dict:
    """Where the held-out cross-entropy goes: the share of targets that are <UNK> (words outside
    the vocabulary), their mean cross-entropy (nats), and the perplexity of the other targets
    (token-weighted, both directions, full softmax)."""
    import torch
    from torch_elmo.checkpoint import load_language_model
    from torch_elmo.data import LMBatchStream
    from torch_elmo.lm import full_softmax_ce
    lm, _ = load_language_model(str(run))
    lm.eval()
    unk = vocab.unk
    sums = {"unk": [0.0, 0], "known": [0.0, 0]}
    state = None
    with torch.no_grad():
        for batch in LMBatchStream(str(text), vocab, 64, 20, shuffle=False, loop=False):
            if state is None:
                state = lm.zero_state(batch["fwd_chars"].shape[0])
            tops, state = lm.top_outputs(batch, state)
            for top, key in zip(tops, ("fwd_targets", "bwd_targets")):
                y = batch[key].reshape(-1)                                   # (B * T,)
                ce = full_softmax_ce(top.reshape(-1, top.shape[-1]), y, lm.softmax_W,
                                     lm.softmax_b)                           # (B * T,)
                for name, m in (("unk", y == unk), ("known", y != unk)):
                    sums[name][0] += float(ce[m].sum())
                    sums[name][1] += int(m.sum())
    (u, nu), (k, nk) = sums["unk"], sums["known"]
    return {"unk_share": nu / max(nu + nk, 1), "unk_mean_ce": u / max(nu, 1),
            "known_ppl": math.exp(k / max(nk, 1))}


def tag(model_dir: Path, train, dev, test, epochs: int) -> dict:
    """The CoNLL-2003 BiLSTM-CRF with the model's ELMo (downstream.py's settings)."""
    from torch_elmo import ElmoEmbedder, tasks
    from torch_elmo.hub import resolve_model
    embedder = ElmoEmbedder(*resolve_model(str(model_dir)))
    res = tasks.train_tagger(train, dev, test, embedder, epochs=epochs, patience=3, seed=0,
                             log=lambda m: print(f"    {m}", flush=True))
    return {"ner+elmo": {"test_f1": res.test["f1"], "dev_f1": res.dev_f1,
                         "best_epoch": res.best_epoch}}


def classify(model_dir: Path, train, dev, test) -> dict:
    """Logistic regression on the pooled ELMo vector, and on TF-IDF + that vector."""
    from torch_elmo import ElmoEmbedder, tasks
    from torch_elmo.hub import resolve_model
    embedder = ElmoEmbedder(*resolve_model(str(model_dir)))     # as benchmarks/downstream.py
    out, cache = {}, {}
    for features in ("elmo", "tfidf+elmo"):
        r = tasks.run_classification(train, test, dev, features, "logreg", embedder,
                                     batch_size=64, seed=0, feature_cache=cache)
        out[features] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "C": r.get("reg")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--general", required=True, help="run directory of the general model")
    p.add_argument("--vocab", default=None, help="its vocabulary (default: RUN/../vocab.txt)")
    p.add_argument("--task", choices=sorted(TASKS), default="emotion")
    p.add_argument("--minutes", type=float, default=4.0, help="fine-tuning time")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="fine-tune for this many tokens instead (not affected by a busy machine)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the fine-tuning")
    p.add_argument("--task-models", default="general,adapted",
                   help="the models whose task scores are measured (perplexities: always both)")
    p.add_argument("--ner-epochs", type=int, default=10)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "domain_adapt"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from torch_elmo.checkpoint import export_run
    from torch_elmo.vocab import Vocabulary
    general, data, work = Path(args.general), Path(args.data), Path(args.work_dir)
    vocab_file = Path(args.vocab) if args.vocab else general.parent / "vocab.txt"
    vocab = Vocabulary.read(vocab_file)
    work.mkdir(parents=True, exist_ok=True)
    train, dev, test = read_task(data, args.task)
    corpus, heldout = work / f"{args.task}.train.txt", work / f"{args.task}.dev.txt"
    corpus.write_text("".join(" ".join(e.tokens) + "\n" for e in train))
    heldout.write_text("".join(" ".join(e.tokens) + "\n" for e in dev))
    print(f"{args.task}: {len(train):,} training sentences ({sum(len(e.tokens) for e in train):,} "
          f"tokens) as the unlabeled corpus, {len(dev):,} dev sentences held out", flush=True)

    adapted = work / f"{args.task}-adapted"
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch_elmo", "train", "--train", str(corpus), "--vocab",
           str(vocab_file), "--save-dir", str(adapted), "--init-from", str(general), "--preset",
           "wt2", "--recipe", "fast", "--learning-rate", str(args.lr), "--epochs", "100",
           "--log-every", "200", "--no-progress"]
    cmd += (["--max-tokens", str(args.max_tokens)] if args.max_tokens
            else ["--max-time", str(args.minutes * 60)])
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    if (adapted / "checkpoint.pt").exists():
        cmd.append("--resume")
    subprocess.run(cmd, check=True, env=env)
    print(f"fine-tuned for {time.time() - t0:.0f} s", flush=True)
    wiki = data / "wikitext-2" / "valid.txt"
    results = {"task": args.task, "minutes": args.minutes, "max_tokens": args.max_tokens,
               "lr": args.lr, "fine_tune_seconds": time.time() - t0, "models": {}}
    task_models = [m.strip() for m in args.task_models.split(",") if m.strip()]
    for name, run in (("general", general), ("adapted", adapted)):
        t0 = time.time()
        model_dir = work / ("general-model" if name == "general" else f"{args.task}-adapted-model")
        export_run(run, model_dir)
        r = {"task_dev_ppl": perplexity_on(run, heldout, vocab),
             "wikitext2_valid_ppl": perplexity_on(run, wiki, vocab),
             "task_dev_split": unk_split(run, heldout, vocab)}
        r["task_scores"] = {}
        if name in task_models:
            r["task_scores"] = (tag(model_dir, train, dev, test, args.ner_epochs)
                                if args.task == "conll2003" else classify(model_dir, train, dev, test))
        r["seconds"] = time.time() - t0
        results["models"][name] = r
        scores = "; ".join(f"{f} " + " ".join(f"{k} {v:.4f}" for k, v in c.items()
                                              if k not in ("C", "best_epoch"))
                           for f, c in r["task_scores"].items()) or "(not measured)"
        u = r["task_dev_split"]
        print(f"{name:8s} {args.task} dev ppl {r['task_dev_ppl']:.1f} ({u['unk_share']:.1%} of the "
              f"targets are <UNK>, {u['unk_mean_ce']:.1f} nats each; the others: ppl "
              f"{u['known_ppl']:.1f}) | WikiText-2 valid ppl "
              f"{r['wikitext2_valid_ppl']:.1f} | {args.task} test: {scores} | "
              f"{r['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
