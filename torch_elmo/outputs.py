"""Writing outputs safely: checked before the work starts, written atomically, nothing half-written.

Every file torch_elmo writes (vocabulary, options.json, weights, embeddings, predictions,
checkpoints) goes through here:

* `check_output(path, flag, inputs)` before long work: the parent directory exists, the path is
  not a directory, it is not one of the inputs (`--out X --train X` would overwrite the corpus),
  and the directory is writable. One-line ElmoError naming the flag.
* `atomic_path(path)` around the writing: the data goes to a hidden temporary file beside the
  target (`.<name>.<pid>.tmp`), which is renamed over the target only when complete, with the
  permissions a plain `open()` would give (0666 minus the umask). On any failure the temporary
  file is removed and the previous target, if any, is untouched; a full disk, a read-only file
  system or a permission error becomes one line. Temporary files left by a killed process
  (its pid no longer runs) are removed the next time the same target is written; a process
  that must exit at once (a torchrun rank stopped with SIGTERM) removes its own first
  (`remove_in_progress`).
* `check_free_space(path, n_bytes)`: refuse before writing a file that cannot fit (HDF5 on a full
  disk can crash the process instead of raising).
* `atomic_dir(path)`: the same for a whole directory (a saved task model): written into a hidden
  temporary directory beside the target, which replaces the target only when complete; on any
  failure the temporary directory is removed and an existing target is left as it was.
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Sequence

from .errors import ElmoError, quote

# the temporaries of the atomic_path blocks running now (removed by remove_in_progress)
IN_PROGRESS: set[str] = set()

# errors that mean "this cannot be written here", reported as one line
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output(path: str | os.PathLike, flag: str, inputs: Sequence[str | os.PathLike] = (),
                 directory: bool = False) -> str:
    """Validate an output path before the work; returns it as a str. `directory=True` for an
    output directory (created later by the writer, its parent must exist or be creatable)."""
    path = os.fspath(path)
    for inp in inputs:
        if inp is not None and os.path.exists(path) and _same_file(path, os.fspath(inp)):
            raise ElmoError(f"{flag} {path} is also an input; writing it would destroy the input "
                            f"(choose another output path)")
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ElmoError(f"{flag} {path} is a file, expected a directory")
        return path
    if os.path.isdir(path):
        raise ElmoError(f"{flag} {path} is a directory, expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ElmoError(f"{flag} {path}: directory {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ElmoError(f"{flag} {path}: directory {parent} is not writable")
    return path


def check_free_space(path: str | os.PathLike, n_bytes: int, what: str = "file") -> None:
    """ElmoError if the file system holding `path` has less than `n_bytes` (+1%) free."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    free = shutil.disk_usage(parent).free
    need = n_bytes * 1.01 + (64 << 10)
    if free < need:
        raise ElmoError(f"{path}: not enough disk space for the {what} ({need / 1e6:.2f} MB "
                        f"needed, {free / 1e6:.2f} MB free)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove `.<name>.<pid>.tmp` files beside `path` whose process is gone; returns them."""
    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.tmp")):
        pid = tmp[len(os.path.join(parent, f".{name}.")):-len(".tmp")].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                if os.path.isdir(tmp) and not os.path.islink(tmp):
                    shutil.rmtree(tmp)                  # an atomic_dir's temporary directory
                else:
                    os.remove(tmp)
                removed.append(tmp)
            except OSError:
                pass
    return removed


def write_error(path: str | os.PathLike, e: OSError) -> ElmoError:
    """The one-line error for an OSError met while writing `path`."""
    return ElmoError(f"{path}: cannot write ({quote(e)}); nothing was written and the "
                     f"previous file, if any, is unchanged")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path` atomically."""
    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except FileNotFoundError:
        raise ElmoError(f"{path}: directory {parent} does not exist") from None
    except OSError as e:
        raise write_error(path, e) from None
    IN_PROGRESS.add(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno in _WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    finally:
        IN_PROGRESS.discard(tmp)


def remove_in_progress() -> None:
    """Remove the temporary files of every atomic_path block still running (for a process about
    to leave through os._exit, which runs no `finally`)."""
    for tmp in list(IN_PROGRESS):
        _remove(tmp)


def _remove(p: str) -> None:
    try:
        os.remove(p)
    except OSError:
        pass


@contextmanager
def atomic_text(path: str | os.PathLike) -> Iterator:
    """An open UTF-8 text file whose contents replace `path` atomically when the block ends."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory to fill; on success it replaces the directory `path`.

    An existing `path` is first renamed aside (`.<name>.<pid>.old.tmp`), the new directory is
    renamed into place, then the old one is removed; if the second rename fails the old one is
    put back. So a failure (an exception, a full disk) leaves `path` as it was; only a kill in
    the instant between the two renames leaves the old directory under its aside name."""
    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent)
    except FileNotFoundError:
        raise ElmoError(f"{path}: directory {parent} does not exist") from None
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.old.", suffix=".tmp",
                                   dir=parent)
            os.rmdir(old)                     # only its unique name is wanted
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
