"""The biLM (model.py): against an independent numpy forward pass of the bilm-tf architecture,
reading the TF-layout weights that export.save_weights writes; parameter counts of the presets;
the entry points' contracts (masks, empty batches, token-embedding input)."""
import h5py
import numpy as np
import pytest
import torch

from torch_elmo import BiLM, batch_to_ids, preset, save_weights
from reference import reference_lstm
from torch_elmo.model import count_parameters

SENTENCES = [["The", "plane", "took", "off", "."], ["A", "flat", "plane"], [], ["x"] * 9]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_elmo(w, options, ids):
    """Independent reference: TF layouts (x @ W, gates i, j, f, o), zero initial state."""
    cnn, lstm = options.char_cnn, options.lstm
    table = np.concatenate([np.zeros((1, w["char_embed"].shape[1])), w["char_embed"]])
    B, T, C = ids.shape
    emb = table[ids]                                            # (B, T, C, D)
    feats = []
    for i, (width, n) in enumerate(cnn.filters):
        k, b = w[f"CNN/W_cnn_{i}"][0], w[f"CNN/b_cnn_{i}"]      # (w, D, n)
        conv = np.stack([np.einsum("btkd,kdn->btn", emb[:, :, s:s + width], k)
                         for s in range(C - width + 1)], axis=2) + b
        feats.append(np.maximum(conv.max(axis=2), 0))
    x = np.concatenate(feats, axis=-1)
    for k in range(cnn.n_highway):
        g = _sigmoid(x @ w[f"CNN_high_{k}/W_carry"] + w[f"CNN_high_{k}/b_carry"])
        x = g * np.maximum(x @ w[f"CNN_high_{k}/W_transform"] + w[f"CNN_high_{k}/b_transform"], 0) \
            + (1 - g) * x
    token = x @ w["CNN_proj/W_proj"] + w["CNN_proj/b_proj"]
    lengths = (ids > 0).any(-1).sum(1)
    H, P = lstm.dim, lstm.projection_dim
    layers = [np.concatenate([token, token], -1) * (ids > 0).any(-1)[..., None]]
    outs = {}
    for d in range(2):
        for b in range(B):
            L = lengths[b]
            order = range(L) if d == 0 else range(L - 1, -1, -1)
            inp = token[b]
            for l in range(lstm.n_layers):
                pre = f"RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/"
                W, Bi, WP = w[pre + "W_0"], w[pre + "B"], w[pre + "W_P_0"]
                c, h = np.zeros(H), np.zeros(P)
                out = np.zeros((T, P))
                for t in order:
                    z = np.concatenate([inp[t], h]) @ W + Bi
                    i, j, f, o = np.split(z, 4)
                    c = np.clip(_sigmoid(f + 1.0) * c + _sigmoid(i) * np.tanh(j), -3, 3)
                    h = np.clip((_sigmoid(o) * np.tanh(c)) @ WP, -3, 3)
                    out[t] = h
                if l > 0 and lstm.use_skip_connections:
                    out[:L] += inp[:L]
                outs[d, l, b] = out
                inp = out
    for l in range(lstm.n_layers):
        layers.append(np.concatenate([np.stack([outs[0, l, b] for b in range(B)]),
                                      np.stack([outs[1, l, b] for b in range(B)])], -1))
    return layers


@pytest.mark.parametrize("skip", [True, False])
def test_matches_independent_numpy_forward(tmp_path, skip):
    options = preset("tiny")
    options.lstm.use_skip_connections = skip
    options.char_cnn.n_highway = 2
    torch.manual_seed(0)
    model = BiLM(options).eval()
    with torch.no_grad():  # non-zero biases so that every term is exercised
        for lstm in list(model.forward_layers) + list(model.backward_layers):
            lstm.bias.normal_(0, 0.5)
    save_weights(model, tmp_path / "w.hdf5")
    with h5py.File(tmp_path / "w.hdf5") as f:
        w = {}
        f.visititems(lambda n, o: w.__setitem__(n, o[...].astype(np.float64))
                     if isinstance(o, h5py.Dataset) else None)
    ids = batch_to_ids(SENTENCES, add_boundaries=True)
    with torch.no_grad():
        got = model(ids)["layers"]
    want = _numpy_elmo(w, options, ids.numpy())
    for l in range(3):
        np.testing.assert_allclose(got[l].numpy(), want[l], atol=1e-5, rtol=0)
    if skip:  # the residual really changes the top layer
        options.lstm.use_skip_connections = False
        assert np.abs(_numpy_elmo(w, options, ids.numpy())[2] - want[2]).max() > 1e-3


@pytest.mark.parametrize("name,count", [("original", 93_600_848), ("medium", 28_027_728),
                                        ("small", 13_593_296)])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = BiLM(preset(name))
    assert count_parameters(model) == count


def test_token_representation_is_position_independent(tiny_model):
    """Fixture README section B: a token encodes the same alone or in a sentence, and an explicit
    <S> / </S> token equals the automatically added boundary."""
    with torch.no_grad():
        sent = tiny_model(batch_to_ids([["a", "plane", "flies"]],
                                       add_boundaries=True))["token_embedding"][0]
        alone = tiny_model(batch_to_ids([["plane"]], add_boundaries=True))["token_embedding"][0]
        bos = tiny_model(batch_to_ids([["<S>"]], add_boundaries=True))["token_embedding"][0]
        eos = tiny_model(batch_to_ids([["</S>"]], add_boundaries=True))["token_embedding"][0]
    torch.testing.assert_close(sent[2], alone[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(bos[1], bos[0], rtol=0, atol=0)
    torch.testing.assert_close(eos[1], eos[2], rtol=0, atol=0)


def test_padding_positions_are_zero_and_rows_independent(tiny_model):
    with torch.no_grad():
        both = tiny_model(batch_to_ids([["a", "b", "c", "d"], ["e"]], add_boundaries=True))
        alone = tiny_model(batch_to_ids([["e"]], add_boundaries=True))
    for l in range(3):
        assert both["layers"][l][1, 3:].abs().max() == 0
        torch.testing.assert_close(both["layers"][l][1, :3], alone["layers"][l][0], atol=1e-6, rtol=0)


def test_empty_batch_and_token_embedding_input(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.zeros(0, 2, 50, dtype=torch.long))
        assert out["layers"][2].shape == (0, 2, 32) and out["state"][0].shape == (2, 2, 0, 64)
        ids = batch_to_ids(SENTENCES, add_boundaries=True)
        want = tiny_model(ids)
        token = tiny_model.char_cnn(ids)
        got = tiny_model(token_embedding=token, mask=(ids > 0).any(-1))
    for a, b in zip([got["token_embedding"], *got["layers"], *got["state"]],
                    [want["token_embedding"], *want["layers"], *want["state"]]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(got["mask"], want["mask"])


def test_lstmp_forward_prefix_and_non_prefix_masks(tiny_model):
    cell = tiny_model.forward_layers[0]
    with torch.no_grad():
        cell.bias.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    x = torch.randn(B, T, tiny_model.proj_dim, generator=g)
    c = torch.randn(B, tiny_model.hidden_dim, generator=g)
    h = torch.randn(B, tiny_model.proj_dim, generator=g)
    lengths = torch.tensor([6, 2, 0, 5])
    valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.no_grad():
        got = cell(x, valid, c, h)
        want = reference_lstm(cell, x, lengths, c, h)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        holes = valid.clone()
        holes[0, 2] = False  # not a prefix: position 2 of row 0 is skipped
        y, c1, h1 = cell(x, holes, c, h)
        assert y[0, 2].abs().max() == 0 and y[0, 3].abs().max() > 0
        # row 0 equals the row with position 2 removed; the other rows are unchanged
        keep = [0, 1, 3, 4, 5]
        y0, c0, h0 = reference_lstm(cell, x[:1, keep], torch.tensor([5]), c[:1], h[:1])
        torch.testing.assert_close(y[:1, keep], y0, atol=1e-5, rtol=0)
        torch.testing.assert_close(c1[:1], c0, atol=1e-5, rtol=0)
        torch.testing.assert_close(h1[:1], h0, atol=1e-5, rtol=0)
        for a, b in zip((y, c1, h1), got):
            torch.testing.assert_close(a[1:], b[1:], atol=0, rtol=0)


def test_run_direction_empty_batch_with_grad(tiny_model):
    model = tiny_model.train()
    x = torch.zeros(0, 4, model.proj_dim, requires_grad=True)
    c0, h0 = (s[0] for s in model.zero_state(0))
    outs, c, h = model.run_direction(0, x, torch.ones(0, 4, dtype=torch.bool), c0, h0)
    assert outs[-1].shape == (0, 4, model.proj_dim) and c.shape == (2, 0, model.hidden_dim)
    (outs[-1].sum() + c.sum()).backward()
