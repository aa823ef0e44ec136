"""allennlp drop-in: `batch_to_ids` + `Elmo` (the tutorial idiom), ScalarMix's parameter layout,
allennlp's Elmo state_dict keys (both ways), ElmoEmbedder's 0.9 signature and
`batch_to_embeddings`, `embed_file` with an open file, sentence keys, forget_sentences, and
`elmo embed`'s allennlp options through cli_embed."""
import argparse
import io
import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from torch_elmo import (BiLM, Elmo, ElmoEmbedder, ElmoError, ScalarMix, batch_to_ids, load,
                        read_options)
from torch_elmo.cli.embed import cmd_embed as cli_embed

from test_embed import fixture_batches, fixture_top_layer

TOP = [-1e4, -1e4, 0.0]   # softmax -> exactly (0, 0, 1): the mix is layer 2


def _files(d):
    return d / "options.json", d / "lm_weights.hdf5"


# ------------------------------------------------------------------ batch_to_ids + Elmo
def test_tutorial_idiom_reproduces_the_fixture_with_carried_state(fixture_model_dir):
    d = fixture_model_dir
    elmo = Elmo(*_files(d), 1, dropout=0.0, scalar_mix_parameters=TOP, state="carry")
    for i, batch in enumerate(fixture_batches(d)):
        ids = batch_to_ids(batch)                                  # (3, T, 50), no <S>/</S>
        assert ids.shape == (3, max(map(len, batch)), 50)
        out = elmo(ids)
        rep, mask = out["elmo_representations"][0], out["mask"]
        assert rep.shape == (3, ids.shape[1], 32) and mask.shape == ids.shape[:2]
        assert mask.sum(1).tolist() == [len(s) for s in batch]
        for k in range(3):
            n = len(batch[k])
            assert np.allclose(rep[k, :n].detach().numpy(), fixture_top_layer(d, k, i),
                               atol=1e-6), (i, k)
            assert torch.all(rep[k, n:] == 0)


def test_every_ids_path_agrees(fixture_model_dir):
    d = fixture_model_dir
    batch = [["Nothing", "suits", "me"], ["A"]]
    ids = batch_to_ids(batch)
    elmo = Elmo(*_files(d), 1, dropout=0.0, scalar_mix_parameters=TOP, state="zero")
    emb = ElmoEmbedder(*_files(d), state="zero")
    hub = load(d, state="zero")
    a = elmo(ids)["elmo_representations"][0]
    assert torch.allclose(a, elmo(batch)["elmo_representations"][0], atol=1e-6)
    layers, mask = emb.batch_to_layers(ids)                        # boundaries added inside
    layers_tok, mask_tok = emb.batch_to_layers(batch)
    assert layers.shape == (3, 2, 5, 32) and torch.equal(mask, mask_tok)
    assert torch.allclose(layers, layers_tok, atol=1e-6)
    acts, m = emb.batch_to_embeddings(ids)
    assert torch.allclose(acts[:, 2], a, atol=1e-6) and m.tolist() == [[True] * 3, [True, False, False]]
    h_ids, h_tok = hub(ids), hub(tokens=batch)
    for key in h_tok:
        assert torch.allclose(h_ids[key].float(), h_tok[key].float(), atol=1e-6), key
    with pytest.raises(ElmoError, match="char ids"):
        elmo(torch.zeros(2, 3, 7, dtype=torch.long))


def test_elmo_positional_parameters_are_allennlps(fixture_model_dir):
    d = fixture_model_dir
    # allennlp: options, weights, num_output_representations, requires_grad, do_layer_norm,
    # dropout, vocab_to_cache, keep_sentence_boundaries, scalar_mix_parameters, module
    elmo = Elmo(*_files(d), 2, True, True, 0.25, None, True, [1.0, 2.0, 3.0])
    assert elmo.requires_grad and all(p.requires_grad for p in elmo.bilm.parameters())
    assert elmo.scalar_mix_0.do_layer_norm and elmo.dropout.p == 0.25
    assert elmo.keep_sentence_boundaries and elmo.get_output_dim() == 32
    assert [float(w) for w in elmo.scalar_mix_1.scalar_parameters] == [1.0, 2.0, 3.0]
    assert not any(p.requires_grad for mix in elmo.scalar_mixes for p in mix.parameters())
    with pytest.raises(ElmoError, match="not both"):
        Elmo(*_files(d), 1, module=elmo.bilm)
    shared = Elmo(None, None, 1, module=elmo.bilm)
    assert shared.bilm is elmo.bilm


def test_vocab_to_cache_word_inputs_match_the_char_cnn(fixture_model_dir):
    d = fixture_model_dir
    vocab = ["@@PADDING@@", "the", "cat", "sat", "a"]              # allennlp: index 0 = padding
    elmo = Elmo(*_files(d), 1, dropout=0.0, vocab_to_cache=vocab, state="zero")
    batch = [["the", "cat", "sat"], ["a", "cat"]]
    word_ids = torch.tensor([[1, 2, 3], [4, 2, 0]])
    chars = elmo(batch_to_ids(batch))
    cached = elmo(batch_to_ids(batch), word_ids)
    assert torch.equal(chars["mask"], cached["mask"])
    assert torch.allclose(chars["elmo_representations"][0], cached["elmo_representations"][0],
                          atol=1e-6)


# ------------------------------------------------------------------------------ ScalarMix
def test_scalar_mix_parameter_layout_is_allennlps():
    mix = ScalarMix(3)
    assert isinstance(mix.scalar_parameters, nn.ParameterList) and len(mix.scalar_parameters) == 3
    assert all(p.shape == (1,) for p in mix.scalar_parameters) and mix.gamma.shape == (1,)
    assert sorted(mix.state_dict()) == ["gamma", "scalar_parameters.0", "scalar_parameters.1",
                                        "scalar_parameters.2"]
    mix.scalar_parameters[1].data[0] = 2.0                         # allennlp tests do this
    mix.gamma.data[0] = 0.5
    layers = [torch.full((2, 3, 4), float(k)) for k in range(3)]
    s = np.exp([0.0, 2.0, 0.0]) / np.exp([0.0, 2.0, 0.0]).sum()
    assert torch.allclose(mix(layers), torch.full((2, 3, 4), 0.5 * float(s @ [0, 1, 2])))
    other = ScalarMix(3)
    other.load_state_dict({"scalar_parameters.0": torch.tensor([0.0]),
                           "scalar_parameters.1": torch.tensor([2.0]),
                           "scalar_parameters.2": torch.tensor([0.0]), "gamma": torch.tensor([0.5])})
    assert torch.equal(other(layers), mix(layers))
    fixed = ScalarMix(3, initial_scalar_parameters=[1, 2, 3], trainable=False)
    assert not any(p.requires_grad for p in fixed.parameters())
    assert all(p.requires_grad for p in ScalarMix(2).parameters())
    with pytest.raises(ElmoError, match="2 initial parameters for 3"):
        ScalarMix(3, initial_scalar_parameters=[1, 2])


# -------------------------------------------------------------- Elmo state_dict (allennlp)
def allennlp_state_from_hdf5(d) -> dict:
    """What allennlp's loaders make of a bilm-tf weight file, written here from its documented
    conventions: a zero padding row, conv (1, w, D, n) -> (n, D, w), highway [W_t^T; -W_c^T],
    LSTM W_0^T split in input / state parts with gates (i, j, f, o) -> (i, f, j, o) and the
    forget bias +1 inside the bias."""
    opts = read_options(d / "options.json")
    sd = {}
    te, lm = "_elmo_lstm._token_embedder.", "_elmo_lstm._elmo_lstm."
    with h5py.File(d / "lm_weights.hdf5") as f:
        a = lambda name: torch.from_numpy(np.asarray(f[name][...], dtype=np.float32))  # noqa: E731
        sd[te + "_char_embedding_weights"] = torch.cat([torch.zeros(1, 4), a("char_embed")])
        for i in range(len(opts.char_cnn.filters)):
            sd[te + f"char_conv_{i}.weight"] = a(f"CNN/W_cnn_{i}")[0].permute(2, 1, 0)
            sd[te + f"char_conv_{i}.bias"] = a(f"CNN/b_cnn_{i}")
        for k in range(opts.char_cnn.n_highway):
            h = f"CNN_high_{k}/"
            sd[te + f"_highways._layers.{k}.weight"] = torch.cat([a(h + "W_transform").T,
                                                                  -a(h + "W_carry").T])
            sd[te + f"_highways._layers.{k}.bias"] = torch.cat([a(h + "b_transform"),
                                                                -a(h + "b_carry")])
        sd[te + "_projection.weight"] = a("CNN_proj/W_proj").T
        sd[te + "_projection.bias"] = a("CNN_proj/b_proj")
        H, P = opts.lstm.dim, opts.lstm.projection_dim
        perm = torch.cat([torch.arange(0, H), torch.arange(2 * H, 3 * H),
                          torch.arange(H, 2 * H), torch.arange(3 * H, 4 * H)])
        for d_, name in enumerate(("forward", "backward")):
            for l in range(opts.lstm.n_layers):
                c = f"RNN_{d_}/RNN/MultiRNNCell/Cell{l}/LSTMCell/"
                w = a(c + "W_0").T[perm]                            # (4H, P + P)
                b = a(c + "B").clone()
                b[2 * H:3 * H] += 1.0
                x = lm + f"{name}_layer_{l}."
                sd[x + "input_linearity.weight"] = w[:, :P]
                sd[x + "state_linearity.weight"] = w[:, P:]
                sd[x + "state_linearity.bias"] = b[perm]
                sd[x + "state_projection.weight"] = a(c + "W_P_0").T
    return sd


def test_elmo_state_dict_has_allennlps_keys_and_values(fixture_model_dir):
    d = fixture_model_dir
    elmo = Elmo(*_files(d), 2)
    sd = elmo.state_dict()
    want = allennlp_state_from_hdf5(d)
    mixes = [f"scalar_mix_{k}.{p}" for k in range(2)
             for p in ("gamma", "scalar_parameters.0", "scalar_parameters.1", "scalar_parameters.2")]
    assert list(sd) == list(want) + mixes                          # biLM first, then the mixes
    for key, value in want.items():
        assert sd[key].shape == value.shape, key
        assert torch.allclose(sd[key], value, atol=1e-6), key
    assert sd["_elmo_lstm._token_embedder._char_embedding_weights"].shape == (262, 4)
    assert torch.all(sd["_elmo_lstm._token_embedder._char_embedding_weights"][0] == 0)


def test_allennlp_checkpoint_loads_into_our_elmo(fixture_model_dir):
    d = fixture_model_dir
    reference = Elmo(*_files(d), 1, dropout=0.0, state="zero")
    torch.manual_seed(0)
    blank = Elmo(None, None, 1, dropout=0.0, state="zero",
                 module=BiLM(read_options(d / "options.json")).eval())
    theirs = allennlp_state_from_hdf5(d)
    theirs.update({"scalar_mix_0.scalar_parameters.0": torch.tensor([0.3]),
                   "scalar_mix_0.scalar_parameters.1": torch.tensor([-0.2]),
                   "scalar_mix_0.scalar_parameters.2": torch.tensor([0.1]),
                   "scalar_mix_0.gamma": torch.tensor([1.5])})
    result = blank.load_state_dict(theirs)                         # strict
    assert not result.missing_keys and not result.unexpected_keys
    reference.scalar_mix_0.load_state_dict({k[len("scalar_mix_0."):]: v for k, v in theirs.items()
                                            if k.startswith("scalar_mix_0.")})
    for (n, p), q in zip(reference.bilm.state_dict().items(), blank.bilm.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), n
    batch = [["the", "cat", "sat"], ["a"]]
    assert torch.allclose(blank(batch)["elmo_representations"][0],
                          reference(batch)["elmo_representations"][0], atol=1e-5)
    # nested, as in an allennlp model's checkpoint; our own `bilm.*` keys load too
    wrapper = nn.Module()
    wrapper._elmo = Elmo(None, None, 1, module=BiLM(read_options(d / "options.json")))
    wrapper.load_state_dict({"_elmo." + k: v for k, v in theirs.items()})
    assert torch.allclose(wrapper._elmo.bilm.char_cnn.char_embed, reference.bilm.char_cnn.char_embed)
    native = {"bilm." + k: v for k, v in reference.bilm.state_dict().items()}
    native.update({k: v for k, v in theirs.items() if k.startswith("scalar_mix_0.")})
    assert not blank.load_state_dict(native).missing_keys
    # an incomplete checkpoint is reported by torch's own strict check
    del theirs["_elmo_lstm._elmo_lstm.backward_layer_1.state_projection.weight"]
    with pytest.raises(RuntimeError, match="backward_layers.1.proj_weight"):
        blank.load_state_dict(theirs)


def test_elmo_state_dict_round_trip_is_exact_in_outputs(fixture_model_dir):
    d = fixture_model_dir
    a = Elmo(*_files(d), 1, dropout=0.0, state="zero", requires_grad=True)
    with torch.no_grad():
        a.scalar_mix_0.scalar_parameters[2].fill_(1.0)
    b = Elmo(None, None, 1, dropout=0.0, state="zero",
             module=BiLM(read_options(d / "options.json")).eval())
    b.load_state_dict(a.state_dict())
    for (n, p), q in zip(a.bilm.state_dict().items(), b.bilm.state_dict().values()):
        assert torch.equal(p, q) or (n.endswith(".bias") and "_layers." in n), n  # b + 1 - 1
    x = batch_to_ids([["round", "trip"]])
    with torch.no_grad():                                          # same code path for both
        assert torch.equal(a(x)["elmo_representations"][0], b(x)["elmo_representations"][0])


# -------------------------------------------------------------------------- ElmoEmbedder
def test_embedder_allennlp_signature(fixture_model_dir):
    d = fixture_model_dir
    cpu = ElmoEmbedder(str(d / "options.json"), str(d / "lm_weights.hdf5"), -1)
    assert cpu.device == torch.device("cpu") and cpu.cuda_device == -1
    assert ElmoEmbedder(*_files(d), -1, state="zero", device="cpu").state == "zero"
    with pytest.raises(ElmoError, match="cuda_device"):
        ElmoEmbedder(*_files(d), "zero")
    with pytest.raises(ElmoError, match="disagree"):
        ElmoEmbedder(*_files(d), 0, device="cpu")
    assert cpu.embed_batch([[]])[0].shape == (3, 0, 32)


def test_batch_to_embeddings_carry_reproduces_the_fixture(fixture_model_dir):
    d = fixture_model_dir
    emb = ElmoEmbedder(*_files(d), -1, state="carry")
    for i, batch in enumerate(fixture_batches(d)):
        acts, mask = emb.batch_to_embeddings(batch)
        T = max(map(len, batch))
        assert acts.shape == (3, 3, T, 32) and mask.shape == (3, T) and mask.dtype == torch.bool
        for k in range(3):
            n = len(batch[k])
            assert int(mask[k].sum()) == n
            assert np.allclose(acts[k, 2, :n].numpy(), fixture_top_layer(d, k, i), atol=1e-6)
            assert torch.all(acts[k, :, n:] == 0)


# --------------------------------------------------------------------------- embed_file
def _lines(path):
    with h5py.File(path) as f:
        return {k: f[k][...] for k in f}


def test_embed_file_takes_an_open_file_in_allennlps_order(fixture_model_dir, tmp_path):
    d = fixture_model_dir
    lines = ["the cat sat", "a dog", "the cat sat"]
    emb = ElmoEmbedder(*_files(d), state="zero")
    with open(tmp_path / "in.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(tmp_path / "in.txt") as f:                          # text file object
        assert emb.embed_file(f, str(tmp_path / "a.hdf5"), "top", 2) == 3
        assert not f.closed
    data = _lines(tmp_path / "a.hdf5")
    assert json.loads(data.pop("sentence_to_index")[0]) == {"the cat sat": "2", "a dog": "1"}
    for i, line in enumerate(lines):
        assert np.allclose(data[str(i)], emb.embed_sentence(line.split())[2], atol=1e-6)
    # binary file object, allennlp's keyword names, forget_sentences
    emb.embed_file(io.BytesIO("\n".join(lines).encode()), output_file_path=tmp_path / "b.hdf5",
                   output_format="average", forget_sentences=True)
    data = _lines(tmp_path / "b.hdf5")
    assert sorted(data) == ["0", "1", "2"] and data["1"].shape == (2, 32)
    with pytest.raises(ElmoError, match="not both"):
        emb.embed_file(io.StringIO("a"), tmp_path / "c.hdf5", output_file_path=tmp_path / "d")


def test_sentence_keys(fixture_model_dir, tmp_path):
    d = fixture_model_dir
    emb = ElmoEmbedder(*_files(d), state="zero")
    emb.embed_file(io.StringIO("the cat sat\n a / b  \n"), tmp_path / "k.hdf5",
                   use_sentence_keys=True)
    with h5py.File(tmp_path / "k.hdf5") as f:
        assert "sentence_to_index" not in f
        assert f["the cat sat"].shape == (3, 3, 32) and f["a / b"].shape == (3, 3, 32)
        assert np.allclose(f["the cat sat"][...], emb.embed_sentence("the cat sat".split()),
                           atol=1e-6)
    with pytest.raises(ElmoError, match="lines 1 and 3 are the same sentence"):
        emb.embed_file(io.StringIO("a b\nc\na b\n"), tmp_path / "x.hdf5", use_sentence_keys=True)
    with pytest.raises(ElmoError, match="line 2: empty"):
        emb.embed_file(io.StringIO("a b\n\n"), tmp_path / "x.hdf5", use_sentence_keys=True)
    assert not (tmp_path / "x.hdf5").exists()


# ------------------------------------------------------------------------------ elmo embed
def _args(**kw):
    base = dict(model=None, input=None, output=None, layers="all", batch_size=4, state="zero",
                dtype="float32", max_tokens=1000, device="cpu", progress=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_embed_allennlp_options(fixture_model_dir, tmp_path, capsys):
    d = fixture_model_dir
    (tmp_path / "in.txt").write_text("the cat sat\na dog\n")
    out = tmp_path / "out.hdf5"
    assert cli_embed(_args(options_file=str(d / "options.json"), weight_file=str(d / "lm_weights.hdf5"),
                           input=str(tmp_path / "in.txt"), output=str(out),
                           use_sentence_keys=True)) == 0
    assert sorted(_lines(out)) == ["a dog", "the cat sat"]
    assert cli_embed(_args(model=str(d), input=str(tmp_path / "in.txt"), output=str(out),
                           forget_sentences=True)) == 0
    assert sorted(_lines(out)) == ["0", "1"]
    assert cli_embed(_args(model=str(d), input=str(tmp_path / "in.txt"), output=str(out))) == 0
    assert "sentence_to_index" in _lines(out)                    # args without the new flags
    with pytest.raises(ElmoError, match="not both"):
        cli_embed(_args(model=str(d), options_file="o", weight_file="w"))
    with pytest.raises(ElmoError, match="both --options-file and --weight-file"):
        cli_embed(_args(options_file=str(d / "options.json")))
