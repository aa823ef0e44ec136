"""embed.py: ElmoEmbedder against the bilm-tf fixture, the inference states, length-sorted
batching, token windows and embed_file's atomic output."""
import json

import h5py
import numpy as np
import pytest
import torch

from torch_elmo import ElmoEmbedder, ElmoError, load, load_bilm
from torch_elmo.embed import (STATE_MODES, embed_file, length_sorted_batches, token_windows,
                              warm_state)


def fixture_batches(d):
    S = json.loads((d / "lm_embeddings_sentences.json").read_text())
    return [[S[k][i].strip().split() for k in range(3)] for i in range(10)]


def fixture_top_layer(d, k, i):
    with h5py.File(d / f"lm_embeddings_{k}.hdf5") as f:
        e = f[str(i)][...]
    return np.concatenate([e[0], e[1]], axis=-1)  # (n, 2P): forward | backward top layer


def test_stateful_top_layer_matches_bilm_tf_fixture(fixture_model_dir):
    d = fixture_model_dir
    embedder = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry",
                            max_batch_size=4)
    for i, batch in enumerate(fixture_batches(d)):
        out = embedder.embed_batch(batch)
        for k in range(3):
            want = fixture_top_layer(d, k, i)
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
    batches = fixture_batches(d)
    fresh = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry")
    out = fresh.embed_batch(batches[1])
    assert not np.allclose(out[0][2], fixture_top_layer(d, 0, 1), atol=1e-6)


def test_embed_sentences_in_order_equals_batches(fixture_model_dir):
    d = fixture_model_dir
    flat = [s for batch in fixture_batches(d) for s in batch]
    embedder = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="carry")
    out = list(embedder.embed_sentences(flat, batch_size=3))
    assert len(out) == 30
    assert np.allclose(out[3 * 4 + 2][2], fixture_top_layer(d, 2, 4), atol=1e-6)


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


def fixture_sentences(d):
    return [s for batch in fixture_batches(d) for s in batch]


@pytest.fixture
def bilm(fixture_model_dir):
    d = fixture_model_dir
    return load_bilm(d / "options.json", d / "lm_weights.hdf5")


# ------------------------------------------------------------------------------ state modes
def test_zero_and_warm_are_batch_independent(fixture_model_dir):
    sents = fixture_sentences(fixture_model_dir)
    target = ["Nothing", "suits", "me", "like", "suit"]
    longer = [sents[k % 30] + sents[(k + 7) % 30] for k in range(32)]   # 32 longer sentences
    assert min(map(len, longer)) > len(target)
    for state in ("zero", "warm"):
        elmo = load(fixture_model_dir, state=state)
        alone = elmo.embed_sentence(target)
        for row in (0, 17, 32):
            batch = longer[:row] + [target] + longer[row:]
            got = elmo.embed_batch(batch)[row]
            assert np.allclose(got, alone, atol=1e-5), (state, row)
        # the hub call too, after other calls ran
        again = elmo(tokens=[target])["lstm_outputs2"][0].detach().numpy()
        assert np.allclose(again, alone[2], atol=1e-5)


def test_carry_depends_on_history_and_warm_differs_from_zero(fixture_model_dir):
    target = ["Nothing", "suits", "me", "like", "suit"]
    carry = load(fixture_model_dir, state="carry")
    first = carry.embed_sentence(target)
    assert not np.allclose(carry.embed_sentence(target), first, atol=1e-3)
    zero = load(fixture_model_dir, state="zero").embed_sentence(target)
    warm = load(fixture_model_dir, state="warm").embed_sentence(target)
    assert np.allclose(first, zero, atol=1e-6)       # first carry call starts from zeros
    assert np.array_equal(warm[0], zero[0])          # layer 0 is context-free
    assert not np.allclose(warm[1:], zero[1:], atol=1e-3)
    with pytest.raises(ElmoError, match="state must be"):
        load(fixture_model_dir, state="hot")
    assert STATE_MODES == ("carry", "zero", "warm")


def test_warm_state_is_deterministic_and_follows_the_weights(bilm):
    c1, h1 = warm_state(bilm)
    c2, h2 = warm_state(bilm)
    assert torch.equal(c1, c2) and torch.equal(h1, h2)
    assert c1.shape == (2, 2, 1, 64) and h1.shape == (2, 2, 1, 16)
    emb = ElmoEmbedder(model=bilm, state="warm")
    before = emb.embed_sentence(["a", "b"])
    with torch.no_grad():
        bilm.forward_layers[0].bias.add_(0.1)       # in place, as an optimizer step does
    after = emb.embed_sentence(["a", "b"])
    c3, _ = emb.states.read(1)
    assert torch.allclose(c3, warm_state(bilm)[0]) and not torch.allclose(c3, c1)
    assert not np.allclose(before[1], after[1])


# --------------------------------------------------------------------------- token cache
# ------------------------------------------------------------------- batching and files
def test_length_sorted_batches_cover_every_index_shortest_first():
    lengths = [5, 1, 3, 1, 0, 7, 3]
    batches = list(length_sorted_batches(lengths, 3))
    assert batches == [[4, 1, 3], [2, 6, 0], [5]]           # stable for equal lengths
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert list(length_sorted_batches([], 4)) == []


def test_length_sorted_batches_with_a_token_budget():
    lengths = [5, 1, 3, 1, 0, 7, 3, 20]
    batches = list(length_sorted_batches(lengths, 100, max_tokens=8))
    # rows x longest <= 8 (an empty row counts 1); the 20-token row alone, over the budget
    assert batches == [[4, 1, 3], [2, 6], [0], [5], [7]]
    assert list(length_sorted_batches(lengths, 2, max_tokens=100)) == \
        list(length_sorted_batches(lengths, 2))                           # the count cap holds


def test_token_windows_tile_and_overlap():
    assert token_windows(10, None) == [(0, 10, 0, 10)]
    assert token_windows(10, 10) == [(0, 10, 0, 10)]
    for n, w in [(11, 10), (5000, 1000), (37, 8), (9, 4), (7, 1), (100, 3)]:
        wins = token_windows(n, w)
        kept = [i for _, _, a, b in wins for i in range(a, b)]
        assert kept == list(range(n)), (n, w)                     # exact tiling
        m = w // 4
        for start, end, a, b in wins:
            assert end - start <= w and start <= a < b <= end
            assert a - start >= m or start == 0                    # context on the left
            assert end - b >= m or end == n                        # and on the right


def test_interrupted_embedding_leaves_no_output(fixture_model_dir, tmp_path, monkeypatch):
    d = fixture_model_dir
    (tmp_path / "in.txt").write_text("a b\nc d\ne f\n")
    out = tmp_path / "out.hdf5"
    out.write_bytes(b"previous result")
    emb = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state="zero")
    calls = []

    def boom(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ElmoEmbedder.embed_batch(emb, batch)

    monkeypatch.setattr(emb, "embed_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        embed_file(emb, tmp_path / "in.txt", out, batch_size=1)
    assert out.read_bytes() == b"previous result"                   # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.hdf5"]
    with pytest.raises(ElmoError, match="layers must be"):
        embed_file(emb, tmp_path / "in.txt", out, layers="middle")


def test_embed_output_follows_the_umask_and_stale_temporaries_go(tmp_path, tiny_model):
    import os
    import subprocess
    import sys
    from torch_elmo import ElmoEmbedder
    inp = tmp_path / "in.txt"
    inp.write_text("a b\nc\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.hdf5.{dead}.x1.tmp"           # left by a killed embed
    stale.write_bytes(b"x" * 1000)
    old = os.umask(0o022)
    try:
        ElmoEmbedder(model=tiny_model).embed_file(str(inp), str(tmp_path / "out.hdf5"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.hdf5").stat().st_mode & 0o777 == 0o644
    assert not stale.exists()
