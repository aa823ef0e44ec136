"""Checkpoints and run directories: what a training run saves, how it continues, what it starts from.

`save_dir/checkpoint.pt` holds everything needed to continue bit for bit: model, softmax,
optimizer, carried LSTM states, every RNG, the data-stream position and the counters (the key list
is in docs/formats.md); it loads with torch.load(weights_only=True) and is written atomically.
This module also owns the checks that a resumed run continues the checkpointed one (options,
vocabulary, seed, files), the vocabulary check of `elmo test`, and `--init-from` (a run
directory, an exported model directory or a weights.hdf5).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

from .config import N_CHARACTERS_TRAIN, ElmoError, Options, read_options
from .errors import quote, short_path
from .export import export_model, load_weights
from .lm import LanguageModel
from .model import BiLM
from .outputs import atomic_path, write_error
from .vocab import Vocabulary

CHECKPOINT = "checkpoint.pt"
OPTIONS = "options.json"
CHECKPOINT_FORMAT = 1

# Options keys that change the trajectory of a run: --resume refuses if any differs. n_epochs and
# n_train_tokens only decide when to stop, so a resumed run may extend them (bilm-tf restart.py).
STOPPING_KEYS = ("n_epochs", "n_train_tokens")
LOCK = ".elmo-train.lock"


def lock_run_dir(save_dir: str):
    """Hold `save_dir/.elmo-train.lock` (an flock, released when the process ends, also when it is
    killed) for the life of a run; a second run into the same directory is refused at once."""
    os.makedirs(save_dir, exist_ok=True)
    f = open(os.path.join(save_dir, LOCK), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ElmoError(f"--save-dir {save_dir} is in use by another `elmo train` ({holder}); "
                        f"wait for it to finish or choose another --save-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def vocab_fingerprint(vocab: Vocabulary) -> str:
    return hashlib.sha1("\n".join(vocab.tokens).encode("utf-8")).hexdigest()


def same_vocabulary(ckpt: dict, vocab: Vocabulary) -> bool:
    """Is `vocab` the one the checkpointed model was trained with (size and tokens)?"""
    v = ckpt["vocab"]
    return int(v["size"]) == len(vocab) and v["sha1"] == vocab_fingerprint(vocab)


def training_options_dict(options: Options) -> dict:
    """options.json in bilm-tf's training form (n_characters 261, training keys included)."""
    d = options.to_dict()
    d["char_cnn"]["n_characters"] = N_CHARACTERS_TRAIN
    return d


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
           "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    n = d["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = d["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temp file, fsync, rename over `path`: a kill at any moment leaves either the old
    or the new checkpoint, never half of one; a full disk is one line and leaves the old one."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except RuntimeError as e:   # torch's writer reports ENOSPC as a RuntimeError
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            if "write failed" in str(e) or free < (1 << 20):
                raise write_error(path, OSError(28, f"write failed, {free / 1e6:.1f} MB free on "
                                                    f"the disk")) from None
            raise
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise ElmoError(f"{path}: no checkpoint found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated / foreign file
        raise ElmoError(f"{path}: cannot read checkpoint ({type(e).__name__}: "
                        f"{quote(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ElmoError(f"{path}: not a torch_elmo training checkpoint")
    return ckpt


def checkpoint_options(ckpt: dict, source: str = "checkpoint") -> Options:
    return Options.from_dict(json.loads(ckpt["options"]), source=source)


def load_language_model(save_dir: str, device="cpu") -> tuple[LanguageModel, dict]:
    """The LanguageModel (BiLM + softmax) of a run directory's checkpoint, in eval mode."""
    ckpt = load_checkpoint(save_dir)
    options = checkpoint_options(ckpt, os.path.join(save_dir, CHECKPOINT))
    lm = LanguageModel(options, int(ckpt["vocab"]["size"]))
    load_model_state(lm, ckpt["model"], ckpt["softmax"])
    return lm.to(device).eval(), ckpt


def load_model_state(lm: LanguageModel, bilm_state: dict, softmax: Optional[dict]) -> None:
    """Copy a saved biLM state_dict and (unless None) softmax {"W", "b"} into `lm`."""
    lm.bilm.load_state_dict(bilm_state)
    if softmax is not None:
        with torch.no_grad():
            lm.softmax_W.copy_(softmax["W"])
            lm.softmax_b.copy_(softmax["b"])


def differing_keys(a: dict, b: dict, prefix: str = "", skip: tuple = ()) -> list[tuple]:
    """(dotted key, value in a, value in b) for every leaf that differs; top-level `skip` keys
    left out."""
    out = []
    for k in sorted(set(a) | set(b)):
        if not prefix and k in skip:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((f"{prefix}{k}", va, vb))
    return out


def options_diff(a: dict, b: dict) -> list[str]:
    """What differs between the options now (a) and the checkpoint's (b), for --resume; the
    stopping keys may change and n_gpus is the world size."""
    return [f"{k} ({vb!r} in the checkpoint, {va!r} now)"
            for k, va, vb in differing_keys(a, b, skip=(*STOPPING_KEYS, "n_gpus"))]


def check_resume_compatible(ckpt: dict, options: Options, vocab: Vocabulary, seed: int,
                            train_files: list[str], world_size: int, path: str) -> None:
    """One-line refusal when a resumed run would not continue the checkpointed one."""
    if not same_vocabulary(ckpt, vocab):
        v = ckpt["vocab"]
        raise ElmoError(f"--resume: vocabulary {vocab.source} ({len(vocab)} tokens) differs from "
                        f"the checkpoint's ({v['path']}, {v['size']} tokens)")
    saved = training_options_dict(checkpoint_options(ckpt, path))   # keys added since: defaults
    diff = options_diff(training_options_dict(options), saved)
    if diff:
        raise ElmoError(f"--resume: options differ from {path}: {'; '.join(diff)}")
    run = ckpt["run"]
    if int(run["seed"]) != seed:
        raise ElmoError(f"--resume: --seed {seed} differs from the checkpoint's {run['seed']}")
    now, then = [os.path.abspath(f) for f in train_files], list(run["train_files"])
    if now != then:
        i = next((k for k, (a, b) in enumerate(zip(now, then)) if a != b),
                 min(len(now), len(then)))   # or where the shorter list ends

        def file_at(files):
            return short_path(files[i]) if i < len(files) else "none"
        raise ElmoError(f"--resume: the --train files differ from the checkpoint's at file "
                        f"{i + 1} of {len(now)} now ({len(then)} then): {file_at(now)} now, "
                        f"{file_at(then)} then; give --train the checkpoint's files, or drop "
                        f"--resume and start a new run from these weights: --init-from "
                        f"{short_path(os.path.dirname(os.path.abspath(path)))} --save-dir NEW_DIR")
    # a different world size is allowed: train() re-shards the data and says so


def resolve_init_from(path: str) -> tuple[Options, dict, Optional[dict], Optional[dict]]:
    """--init-from: (architecture options, BiLM state_dict, softmax or None, vocab info or None).

    Accepts a run directory (its checkpoint.pt), an exported model directory (options.json +
    weights.hdf5) or the path of a weights.hdf5 (options.json beside it)."""
    ckpt_path = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
    if os.path.isfile(ckpt_path) and ckpt_path.endswith(".pt"):
        ckpt = load_checkpoint(ckpt_path)
        return (checkpoint_options(ckpt, ckpt_path), ckpt["model"], ckpt["softmax"], ckpt["vocab"])
    if os.path.isdir(path):
        weights = os.path.join(path, "weights.hdf5")
        if not os.path.exists(weights):
            raise ElmoError(f"--init-from {path}: neither {CHECKPOINT} nor weights.hdf5 found there")
    elif os.path.isfile(path):
        weights = path
    else:
        raise ElmoError(f"--init-from {path}: no such file or directory")
    options_file = os.path.join(os.path.dirname(os.path.abspath(weights)), "options.json")
    options = read_options(options_file)
    bilm = BiLM(options)
    load_weights(bilm, weights)
    return options, bilm.state_dict(), None, None


def same_architecture(a: Options, b: Options) -> bool:
    da, db = a.to_dict(inference=True), b.to_dict(inference=True)
    return da == db and a.bidirectional == b.bidirectional


def architecture_mismatch(path: str, source: Options, run: Options, shown: int = 4) -> str:
    """The one-line refusal of --init-from `path` whose model (`source`) is not the run's
    architecture: the differing options with both values, and the two ways out."""
    diff = differing_keys({**source.to_dict(inference=True), "bidirectional": source.bidirectional},
                          {**run.to_dict(inference=True), "bidirectional": run.bidirectional})
    listed = ", ".join(f"{k} {quote(repr(va), 30)} vs {quote(repr(vb), 30)}"
                       for k, va, vb in diff[:shown])
    more = f" (and {len(diff) - shown} more)" if len(diff) > shown else ""
    where = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return (f"--init-from {path}: the model's architecture differs from this run's options: "
            f"{listed}{more} (the model's vs this run's); use --options "
            f"{short_path(os.path.join(where, OPTIONS))}, or leave out --preset / --options to "
            f"train with the model's own")


def export_run(save_dir: str | os.PathLike, out_dir: str | os.PathLike,
               safetensors: bool = False, weight_name: str = "weights.hdf5") -> tuple[str, str]:
    """A training run's biLM -> out_dir/options.json (inference form) + weights.hdf5 (or
    `weight_name`; and weights.safetensors with `safetensors`)."""
    path = os.path.join(save_dir, CHECKPOINT)
    ckpt = load_checkpoint(path)
    model = BiLM(checkpoint_options(ckpt, path))
    model.load_state_dict(ckpt["model"])
    return export_model(model, out_dir, safetensors=safetensors, weight_name=weight_name)

