"""tasks/classify.py: the readers (tiny files and the shared data sets), pooled features, the
classifier on a separable toy set, `elmo classify`. A tiny random biLM; seconds."""
import numpy as np
import pytest

from conftest import shared_path
from torch_elmo import cli, export_model
from torch_elmo.tasks import classify, common
from torch_elmo.tasks.classify import Example

from test_tasks_common import embedder, random_set, run_cli  # noqa: F401 (embedder: a fixture)

FRUIT = "apple banana cherry grape lemon mango melon peach pear plum".split()
TOOLS = "hammer wrench drill chisel saw pliers spanner mallet axe file".split()
FILLER = "the a my your some this that".split()


def separable_examples(n, seed):
    """Two classes told apart by which word list their content words come from."""
    def one(rng, i):
        label = ["fruit", "tool"][i % 2]
        words = FRUIT if label == "fruit" else TOOLS
        return Example([rng.choice(FILLER), rng.choice(words), "and", rng.choice(words)], label)
    return random_set(n, seed, one)


def write_tsv(path, examples):
    path.write_text("".join(f"{' '.join(e.tokens)}\t{e.label}\n" for e in examples))


def test_classifier_learns_separable_set(embedder):
    train, test = separable_examples(80, 0), separable_examples(40, 1)
    cache = {}
    for features in ("elmo", "tfidf", "layer0"):
        r = classify.run_classification(train, test, features=features, embedder=embedder,
                                        feature_cache=cache)
        if features == "layer0":  # only P=16 random char-CNN dims: it runs, and beats chance
            assert r["accuracy"] > 0.6 and r["dim"] == embedder.model.proj_dim
            continue
        assert r["accuracy"] > 0.9, (features, r["accuracy"])
        assert r["macro_f1"] > 0.9 and set(r["per_class_f1"]) == {"fruit", "tool"}
    tiny_dim = 2 * embedder.model.proj_dim
    r = classify.run_classification(train, test, dev=separable_examples(20, 2), embedder=embedder)
    assert r["dim"] == tiny_dim and r["reg"] in classify.C_GRID and len(r["predictions"]) == 40


def test_pooled_features(embedder):
    alone = common.embed_layers(embedder, [["the", "plane", "took", "off"]])[0]
    pooled = classify.pool_features([alone], embedder.model.proj_dim)
    assert np.allclose(pooled["elmo"][0], alone.mean(axis=0).mean(axis=0))
    assert np.allclose(pooled["layer0"][0], alone[0, :, :embedder.model.proj_dim].mean(axis=0))


# ------------------------------------------------------------------------ shared data formats
@pytest.mark.parametrize("parts, fmt, tokens, label", [
    (("emotion-dair-ai", "val.txt"), "emotion",
     "im feeling quite sad and sorry for myself but ill snap out of it soon", "sadness"),
    (("sst", "sst2-sentence", "dev.tsv"), "tsv", None, None),
    (("sst", "senteval-binary", "sentiment-dev"), "tsv",
     "it 's a charming and often affecting journey .", "1"),
    (("sst", "senteval-fine", "sentiment-dev"), "sst", "in his first stab at the form , jacquot "
     "takes a slightly anarchic approach that works only sporadically .", "2"),
    (("trec", "TREC_10.label"), "trec", "How far is it from Denver to Aspen ?", "NUM"),
])
def test_readers_parse_shared_formats(parts, fmt, tokens, label):
    path = shared_path("data", *parts)
    assert classify.detect_format(path) == fmt
    examples = classify.read_examples(path)
    assert examples == classify.read_examples(path, "sst" if parts[0] == "sst" else fmt)
    first = examples[0]
    if tokens is None:  # sst2-sentence: header skipped, first row of the file's data
        line = path.read_text().splitlines()[1]
        tokens, label = line.rsplit("\t", 1)
        assert label in ("0", "1")
    assert first == Example(tokens.split(), label)


def test_reader_counts_match_shared_readmes():
    assert len(classify.read_examples(shared_path("data", "emotion-dair-ai", "test.txt"))) == 2000
    assert len(classify.read_examples(shared_path("data", "sst", "sst2-sentence",
                                                  "test.tsv"))) == 1821
    trec = classify.read_examples(shared_path("data", "trec", "TREC_10.label"))
    assert len(trec) == 500 and {e.label for e in trec} == {"ABBR", "DESC", "ENTY", "HUM", "LOC",
                                                           "NUM"}
    assert classify.read_trec(shared_path("data", "trec", "TREC_10.label"), fine=True)[0].label == \
        "NUM:dist"


# ------------------------------------------------------------------------------ elmo classify
def test_cli_classify_errors_are_one_line(tmp_path, capsys):
    good = tmp_path / "train.tsv"
    good.write_text("good film\tpos\nbad film\tneg\n")
    missing = tmp_path / "nope.tsv"
    rc, err = run_cli(["classify", "--features", "tfidf", "--train", str(good), "--test",
                       str(missing)], capsys)
    assert rc == 2 and len(err) == 1 and err[0] == f"elmo classify: error: {missing}: no such file"

    bad = tmp_path / "bad.tsv"
    bad.write_text("fine film\tpos\nno tab on this line\n")
    rc, err = run_cli(["classify", "--features", "tfidf", "--format", "tsv", "--train", str(good),
                       "--test", str(bad)], capsys)
    assert rc == 2 and len(err) == 1 and f"{bad}:2: expected 'text<TAB>label'" in err[0]

    rc, err = run_cli(["classify", "--train", str(good), "--test", str(good)], capsys)
    assert rc == 2 and len(err) == 1 and "--model is required" in err[0]


def test_cli_classify_tfidf_writes_predictions(tmp_path, capsys):
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    write_tsv(train, separable_examples(40, 0))
    write_tsv(test, separable_examples(20, 1))
    pred = tmp_path / "pred.tsv"
    assert cli.main(["classify", "--features", "tfidf", "--train", str(train), "--test", str(test),
                     "--dev", str(test), "--predictions", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "accuracy 1.0000" in out and "macro-F1 1.0000" in out
    rows = pred.read_text().splitlines()
    assert rows[0] == "text\tgold\tpredicted" and len(rows) == 21


def test_cli_classify_with_a_model(tmp_path, tiny_model, capsys):
    model_dir = tmp_path / "model"
    export_model(tiny_model, model_dir)
    train = tmp_path / "train.tsv"
    write_tsv(train, separable_examples(40, 0))
    assert cli.main(["classify", "--model", str(model_dir), "--train", str(train), "--test",
                     str(train), "--features", "layer0"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_classify_checks_the_predictions_path_before_training(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    write_tsv(train, separable_examples(40, 0))
    pred = tmp_path / "missing_dir" / "p.tsv"
    rc, err = run_cli(["classify", "--features", "tfidf", "--train", str(train), "--test",
                       str(train), "--predictions", str(pred)], capsys)
    assert rc == 2 and len(err) == 1 and "--predictions" in err[0] and "does not exist" in err[0]
    assert "accuracy" not in capsys.readouterr().out          # refused before any training
    rc, err = run_cli(["classify", "--features", "tfidf", "--train", str(train), "--test",
                       str(train), "--predictions", str(train)], capsys)
    assert rc == 2 and "is also an input" in err[0]
    assert len(train.read_text().splitlines()) == 40           # the input is intact


def test_tsv_with_an_id_column_or_swapped_columns_is_refused(tmp_path, capsys):
    three = tmp_path / "three.tsv"
    three.write_text("1\tgood film\tpos\n2\tbad film\tneg\n")
    with pytest.raises(classify.ElmoError, match=r"three\.tsv:1: .*3 tab-separated columns"):
        classify.read_examples(three, "tsv")
    swapped = tmp_path / "swapped.tsv"
    write_tsv(swapped, separable_examples(40, 0))
    swapped.write_text("".join(f"{b}\t{a}\n" for a, b in (line.split("\t") for line in
                               swapped.read_text().splitlines())))
    rc, err = run_cli(["classify", "--features", "tfidf", "--format", "tsv", "--train",
                       str(swapped), "--test", str(swapped)], capsys)
    assert rc == 2 and len(err) == 1 and "columns look swapped" in err[0]


# ------------------------------------------------------------- tfidf+elmo, bilstm through the CLI
def test_tfidf_elmo_stacks_both_blocks_with_comparable_norms(embedder):
    train, test = separable_examples(40, 0), separable_examples(20, 1)
    _, tfidf, (tfidf_test,) = classify.tfidf_features([e.tokens for e in train],
                                                      [[e.tokens for e in test]])
    pooled = classify.pooled_elmo(embedder, {"train": train, "test": test}, 64, None, False)
    X, _ = classify.hstack_tfidf_elmo({"train": tfidf, "test": tfidf_test},
                                      {name: p["elmo"] for name, p in pooled.items()})
    dim = 2 * embedder.model.proj_dim
    assert X["train"].shape == (40, tfidf.shape[1] + dim) and X["test"].shape[0] == 20
    dense = X["train"][:, tfidf.shape[1]:].toarray()
    assert np.allclose(dense.mean(axis=0), 0, atol=1e-5)         # standardised on train
    assert np.isclose(np.mean(np.sum(dense ** 2, axis=1)), 1.0, atol=0.05)   # ~ a tfidf row
    r = classify.run_classification(train, test, features="tfidf+elmo", embedder=embedder)
    assert r["dim"] == tfidf.shape[1] + dim and r["accuracy"] > 0.9


def test_cli_classify_tfidf_elmo_and_bilstm(tmp_path, tiny_model, capsys):
    model_dir = tmp_path / "model"
    export_model(tiny_model, model_dir)
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    write_tsv(train, separable_examples(40, 0))
    write_tsv(test, separable_examples(20, 1))
    common_args = ["--train", str(train), "--test", str(test), "--dev", str(test)]
    assert cli.main(["classify", "--model", str(model_dir), "--features", "tfidf+elmo"]
                    + common_args) == 0
    assert "features tfidf+elmo" in capsys.readouterr().out
    pred = tmp_path / "pred.tsv"
    assert cli.main(["classify", "--model", str(model_dir), "--classifier", "bilstm",
                     "--epochs", "2", "--hidden", "8", "--predictions", str(pred)]
                    + common_args) == 0
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "scalar mix" in out and "accuracy" in out
    assert len(pred.read_text().splitlines()) == 21


def test_cli_bilstm_no_elmo_needs_no_model(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    write_tsv(train, separable_examples(40, 0))
    assert cli.main(["classify", "--classifier", "bilstm", "--no-elmo", "--train", str(train),
                     "--test", str(train), "--epochs", "8", "--lr", "1e-2", "--hidden",
                     "16"]) == 0
    out = capsys.readouterr().out
    assert "no ELMo" in out and "last of 8 epochs (no --dev)" in out
    assert "accuracy 1.0000" in out


@pytest.mark.parametrize("flags, message", [
    (["--classifier", "bilstm", "--features", "tfidf"],
     "--classifier bilstm reads the words (+ ELMo layers, or none with --no-elmo), not pooled "
     "features: --features tfidf is for logreg / mlp"),
    (["--classifier", "bilstm", "--no-elmo", "--features", "layer0"], "--features layer0 is for"),
    (["--no-elmo"], "--no-elmo is for --classifier bilstm"),
    (["--classifier", "bilstm"], "--model is required (a dir with options.json + weights.hdf5); "
     "--no-elmo: the BiLSTM without ELMo"),
    (["--features", "tfidf+elmo"], "--model is required"),
    (["--classifier", "bilstm", "--no-elmo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--classifier", "bilstm", "--no-elmo", "--patience", "0"], "--patience must be >= 1"),
    (["--classifier", "bilstm", "--no-elmo", "--hidden", "0"], "--hidden must be >= 1"),
    (["--classifier", "bilstm", "--no-elmo", "--lr", "0"], "--lr must be > 0, got 0.0"),
])
def test_cli_classify_refuses_bad_combinations_in_one_line(tmp_path, capsys, flags, message):
    train = tmp_path / "train.tsv"
    write_tsv(train, separable_examples(20, 0))
    rc, err = run_cli(["classify", "--train", str(train), "--test", str(train)] + flags, capsys)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert "accuracy" not in capsys.readouterr().out


# ------------------------------------------------- saved classifier: --save, TextClassifier
VARIANTS = {"logreg-elmo": ["--features", "elmo"], "mlp-layer0": ["--classifier", "mlp",
            "--features", "layer0"], "logreg-tfidf": ["--features", "tfidf"],
            "logreg-tfidf+elmo": ["--features", "tfidf+elmo"],
            "bilstm-elmo": ["--classifier", "bilstm", "--epochs", "2", "--hidden", "8"],
            "bilstm-no-elmo": ["--classifier", "bilstm", "--no-elmo", "--epochs", "2",
                               "--hidden", "8"]}


@pytest.fixture(scope="module")
def saved_classifiers(tmp_path_factory):
    """`elmo classify --save DIR --predictions P` for every classifier / feature set: per
    variant (DIR, the test examples, the labels training predicted for them)."""
    import torch
    from torch_elmo import BiLM, preset
    root = tmp_path_factory.mktemp("classifiers")
    torch.manual_seed(1234)
    export_model(BiLM(preset("tiny")).eval(), root / "lm")
    train, test = root / "train.tsv", root / "test.tsv"
    write_tsv(train, separable_examples(40, 0))
    examples = separable_examples(20, 1)
    write_tsv(test, examples)
    out = {}
    for name, flags in VARIANTS.items():
        d, pred = root / name, root / f"{name}.pred"
        model = [] if "tfidf" == flags[-1] or "--no-elmo" in flags else ["--model",
                                                                        str(root / "lm")]
        assert cli.main(["classify", *model, *flags, "--train", str(train), "--test", str(test),
                         "--dev", str(test), "--save", str(d), "--predictions", str(pred)]) == 0
        trained = [line.split("\t")[2] for line in pred.read_text().splitlines()[1:]]
        out[name] = (d, examples, trained)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_reloaded_classifier_predicts_what_training_predicted(saved_classifiers, variant):
    from torch_elmo import TextClassifier, load_task
    d, examples, trained = saved_classifiers[variant]
    clf = load_task(d, device="cpu")
    assert isinstance(clf, TextClassifier) and clf.kind == "classify"
    assert clf.labels == clf.classes_ == ["fruit", "tool"]
    assert (d / "elmo" / "weights.hdf5").is_file() == (variant not in ("logreg-tfidf",
                                                                       "bilstm-no-elmo"))
    assert clf.predict([e.tokens for e in examples]) == trained
    texts = [" ".join(e.tokens) for e in examples]
    assert clf.predict(texts[::-1], batch_size=3) == trained[::-1]
    proba = clf.predict_proba(texts + [""])
    assert proba.shape == (21, 2) and np.allclose(proba[:20].sum(axis=1), 1)
    assert [clf.classes_[k] for k in proba[:20].argmax(axis=1)] == trained
    assert np.isnan(proba[20]).all()
    assert clf.predict(["", texts[1]]) == [None, trained[1]]
    assert clf.predict(texts[1]) == trained[1] and clf.predict_proba(texts[1]).shape == (2,)


def test_a_skops_file_with_a_foreign_type_is_not_loaded(saved_classifiers, tmp_path):
    import json
    import os
    import shutil

    import skops.io as sio

    from torch_elmo import ElmoError, load_task
    from torch_elmo.hub import sha256_file
    d = tmp_path / "m"
    shutil.copytree(saved_classifiers["logreg-tfidf"][0], d)
    parts = sio.load(d / "sklearn.skops", trusted=classify.TRUSTED)
    parts["hook"] = os.system                # what a crafted file could smuggle in
    sio.dump(parts, d / "sklearn.skops")
    meta = json.loads((d / "task.json").read_text())
    meta["files"]["sklearn.skops"] = sha256_file(d / "sklearn.skops")   # even with a valid sum
    (d / "task.json").write_text(json.dumps(meta))
    with pytest.raises(ElmoError, match=r"sklearn\.skops: holds types .*system.*not loaded"):
        load_task(d)


def test_cli_classify_checks_the_save_dir_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.tsv"
    write_tsv(train, separable_examples(40, 0))
    base = ["classify", "--features", "tfidf", "--train", str(train), "--test", str(train)]
    for target, message in ((data, "holds the input"), (tmp_path / "no" / "m", "does not exist"),
                            (train, "is a file")):
        rc, err = run_cli(base + ["--save", str(target)], capsys)
        assert rc == 2 and len(err) == 1 and "--save" in err[0] and message in err[0], err
        assert "accuracy" not in capsys.readouterr().out        # refused before any training
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, err = run_cli(base + ["--save", str(other)], capsys)
    assert rc == 2 and "is not a saved task model" in err[0]
    assert (other / "keep.txt").read_text() == "mine"
    assert run_cli(base + ["--save", str(tmp_path / "m")], capsys)[0] == 0
    assert run_cli(base + ["--save", str(tmp_path / "m")], capsys)[0] == 0   # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m", "notes"]
