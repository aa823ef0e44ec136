"""token_cache.py: bilm-tf's dump_token_embeddings file, the cached path against the character
path and the fixture, growing caches, unknown tokens."""
import h5py
import numpy as np
import pytest

from test_embed import fixture_batches, fixture_top_layer
from torch_elmo import (ElmoEmbedder, ElmoError, TokenEmbeddingCache, dump_token_embeddings,
                        load_bilm)


def test_token_cache_path_equals_character_path(fixture_model_dir, tmp_path):
    d = fixture_model_dir
    batches = fixture_batches(d)
    vocab = sorted({t for b in batches for s in b for t in s})
    (tmp_path / "vocab.txt").write_text("\n".join(["<S>", "</S>", *vocab]) + "\n")
    dump_token_embeddings(tmp_path / "vocab.txt", d / "options.json", d / "lm_weights.hdf5",
                          tmp_path / "tokens.hdf5")
    with h5py.File(tmp_path / "tokens.hdf5") as f:
        assert f["embedding"].shape == (len(vocab) + 2, 16)
    bilm = load_bilm(d / "options.json", d / "lm_weights.hdf5")
    cache = TokenEmbeddingCache.load(bilm, tmp_path / "tokens.hdf5", grow=False)
    ids = cache.token_ids([vocab[:2], vocab[2:3]])            # line index + 1, 0 = padding
    assert ids.tolist() == [[1, 3, 4, 2], [1, 5, 2, 0]]
    tok = ElmoEmbedder(model=bilm, state="carry", token_cache=cache, max_batch_size=4)
    char = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry")
    for i, batch in enumerate(batches):
        a, b = tok.embed_batch(batch), char.embed_batch(batch)
        for k in range(3):
            assert np.allclose(a[k], b[k], atol=1e-6), (i, k, np.abs(a[k] - b[k]).max())
            assert np.allclose(a[k][2], fixture_top_layer(d, k, i), atol=1e-6)
    with pytest.raises(ElmoError, match="not in the cache"):
        cache.token_ids([["zzz-unknown"]])
    grow = TokenEmbeddingCache(bilm, ["the"])                    # unknown tokens are added
    x = ElmoEmbedder(model=bilm, state="zero", token_cache=grow).embed_sentence(["a", "zzz"])
    y = ElmoEmbedder(model=bilm, state="zero").embed_sentence(["a", "zzz"])
    assert np.allclose(x, y, atol=1e-6) and "zzz" in grow.index
