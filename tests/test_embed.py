import json

import h5py
import numpy as np
import pytest

from torch_elmo import ElmoEmbedder, ElmoError


def _fixture_batches(d):
    S = json.loads((d / "lm_embeddings_sentences.json").read_text())
    return [[S[k][i].strip().split() for k in range(3)] for i in range(10)]


def _expected(d, k, i):
    with h5py.File(d / f"lm_embeddings_{k}.hdf5") as f:
        e = f[str(i)][...]
    return np.concatenate([e[0], e[1]], axis=-1)  # (n, 2P): forward | backward top layer


def test_stateful_top_layer_matches_bilm_tf_fixture(fixture_model_dir):
    d = fixture_model_dir
    embedder = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry",
                            max_batch_size=4)
    for i, batch in enumerate(_fixture_batches(d)):
        out = embedder.embed_batch(batch)
        for k in range(3):
            want = _expected(d, k, i)
            assert out[k].shape == (3, len(batch[k]), 32) and out[k].dtype == np.float32
            assert out[k].shape[1] == want.shape[0]
            assert np.allclose(out[k][2], want, atol=1e-6), (k, i, np.abs(out[k][2] - want).max())
    # state test 1: row 3 was never used and stays zero in every direction/layer, c and h
    assert float(embedder.states.c[:, :, 3].abs().sum()) < 1e-7
    assert float(embedder.states.h[:, :, 3].abs().sum()) < 1e-7
    # state test 2: a batch of 2 leaves row 2 untouched
    c2, h2 = embedder.states.c[:, :, 2].clone(), embedder.states.h[:, :, 2].clone()
    c0 = embedder.states.c[:, :, 0].clone()
    embedder.embed_batch([["a", "b", "c"], ["d"]])
    assert np.allclose(embedder.states.c[:, :, 2], c2, atol=1e-6)
    assert np.allclose(embedder.states.h[:, :, 2], h2, atol=1e-6)
    assert not np.allclose(embedder.states.c[:, :, 0], c0)


def test_state_is_what_makes_the_fixture_match(fixture_model_dir):
    """Without carried state (fresh embedder per batch) batch 1 no longer matches."""
    d = fixture_model_dir
    batches = _fixture_batches(d)
    fresh = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry")
    out = fresh.embed_batch(batches[1])
    assert not np.allclose(out[0][2], _expected(d, 0, 1), atol=1e-6)


def test_embed_sentences_in_order_equals_batches(fixture_model_dir):
    d = fixture_model_dir
    flat = [s for batch in _fixture_batches(d) for s in batch]
    embedder = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry")
    out = list(embedder.embed_sentences(flat, batch_size=3))
    assert len(out) == 30
    assert np.allclose(out[3 * 4 + 2][2], _expected(d, 2, 4), atol=1e-6)


def test_empty_sentence_and_empty_batch(fixture_model_dir):
    d = fixture_model_dir
    embedder = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5")
    assert embedder.embed_sentence([]).shape == (3, 0, 32)
    assert embedder.embed_batch([]) == []
    out = embedder.embed_batch([[], ["a"]])
    assert out[0].shape == (3, 0, 32) and out[1].shape == (3, 1, 32)


def test_bad_tokens(fixture_model_dir):
    d = fixture_model_dir
    embedder = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5")
    with pytest.raises(ElmoError, match="got a string"):
        embedder.embed_batch(["not tokenized"])
    out = embedder.embed_sentence(["x" * 10_000, "a\udc80b", "\udcff"])  # truncated / dropped
    assert out.shape == (3, 3, 32) and np.isfinite(out).all()
    with pytest.raises(ElmoError, match="state must be"):
        ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="bogus")
