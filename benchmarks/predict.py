"""Prediction with saved task models against the training script's own scoring: texts/s of
`elmo predict` (a subprocess, the way a user runs it) and of `load_task(DIR).predict` (the same
code path in-process) for the CoNLL-2003 NER tagger on eng.testb and the SST-2 BiLSTM classifier
on its test file, against the ceiling: the same model's forward as `elmo ner` / `elmo classify`
score their test file (the ELMo layers as train_tagger / train_bilstm_classifier cache them, then
ner.predict_tags / bilstm.predict_labels). Target: prediction >= 90% of the ceiling.

    .venv/bin/python benchmarks/predict.py [--preset wt2] [--max-train 500] [--max-test N]
                                           [--rounds 2] [--tasks ner,sst] [--batch-size N]

Only speed matters, so the biLM is a random-weight model of --preset, and each task model is
trained for 1 epoch on --max-train sentences (`elmo ner --save`, `elmo classify --classifier
bilstm --save`, subprocesses). Every timing is the fastest of --rounds, ceiling and prediction
alternated. `elmo predict`'s time is its whole command (process start, imports, model load, the
warm state, reading and writing files); its start-up is measured on a one-line input and the
ratio is also given without it (a fixed cost that large inputs amortise). Both sides use
the same threads (torch's default) and OMP_WAIT_POLICY=PASSIVE. Ratios are given by wall clock
and by CPU seconds (user + system of every thread, getrusage; for `elmo predict` the child's):
on a machine shared with other work the CPU ratio moves much less than the wall one.
~2.5-4 min on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def cpu_seconds() -> float:
    """CPU seconds (user + system, every thread) of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(f) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of f()."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    f()
    return time.perf_counter() - t0, cpu_seconds() - c0


def run(cmd: list[str]) -> None:
    """Run a command; its ElmoError line or traceback shown if it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def elmo(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch_elmo", *args]


def ner_ceiling(task, tokens: list[list[str]]) -> None:
    """`elmo ner`'s scoring of these sentences with the loaded tagger's network:
    cache_elmo_layers' embed_layers (batch 64, float16) + encode + predict_tags (batch 128)."""
    import numpy as np

    from torch_elmo.tasks import ner
    from torch_elmo.tasks.common import casing, embed_layers
    elmo = embed_layers(task.embedder, tokens, 64, dtype=np.float16)
    words = [task.vocab.ids(s) for s in tokens]
    data = (words, [[casing(w) for w in s] for s in tokens], [[0] * len(s) for s in tokens])
    ner.predict_tags(task.model, data, elmo, task.labels, task.device)


def bilstm_ceiling(task, tokens: list[list[str]]) -> None:
    """`elmo classify --classifier bilstm`'s scoring of these sentences with the loaded
    classifier's network: embed_layers (batch 64, float16) + predict_labels (batch 128)."""
    import numpy as np

    from torch_elmo.tasks import bilstm
    from torch_elmo.tasks.common import casing, embed_layers
    model, vocab = task.bilstm
    elmo = embed_layers(task.embedder, tokens, 64, dtype=np.float16)
    words = [vocab.ids(s) for s in tokens]
    cases = [[casing(w) for w in s] for s in tokens]
    bilstm.predict_labels(model, words, cases, elmo, list(task.classes_), task.device)


def measure(name: str, task_dir: Path, tokens: list[list[str]], input_file: Path, ceiling,
            rounds: int, work: Path, batch_size: Optional[int]) -> dict:
    """The four timings of one task, each the fastest of `rounds`."""
    from torch_elmo import load_task
    task = load_task(task_dir)
    texts = [" ".join(s) for s in tokens]
    one_line = work / f"{name}.one.txt"
    one_line.write_text(texts[0] + "\n", encoding="utf-8")
    cmd = elmo("predict", "--model", str(task_dir), "--output", str(work / f"{name}.out.jsonl"))
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    # one-time costs (the warm state, the first import of seqeval's entity reader) left out
    task.predict(texts[:1])
    ceiling(task, tokens[:1])
    runs = {"ceiling": lambda: ceiling(task, tokens), "predict": lambda: task.predict(texts, **kw),
            "cli": lambda: run(cmd + ["--input", str(input_file)]),
            "startup": lambda: run(cmd + ["--input", str(one_line)])}
    times: dict = {k: [] for k in runs}
    for _ in range(rounds):                   # alternated, so that drift hits every side alike
        for k, f in runs.items():
            times[k].append(timed(f))
    return {k: tuple(min(x[j] for x in v) for j in (0, 1)) for k, v in times.items()}


def report(name: str, n: int, t: dict) -> None:
    """texts/s and the ratio to the ceiling, by wall clock and by CPU seconds."""
    steady = tuple(a - b for a, b in zip(t["cli"], t["startup"]))
    print(f"{name}: {n} texts; ceiling (training's scoring) {n / t['ceiling'][0]:,.0f} texts/s "
          f"({t['ceiling'][0]:.1f} s wall, {t['ceiling'][1]:.1f} s CPU)")
    print(f"  {'':36s} {'texts/s':>8s} {'of ceiling (wall)':>18s} {'(CPU)':>7s}")
    for label, x in (("load_task().predict, in-process", t["predict"]),
                     ("elmo predict, whole command", t["cli"]),
                     ("elmo predict, start-up excluded", steady)):
        print(f"  {label:36s} {n / x[0]:8,.0f} {t['ceiling'][0] / x[0]:18.1%} "
              f"{t['ceiling'][1] / x[1]:7.1%}")
    print(f"  (elmo predict's start-up, on one line: {t['startup'][0]:.1f} s wall, "
          f"{t['startup'][1]:.1f} s CPU)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wt2", help="the random biLM's size (config.PRESETS)")
    p.add_argument("--max-train", type=int, default=500, help="training sentences per task")
    p.add_argument("--max-test", type=int, default=None,
                   help="the first N test sentences only (default: the whole test file)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tasks", default="ner,sst", help="ner, sst or both")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prediction's batch size (default: predict's and elmo predict's own)")
    args = p.parse_args(argv)
    import torch

    from torch_elmo import BiLM, export_model, preset
    from torch_elmo.tasks import classify, ner
    conll, sst = DATA / "conll2003", DATA / "sst" / "sst2-sentence"
    print(f"preset {args.preset}, random weights; task models: 1 epoch on {args.max_train} "
          f"sentences; {torch.get_num_threads()} torch threads; fastest of {args.rounds}; "
          f"prediction batch size {args.batch_size or 'default'}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        torch.manual_seed(0)
        export_model(BiLM(preset(args.preset)).eval(), work / "elmo")
        tasks = args.tasks.split(",")
        if "ner" in tasks:
            run(elmo("ner", "--model", str(work / "elmo"), "--train", str(conll / "eng.train"),
                     "--dev", str(conll / "eng.testa"), "--test", str(conll / "eng.testb"),
                     "--max-train", str(args.max_train), "--max-eval", "100", "--epochs", "1",
                     "--save", str(work / "ner")))
            test = ner.read_conll(conll / "eng.testb")[:args.max_test]
            tokens = [s.tokens for s in test]
            conll_in = conll / "eng.testb"           # elmo predict reads the CoNLL file itself
            if args.max_test is not None:
                conll_in = work / "testb.conll"
                ner.write_conll(test, conll_in)
            report("NER tagger, CoNLL-2003 eng.testb", len(tokens),
                   measure("ner", work / "ner", tokens, conll_in, ner_ceiling, args.rounds, work,
                           args.batch_size))
        if "sst" in tasks:
            run(elmo("classify", "--classifier", "bilstm", "--model", str(work / "elmo"),
                     "--train", str(sst / "train.tsv"), "--test", str(sst / "dev.tsv"),
                     "--max-train", str(args.max_train), "--epochs", "1",
                     "--save", str(work / "sst")))
            tokens = [e.tokens for e in classify.read_examples(sst / "test.tsv")][:args.max_test]
            text = work / "sst.txt"
            text.write_text("".join(" ".join(s) + "\n" for s in tokens), encoding="utf-8")
            report("BiLSTM classifier, SST-2 test", len(tokens),
                   measure("sst", work / "sst", tokens, text, bilstm_ceiling, args.rounds, work,
                           args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
