"""Domain adaptation, as the paper recommends: fine-tune a general biLM on the task's own unlabeled
text for a few minutes, then measure what it did.

    .venv/bin/python benchmarks/domain_adapt.py --general runs/recipes/fast --task emotion --minutes 4

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
  4. the task's classification with each model (`elmo classify`'s logistic regression on the
     pooled ELMo vector, and on TF-IDF + that vector): test accuracy and macro-F1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from downstream import CLASSIFICATION  # noqa: E402  (train, dev, test, format) of each task

TASKS = {k: v for k, v in CLASSIFICATION.items() if v[1] is not None}   # the ones with a dev split


def perplexity_on(run: Path, text: Path, vocab) -> float:
    import torch
    from torch_elmo.checkpoint import load_language_model
    from torch_elmo.data import LMBatchStream
    from torch_elmo.evaluate import perplexity
    torch.set_num_threads(2)
    lm, _ = load_language_model(str(run))
    return perplexity(lm, LMBatchStream(str(text), vocab, 64, 1, shuffle=False, loop=False))["average"]


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
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "domain_adapt"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from torch_elmo import tasks
    from torch_elmo.checkpoint import export_run
    from torch_elmo.vocab import Vocabulary
    general, data, work = Path(args.general), Path(args.data), Path(args.work_dir)
    vocab_file = Path(args.vocab) if args.vocab else general.parent / "vocab.txt"
    vocab = Vocabulary.read(vocab_file)
    work.mkdir(parents=True, exist_ok=True)
    tr, dv, te, fmt = TASKS[args.task]
    train, dev, test = (tasks.read_examples(data / f, fmt) for f in (tr, dv, te))
    corpus, heldout = work / f"{args.task}.train.txt", work / f"{args.task}.dev.txt"
    corpus.write_text("".join(" ".join(e.tokens) + "\n" for e in train))
    heldout.write_text("".join(" ".join(e.tokens) + "\n" for e in dev))
    print(f"{args.task}: {len(train):,} training sentences ({sum(len(e.tokens) for e in train):,} "
          f"tokens) as the unlabeled corpus, {len(dev):,} dev sentences held out", flush=True)

    adapted = work / "adapted"
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
    for name, run in (("general", general), ("adapted", adapted)):
        t0 = time.time()
        model_dir = work / f"{name}-model"
        export_run(run, model_dir)
        r = {"task_dev_ppl": perplexity_on(run, heldout, vocab),
             "wikitext2_valid_ppl": perplexity_on(run, wiki, vocab)}
        r["classification"] = classify(model_dir, train, dev, test)
        r["seconds"] = time.time() - t0
        results["models"][name] = r
        scores = "; ".join(f"{f} acc {c['accuracy']:.4f} macro-F1 {c['macro_f1']:.4f}"
                           for f, c in r["classification"].items())
        print(f"{name:8s} {args.task} dev ppl {r['task_dev_ppl']:.1f} | WikiText-2 valid ppl "
              f"{r['wikitext2_valid_ppl']:.1f} | {args.task} test: {scores} | "
              f"{r['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
