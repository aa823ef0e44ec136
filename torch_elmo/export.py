"""Export: the bilm-tf weight file and options.json, in both directions (docs/formats.md).

This is the only module that knows the HDF5 dataset names, the TF kernel layouts (x @ W, conv
kernels (1, w, D, n)) and the TF LSTM gate order i, j, f, o. Everything else in torch_elmo sees
PyTorch layout (model.py). The forget bias is not stored (TF adds it at run time; so do we).

    load_bilm(options_file, weight_file) -> BiLM        read released / bilm-tf / our files
    save_weights(model, path)                          write the dump_weights layout (atomic)
    save_safetensors(model, path)                      the same arrays as weights.safetensors
    export_model(model, out_dir, safetensors=False)    options.json (inference form) + weights.hdf5
                                                       (+ weights.safetensors)

weights.safetensors holds exactly the HDF5 file's datasets: the dataset names are its keys and the
arrays are the same float32 TF-layout arrays, so either file loads bit for bit the same model;
`load_weights` reads a path ending in `.safetensors` as one. The `safetensors` package is needed
only for that format (`pip install 'torch-elmo[hub]'`).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Iterator

import h5py
import numpy as np
import torch

from .config import ElmoError, read_options, write_options
from .errors import quote
from .model import BiLM
from .outputs import atomic_path, check_free_space

# Datasets of the model's own structure: one in the file that the options do not use means the
# options describe another model (fewer highway layers, filters or LSTM layers).
_STRUCTURAL = re.compile(r"^(char_embed|CNN/[Wb]_cnn_\d+|CNN_high_\d+/.*|CNN_proj/.*|RNN_\d+/.*)$")

# TF LSTMCell column blocks are (i, j, f, o); ours are (i, f, j, o). The permutation is its own
# inverse, so the same index converts both ways.
_GATE_PERM = (0, 2, 1, 3)


def _cell_prefix(d: int, l: int, n_layers: int) -> str:
    # With one layer TF has no MultiRNNCell level (allennlp cannot load that; we can).
    if n_layers == 1:
        return f"RNN_{d}/RNN/LSTMCell"
    return f"RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell"


def _swap_gates(a: np.ndarray, axis: int) -> np.ndarray:
    blocks = np.split(a, 4, axis=axis)
    return np.concatenate([blocks[k] for k in _GATE_PERM], axis=axis)


def _tf_arrays(model: BiLM) -> Iterator[tuple[str, np.ndarray, torch.Tensor, callable]]:
    """(dataset name, TF-layout array of the current value, target parameter, tf->torch fn)."""
    def np_(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().float().numpy()

    cnn = model.char_cnn
    yield "char_embed", np_(cnn.char_embed), cnn.char_embed, lambda a: a
    for i, conv in enumerate(cnn.convs):
        # torch Conv1d (n, D, w) <-> TF conv2d kernel (1, w, D, n)
        yield (f"CNN/W_cnn_{i}", np_(conv.weight).transpose(2, 1, 0)[None], conv.weight,
               lambda a: a[0].transpose(2, 1, 0))
        yield f"CNN/b_cnn_{i}", np_(conv.bias), conv.bias, lambda a: a
    for k, hw in enumerate(cnn.highways):
        for name, lin in (("carry", hw.carry), ("transform", hw.transform)):
            yield f"CNN_high_{k}/W_{name}", np_(lin.weight).T, lin.weight, lambda a: a.T
            yield f"CNN_high_{k}/b_{name}", np_(lin.bias), lin.bias, lambda a: a
    if cnn.projection is not None:
        yield "CNN_proj/W_proj", np_(cnn.projection.weight).T, cnn.projection.weight, lambda a: a.T
        yield "CNN_proj/b_proj", np_(cnn.projection.bias), cnn.projection.bias, lambda a: a
    for d, layers in enumerate(model.directions):
        for l, cell in enumerate(layers):
            prefix = _cell_prefix(d, l, model.n_layers)
            n_in = cell.input_weight.shape[1]
            # W_0 (in + P, 4H): rows [x; h_prev], columns gates i, j, f, o
            w0 = np.concatenate([np_(cell.input_weight), np_(cell.state_weight)], axis=1).T
            yield f"{prefix}/W_0", _swap_gates(w0, axis=1), cell.input_weight, \
                lambda a, n=n_in: _swap_gates(a, axis=1).T[:, :n]
            yield f"{prefix}/W_0", _swap_gates(w0, axis=1), cell.state_weight, \
                lambda a, n=n_in: _swap_gates(a, axis=1).T[:, n:]
            yield f"{prefix}/B", _swap_gates(np_(cell.bias), axis=0), cell.bias, \
                lambda a: _swap_gates(a, axis=0)
            yield f"{prefix}/W_P_0", np_(cell.proj_weight).T, cell.proj_weight, lambda a: a.T


def _fill(model: BiLM, path: str, lookup, present: list[str]) -> BiLM:
    """Copy every array of the name table into `model`. `lookup(name)` -> None when the file has
    no such entry, else (shape, read) with read() -> the float32 array; `present`: every entry
    name of the file. NaN/inf values are refused; a structural entry the options do not use
    means the options belong to another model."""
    used = set()
    with torch.no_grad():
        for name, expected, param, to_torch in _tf_arrays(model):
            used.add(name)
            entry = lookup(name)
            if entry is None:
                raise ElmoError(f"{path}: missing dataset '{name}' (the options expect it)")
            shape, read = entry
            if shape != expected.shape:
                raise ElmoError(f"{path}: dataset '{name}' has shape {shape} but the "
                                f"options imply {expected.shape}")
            value = read()
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                raise ElmoError(f"{path}: dataset '{name}' holds {bad} NaN/inf value(s); the "
                                f"weights are broken (a diverged run?)")
            param.copy_(torch.from_numpy(np.ascontiguousarray(to_torch(value))))
    unused = sorted(set(present) - used)
    structural = [n for n in unused if _STRUCTURAL.match(n)]
    if structural:
        more = f" (and {len(structural) - 3} more)" if len(structural) > 3 else ""
        raise ElmoError(f"{path}: dataset(s) {', '.join(structural[:3])}{more} are not used by "
                        f"the options (n_highway {model.options.char_cnn.n_highway}, "
                        f"{len(model.options.char_cnn.filters)} filter banks, "
                        f"{model.n_layers} LSTM layers): these options belong to another model")
    if unused:
        warnings.warn(f"{path}: ignoring dataset(s) {', '.join(unused[:5])} (not model weights)",
                      stacklevel=3)
    return model


def load_weights(model: BiLM, weight_file: str | os.PathLike) -> BiLM:
    """Fill `model` from a bilm-tf weights.hdf5 (or a weights.safetensors, by its suffix). Errors
    name the file, the dataset and both shapes; a truncated or non-HDF5 file gives one line, not
    an h5py trace."""
    path = os.fspath(weight_file)
    if path.endswith(".safetensors"):
        return load_safetensors(model, path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise ElmoError(f"{path}: weight file not found") from None
    except OSError as e:
        raise ElmoError(f"{path}: cannot read as HDF5 (truncated or not an HDF5 file): "
                        f"{quote(e)}") from None

    def lookup(name: str):
        if name not in f:
            return None
        ds = f[name]
        if not isinstance(ds, h5py.Dataset):
            raise ElmoError(f"{path}: '{name}' is a group, expected a dataset")

        def read() -> np.ndarray:
            try:
                return np.asarray(ds[...], dtype=np.float32)
            except (OSError, RuntimeError, KeyError) as e:
                raise ElmoError(f"{path}: cannot read dataset '{name}' (truncated file?): "
                                f"{quote(e)}") from None
        return tuple(ds.shape), read

    with f:
        present: list[str] = []
        f.visititems(lambda n, obj: present.append(n) if isinstance(obj, h5py.Dataset) else None)
        return _fill(model, path, lookup, present)


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ElmoError("weights.safetensors needs the safetensors package: "
                        "pip install 'torch-elmo[hub]'") from None
    return safetensors


def load_safetensors(model: BiLM, weight_file: str | os.PathLike) -> BiLM:
    """Fill `model` from a weights.safetensors written by `save_safetensors` (keys = the HDF5
    dataset names). A truncated or foreign file gives one line."""
    st = _safetensors()
    path = os.fspath(weight_file)
    try:
        f = st.safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise ElmoError(f"{path}: weight file not found") from None
    except Exception as e:  # SafetensorError: a bad header, a truncated file
        raise ElmoError(f"{path}: cannot read as safetensors (truncated or not a safetensors "
                        f"file): {quote(e)}") from None
    with f:
        keys = set(f.keys())

        def lookup(name: str):
            if name not in keys:
                return None
            return (tuple(f.get_slice(name).get_shape()),
                    lambda: np.asarray(f.get_tensor(name), dtype=np.float32))
        return _fill(model, path, lookup, sorted(keys))


def save_weights(model: BiLM, weight_file: str | os.PathLike) -> None:
    """Write the dump_weights layout: float32 datasets, no softmax, no optimizer slots.
    Written to a temp file and renamed, so an interrupted save never leaves a half file."""
    path = os.fspath(weight_file)
    arrays = {}
    for name, value, _, _ in _tf_arrays(model):
        arrays.setdefault(name, value.astype(np.float32))  # W_0 comes once per parameter it feeds
    # HDF5 on a full disk can crash the process instead of raising: refuse before writing
    check_free_space(path, sum(a.nbytes for a in arrays.values()) + (1 << 20), "weights")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, value in arrays.items():
                f.create_dataset(name, data=value)


def load_bilm(options_file: str | os.PathLike, weight_file: str | os.PathLike) -> BiLM:
    options = read_options(options_file)
    model = BiLM(options)
    load_weights(model, weight_file)
    return model.eval()


def save_safetensors(model: BiLM, weight_file: str | os.PathLike) -> None:
    """The arrays `save_weights` writes, as one safetensors file keyed by the same dataset names
    (temp file + rename, like the HDF5)."""
    st = _safetensors()
    path = os.fspath(weight_file)
    arrays: dict[str, np.ndarray] = {}
    for name, value, _, _ in _tf_arrays(model):
        arrays.setdefault(name, np.ascontiguousarray(value, dtype=np.float32))
    check_free_space(path, sum(a.nbytes for a in arrays.values()) + (1 << 20), "weights")
    with atomic_path(path) as tmp:
        st.numpy.save_file(arrays, tmp, metadata={"format": "bilm-tf"})


def export_model(model: BiLM, out_dir: str | os.PathLike, safetensors: bool = False,
                 weight_name: str = "weights.hdf5") -> tuple[str, str]:
    """out_dir/options.json (inference form, n_characters 262) + out_dir/weights.hdf5 (or
    `weight_name`: bilm-tf's dump_weights.py names its file), and with `safetensors=True` also
    out_dir/weights.safetensors (the same arrays)."""
    os.makedirs(out_dir, exist_ok=True)
    options_file = os.path.join(out_dir, "options.json")
    weight_file = os.path.join(out_dir, weight_name)
    save_weights(model, weight_file)
    if safetensors:
        save_safetensors(model, os.path.join(out_dir, "weights.safetensors"))
    write_options(model.options, options_file, inference=True)
    return options_file, weight_file
