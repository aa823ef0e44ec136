"""tasks/ner.py: IOB1 -> BIO, the CoNLL reader/writer, seqeval scoring, the tagger on a toy set,
`elmo ner`. A tiny random biLM; seconds."""
import pytest

from conftest import shared_path
from torch_elmo import cli, export_model
from torch_elmo.tasks import ner
from torch_elmo.tasks.ner import ConllSentence

from test_tasks_common import embedder, random_set, run_cli  # noqa: F401 (embedder: a fixture)

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
    assert ner.iob1_to_bio(["I-PER", "I-PER", "B-PER", "I-PER", "O", "I-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "B-PER", "I-PER", "O", "B-LOC", "B-ORG"]
    assert ner.iob1_to_bio(["O", "I-MISC", "B-MISC", "O", "B-LOC"]) == \
        ["O", "B-MISC", "B-MISC", "O", "B-LOC"]
    assert ner.iob1_to_bio(["B-PER", "I-PER", "O"]) == ["B-PER", "I-PER", "O"]  # BIO unchanged


def test_conll_reader_round_trips_and_converts(tmp_path):
    src = tmp_path / "eng.mini"
    src.write_text(CONLL_IOB1)
    every = ner.read_conll(src, keep_docstart=True)
    assert [s.is_docstart for s in every] == [True, False, False, True, False]
    out = tmp_path / "copy"
    ner.write_conll(every, out)
    assert out.read_bytes() == src.read_bytes()

    sents = ner.read_conll(src)  # -DOCSTART- dropped
    assert [s.tokens[0] for s in sents] == ["EU", "Peter", "Spain"]
    assert sents[0].tags == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert sents[1].tags == ["B-PER", "I-PER", "B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-ORG"]
    assert sents[2].rows[0] == ["Spain", "NNP", "I-NP", "I-LOC"]

    # writing BIO + a predicted column gives conlleval's 5-column layout, readable again
    ner.write_conll(sents, out, extra=[s.tags for s in sents], bio=True)
    lines = out.read_text().splitlines()
    assert lines[0] == "EU NNP I-NP B-ORG B-ORG"
    again = ner.read_conll(out, scheme="bio")
    assert [s.tags for s in again] == [s.tags for s in sents]


def test_seqeval_entity_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "I-ORG", "O", "O", "B-MISC"]]
    # gold entities: PER(0-1) LOC(3) | ORG(0-2) MISC(4)                     -> 4
    # predicted:     PER(0-1) ORG(3) | ORG(0-1) MISC(4)                     -> 4
    # exact matches (type and span): PER(0-1), MISC(4)                      -> 2
    p, r = 2 / 4, 2 / 4
    s = ner.ner_scores(gold, pred)
    assert s["precision"] == pytest.approx(p) and s["recall"] == pytest.approx(r)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert ner.ner_scores(gold, gold)["f1"] == pytest.approx(1.0)


FIRST = "alice bob carol dave erin frank grace heidi".split()
LAST = "smith jones brown taylor wilson".split()
CITY = "paris london berlin madrid rome vienna".split()
WORDS = "went to visited met in saw yesterday and then the with from".split()


def tagging_set(n, seed):
    """Tags follow from the words: first+last name -> B-PER I-PER, city -> B-LOC, else O."""
    def one(rng, i):
        rows = []
        for _ in range(rng.randint(3, 7)):
            r = rng.random()
            if r < 0.25:
                rows += [[rng.choice(FIRST), "B-PER"], [rng.choice(LAST), "I-PER"]]
            elif r < 0.45:
                rows.append([rng.choice(CITY), "B-LOC"])
            else:
                rows.append([rng.choice(WORDS), "O"])
        return ConllSentence(rows, [t for _, t in rows])
    return random_set(n, seed, one)


@pytest.mark.parametrize("use_elmo", [True, False])
def test_tagger_learns_separable_set(embedder, use_elmo):
    train, dev, test = tagging_set(60, 0), tagging_set(30, 1), tagging_set(30, 2)
    res = ner.train_tagger(train, dev, test, embedder if use_elmo else None, epochs=6,
                             patience=3, batch_size=8, lr=2e-2, hidden=32, word_dim=16,
                             dropout=0.1, log=lambda *a: None)
    assert res.test["f1"] > 0.9, res.history
    assert len(res.epoch_seconds) == res.epochs_run and res.best_epoch >= 1


def test_conll_shared_counts():
    s = ner.read_conll(shared_path("data", "conll2003", "eng.testb"))
    assert len(s) == 3453 and sum(len(x.rows) for x in s) == 46435
    n_per = sum(t == "B-PER" for x in s for t in x.tags)
    assert n_per == 1617  # every entity starts with B- after the conversion (README: 1,617 PER)


# ----------------------------------------------------------------------------------- elmo ner
def test_cli_ner_errors_are_one_line(tmp_path, capsys):
    good = tmp_path / "train.tsv"
    good.write_text("good film\tpos\nbad film\tneg\n")
    conll = tmp_path / "bad.conll"
    conll.write_text("EU NNP I-NP I-ORG\nrejects VBZ I-VP X-TAG\n\n")
    rc, err = run_cli(["ner", "--no-elmo", "--train", str(conll), "--dev", str(conll), "--test",
                       str(conll)], capsys)
    assert rc == 2 and len(err) == 1 and f"{conll}:2: NER tag" in err[0]

    rc, err = run_cli(["ner", "--model", str(tmp_path / "no-model"), "--train", str(good),
                       "--dev", str(good), "--test", str(good)], capsys)
    assert rc == 2 and len(err) == 1 and "error:" in err[0]


def test_cli_ner_with_a_model(tmp_path, tiny_model, capsys):
    model_dir = tmp_path / "model"
    export_model(tiny_model, model_dir)
    conll = tmp_path / "mini.conll"
    conll.write_text(CONLL_IOB1)
    assert cli.main(["ner", "--model", str(model_dir), "--train", str(conll), "--dev", str(conll),
                     "--test", str(conll), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "s per epoch" in out and "test entity F1" in out


def test_cli_ner_refuses_bad_settings_and_o_only_data_before_training(tmp_path, capsys):
    conll = tmp_path / "mini.conll"
    conll.write_text(CONLL_IOB1)
    base = ["ner", "--no-elmo", "--train", str(conll), "--dev", str(conll), "--test", str(conll)]
    for flag in ("--epochs", "--batch-size"):
        rc, err = run_cli(base + [flag, "0"], capsys)
        assert rc == 2 and err == [f"elmo ner: error: {flag} must be >= 1, got 0"]
    rc, err = run_cli(base + ["--predictions", str(tmp_path / "nodir" / "p.conll")], capsys)
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]
    rc, err = run_cli(base + ["--save", str(tmp_path)], capsys)       # the dir holding train
    assert rc == 2 and len(err) == 1 and "--save" in err[0] and "holds the input" in err[0]
    assert "epoch" not in capsys.readouterr().out                     # before any training
    only_o = tmp_path / "o.conll"
    only_o.write_text("EU NNP I-NP O\nrejects VBZ I-VP O\n\nPeter NNP I-NP O\n\n")
    rc, err = run_cli(["ner", "--no-elmo", "--train", str(only_o), "--dev", str(conll),
                       "--test", str(conll)], capsys)
    assert rc == 2 and len(err) == 1 and "every tag is O" in err[0]


# --------------------------------------------------------------- saved tagger: --save, Tagger
def write_tagged(path, sentences):
    path.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(s.tokens, s.tags)) + "\n"
                            for s in sentences))


@pytest.fixture(scope="module")
def saved_taggers(tmp_path_factory):
    """`elmo ner --save DIR --predictions P` with ELMo and --no-elmo on the toy set: per variant
    (DIR, the test sentences, the tags training predicted for them)."""
    import torch
    from torch_elmo import BiLM, preset
    root = tmp_path_factory.mktemp("taggers")
    torch.manual_seed(1234)
    export_model(BiLM(preset("tiny")).eval(), root / "lm")
    files = {}
    for name, seed in (("train", 0), ("dev", 1), ("test", 2)):
        files[name] = root / f"{name}.conll"
        write_tagged(files[name], tagging_set(40 if name == "train" else 20, seed))
    out = {}
    for variant in ("elmo", "no-elmo"):
        d, pred = root / variant, root / f"{variant}.pred"
        flags = ["--no-elmo"] if variant == "no-elmo" else ["--model", str(root / "lm")]
        assert cli.main(["ner", *flags, "--train", str(files["train"]), "--dev",
                         str(files["dev"]), "--test", str(files["test"]), "--epochs", "5",
                         "--hidden", "16", "--lr", "2e-2", "--save", str(d), "--predictions",
                         str(pred)]) == 0
        test = ner.read_conll(files["test"], scheme="bio")
        tags = [s.tags for s in ner.read_conll(pred, scheme="bio")]   # last column: predicted
        out[variant] = (d, test, tags)
    return out


@pytest.mark.parametrize("variant", ["elmo", "no-elmo"])
def test_a_reloaded_tagger_predicts_what_training_predicted(saved_taggers, variant):
    from torch_elmo import Tagger, load_task
    d, test, trained_tags = saved_taggers[variant]
    tagger = load_task(d, device="cpu")
    assert isinstance(tagger, Tagger) and tagger.kind == "ner" and tagger.path == str(d)
    assert tagger.labels == ["B-LOC", "B-PER", "I-PER", "O"] and str(tagger.device) == "cpu"
    assert (d / "elmo" / "weights.hdf5").is_file() == (variant == "elmo")
    got = tagger.predict([s.tokens for s in test])
    assert [r["tags"] for r in got] == trained_tags
    assert any(r["entities"] for r in got)
    # strings in any batch size, in any order, give the same tags (length-sorted, input order)
    texts = [" ".join(s.tokens) for s in test][::-1]
    assert [r["tags"] for r in tagger.predict(texts, batch_size=1)] == trained_tags[::-1]


def test_tagger_predict_offsets_empty_and_over_long_texts(saved_taggers):
    from seqeval.metrics.sequence_labeling import get_entities
    from torch_elmo import load_task
    d, test, _ = saved_taggers["elmo"]
    tagger = load_task(d, device="cpu")
    text = "  alice smith   went to\tparis then  met heidi taylor in rome "
    one = tagger.predict(text)                                   # one string: one dict
    assert one["tokens"] == text.split() and len(one["tags"]) == len(one["tokens"])
    assert one["entities"], one
    for e in one["entities"]:
        assert text[e["start_char"]:e["end_char"]] == e["text"]
        assert e["text"] == " ".join(one["tokens"][e["start"]:e["end"]])
    assert [(e["label"], e["start"], e["end"] - 1) for e in one["entities"]] == \
        get_entities(one["tags"])
    tokens = ["alice", "smith", "went", "to", "paris"]                # a token list: offsets
    r = tagger.predict([tokens])[0]                                   # into " ".join(tokens)
    assert all(" ".join(tokens)[e["start_char"]:e["end_char"]] == e["text"]
               for e in r["entities"])
    long = (text.split() * 300)[:2500]                                # windowed like elmo embed
    out = tagger.predict(["", long, "   ", tokens], batch_size=2)
    assert out[0] == out[2] == {"tokens": [], "tags": [], "entities": []}
    assert len(out[1]["tags"]) == 2500 and out[3]["tags"] == r["tags"]
