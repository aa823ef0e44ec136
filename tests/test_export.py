import h5py
import numpy as np
import pytest
import torch

from torch_elmo import BiLM, ElmoError, batch_to_ids, export_model, load_bilm, load_weights, preset
from torch_elmo.export import save_weights


def _datasets(path):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, (o.shape, o.dtype, o[...]))
                     if isinstance(o, h5py.Dataset) else None)
    return out


def test_fixture_file_round_trip_is_byte_exact(fixture_model_dir, tmp_path):
    src = fixture_model_dir / "lm_weights.hdf5"
    model = load_bilm(fixture_model_dir / "options.json", src)
    save_weights(model, tmp_path / "w.hdf5")
    a, b = _datasets(src), _datasets(tmp_path / "w.hdf5")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][0] == b[name][0] and b[name][1] == np.float32, name
        assert np.array_equal(a[name][2], b[name][2]), name
    assert a["char_embed"][0] == (261, 4)


def test_load_save_load_identical_tensors_and_outputs(tiny_model, tmp_path):
    opts, weights = export_model(tiny_model, tmp_path / "m")
    again = load_bilm(opts, weights)
    for (n1, p1), (n2, p2) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = batch_to_ids([["a", "round", "trip"], ["ok"]], add_boundaries=True)
    with torch.no_grad():
        for x, y in zip(tiny_model(ids)["layers"], again(ids)["layers"]):
            assert torch.equal(x, y)


def test_tf_gate_order_and_forget_bias_not_stored(tiny_model, tmp_path):
    save_weights(tiny_model, tmp_path / "w.hdf5")
    H = tiny_model.hidden_dim
    with torch.no_grad():
        tiny_model.forward_layers[0].bias.copy_(torch.arange(4 * H, dtype=torch.float32))
    save_weights(tiny_model, tmp_path / "w.hdf5")
    with h5py.File(tmp_path / "w.hdf5") as f:
        B = f["RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/B"][...]
    # ours i,f,j,o -> TF i,j,f,o, and no +1.0 folded in
    assert B[:H].tolist() == list(range(H))
    assert B[H:2 * H].tolist() == list(range(2 * H, 3 * H))
    assert B[2 * H:3 * H].tolist() == list(range(H, 2 * H))


def test_shape_mismatch_names_dataset_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    save_weights(BiLM(preset("tiny")), tmp_path / "w.hdf5")
    other = preset("tiny")
    other.lstm.dim = 32
    with pytest.raises(ElmoError, match=r"w\.hdf5: dataset 'RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/"
                                        r"W_0' has shape \(32, 256\) but the options imply \(32, 128\)"):
        load_weights(BiLM(other), tmp_path / "w.hdf5")


def test_missing_dataset_and_truncated_file(tiny_model, tmp_path):
    path = tmp_path / "w.hdf5"
    save_weights(tiny_model, path)
    with h5py.File(path, "a") as f:
        del f["CNN_proj/W_proj"]
    with pytest.raises(ElmoError, match="missing dataset 'CNN_proj/W_proj'"):
        load_weights(BiLM(preset("tiny")), path)
    save_weights(tiny_model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ElmoError, match=r"w\.hdf5: cannot read"):
        load_weights(BiLM(preset("tiny")), path)
    with pytest.raises(ElmoError, match="not found"):
        load_weights(BiLM(preset("tiny")), tmp_path / "nope.hdf5")


def test_export_writes_inference_options(tiny_model, tmp_path):
    import json
    opts, _ = export_model(tiny_model, tmp_path / "m")
    d = json.loads(open(opts).read())
    assert set(d) == {"lstm", "char_cnn"} and d["char_cnn"]["n_characters"] == 262


def test_weights_of_another_model_or_nan_are_named(tmp_path):
    import h5py
    import pytest
    from torch_elmo import BiLM, ElmoError, export_model, load_bilm, preset
    two = preset("tiny")
    two.char_cnn.n_highway = 2
    opts, weights = export_model(BiLM(two), tmp_path / "two")
    export_model(BiLM(preset("tiny")), tmp_path / "one")          # n_highway 1
    with pytest.raises(ElmoError, match=r"CNN_high_1/.* not used by the options \(n_highway 1"):
        load_bilm(tmp_path / "one" / "options.json", weights)
    with h5py.File(weights, "a") as f:
        f["CNN_proj/b_proj"][0] = float("nan")
    with pytest.raises(ElmoError, match=r"'CNN_proj/b_proj' holds 1 NaN/inf value"):
        load_bilm(opts, weights)


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tiny_model):
    import os
    import pytest
    from torch_elmo import ElmoError, export_model
    from torch_elmo.config import preset
    from torch_elmo.model import BiLM
    opts = preset("tiny")
    opts.lstm.dim, opts.lstm.projection_dim = 256, 64           # ~1 MB of weights > 256 KB disk
    with pytest.raises(ElmoError, match=r"weights\.hdf5: not enough disk space for the weights"):
        export_model(BiLM(opts), small_disk / "model")
    assert os.listdir(small_disk / "model") == []
