"""Tasks: classification readers + classifier, CoNLL reader/writer, seqeval scoring, the tagger,
CLI errors. Tiny data, a tiny random biLM; seconds."""
import random

import numpy as np
import pytest

from conftest import shared_path
from torch_elmo import cli, tasks
from torch_elmo.tasks import Example, ConllSentence

FRUIT = "apple banana cherry grape lemon mango melon peach pear plum".split()
TOOLS = "hammer wrench drill chisel saw pliers spanner mallet axe file".split()
FILLER = "the a my your some this that".split()


def _separable_examples(n, seed):
    """Two classes told apart by which word list their content words come from."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ["fruit", "tool"][i % 2]
        words = FRUIT if label == "fruit" else TOOLS
        toks = [rng.choice(FILLER), rng.choice(words), "and", rng.choice(words)]
        out.append(Example(toks, label))
    return out


@pytest.fixture
def embedder(tiny_model):
    return tasks.load_embedder(None, bilm=tiny_model)


def test_classifier_learns_separable_set(embedder):
    train, test = _separable_examples(80, 0), _separable_examples(40, 1)
    cache = {}
    for features in ("elmo", "tfidf", "layer0"):
        r = tasks.run_classification(train, test, features=features, embedder=embedder,
                                     feature_cache=cache)
        if features == "layer0":  # only P=16 random char-CNN dims: it runs, and beats chance
            assert r["accuracy"] > 0.6 and r["dim"] == embedder.model.proj_dim
            continue
        assert r["accuracy"] > 0.9, (features, r["accuracy"])
        assert r["macro_f1"] > 0.9 and set(r["per_class_f1"]) == {"fruit", "tool"}
    tiny_dim = 2 * embedder.model.proj_dim
    r = tasks.run_classification(train, test, dev=_separable_examples(20, 2), embedder=embedder)
    assert r["dim"] == tiny_dim and r["reg"] in tasks.C_GRID and len(r["predictions"]) == 40


def test_features_do_not_depend_on_the_batch(embedder):
    s = ["the", "plane", "took", "off"]
    alone = tasks.embed_layers(embedder, [s])[0]
    batch = tasks.embed_layers(embedder, [["x"] * 9, s, ["a", "b"], ["one"] * 3])[1]
    again = tasks.embed_layers(embedder, [s])[0]  # no state carried from the previous call
    assert alone.shape == (3, 4, 2 * embedder.model.proj_dim)
    assert np.allclose(alone, batch, atol=1e-5) and np.allclose(alone, again, atol=1e-6)
    pooled = tasks.pool_features([alone], embedder.model.proj_dim)
    assert np.allclose(pooled["elmo"][0], alone.mean(axis=0).mean(axis=0))
    assert np.allclose(pooled["layer0"][0], alone[0, :, :embedder.model.proj_dim].mean(axis=0))


# ------------------------------------------------------------------------------------- CoNLL
CONLL_IOB1 = """\
-DOCSTART- -X- O O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O
. . O O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER
Paul NNP I-NP B-PER
Smith NNP I-NP I-PER
in IN I-PP O
New NNP I-NP I-LOC
York NNP I-NP I-LOC
Times NNP I-NP I-ORG

-DOCSTART- -X- -X- O

Spain NNP I-NP I-LOC
wins VBZ I-VP O

"""


def test_iob1_to_bio():
    assert tasks.iob1_to_bio(["I-PER", "I-PER", "B-PER", "I-PER", "O", "I-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "B-PER", "I-PER", "O", "B-LOC", "B-ORG"]
    assert tasks.iob1_to_bio(["O", "I-MISC", "B-MISC", "O", "B-LOC"]) == \
        ["O", "B-MISC", "B-MISC", "O", "B-LOC"]
    assert tasks.iob1_to_bio(["B-PER", "I-PER", "O"]) == ["B-PER", "I-PER", "O"]  # BIO unchanged


def test_conll_reader_round_trips_and_converts(tmp_path):
    src = tmp_path / "eng.mini"
    src.write_text(CONLL_IOB1)
    every = tasks.read_conll(src, keep_docstart=True)
    assert [s.is_docstart for s in every] == [True, False, False, True, False]
    out = tmp_path / "copy"
    tasks.write_conll(every, out)
    assert out.read_bytes() == src.read_bytes()

    sents = tasks.read_conll(src)  # -DOCSTART- dropped
    assert [s.tokens[0] for s in sents] == ["EU", "Peter", "Spain"]
    assert sents[0].tags == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert sents[1].tags == ["B-PER", "I-PER", "B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-ORG"]
    assert sents[2].rows[0] == ["Spain", "NNP", "I-NP", "I-LOC"]

    # writing BIO + a predicted column gives conlleval's 5-column layout, readable again
    tasks.write_conll(sents, out, extra=[s.tags for s in sents], bio=True)
    lines = out.read_text().splitlines()
    assert lines[0] == "EU NNP I-NP B-ORG B-ORG"
    again = tasks.read_conll(out, scheme="bio")
    assert [s.tags for s in again] == [s.tags for s in sents]


def test_seqeval_entity_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "I-ORG", "O", "O", "B-MISC"]]
    # gold entities: PER(0-1) LOC(3) | ORG(0-2) MISC(4)                     -> 4
    # predicted:     PER(0-1) ORG(3) | ORG(0-1) MISC(4)                     -> 4
    # exact matches (type and span): PER(0-1), MISC(4)                      -> 2
    p, r = 2 / 4, 2 / 4
    s = tasks.ner_scores(gold, pred)
    assert s["precision"] == pytest.approx(p) and s["recall"] == pytest.approx(r)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert tasks.ner_scores(gold, gold)["f1"] == pytest.approx(1.0)


FIRST = "alice bob carol dave erin frank grace heidi".split()
LAST = "smith jones brown taylor wilson".split()
CITY = "paris london berlin madrid rome vienna".split()
WORDS = "went to visited met in saw yesterday and then the with from".split()


def _tagging_set(n, seed):
    """Tags follow from the words: first+last name -> B-PER I-PER, city -> B-LOC, else O."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(rng.randint(3, 7)):
            r = rng.random()
            if r < 0.25:
                rows += [[rng.choice(FIRST), "B-PER"], [rng.choice(LAST), "I-PER"]]
            elif r < 0.45:
                rows.append([rng.choice(CITY), "B-LOC"])
            else:
                rows.append([rng.choice(WORDS), "O"])
        out.append(ConllSentence(rows, [t for _, t in rows]))
    return out


@pytest.mark.parametrize("use_elmo", [True, False])
def test_tagger_learns_separable_set(embedder, use_elmo):
    train, dev, test = _tagging_set(60, 0), _tagging_set(30, 1), _tagging_set(30, 2)
    res = tasks.train_tagger(train, dev, test, embedder if use_elmo else None, epochs=6,
                             patience=3, batch_size=8, lr=2e-2, hidden=32, word_dim=16,
                             dropout=0.1, log=lambda *a: None)
    assert res.test["f1"] > 0.9, res.history
    assert len(res.epoch_seconds) == res.epochs_run and res.best_epoch >= 1


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
    assert tasks.detect_format(path) == fmt
    examples = tasks.read_examples(path)
    assert examples == tasks.read_examples(path, "sst" if parts[0] == "sst" else fmt)
    first = examples[0]
    if tokens is None:  # sst2-sentence: header skipped, first row of the file's data
        line = path.read_text().splitlines()[1]
        tokens, label = line.rsplit("\t", 1)
        assert label in ("0", "1")
    assert first == Example(tokens.split(), label)


def test_reader_counts_match_shared_readmes():
    assert len(tasks.read_examples(shared_path("data", "emotion-dair-ai", "test.txt"))) == 2000
    assert len(tasks.read_examples(shared_path("data", "sst", "sst2-sentence", "test.tsv"))) == 1821
    trec = tasks.read_examples(shared_path("data", "trec", "TREC_10.label"))
    assert len(trec) == 500 and {e.label for e in trec} == {"ABBR", "DESC", "ENTY", "HUM", "LOC",
                                                           "NUM"}
    assert tasks.read_trec(shared_path("data", "trec", "TREC_10.label"), fine=True)[0].label == \
        "NUM:dist"


def test_conll_shared_counts():
    s = tasks.read_conll(shared_path("data", "conll2003", "eng.testb"))
    assert len(s) == 3453 and sum(len(x.rows) for x in s) == 46435
    n_per = sum(t == "B-PER" for x in s for t in x.tags)
    assert n_per == 1617  # every entity starts with B- after the conversion (README: 1,617 PER)


# ------------------------------------------------------------------------------- CLI errors
def _run(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_cli_errors_are_one_line(tmp_path, capsys):
    good = tmp_path / "train.tsv"
    good.write_text("good film\tpos\nbad film\tneg\n")
    missing = tmp_path / "nope.tsv"
    rc, err = _run(["classify", "--features", "tfidf", "--train", str(good), "--test",
                    str(missing)], capsys)
    assert rc == 2 and len(err) == 1 and err[0] == f"elmo classify: error: {missing}: no such file"

    bad = tmp_path / "bad.tsv"
    bad.write_text("fine film\tpos\nno tab on this line\n")
    rc, err = _run(["classify", "--features", "tfidf", "--format", "tsv", "--train", str(good),
                    "--test", str(bad)], capsys)
    assert rc == 2 and len(err) == 1 and f"{bad}:2: expected 'text<TAB>label'" in err[0]

    rc, err = _run(["classify", "--train", str(good), "--test", str(good)], capsys)
    assert rc == 2 and len(err) == 1 and "--model is required" in err[0]

    conll = tmp_path / "bad.conll"
    conll.write_text("EU NNP I-NP I-ORG\nrejects VBZ I-VP X-TAG\n\n")
    rc, err = _run(["ner", "--no-elmo", "--train", str(conll), "--dev", str(conll), "--test",
                    str(conll)], capsys)
    assert rc == 2 and len(err) == 1 and f"{conll}:2: NER tag" in err[0]

    rc, err = _run(["ner", "--model", str(tmp_path / "no-model"), "--train", str(good),
                    "--dev", str(good), "--test", str(good)], capsys)
    assert rc == 2 and len(err) == 1 and "error:" in err[0]


def test_cli_classify_tfidf_writes_predictions(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{' '.join(e.tokens)}\t{e.label}\n" for e in _separable_examples(40, 0)))
    test = tmp_path / "test.tsv"
    test.write_text("".join(f"{' '.join(e.tokens)}\t{e.label}\n" for e in _separable_examples(20, 1)))
    pred = tmp_path / "pred.tsv"
    assert cli.main(["classify", "--features", "tfidf", "--train", str(train), "--test", str(test),
                     "--dev", str(test), "--predictions", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "accuracy 1.0000" in out and "macro-F1 1.0000" in out
    rows = pred.read_text().splitlines()
    assert rows[0] == "text\tgold\tpredicted" and len(rows) == 21


def test_cli_classify_and_ner_with_a_model(tmp_path, tiny_model, capsys):
    from torch_elmo import export_model
    model_dir = tmp_path / "model"
    export_model(tiny_model, model_dir)
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{' '.join(e.tokens)}\t{e.label}\n" for e in _separable_examples(40, 0)))
    assert cli.main(["classify", "--model", str(model_dir), "--train", str(train), "--test",
                     str(train), "--features", "layer0"]) == 0
    assert "accuracy" in capsys.readouterr().out
    conll = tmp_path / "mini.conll"
    conll.write_text(CONLL_IOB1)
    assert cli.main(["ner", "--model", str(model_dir), "--train", str(conll), "--dev", str(conll),
                     "--test", str(conll), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "s per epoch" in out and "test entity F1" in out
