"""The saved task model directory (`elmo ner --save DIR`, `elmo classify --save DIR`,
`torch_elmo.load_task(DIR)`): its layout, its task.json, writing it atomically and checking it
when it is read.

    DIR/task.json          what the model is (below) and the sha256 of every other file
    DIR/head.safetensors   the BiLSTM models' tensors (BiLSTM-CRF tagger, BiLSTM classifier)
    DIR/words.json         their word vocabulary (a JSON list; id = position)
    DIR/sklearn.skops      logreg / mlp: the fitted scikit-learn parts, through skops.io
    DIR/elmo/              the biLM that computed the features: options.json + weights.hdf5
                           (export_model of the embedder's model; absent for --no-elmo and
                           --features tfidf)

task.json: `format` ("torch-elmo-task"), `format_version`, `torch_elmo_version`, `kind` ("ner" or
"classify"), `model` (bilstm-crf, bilstm, logreg, mlp), `features`, `labels` (in the order of the
model's outputs), `elmo` (the biLM's directory, inference state, layers / pooling / scalar mix,
the dtype the layers were rounded to in training), `words` (vocabulary file and normalisation,
casing classes), `head` (the head's sizes), `training` (the command and its options, the kept
epoch, the scores) and `files` (name -> sha256). A reader refuses a newer format version, a file
missing or changed since it was written, and a directory that is not a saved task model, each in
one line. The directory is written with outputs.atomic_dir: a failure leaves no half directory
and keeps an existing one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import ElmoError
from ..hub import sha256_file
from ..outputs import atomic_dir, current_umask

FORMAT = "torch-elmo-task"
FORMAT_VERSION = 1
TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"
WORDS_FILE = "words.json"
SKLEARN_FILE = "sklearn.skops"
ELMO_DIR = "elmo"
KINDS = ("ner", "classify")


def torch_elmo_version() -> str:
    from .. import __version__
    return __version__


# --------------------------------------------------------------------------------------- writing
def check_save_dir(path: str | os.PathLike, flag: str = "--save",
                   inputs: Sequence[Optional[str | os.PathLike]] = ()) -> str:
    """Before training: `path` may be written as a saved task model directory. Its parent exists
    and is writable; it is not a file; it does not hold (or is not) one of the inputs; an
    existing directory is replaced only when it is empty or a saved task model itself."""
    path = os.fspath(path)
    full = os.path.realpath(path)
    parent = os.path.dirname(full)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ElmoError(f"{flag} {path} is a file, expected a directory (a saved task model)")
    for inp in inputs:
        if inp is None:
            continue
        where = os.path.realpath(os.fspath(inp))
        if where == full or where.startswith(full + os.sep):
            raise ElmoError(f"{flag} {path} holds the input {inp}; replacing it would destroy "
                            f"the input (choose another directory)")
    if not os.path.isdir(parent):
        raise ElmoError(f"{flag} {path}: directory {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ElmoError(f"{flag} {path}: directory {parent} is not writable")
    if (os.path.isdir(path) and os.listdir(path)
            and not os.path.isfile(os.path.join(path, TASK_FILE))):
        raise ElmoError(f"{flag} {path}: the directory exists and is not a saved task model "
                        f"(no {TASK_FILE}); refusing to replace it (choose a new directory)")
    return path


def save_task(path: str | os.PathLike, meta: dict, write_parts: Callable[[Path], None],
              embedder=None) -> str:
    """Write a saved task model to `path` atomically: `write_parts(tmp)` writes the model's own
    files into the temporary directory, the embedder's biLM goes to elmo/ (export_model: the
    exact weights that computed the features), then task.json with `meta`, the format fields
    and the sha256 of every file. Returns the path."""
    from ..export import export_model
    path = os.fspath(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "torch_elmo_version": torch_elmo_version(), **meta}
    if meta.get("kind") not in KINDS:
        raise ElmoError(f"task kind must be one of {', '.join(KINDS)}, got {meta.get('kind')!r}")
    with atomic_dir(path) as tmp:
        tmp = Path(tmp)
        write_parts(tmp)
        if embedder is not None:
            export_model(embedder.model, tmp / ELMO_DIR)
            meta["elmo"] = {"dir": ELMO_DIR, "state": embedder.state,
                            "output_dim": embedder.output_dim, **meta.get("elmo", {})}
        else:
            meta["elmo"] = None
        files = list_files(tmp)
        mode = 0o666 & ~current_umask()
        for rel in files:                  # safetensors writes 0600; the rest as open() does
            os.chmod(tmp / rel, mode)
        meta["files"] = {rel: sha256_file(tmp / rel) for rel in files}
        with open(tmp / TASK_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False, default=str)
            f.write("\n")
    return path


def scalar_mix_meta(mix, dtype: str = "float16") -> dict:
    """task.json's ELMo settings of a BiLSTM model: all layers through its trained scalar mix
    (the weights live in head.safetensors; listed here to be read), rounded to `dtype`."""
    from ..embed import DEFAULT_MAX_TOKENS
    return {"layers": "all", "pooling": None, "layer_dtype": dtype,
            "max_tokens": DEFAULT_MAX_TOKENS,
            "scalar_mix": {"weights": mix.weights().detach().flatten().tolist(),
                           "gamma": float(mix.gamma.detach().flatten()[0])}}


def words_meta() -> dict:
    """task.json's `words` entry of the BiLSTM models (common.WordVocab, common.casing)."""
    return {"file": WORDS_FILE, "normalise": "lowercase, every digit 0", "unknown": "<unk>",
            "casing": "7 classes (common.casing)"}


def head_writer(model, words: Sequence[str]) -> Callable[[Path], None]:
    """save_task's `write_parts` of a BiLSTM model: its tensors and its vocabulary."""
    def write(tmp: Path) -> None:
        save_head(model, tmp / HEAD_FILE)
        write_json(tmp / WORDS_FILE, list(words))
    return write


def list_files(root: Path) -> list[str]:
    """Every file under `root` except task.json, as sorted POSIX-style relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != TASK_FILE)


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def save_head(module, path: Path) -> None:
    """An nn.Module's state dict as safetensors (CPU copies; tensors only, no code)."""
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
              str(path))


# --------------------------------------------------------------------------------------- reading
def read_task(path: str | os.PathLike) -> dict:
    """task.json of a saved task model, after checking that every file it lists is there with
    its sha256; a directory that is not one (an ELMo model, anything else), a newer format
    version, a missing or changed file: one-line ElmoError."""
    path = Path(path)
    if not path.is_dir():
        raise ElmoError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}"
                        f" (a saved task model is a directory written by `elmo ner --save` / "
                        f"`elmo classify --save`)")
    task_file = path / TASK_FILE
    if not task_file.is_file():
        if (path / "options.json").is_file():
            raise ElmoError(f"{path}: an ELMo model (options.json + weights), not a saved task "
                            f"model; load it with torch_elmo.load, or train a task model on it "
                            f"with `elmo ner --save` / `elmo classify --save`")
        raise ElmoError(f"{path}: not a saved task model (no {TASK_FILE}; written by "
                        f"`elmo ner --save` / `elmo classify --save`)")
    try:
        meta = json.loads(task_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ElmoError(f"{task_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ElmoError(f"{task_file}: not a torch-elmo task file (format is not {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ElmoError(f"{task_file}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ElmoError(f"{path}: saved with task format version {version} by torch-elmo "
                        f"{meta.get('torch_elmo_version', '?')}; this torch-elmo "
                        f"({torch_elmo_version()}) reads up to version {FORMAT_VERSION}: "
                        f"upgrade torch-elmo")
    if meta.get("kind") not in KINDS:
        raise ElmoError(f"{task_file}: kind must be one of {', '.join(KINDS)}, "
                        f"got {meta.get('kind')!r}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ElmoError(f"{task_file}: no 'files' table of sha256 sums")
    for rel, want in files.items():
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ElmoError(f"{task_file}: file {rel!r} is outside the model directory")
        if not f.is_file():
            raise ElmoError(f"{f}: missing (listed in {TASK_FILE}); the saved model is "
                            f"incomplete")
        if sha256_file(f) != want:
            raise ElmoError(f"{f}: sha256 differs from the one in {TASK_FILE}; the file was "
                            f"changed or damaged after the model was saved")
    return meta


def part(path: str | os.PathLike, meta: dict, name: str) -> Path:
    """The path of one of the model's files, which read_task checked (it is in `files`)."""
    if name not in meta["files"]:
        raise ElmoError(f"{Path(path) / TASK_FILE}: a {meta['kind']} model of this kind needs "
                        f"{name}, which is not listed")
    return Path(path) / name


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def load_head(module, path: Path, device) -> None:
    """Fill `module` with the tensors of `path` (safetensors; no code runs), then move it."""
    from safetensors.torch import load_file
    try:
        module.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ElmoError(f"{path}: tensors do not fit the model task.json describes "
                        f"({first[-1].strip() if first else e})") from None
    module.to(device).eval()


def load_embedder(path: str | os.PathLike, meta: dict, device):
    """The ElmoEmbedder of the saved biLM (in the state it was trained with), or None."""
    if not meta.get("elmo"):
        return None
    from ..embed import ElmoEmbedder
    elmo = meta["elmo"]
    return ElmoEmbedder(str(part(path, meta, f"{elmo['dir']}/options.json")),
                        str(part(path, meta, f"{elmo['dir']}/weights.hdf5")),
                        state=elmo.get("state", "warm"), device=device)
