"""load() / the TF-Hub-style call, Elmo + ScalarMix, state modes, the token-embedding cache."""
import json

import h5py
import numpy as np
import pytest
import torch

from torch_elmo import (Elmo, ElmoEmbedder, ElmoError, ScalarMix, TokenEmbeddingCache,
                        batch_to_ids, dump_token_embeddings, load, load_bilm)
from torch_elmo.embed import DEFAULT_STATE, STATE_MODES, warm_state
from torch_elmo.export import save_weights

from test_embed import _expected, _fixture_batches


@pytest.fixture
def bilm(fixture_model_dir):
    d = fixture_model_dir
    return load_bilm(d / "options.json", d / "lm_weights.hdf5")


def _fixture_sentences(d):
    return [s for batch in _fixture_batches(d) for s in batch]


# ------------------------------------------------------------------------------ TF-Hub call
def test_hub_call_shapes_default_and_zero_padding(fixture_model_dir):
    elmo = load(fixture_model_dir)
    assert elmo.state == DEFAULT_STATE
    out = elmo(["Nothing suits me like suit", "A b", ""])
    n, P = 5, 16
    assert out["elmo"].shape == (3, n, 2 * P)
    assert out["default"].shape == (3, 2 * P)
    assert out["word_emb"].shape == (3, n, P)
    assert out["lstm_outputs1"].shape == out["lstm_outputs2"].shape == (3, n, 2 * P)
    assert out["sequence_len"].tolist() == [5, 2, 0]
    mask = torch.arange(n)[None] < out["sequence_len"][:, None]
    for key in ("elmo", "word_emb", "lstm_outputs1", "lstm_outputs2"):
        assert torch.all(out[key][~mask] == 0), key             # padding exactly zero
        assert torch.all(out[key][0].abs().sum(-1) > 0), key    # real tokens are not
    want = (out["elmo"] * mask[..., None]).sum(1) / out["sequence_len"].clamp(min=1)[:, None]
    assert torch.allclose(out["default"], want, atol=1e-6)
    assert torch.all(out["default"][2] == 0)                     # empty sentence: zeros
    # elmo = gamma * softmax(w) . layers, w = 0: the plain mean at the start
    layers = [out["word_emb"].repeat(1, 1, 2), out["lstm_outputs1"], out["lstm_outputs2"]]
    assert torch.allclose(out["elmo"], sum(layers) / 3, atol=1e-6)
    assert elmo(["A b"], as_dict=False).shape == (1, 2 * P)


def test_hub_layer_norm_uses_real_tokens_only(fixture_model_dir):
    elmo = load(fixture_model_dir, state="zero", do_layer_norm=True)
    out = elmo(["Nothing suits me like suit", "A b"])
    mask = out["mask"]
    assert torch.all(out["elmo"][~mask] == 0)
    layers = [out["word_emb"].repeat(1, 1, 2), out["lstm_outputs1"], out["lstm_outputs2"]]
    want = 0
    for x in layers:
        vals = x[mask]                                          # (n_real, 2P)
        want = want + (x - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-12) / 3
    assert torch.allclose(out["elmo"][mask], want[mask], atol=1e-5)


def test_hub_call_forms_agree(fixture_model_dir):
    elmo = load(fixture_model_dir, state="zero")
    a = elmo(["the cat sat", "a dog"])
    b = elmo(tokens=[["the", "cat", "sat"], ["a", "dog"]])
    c = elmo(inputs={"tokens": [["the", "cat", "sat"], ["a", "dog", ""]], "sequence_len": [3, 2]},
             signature="tokens", as_dict=True)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
        assert torch.allclose(a[k].float(), c[k].float(), atol=1e-6), k
    with pytest.raises(ElmoError, match="one string"):
        elmo("the cat sat")
    with pytest.raises(ElmoError, match="either"):
        elmo()


def test_hub_mix_is_trainable_and_bilm_frozen(fixture_model_dir):
    elmo = load(fixture_model_dir)
    out = elmo(["the cat sat"])
    out["elmo"].sum().backward()
    assert elmo.scalar_mix.scalar_parameters.grad is not None
    assert elmo.scalar_mix.gamma.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in elmo.bilm.parameters())


# ------------------------------------------------------------------------------ state modes
def test_zero_and_warm_are_batch_independent(fixture_model_dir):
    sents = _fixture_sentences(fixture_model_dir)
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


# ------------------------------------------------------------------------------------- Elmo
def test_elmo_module_matches_embedder_layers(fixture_model_dir):
    d = fixture_model_dir
    batch = [["The", "first", "sentence", "."], ["Second", "."], []]
    for state in ("carry", "warm"):
        elmo = Elmo(d / "options.json", d / "lm_weights.hdf5", 2, dropout=0.0, state=state,
                    scalar_mix_parameters=[0.0, 0.0, 0.0])
        emb = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state=state)
        ids = batch_to_ids(batch, add_boundaries=False)          # allennlp: no boundaries
        assert ids.shape == (3, 4, 50)
        out = elmo(ids)
        want = emb.embed_batch(batch)
        assert out["mask"].tolist() == [[True] * 4, [True, True, False, False], [False] * 4]
        for k, s in enumerate(batch):
            mean = want[k].mean(axis=0)
            for rep in out["elmo_representations"]:
                assert rep.shape == (3, 4, 32)
                assert np.allclose(rep[k, :len(s)].detach().numpy(), mean, atol=1e-6)
                assert torch.all(rep[k, len(s):] == 0)
    # token lists are accepted too; more leading dims are kept
    elmo = Elmo(d / "options.json", d / "lm_weights.hdf5", 1, dropout=0.0, state="zero")
    a = elmo(batch)["elmo_representations"][0]
    b = elmo(batch_to_ids(batch, add_boundaries=False)[None])["elmo_representations"][0]
    assert b.shape == (1, 3, 4, 32) and torch.allclose(a, b[0], atol=1e-6)
    kept = Elmo(d / "options.json", d / "lm_weights.hdf5", 1, keep_sentence_boundaries=True,
                dropout=0.0, state="zero")(batch)
    assert kept["elmo_representations"][0].shape == (3, 6, 32)
    assert kept["mask"].sum(1).tolist() == [6, 4, 2]
    assert torch.all(kept["elmo_representations"][0][1, 4:] == 0)


def test_elmo_fine_tune_and_save(fixture_model_dir, tmp_path):
    d = fixture_model_dir
    elmo = Elmo(d / "options.json", d / "lm_weights.hdf5", 1, requires_grad=True, state="warm")
    elmo.train()
    assert not elmo.bilm.training                     # no dropout inside the biLM
    opt = torch.optim.SGD(elmo.parameters(), lr=0.1)
    out = elmo([["fine", "tune", "me"]])["elmo_representations"][0]
    out.pow(2).sum().backward()
    grads = [p.grad for p in elmo.bilm.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    before = elmo.bilm.char_cnn.char_embed.detach().clone()
    opt.step()
    assert not torch.equal(before, elmo.bilm.char_cnn.char_embed)
    elmo.save_weights(tmp_path / "weights.hdf5")
    again = load_bilm(d / "options.json", tmp_path / "weights.hdf5")
    for (n, p), (_, q) in zip(elmo.bilm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    frozen = Elmo(d / "options.json", d / "lm_weights.hdf5", 1)
    assert not any(p.requires_grad for p in frozen.bilm.parameters())
    assert all(p.requires_grad for p in frozen.scalar_mixes.parameters())
    fixed = Elmo(d / "options.json", d / "lm_weights.hdf5", 1, scalar_mix_parameters=[1, 2, 3])
    assert not any(p.requires_grad for p in fixed.scalar_mixes.parameters())


def test_scalar_mix_layer_norm_and_penalty():
    torch.manual_seed(0)
    layers = [torch.randn(2, 4, 3) * (k + 1) + k for k in range(3)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    mix = ScalarMix(3, do_layer_norm=True, initial_scalar_parameters=[0.5, -1.0, 2.0])
    got = mix(layers, mask)
    s = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
    want = 0
    for w, x in zip(s, layers):
        vals = x.numpy()[mask.numpy()]                      # unmasked elements, all dims
        want = want + w * (x.numpy() - vals.mean()) / np.sqrt(vals.var() + 1e-12)
    assert np.allclose(got.detach().numpy(), want, atol=1e-5)
    plain = ScalarMix(3)
    assert torch.allclose(plain(layers), sum(layers) / 3)
    penalty = ScalarMix(3, initial_scalar_parameters=[1, 2, 0]).l2_penalty(0.001)
    assert float(penalty.detach()) == pytest.approx(0.005)
    with pytest.raises(ElmoError, match="got 2 layers"):
        plain(layers[:2])


# --------------------------------------------------------------------------- token cache
def test_token_cache_path_equals_character_path(fixture_model_dir, tmp_path):
    d = fixture_model_dir
    batches = _fixture_batches(d)
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
            assert np.allclose(a[k][2], _expected(d, k, i), atol=1e-6)
    with pytest.raises(ElmoError, match="not in the cache"):
        cache.token_ids([["zzz-unknown"]])
    grow = TokenEmbeddingCache(bilm, ["the"])                    # unknown tokens are added
    x = ElmoEmbedder(model=bilm, state="zero", token_cache=grow).embed_sentence(["a", "zzz"])
    y = ElmoEmbedder(model=bilm, state="zero").embed_sentence(["a", "zzz"])
    assert np.allclose(x, y, atol=1e-6) and "zzz" in grow.index


def test_load_errors_are_one_line(tmp_path, fixture_model_dir):
    with pytest.raises(ElmoError, match="not a pretrained name"):
        load(tmp_path / "nowhere")
    (tmp_path / "m").mkdir()
    with pytest.raises(ElmoError, match="no options.json"):
        load(tmp_path / "m")
    (tmp_path / "m" / "options.json").write_bytes((fixture_model_dir / "options.json").read_bytes())
    (tmp_path / "m" / "weights.hdf5.tmp").write_bytes(b"\x89HDF")
    with pytest.raises(ElmoError, match=r"no weights.hdf5 \(found weights.hdf5.tmp"):
        load(tmp_path / "m")
    data = (fixture_model_dir / "lm_weights.hdf5").read_bytes()
    (tmp_path / "m" / "weights.hdf5").write_bytes(data[:len(data) // 2])
    with pytest.raises(ElmoError, match="truncated") as e:
        load(tmp_path / "m")
    assert "\n" not in str(e.value)
    (tmp_path / "m" / "options.json").write_text('{"lstm": {"dim": 64,')
    with pytest.raises(ElmoError, match="not valid JSON"):
        load(tmp_path / "m")
