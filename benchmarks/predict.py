"""Prediction with saved task models against the training script's own scoring: texts/s of
`elmo predict` (a subprocess, the way a user runs it) and of `load_task(DIR).predict` (the same
code path in-process) for the CoNLL-2003 NER tagger on eng.testb and the SST-2 BiLSTM classifier
on its test file, against the ceiling: the same model's forward as `elmo ner` / `elmo classify`
score their test file (the ELMo layers as train_tagger / train_bilstm_classifier cache them, then
ner.predict_tags / bilstm.predict_labels). Target: prediction >= 90% of the ceiling.

    .venv/bin/python benchmarks/predict.py [--preset wt2] [--max-train 500] [--max-test N]
                                           [--rounds 2] [--tasks ner,sst]

Only speed matters, so the biLM is a random-weight model of --preset, and each task model is
trained for 1 epoch on --max-train sentences (`elmo ner --save`, `elmo classify --classifier
bilstm --save`, subprocesses). Every timing is the fastest of --rounds, ceiling and prediction
alternated. `elmo predict`'s time is its whole command (process start, imports, model load, the
warm state, reading and writing files); its start-up is measured on a one-line input and the
ratio is also given without it (a fixed cost that large inputs amortise). Both sides use
the same threads (torch's default) and OMP_WAIT_POLICY=PASSIVE. ~2-4 min on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def run(cmd: list[str]) -> float:
    """Wall seconds of a command (ElmoError lines and tracebacks shown if it fails)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def elmo(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch_elmo", *args]


def ner_ceiling(task, tokens: list[list[str]]) -> float:
    """Seconds of `elmo ner`'s scoring of these sentences with the loaded tagger's network:
    cache_elmo_layers' embed_layers (batch 64, float16) + encode + predict_tags (batch 128)."""
    import numpy as np

    from torch_elmo.tasks import ner
    from torch_elmo.tasks.common import casing, embed_layers
    t0 = time.perf_counter()
    elmo = embed_layers(task.embedder, tokens, 64, dtype=np.float16)
    words = [task.vocab.ids(s) for s in tokens]
    data = (words, [[casing(w) for w in s] for s in tokens], [[0] * len(s) for s in tokens])
    ner.predict_tags(task.model, data, elmo, task.labels, task.device)
    return time.perf_counter() - t0


def bilstm_ceiling(task, tokens: list[list[str]]) -> float:
    """Seconds of `elmo classify --classifier bilstm`'s scoring of these sentences with the
    loaded classifier's network: embed_layers (batch 64, float16) + predict_labels (batch 128)."""
    import numpy as np

    from torch_elmo.tasks import bilstm
    from torch_elmo.tasks.common import casing, embed_layers
    model, vocab = task.bilstm
    t0 = time.perf_counter()
    elmo = embed_layers(task.embedder, tokens, 64, dtype=np.float16)
    words = [vocab.ids(s) for s in tokens]
    cases = [[casing(w) for w in s] for s in tokens]
    bilstm.predict_labels(model, words, cases, elmo, list(task.classes_), task.device)
    return time.perf_counter() - t0


def measure(name: str, task_dir: Path, tokens: list[list[str]], input_file: Path, ceiling,
            rounds: int, work: Path) -> dict:
    """The four timings of one task, each the fastest of `rounds`."""
    from torch_elmo import load_task
    task = load_task(task_dir)
    texts = [" ".join(s) for s in tokens]
    one_line = work / f"{name}.one.txt"
    one_line.write_text(texts[0] + "\n", encoding="utf-8")
    cmd = elmo("predict", "--model", str(task_dir), "--output", str(work / f"{name}.out.jsonl"))
    best = {"ceiling": [], "predict": [], "cli": [], "startup": []}
    for _ in range(rounds):
        best["ceiling"].append(ceiling(task, tokens))
        t0 = time.perf_counter()
        task.predict(texts)
        best["predict"].append(time.perf_counter() - t0)
        best["cli"].append(run(cmd + ["--input", str(input_file)]))
        best["startup"].append(run(cmd + ["--input", str(one_line)]))
    return {k: min(v) for k, v in best.items()}


def report(name: str, n: int, t: dict) -> None:
    ceil = n / t["ceiling"]
    steady = t["cli"] - t["startup"]
    print(f"{name}: {n} texts; ceiling (training's scoring) {ceil:,.0f} texts/s "
          f"({t['ceiling']:.1f} s)")
    print(f"  load_task().predict, in-process   {n / t['predict']:,.0f} texts/s  "
          f"{t['ceiling'] / t['predict']:6.1%} of the ceiling")
    print(f"  elmo predict, whole command       {n / t['cli']:,.0f} texts/s  "
          f"{t['ceiling'] / t['cli']:6.1%}  ({t['cli']:.1f} s)")
    print(f"  elmo predict, start-up excluded   {n / steady:,.0f} texts/s  "
          f"{t['ceiling'] / steady:6.1%}  (start-up {t['startup']:.1f} s on one line)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wt2", help="the random biLM's size (config.PRESETS)")
    p.add_argument("--max-train", type=int, default=500, help="training sentences per task")
    p.add_argument("--max-test", type=int, default=None,
                   help="the first N test sentences only (default: the whole test file)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tasks", default="ner,sst", help="ner, sst or both")
    args = p.parse_args(argv)
    import torch

    from torch_elmo import BiLM, export_model, preset
    from torch_elmo.tasks import classify, ner
    conll, sst = DATA / "conll2003", DATA / "sst" / "sst2-sentence"
    print(f"preset {args.preset}, random weights; task models: 1 epoch on {args.max_train} "
          f"sentences; {torch.get_num_threads()} torch threads; fastest of {args.rounds}")
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
                   measure("ner", work / "ner", tokens, conll_in, ner_ceiling, args.rounds, work))
        if "sst" in tasks:
            run(elmo("classify", "--classifier", "bilstm", "--model", str(work / "elmo"),
                     "--train", str(sst / "train.tsv"), "--test", str(sst / "dev.tsv"),
                     "--max-train", str(args.max_train), "--epochs", "1",
                     "--save", str(work / "sst")))
            tokens = [e.tokens for e in classify.read_examples(sst / "test.tsv")][:args.max_test]
            text = work / "sst.txt"
            text.write_text("".join(" ".join(s) + "\n" for s in tokens), encoding="utf-8")
            report("BiLSTM classifier, SST-2 test", len(tokens),
                   measure("sst", work / "sst", tokens, text, bilstm_ceiling, args.rounds, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
