"""torch_elmo.outputs: checks before the work, atomic writes, umask, stale temporaries, full disk."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torch_elmo.config import ElmoError, preset, write_options
from torch_elmo.outputs import (atomic_dir, atomic_path, atomic_text, check_free_space,
                                check_output, remove_stale_temporaries)
from torch_elmo.vocab import Vocabulary


def test_check_output(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("x\n")
    with pytest.raises(ElmoError, match=r"^--out .*in\.txt is also an input"):
        check_output(inp, "--out", [str(inp)])
    with pytest.raises(ElmoError, match=r"^--out .* is a directory, expected a file path$"):
        check_output(tmp_path, "--out")
    with pytest.raises(ElmoError, match=r"directory .*missing does not exist"):
        check_output(tmp_path / "missing" / "p.tsv", "--predictions")
    with pytest.raises(ElmoError, match="is a file, expected a directory"):
        check_output(inp, "--out", directory=True)
    assert check_output(tmp_path / "new.txt", "--out", [str(inp)]) == str(tmp_path / "new.txt")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_text(p) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["v.txt"]         # no temporary left


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_text(tmp_path / "a.txt") as f:
            f.write("x")
        os.umask(0o077)
        with atomic_text(tmp_path / "b.txt") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "out.hdf5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.hdf5.{dead}.abc123.tmp"
    live = tmp_path / f".out.hdf5.{os.getppid()}.def456.tmp"   # a running process: kept
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    assert remove_stale_temporaries(target) == [str(stale)]
    assert not stale.exists() and live.exists()
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new" and live.exists()


def test_atomic_dir_replaces_whole_and_cleans_a_dead_writers_directory(tmp_path):
    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".model.{dead}.abc123.tmp"          # a killed writer's half directory
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "half.bin").write_bytes(b"x")
    with atomic_dir(target) as tmp:
        Path(tmp, "a.txt").write_text("1")
    assert not stale.exists() and os.listdir(target) == ["a.txt"]
    with pytest.raises(KeyError):
        with atomic_dir(target) as tmp:
            Path(tmp, "b.txt").write_text("2")
            raise KeyError("failed half-way")
    assert os.listdir(target) == ["a.txt"] and os.listdir(tmp_path) == ["model"]
    with atomic_dir(target) as tmp:
        Path(tmp, "b.txt").write_text("2")
    assert os.listdir(target) == ["b.txt"] and os.listdir(tmp_path) == ["model"]


def test_check_free_space(tmp_path):
    check_free_space(tmp_path / "x", 10)
    with pytest.raises(ElmoError, match=r"not enough disk space for the weights"):
        check_free_space(tmp_path / "x", 1 << 60, "weights")


def test_full_disk_is_one_line_and_leaves_the_previous_file(small_disk):
    p = small_disk / "vocab.txt"
    Vocabulary(["<S>", "</S>", "<UNK>", "a"]).write(p)
    big = Vocabulary(["<S>", "</S>", "<UNK>", *(f"word{i:07d}" for i in range(60_000))])
    with pytest.raises(ElmoError, match=r"vocab\.txt: cannot write \(No space left on device\)"):
        big.write(p)
    assert p.read_text().split() == ["<S>", "</S>", "<UNK>", "a"]
    assert sorted(os.listdir(small_disk)) == ["vocab.txt"]
    write_options(preset("tiny"), small_disk / "options.json")   # small files still fit
