"""Hub: find a model's options.json + weights.hdf5, downloading published ones once into a cache.

    resolve_model(model) -> (options_file, weight_file)

`model` is a directory, a pretrained name or a Hugging Face Hub address:

* a directory holding `options.json` + `weights.hdf5` (what `export_model` writes); also accepted:
  bilm-tf's `lm_weights.hdf5`, and a single `*options.json` / `*weights.hdf5` pair with the
  allennlp download names (`elmo_2x1024_128_2048cnn_1xhighway_options.json`, ...); a directory
  with no HDF5 but a `weights.safetensors` loads from that;
* `hf://owner/name[@revision][/subfolder]`: options.json + weights.hdf5 (or weights.safetensors)
  from a Hub repository, through huggingface_hub and its cache (`resolve_hf`);
* a name from `PRETRAINED` (`small`, `medium`, `original`, `original-5.5B`): the files published
  by AllenNLP, downloaded once into `cache_dir()/<name>/` (`$TORCH_ELMO_CACHE`, default the user
  cache directory, ~/.cache/torch_elmo on Linux).

Downloads stream into a temp file in the target folder, show progress (progress.py), and are
renamed into place only after every check passed, so an interrupted or corrupt download never
leaves a file that looks complete. Checks, in order:

1. the byte count equals the server's Content-Length (catches a connection cut half-way);
2. the sha256 equals `KNOWN_SHA256[file name]` when the table has it;
3. otherwise, when the server's ETag is a plain MD5 (an S3 single-part upload), the MD5 equals it.

After a download the file's size and sha256 are recorded beside it (`<file>.sha256`); every later
resolve compares the size (cheap) and `verify_cache()` re-hashes. Published sha256 sums for the
AllenNLP ELMo files could not be found (AllenNLP never published them), so `KNOWN_SHA256` starts
empty: the first download is trusted on the server's length and ETag, and recorded.
`$TORCH_ELMO_URL` replaces the base URL (a mirror, or a local server in tests).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .config import ElmoError
from .errors import quote
from .machine import cache_root

BASE_URL = "https://allennlp.s3.amazonaws.com/models/elmo"

# name -> the published folder / file stem under BASE_URL
PRETRAINED: dict[str, str] = {
    "small": "2x1024_128_2048cnn_1xhighway",
    "medium": "2x2048_256_2048cnn_1xhighway",
    "original": "2x4096_512_2048cnn_2xhighway",
    "original-5.5B": "2x4096_512_2048cnn_2xhighway_5.5B",
}
FILES = ("options.json", "weights.hdf5")

# published file name -> sha256 hex. None are published by AllenNLP; add entries as they become
# known (the recorded `<file>.sha256` of a trusted download gives the value).
KNOWN_SHA256: dict[str, str] = {}

CHUNK = 1 << 20


def cache_dir() -> Path:
    """The one cache root of torch-elmo (machine.cache_root: $TORCH_ELMO_CACHE, else the user
    cache directory); the pretrained models go in its <name>/ folders."""
    return cache_root()


def pretrained_urls(name: str) -> dict[str, str]:
    """{"options.json": url, "weights.hdf5": url} of a pretrained name."""
    if name not in PRETRAINED:
        raise ElmoError(f"unknown pretrained model {name!r}; choose one of {', '.join(PRETRAINED)}")
    stem = PRETRAINED[name]
    base = os.environ.get("TORCH_ELMO_URL") or BASE_URL
    return {f: f"{base.rstrip('/')}/{stem}/elmo_{stem}_{f}" for f in FILES}


# ------------------------------------------------------------------------------------- download
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> Optional[tuple[str, int]]:
    try:
        digest, size = _sidecar(path).read_text().split()[:2]
        return digest, int(size)
    except (OSError, ValueError):
        return None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: Optional[str] = None,
             progress: Optional[bool] = None, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` through a temp file in dest's folder; rename only when complete and
    verified. Any failure removes the temp file and raises ElmoError with one line naming the URL.
    `progress=None`: progress.py's policy (a bar on a terminal, a line every 30 s otherwise)."""
    from .progress import progress_bar

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    sha, md5, received = hashlib.sha256(), hashlib.md5(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as e:
                raise ElmoError(f"download {url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise ElmoError(f"download {url}: cannot connect ({quote(reason)})") from None
            with resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                etag = (resp.headers.get("ETag") or "").strip('"')
                bar = progress_bar(total, desc=dest.name, unit="B", enabled=progress,
                                   unit_scale=True, unit_divisor=1024, leave=False)
                with bar:
                    while True:
                        try:
                            block = resp.read(CHUNK)
                        except (http.client.IncompleteRead, OSError) as e:
                            raise ElmoError(
                                f"download {url}: connection lost after {received:,} of "
                                f"{total if total is not None else '?'} bytes ({type(e).__name__}); "
                                f"nothing was written to the cache, run again") from None
                        if not block:
                            break
                        out.write(block)
                        sha.update(block)
                        md5.update(block)
                        received += len(block)
                        bar.update(len(block))
        if total is not None and received != total:
            raise ElmoError(f"download {url}: connection lost after {received:,} of {total:,} "
                            f"bytes; nothing was written to the cache, run again")
        digest = sha.hexdigest()
        if sha256 is not None:
            if digest != sha256.lower():
                raise ElmoError(f"download {url}: sha256 mismatch (got {digest}, expected "
                                f"{sha256}); the file was discarded")
        elif re.fullmatch(r"[0-9a-f]{32}", etag) and md5.hexdigest() != etag:
            raise ElmoError(f"download {url}: MD5 {md5.hexdigest()} does not match the server's "
                            f"ETag {etag}; the file was discarded")
        os.replace(tmp, dest)
        _sidecar(dest).write_text(f"{digest} {received}\n")
        return dest
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_pretrained(name: str, progress: Optional[bool] = None) -> tuple[str, str]:
    """The cached (options_file, weight_file) of a pretrained name, downloading what is missing
    or does not match its recorded size."""
    folder = cache_dir() / name
    paths = []
    for fname, url in pretrained_urls(name).items():
        path = folder / fname
        recorded = _read_sidecar(path)
        ok = path.is_file() and recorded is not None and path.stat().st_size == recorded[1]
        if ok and url.rsplit("/", 1)[-1] in KNOWN_SHA256:
            ok = recorded[0] == KNOWN_SHA256[url.rsplit("/", 1)[-1]]
        if not ok:
            download(url, path, sha256=KNOWN_SHA256.get(url.rsplit("/", 1)[-1]), progress=progress)
        paths.append(str(path))
    return paths[0], paths[1]


def verify_cache(name: str) -> bool:
    """Re-hash a cached pretrained model against its recorded (or known) sha256."""
    for fname, url in pretrained_urls(name).items():
        path = cache_dir() / name / fname
        recorded = _read_sidecar(path)
        want = KNOWN_SHA256.get(url.rsplit("/", 1)[-1]) or (recorded and recorded[0])
        if not path.is_file() or not want or sha256_file(path) != want:
            return False
    return True


# ---------------------------------------------------------------------------------- resolution
def _find(folder: Path, exact: tuple[str, ...], suffix: str, what: str) -> Path:
    for name in exact:
        if (folder / name).is_file():
            return folder / name
    matches = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ElmoError(f"{folder}: several *{suffix} files ({', '.join(p.name for p in matches)}); "
                        f"name the one to use {exact[0]}")
    partial = sorted(p.name for p in folder.glob(f"*{suffix}*") if p.is_file())
    hint = f" (found {', '.join(partial)}: an interrupted write?)" if partial else ""
    raise ElmoError(f"{folder}: no {exact[0]}{hint}; a model directory holds {what}")


def resolve_model(model: str | os.PathLike, progress: Optional[bool] = None) -> tuple[str, str]:
    """A model directory, a pretrained name or an hf:// address -> (options_file, weight_file)."""
    if str(model).startswith(HF_PREFIX):
        return resolve_hf(str(model))
    path = Path(model)
    if path.is_dir():
        if (path / "task.json").is_file():       # tasks/saved.py's TASK_FILE
            raise ElmoError(f"{model}: a saved task model (task.json), not an ELMo model; load "
                            f"it with torch_elmo.load_task (or `elmo predict --model`)")
        what = "options.json + weights.hdf5 (or weights.safetensors)"
        options = _find(path, ("options.json",), "options.json", what)
        # the HDF5 when there is one; a folder with only a weights.safetensors loads from that
        if not any(path.glob("*weights.hdf5")) and any(path.glob("*weights.safetensors")):
            return str(options), str(_find(path, ("weights.safetensors",), "weights.safetensors",
                                           what))
        weights = _find(path, ("weights.hdf5", "lm_weights.hdf5"), "weights.hdf5", what)
        return str(options), str(weights)
    if str(model) in PRETRAINED:
        return fetch_pretrained(str(model), progress=progress)
    if path.exists():
        raise ElmoError(f"{model}: not a directory; give the folder holding options.json + "
                        f"weights.hdf5")
    raise ElmoError(f"model {str(model)!r}: no such directory, and not a pretrained name "
                    f"({', '.join(PRETRAINED)})")


# --------------------------------------------------------------------------- Hugging Face Hub
HF_PREFIX = "hf://"
HF_WEIGHTS = ("weights.hdf5", "weights.safetensors")


def parse_hf(address: str) -> tuple[str, Optional[str], Optional[str]]:
    """`hf://owner/name[@revision][/subfolder]` -> (repo_id, revision, subfolder). The revision
    (a branch, tag or commit hash) ends at the next `/`."""
    rest = address[len(HF_PREFIX):] if address.startswith(HF_PREFIX) else address
    owner, _, rest = rest.partition("/")
    name, _, subfolder = rest.partition("/")
    name, _, revision = name.partition("@")
    if not owner or not name or "@" in owner:
        raise ElmoError(f"{address}: expected hf://owner/name[@revision][/subfolder]")
    return f"{owner}/{name}", revision or None, subfolder.strip("/") or None


def resolve_hf(address: str) -> tuple[str, str]:
    """(options_file, weight_file) of a model on the Hugging Face Hub, through huggingface_hub's
    `hf_hub_download`: its cache ($HF_HOME / $HF_HUB_CACHE), revision pinning, token and
    HF_HUB_OFFLINE=1 (cached files only) apply as they do for any Hub model. The repository
    (or its subfolder) holds options.json + weights.hdf5 or weights.safetensors (what
    `export_model(..., safetensors=True)` writes); the HDF5 is taken when both are there."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError,
                                           LocalEntryNotFoundError, RepositoryNotFoundError,
                                           RevisionNotFoundError)
    except ImportError:
        raise ElmoError(f"{address}: hf:// models need huggingface_hub: "
                        f"pip install 'torch-elmo[hub]'") from None
    repo_id, revision, subfolder = parse_hf(address)
    not_cached: list[str] = []

    def get(filename: str) -> Optional[str]:
        """The file's local path; None when the repository (or, offline, the cache) lacks it."""
        try:
            return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision)
        except LocalEntryNotFoundError:  # HF_HUB_OFFLINE=1 or no connection, and not cached
            not_cached.append(filename)
            return None
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError:
            raise ElmoError(f"{address}: no repository {repo_id} on the Hub (or it is private: "
                            f"log in with `hf auth login` or set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise ElmoError(f"{address}: no revision {revision!r} in {repo_id}") from None
        except (HfHubHTTPError, OSError, ValueError) as e:  # HTTP errors, a malformed repo id
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ElmoError(f"{address}: {quote(first)}") from None

    options = get("options.json")
    weights = None
    if options is not None:
        for filename in HF_WEIGHTS:
            weights = get(filename)
            if weights is not None:
                break
    if options is None or weights is None:
        missing = "options.json" if options is None else " or ".join(HF_WEIGHTS)
        where = (" in the local cache (HF_HUB_OFFLINE=1, or the Hub could not be reached)"
                 if not_cached else "")
        raise ElmoError(f"{address}: no {missing}{where}; a model on the Hub holds options.json "
                        f"+ weights.hdf5 (or weights.safetensors)")
    return options, weights
