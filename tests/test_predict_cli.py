"""cli/predict.py: `elmo predict` with a saved tagger and a saved classifier: CoNLL and text input,
jsonl / conll / tsv output (a file or stdout), one record per input text in input order across
chunks, the training predictions reproduced, every bad input one line. A tiny random biLM."""
import json

import pytest

from torch_elmo import cli, export_model, load_task
from torch_elmo.tasks import ner

from test_tasks_classify import separable_examples, write_tsv
from test_tasks_common import run_cli
from test_tasks_ner import tagging_set, write_tagged


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved ELMo tagger (with its test file and --predictions) and a saved TF-IDF logreg."""
    import torch
    from torch_elmo import BiLM, preset
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(1234)
    export_model(BiLM(preset("tiny")).eval(), root / "lm")
    conll = {}
    for name, seed in (("train", 0), ("test", 2)):
        conll[name] = root / f"{name}.conll"
        write_tagged(conll[name], tagging_set(30 if name == "train" else 15, seed))
    assert cli.main(["ner", "--model", str(root / "lm"), "--train", str(conll["train"]),
                     "--dev", str(conll["test"]), "--test", str(conll["test"]), "--epochs", "2",
                     "--hidden", "8", "--save", str(root / "tagger"), "--predictions",
                     str(root / "tagger.pred")]) == 0
    tsv = root / "train.tsv"
    write_tsv(tsv, separable_examples(30, 0))
    assert cli.main(["classify", "--features", "tfidf", "--train", str(tsv), "--test", str(tsv),
                     "--save", str(root / "clf")]) == 0
    return root


def test_conll_input_is_tagged_as_training_tagged_it(models, tmp_path):
    out = tmp_path / "out.conll"
    assert cli.main(["predict", "--model", str(models / "tagger"), "--input",
                     str(models / "test.conll"), "--output", str(out), "--format", "conll"]) == 0
    got = ner.read_conll(out, scheme="bio")                     # `token TAG` per line
    want = ner.read_conll(models / "tagger.pred", scheme="bio")  # gold + predicted columns
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.tags for s in got] == [s.tags for s in want]


def test_text_input_one_jsonl_record_per_line_in_order(models, tmp_path, capsys):
    sents = [" ".join(s.tokens) for s in tagging_set(70, 5)]
    sents[3] = ""                                               # an empty line: an empty record
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(sents) + "\n")
    out = tmp_path / "out.jsonl"
    # --batch-size 1: chunks of 32 texts, so 70 lines take three chunks
    assert cli.main(["predict", "--model", str(models / "tagger"), "--input", str(inp),
                     "--output", str(out), "--batch-size", "1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == load_task(models / "tagger", device="cpu").predict(sents)
    assert records[3] == {"tokens": [], "tags": [], "entities": []}
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(models / "tagger"), "--input", str(inp),
                     "--output", "-"]) == 0
    assert capsys.readouterr().out == out.read_text()           # stdout: the same records
    tsv = tmp_path / "out.tsv"
    assert cli.main(["predict", "--model", str(models / "tagger"), "--input", str(inp),
                     "--output", str(tsv), "--format", "tsv"]) == 0
    rows = [line.split("\t") for line in tsv.read_text().split("\n")[:-1]]
    assert [(t.split(), g.split()) for t, g in rows] == \
        [(r["tokens"], r["tags"]) for r in records]


def test_classifier_jsonl_and_tsv(models, tmp_path):
    texts = [" ".join(e.tokens) for e in separable_examples(10, 3)] + [""]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(texts) + "\n")
    clf = load_task(models / "clf")
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", "--model", str(models / "clf"), "--input", str(inp), "--output",
                     str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == texts
    assert [r["label"] for r in records] == clf.predict(texts)
    proba = clf.predict_proba(texts[:-1])
    for r, row in zip(records, proba):
        assert list(r["probabilities"]) == clf.classes_
        assert list(r["probabilities"].values()) == pytest.approx(list(row))
    assert records[-1] == {"text": "", "label": None, "probabilities": None}
    tsv = tmp_path / "out.tsv"
    assert cli.main(["predict", "--model", str(models / "clf"), "--input", str(inp), "--output",
                     str(tsv), "--format", "tsv"]) == 0
    assert tsv.read_text().split("\n")[:-1] == [f"{t}\t{label or ''}" for t, label in
                                                zip(texts, clf.predict(texts))]


def test_bad_input_is_one_line_and_loses_nothing(models, tmp_path, capsys):
    import shutil
    inp = tmp_path / "in.txt"
    inp.write_text("apple and pear\n")
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")

    def predict(*flags):
        return run_cli(["predict", "--input", str(inp), "--output", str(out), *flags], capsys)

    rc, err = predict("--model", str(models / "lm"))
    assert rc == 2 and len(err) == 1 and "an ELMo model" in err[0]
    (tmp_path / "empty").mkdir()
    rc, err = predict("--model", str(tmp_path / "empty"))
    assert rc == 2 and len(err) == 1 and "not a saved task model" in err[0]
    bad = tmp_path / "tampered"
    shutil.copytree(models / "tagger", bad)
    with open(bad / "head.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\1\2\3")
    rc, err = predict("--model", str(bad))
    assert rc == 2 and len(err) == 1 and "head.safetensors: sha256 differs" in err[0]
    wrong = tmp_path / "wrong"                       # task.json edited: sizes that do not fit
    shutil.copytree(models / "tagger", wrong)
    meta = json.loads((wrong / "task.json").read_text())
    meta["head"]["hidden"] += 1
    (wrong / "task.json").write_text(json.dumps(meta))
    rc, err = predict("--model", str(wrong))
    assert rc == 2 and len(err) == 1 and "tensors do not fit" in err[0], err
    rc, err = predict("--model", str(models / "clf"), "--format", "conll")
    assert rc == 2 and len(err) == 1 and "--format conll writes a tagger's tags" in err[0]
    rc, err = run_cli(["predict", "--model", str(models / "clf"), "--input",
                       str(models / "test.conll"), "--output", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and "CoNLL input" in err[0] and "text classifier" in err[0]
    rc, err = run_cli(["predict", "--model", str(models / "clf"), "--input", str(inp),
                       "--output", str(inp)], capsys)
    assert rc == 2 and len(err) == 1 and "is also an input" in err[0]
    rc, err = predict("--model", str(models / "clf"), "--batch-size", "0")
    assert rc == 2 and err == ["elmo predict: error: --batch-size must be >= 1, got 0"]
    assert inp.read_text() == "apple and pear\n" and out.read_text() == "previous\n"
    rc, err = run_cli(["predict", "--model", str(models / "clf"), "--input",
                       str(tmp_path / "nope.txt"), "--output", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and "no such file" in err[0]
