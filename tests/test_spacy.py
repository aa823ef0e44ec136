"""spacy: the torch_elmo / torch_elmo_ner / torch_elmo_textcat components on spacy.blank("en"),
found through the entry points, against ElmoEmbedder and load_task(DIR).predict on a tiny random
biLM and tiny task models trained here with `elmo ner --save` / `elmo classify --save`."""
import json
import os
import re
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import spacy  # the [spacy] extra is in the test extra: CI runs these tests
from spacy.tokens import Doc

from torch_elmo import BiLM, ElmoEmbedder, ElmoError, export_model, load_task, preset
from torch_elmo import cli

NER_SENTENCES = [
    ("Peter Blackburn visited Germany .", "B-PER I-PER O B-LOC O"),
    ("John Smith works for Siemens in Berlin .", "B-PER I-PER O O B-ORG O B-LOC O"),
    ("The European Union met in Brussels on Monday .", "O B-ORG I-ORG O O B-LOC O O O"),
    ("Maria Garcia lives in Paris .", "B-PER I-PER O O B-LOC O"),
    ("Shares of Siemens rose in Frankfurt .", "O O B-ORG O O B-LOC O"),
    ("He said the weather was fine .", "O O O O O O O"),
    ("Anna Schmidt flew to London with John Smith .", "B-PER I-PER O O B-LOC O B-PER I-PER O"),
]
REVIEWS = [("a wonderful , moving film", "pos"), ("great acting and a fine story", "pos"),
           ("i loved every minute of it", "pos"), ("a dull , lifeless mess", "neg"),
           ("boring and far too long", "neg"), ("the worst film of the year", "neg")]
# spaCy splits "Berlin." and "Smith's"; a double space and a newline make whitespace tokens
TEXTS = ["John Smith visited Berlin.", "Maria Garcia  works for Siemens in Paris .",
         "Shares of Siemens rose\nin Frankfurt on Monday.", "", "Anna Schmidt's film was boring ."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(elmo dir, ner dir, classifier dir): a tiny random biLM, and a tagger and a BiLSTM
    classifier trained on it for 2 epochs with the CLI."""
    root = tmp_path_factory.mktemp("spacy")
    torch.manual_seed(1234)
    export_model(BiLM(preset("tiny")).eval(), root / "elmo")
    conll = root / "train.conll"
    conll.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(s.split(), tags.split())) + "\n"
                             for s, tags in NER_SENTENCES * 4))
    tsv = root / "train.tsv"
    tsv.write_text("".join(f"{t}\t{label}\n" for t, label in REVIEWS * 3))
    assert cli.main(["ner", "--model", str(root / "elmo"), "--train", str(conll), "--dev",
                     str(conll), "--test", str(conll), "--epochs", "2", "--lr", "2e-2",
                     "--hidden", "16", "--save", str(root / "ner")]) == 0
    assert cli.main(["classify", "--classifier", "bilstm", "--model", str(root / "elmo"),
                     "--train", str(tsv), "--test", str(tsv), "--epochs", "2", "--hidden", "16",
                     "--save", str(root / "cls")]) == 0
    return str(root / "elmo"), str(root / "ner"), str(root / "cls")


def words_of(doc):
    return [t.text for t in doc if not t.is_space]


def ents_of(doc):
    return [(e.text, e.label_, e.start_char, e.end_char) for e in doc.ents]


def expected_ents(doc, result, offsets):
    """The entities of a predict() result as (text, label, start_char, end_char) in doc.text,
    given the (start_char, end_char) of each word the tagger read."""
    out = []
    for e in result["entities"]:
        s, t = offsets[e["start"]][0], offsets[e["end"] - 1][1]
        out.append((doc.text[s:t], e["label"], s, t))
    return out


def test_import_torch_elmo_does_not_import_spacy():
    code = ("import sys, torch_elmo; bad = [m for m in sys.modules if m == 'spacy' or "
            "m.startswith(('spacy.', 'thinc', 'torch_elmo.spacy'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_entry_points_find_the_components_without_importing_the_module(models):
    elmo, ner, cls = models
    code = f"""
import json, sys
import spacy
assert "torch_elmo.spacy" not in sys.modules
nlp = spacy.blank("en")
nlp.add_pipe("torch_elmo", config={{"model": {elmo!r}}})
nlp.add_pipe("torch_elmo_ner", config={{"model": {ner!r}}})
nlp.add_pipe("torch_elmo_textcat", config={{"model": {cls!r}}})
doc = nlp({TEXTS[1]!r})
print(json.dumps({{"ents": [[e.text, e.label_, e.start_char, e.end_char] for e in doc.ents],
                  "cats": doc.cats, "tensor": doc.tensor.tolist()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    nlp = spacy.blank("en")
    for factory, model in (("torch_elmo", elmo), ("torch_elmo_ner", ner),
                           ("torch_elmo_textcat", cls)):
        nlp.add_pipe(factory, config={"model": model})
    doc = nlp(TEXTS[1])
    assert [tuple(e) for e in got["ents"]] == ents_of(doc)
    assert got["cats"] == pytest.approx(doc.cats, abs=1e-6)
    np.testing.assert_allclose(np.array(got["tensor"]), doc.tensor, atol=1e-6)


def test_vectors_are_the_embedders_for_spacys_tokens(models):
    elmo = models[0]
    embedder = ElmoEmbedder(elmo, device="cpu")
    text = TEXTS[2]                                    # "rose\nin": a whitespace token
    for layers, pick in (("average", lambda x: x.mean(0)), ("top", lambda x: x[-1]),
                         ("all", lambda x: x.transpose(1, 0, 2).reshape(x.shape[1], -1)),
                         ([0, 2], lambda x: np.concatenate([x[0], x[2]], axis=1))):
        nlp = spacy.blank("en")
        nlp.vocab.set_vector("Shares", np.ones(7, np.float32))   # a static vector must not win
        nlp.add_pipe("torch_elmo", config={"model": elmo, "layers": layers})
        doc = nlp(text)
        want = pick(embedder.embed_sentence(words_of(doc)))            # (n words, D)
        space = [t.i for t in doc if t.is_space]
        assert space and doc.tensor.shape == (len(doc), want.shape[1]), layers
        np.testing.assert_allclose(np.delete(doc.tensor, space, axis=0), want, atol=1e-6)
        assert not doc.tensor[space].any()
        np.testing.assert_allclose(doc[0].vector, want[0], atol=1e-6)
        np.testing.assert_allclose(doc[1:3].vector, want[1:3].mean(0), atol=1e-6)
        np.testing.assert_allclose(doc.vector, doc.tensor.mean(0), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no W007 "no word vectors" warning
        u, v = doc[0].vector, doc[3].vector
        assert doc[0].similarity(doc[3]) == pytest.approx(
            float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)), abs=1e-6)
    with pytest.raises(ElmoError, match="layers must be one of"):
        spacy.blank("en").add_pipe("torch_elmo", config={"model": elmo, "layers": "bottom"})


def test_ner_ents_are_the_taggers_predictions(models):
    tagger = load_task(models[1])
    nlp = spacy.blank("en")
    nlp.add_pipe("torch_elmo_ner", config={"model": models[1]})
    ws = spacy.blank("en")
    ws.add_pipe("torch_elmo_ner", config={"model": models[1], "tokens": "whitespace"})
    n_ents = 0
    for text in TEXTS:
        doc = nlp(text)
        words = [t for t in doc if not t.is_space]
        result = tagger.predict([[t.text for t in words]])[0]
        assert ents_of(doc) == expected_ents(doc, result, [(t.idx, t.idx + len(t)) for t in words])
        n_ents += len(doc.ents)
        # tokens="whitespace": what the tagger makes of the raw string, on spaCy's tokens
        result = tagger.predict([text])[0]
        want = [(e["text"], e["label"], e["start_char"], e["end_char"])
                for e in result["entities"]]
        assert ents_of(ws(text)) == want
    assert n_ents > 0                                  # the comparison is not between empties
    assert nlp.get_pipe("torch_elmo_ner").labels == ("LOC", "ORG", "PER")   # of B-LOC, I-LOC...


def test_textcat_cats_are_the_classifiers_probabilities(models):
    clf = load_task(models[2])
    nlp = spacy.blank("en")
    nlp.add_pipe("torch_elmo_textcat", config={"model": models[2]})
    docs = [nlp(t) for t in TEXTS]
    proba = clf.predict_proba([words_of(d) for d in docs])
    assert proba.shape == (len(TEXTS), 2)
    assert TEXTS[3] == "" and docs[3].cats == {}       # no words: no label, as predict gives
    for doc, row in zip(docs[:3] + docs[4:], np.delete(proba, 3, axis=0)):
        assert list(doc.cats) == [str(c) for c in clf.classes_]
        np.testing.assert_allclose(list(doc.cats.values()), row, atol=1e-6)
        assert sum(doc.cats.values()) == pytest.approx(1.0, abs=1e-5)


def test_pipe_batches_across_documents(models):
    elmo, ner, cls = models
    nlp = spacy.blank("en")
    nlp.add_pipe("torch_elmo", config={"model": elmo, "batch_size": 2})
    nlp.add_pipe("torch_elmo_ner", config={"model": ner, "batch_size": 2})
    nlp.add_pipe("torch_elmo_textcat", config={"model": cls})
    one_by_one = [nlp(t) for t in TEXTS]
    calls = []
    for name, method in (("torch_elmo_ner", "predict"), ("torch_elmo_textcat", "predict_proba")):
        task = nlp.get_pipe(name).task
        real = getattr(task, method)
        setattr(task, method, lambda texts, _real=real, _name=name, **kw:
                calls.append((_name, len(texts))) or _real(texts, **kw))
    docs = list(nlp.pipe(TEXTS * 2, batch_size=4))     # 10 docs: batches of 4, 4, 2
    assert calls == [(n, k) for k in (4, 4, 2) for n in ("torch_elmo_ner", "torch_elmo_textcat")]
    for doc, ref in zip(docs, one_by_one * 2):
        assert doc.text == ref.text and ents_of(doc) == ents_of(ref)
        assert doc.cats == pytest.approx(ref.cats, abs=1e-6)
        np.testing.assert_allclose(doc.tensor, ref.tensor, atol=1e-6)


def test_pipe_on_several_processes_after_the_parent_ran_the_model(models):
    # a worker forked from a process whose torch thread pools ran must not wait on them forever
    elmo, ner, _ = models
    code = f"""
import json, spacy
nlp = spacy.blank("en")
nlp.add_pipe("torch_elmo", config={{"model": {elmo!r}}})
nlp.add_pipe("torch_elmo_ner", config={{"model": {ner!r}}})
texts = {TEXTS!r} * 2
one = [nlp(t) for t in texts]
many = list(nlp.pipe(texts, batch_size=2, n_process=2))
print(json.dumps([[[e.text, e.label_] for e in d.ents] == [[e.text, e.label_] for e in r.ents]
                  and bool(abs(d.tensor - r.tensor).max(initial=0) < 1e-6)
                  for d, r in zip(many, one)]))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)          # the workers too
        proc.communicate()
        pytest.fail("nlp.pipe(n_process=2) hung")
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == [True] * 2 * len(TEXTS)


def test_to_disk_and_spacy_load_round_trip(models, tmp_path):
    elmo, ner, cls = models
    nlp = spacy.blank("en")
    nlp.add_pipe("torch_elmo", config={"model": elmo, "layers": "top"})
    nlp.add_pipe("torch_elmo_ner", config={"model": ner})
    nlp.add_pipe("torch_elmo_textcat", config={"model": cls, "tokens": "whitespace"})
    nlp.to_disk(tmp_path / "pipeline")
    back = spacy.load(tmp_path / "pipeline")
    assert back.pipe_names == ["torch_elmo", "torch_elmo_ner", "torch_elmo_textcat"]
    assert back.config["components"]["torch_elmo_ner"]["model"] == ner
    for text in TEXTS:
        a, b = nlp(text), back(text)
        assert ents_of(a) == ents_of(b)
        assert a.cats == pytest.approx(b.cats, abs=1e-6)
        np.testing.assert_allclose(a.tensor, b.tensor, atol=1e-6)


def test_a_relative_model_path_is_the_current_directorys(models, tmp_path, monkeypatch):
    root = os.path.dirname(models[1])
    monkeypatch.chdir(root)
    nlp = spacy.blank("en")
    nlp.add_pipe("torch_elmo_ner", config={"model": "ner"})
    nlp.to_disk(tmp_path / "pipeline")
    assert ents_of(spacy.load(tmp_path / "pipeline")(TEXTS[0])) == ents_of(nlp(TEXTS[0]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ElmoError, match="relative path is resolved against the current "
                                        "directory") as err:
        spacy.load(tmp_path / "pipeline")
    assert "\n" not in str(err.value)


def test_misaligned_entity_is_left_out_with_a_warning(models):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("torch_elmo_ner", config={"model": models[1], "tokens": "whitespace"})
    # an entity the tagger finds after its first word, whose first word we then merge with the
    # word before it: its characters start inside a spaCy token
    for text in TEXTS:
        words = text.split()
        ents = [e for e in load_task(models[1]).predict([text])[0]["entities"] if e["start"] > 0]
        if ents:
            break
    assert ents, "the tiny tagger found no entity to misalign"
    k = ents[0]["start"]
    merged = words[:k - 1] + [words[k - 1] + " " + words[k]] + words[k + 1:]
    doc = Doc(nlp.vocab, words=merged, spaces=[True] * (len(merged) - 1) + [False])
    assert doc.text == " ".join(words)
    with pytest.warns(UserWarning, match=re.escape(repr(ents[0]["text"])) +
                      ".*does not fall on spaCy token boundaries.*left out"):
        ner(doc)
    assert ents[0]["start_char"] not in [e.start_char for e in doc.ents]


def test_wrong_kind_of_model_or_tokens_is_one_line(models):
    elmo, ner, cls = models
    for factory, model, match in (("torch_elmo_ner", cls, "use torch_elmo_textcat"),
                                  ("torch_elmo_textcat", ner, "use torch_elmo_ner")):
        with pytest.raises(ElmoError, match=match) as err:
            spacy.blank("en").add_pipe(factory, config={"model": model})
        assert "\n" not in str(err.value)
    with pytest.raises(ElmoError, match="tokens must be one of spacy, whitespace"):
        spacy.blank("en").add_pipe("torch_elmo_ner", config={"model": ner, "tokens": "bpe"})
