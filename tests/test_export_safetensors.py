"""weights.safetensors: the HDF5 file's datasets under the same names, loading bit for bit alike."""
import sys

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

from torch_elmo import (BiLM, ElmoError, batch_to_ids, export_model, load, load_bilm,  # noqa: E402
                        load_weights, preset)
from torch_elmo.export import save_safetensors  # noqa: E402


def test_keys_and_arrays_are_the_hdf5_datasets(tiny_model, tmp_path):
    export_model(tiny_model, tmp_path, safetensors=True)
    tensors = load_file(tmp_path / "weights.safetensors")
    with h5py.File(tmp_path / "weights.hdf5") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(tensors) == sorted(names)
        for name in names:
            assert tensors[name].dtype == np.float32 and tensors[name].shape == f[name].shape
            assert np.array_equal(tensors[name], f[name][...]), name


def test_round_trip_equals_the_hdf5_load_bit_for_bit(fixture_model_dir, tmp_path):
    model = load_bilm(fixture_model_dir / "options.json", fixture_model_dir / "lm_weights.hdf5")
    save_safetensors(model, tmp_path / "w.safetensors")
    again = load_bilm(fixture_model_dir / "options.json", tmp_path / "w.safetensors")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = batch_to_ids([["a", "round", "trip"], ["ok"]])
    with torch.no_grad():
        for x, y in zip(model(ids)["layers"], again(ids)["layers"]):
            assert torch.equal(x, y)


def test_a_dir_with_only_safetensors_loads(tiny_model, tmp_path):
    export_model(tiny_model, tmp_path / "both", safetensors=True)
    only = tmp_path / "only"
    only.mkdir()
    for name in ("options.json", "weights.safetensors"):
        (only / name).write_bytes((tmp_path / "both" / name).read_bytes())
    a = load(tmp_path / "both", state="zero").embed_sentence(["a", "b", "c"])
    b = load(only, state="zero").embed_sentence(["a", "b", "c"])
    assert np.array_equal(a, b)
    from torch_elmo.hub import resolve_model
    assert resolve_model(only)[1].endswith("weights.safetensors")
    assert resolve_model(tmp_path / "both")[1].endswith("weights.hdf5")  # the HDF5 when both


def test_mismatch_errors_are_one_line(tiny_model, tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(tiny_model, path)
    other = BiLM(preset("tiny"))
    arrays = load_file(path)
    name = "CNN_proj/W_proj"
    arrays[name] = np.zeros((3, 3), np.float32)
    save_file(arrays, tmp_path / "bad.safetensors")
    with pytest.raises(ElmoError, match=r"dataset 'CNN_proj/W_proj' has shape \(3, 3\)") as e:
        load_weights(BiLM(tiny_model.options), tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)
    del arrays[name]
    save_file(arrays, tmp_path / "missing.safetensors")
    with pytest.raises(ElmoError, match="missing dataset 'CNN_proj/W_proj'") as e:
        load_weights(BiLM(tiny_model.options), tmp_path / "missing.safetensors")
    assert "\n" not in str(e.value)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ElmoError, match="truncated or not a safetensors file") as e:
        load_weights(other, tmp_path / "cut.safetensors")
    assert "\n" not in str(e.value)
    with pytest.raises(ElmoError, match="weight file not found"):
        load_weights(other, tmp_path / "nowhere.safetensors")


def test_missing_package_is_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ElmoError, match=r"pip install 'torch-elmo\[hub\]'") as e:
        export_model(tiny_model, tmp_path, safetensors=True)
    assert "\n" not in str(e.value)
