"""modules.py: load() and the TF-Hub-style call (ElmoModel), Elmo (allennlp) and ScalarMix."""
import numpy as np
import pytest
import torch

from torch_elmo import Elmo, ElmoEmbedder, ElmoError, ScalarMix, batch_to_ids, load, load_bilm
from torch_elmo.embed import DEFAULT_STATE


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
    elmo = load(fixture_model_dir).train()       # load() is in eval mode: plain tensors out
    out = elmo(["the cat sat"])
    out["elmo"].sum().backward()
    assert all(w.grad is not None for w in elmo.scalar_mix.scalar_parameters)
    assert elmo.scalar_mix.gamma.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in elmo.bilm.parameters())


# ------------------------------------------------------------------------------------- Elmo
def test_elmo_module_matches_embedder_layers(fixture_model_dir):
    d = fixture_model_dir
    batch = [["The", "first", "sentence", "."], ["Second", "."], []]
    for state in ("carry", "warm"):
        elmo = Elmo(d / "options.json", d / "lm_weights.hdf5", 2, dropout=0.0, state=state,
                    scalar_mix_parameters=[0.0, 0.0, 0.0])
        emb = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state=state)
        ids = batch_to_ids(batch)                                # allennlp: no boundaries
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
    b = elmo(batch_to_ids(batch)[None])["elmo_representations"][0]
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
    assert all(p.requires_grad for mix in frozen.scalar_mixes for p in mix.parameters())
    fixed = Elmo(d / "options.json", d / "lm_weights.hdf5", 1, scalar_mix_parameters=[1, 2, 3])
    assert not any(p.requires_grad for mix in fixed.scalar_mixes for p in mix.parameters())


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


# ------------------------------------------------------------------------------------- load
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


def test_hub_outputs_are_plain_tensors_unless_training(tmp_path, tiny_model):
    import torch_elmo
    from torch_elmo import export_model
    export_model(tiny_model, tmp_path / "m")
    m = torch_elmo.load(tmp_path / "m")
    out = m(["a b c"])
    out["elmo"].numpy()                                     # no "requires grad" error
    assert not any(v.requires_grad for v in out.values() if torch.is_tensor(v))
    m.train()                                               # training the scalar mix
    assert m(["a b c"])["elmo"].requires_grad


def test_cuda_requests_without_cuda_are_one_line(tmp_path, tiny_model):
    import pytest
    import torch_elmo
    from torch_elmo import ElmoEmbedder, ElmoError, export_model
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    export_model(tiny_model, tmp_path / "m")
    with pytest.raises(ElmoError, match=r"^device= cuda: CUDA is not available on this machine"):
        torch_elmo.load(tmp_path / "m", device="cuda")
    with pytest.raises(ElmoError, match=r"CUDA is not available"):
        ElmoEmbedder(str(tmp_path / "m"), device="cuda")
    with pytest.raises(ElmoError, match=r"^cuda_device cuda:0: CUDA is not available"):
        ElmoEmbedder(str(tmp_path / "m"), None, 0)


def test_encode_like_sentence_transformers(tmp_path, tiny_model):
    import numpy as np
    import torch_elmo
    from torch_elmo import ElmoEmbedder, export_model
    export_model(tiny_model, tmp_path / "m")
    m = torch_elmo.load(tmp_path / "m")
    texts = ["a much longer sentence than the others", "hi", "", "the cat sat"]
    v = m.encode(texts, batch_size=2)
    assert v.shape == (4, m.output_dim) and v.dtype == np.float32
    assert not v[2].any()                                    # empty sentence: zeros
    ref = ElmoEmbedder(str(tmp_path / "m")).embed_sentence("the cat sat".split())
    np.testing.assert_allclose(v[3], ref.mean(axis=0).mean(axis=0), atol=1e-6)   # order kept
    np.testing.assert_array_equal(v, m.encode(texts[::-1], batch_size=3)[::-1])   # deterministic
    top = m.encode("the cat sat", layers="top", pooling="max", convert_to_numpy=False)
    assert torch.is_tensor(top) and top.shape == (m.output_dim,)
    np.testing.assert_allclose(top.numpy(), ref[2].max(axis=0), atol=1e-6)
    unit = m.encode(texts[:2], normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    import pytest
    with pytest.raises(torch_elmo.ElmoError, match="pooling"):
        m.encode(texts, pooling="cls")
