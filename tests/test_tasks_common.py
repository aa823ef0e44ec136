"""tasks/common.py: batch-independent layers from an embedder, subsampling, reading data lines;
and the helpers the task tests share (seeded toy data sets, the tiny embedder, the CLI)."""
import random

import numpy as np
import pytest

from torch_elmo import ElmoEmbedder, ElmoError, cli
from torch_elmo.tasks import common


def random_set(n, seed, make_one):
    """[make_one(rng, i) for i in range(n)] drawn from one random.Random(seed): a toy data set."""
    rng = random.Random(seed)
    return [make_one(rng, i) for i in range(n)]


def run_cli(argv, capsys):
    """`elmo ...` in-process: the return code and stderr's lines."""
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.fixture
def embedder(tiny_model):
    return ElmoEmbedder(model=tiny_model)     # warm state: batch-independent


def test_features_do_not_depend_on_the_batch(embedder):
    s = ["the", "plane", "took", "off"]
    alone = common.embed_layers(embedder, [s])[0]
    batch = common.embed_layers(embedder, [["x"] * 9, s, ["a", "b"], ["one"] * 3])[1]
    again = common.embed_layers(embedder, [s])[0]  # no state carried from the previous call
    assert alone.shape == (3, 4, 2 * embedder.model.proj_dim)
    assert np.allclose(alone, batch, atol=1e-5) and np.allclose(alone, again, atol=1e-6)


def test_carry_embedder_starts_every_batch_from_zero(tiny_model):
    carry = ElmoEmbedder(model=tiny_model, state="carry")
    zero = ElmoEmbedder(model=tiny_model, state="zero")
    s = ["the", "plane", "took", "off"]
    first = common.embed_layers(carry, [s])[0]
    assert np.allclose(common.embed_layers(carry, [s])[0], first, atol=1e-6)
    assert np.allclose(first, common.embed_layers(zero, [s])[0], atol=1e-6)


def test_subsample_keeps_order_and_is_seeded():
    items = list(range(100))
    a = common.subsample(items, 10, seed=3)
    assert len(a) == 10 and a == sorted(a) and a == common.subsample(items, 10, seed=3)
    assert common.subsample(items, None) is items and common.subsample(items, 500) is items
    with pytest.raises(ElmoError, match="must be positive"):
        common.subsample(items, 0)


def test_data_lines_are_strict_utf8(tmp_path):
    with pytest.raises(ElmoError, match=r"nope\.tsv: no such file$"):
        common.read_data_lines(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"\xef\xbb\xbfok\tpos\nbad \xff\tneg\n")
    with pytest.raises(ElmoError, match=r"bad\.tsv:2: not valid UTF-8"):
        common.read_data_lines(bad)
    bad.write_bytes(b"\xef\xbb\xbfok\tpos\n")
    assert common.read_data_lines(bad) == ["ok\tpos"]


def test_word_vocab_and_casing_of_the_bilstm_models():
    vocab = common.WordVocab([["Paris", "in", "1999"], ["in", "Rome"]])
    assert vocab.words == ["<pad>", "<unk>", "0000", "in", "paris", "rome"]
    assert vocab.ids(["PARIS", "2024", "Oslo"]) == [4, 2, 1]            # lowercased, digits 0
    assert vocab.singletons == {2, 4, 5}
    assert [common.casing(w) for w in ["1999", "A4", "USA", "Paris", "in", "--", "iPod"]] == \
        [1, 2, 3, 4, 5, 6, 7]
    assert common.N_CASING == 8
