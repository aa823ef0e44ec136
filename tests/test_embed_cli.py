"""`elmo embed`: the fixture through the CLI, the output format, ordering, windows, bad input."""
import json
import os

import h5py
import numpy as np
import pytest

from torch_elmo import ElmoEmbedder, load_bilm
from torch_elmo.cli import main

from test_embed import fixture_batches, fixture_top_layer


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["embed", *map(str, argv)])
    return rc, capsys.readouterr().err


def _read(path) -> dict:
    with h5py.File(path) as f:
        index = json.loads(f["sentence_to_index"][0])
        return {k: f[k][...] for k in f if k != "sentence_to_index"}, index


def test_cli_carry_reproduces_the_fixture(fixture_model_dir, tmp_path, capsys):
    d = fixture_model_dir
    flat = [s for batch in fixture_batches(d) for s in batch]     # i-major, k-minor
    (tmp_path / "in.txt").write_text("\n".join(" ".join(s) for s in flat) + "\n")
    rc, err = _run(capsys, "--model", d, "--input", tmp_path / "in.txt", "--output",
                   tmp_path / "out.hdf5", "--state", "carry", "--batch-size", 3)
    assert rc == 0, err
    data, index = _read(tmp_path / "out.hdf5")
    assert sorted(data, key=int) == [str(i) for i in range(30)]
    for i in range(10):
        for k in range(3):
            got = data[str(3 * i + k)]
            assert got.shape == (3, len(flat[3 * i + k]), 32) and got.dtype == np.float32
            assert np.allclose(got[2], fixture_top_layer(d, k, i), atol=1e-6), (i, k)
    assert index[" ".join(flat[4])] == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.hdf5"]  # no temp file


@pytest.mark.parametrize("state", ["zero", "warm"])
def test_sorted_states_write_input_order(fixture_model_dir, tmp_path, capsys, state):
    d = fixture_model_dir
    flat = [s for batch in fixture_batches(d) for s in batch][:12]
    lines = [" ".join(s) for s in flat]
    lines.insert(5, "")                                             # an empty line
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    rc, err = _run(capsys, "--model", d, "--input", tmp_path / "in.txt", "--output",
                   tmp_path / "out.hdf5", "--state", state, "--batch-size", 4, "--layers", "top")
    assert rc == 0, err
    data, index = _read(tmp_path / "out.hdf5")
    alone = ElmoEmbedder(d / "options.json", d / "lm_weights.hdf5", state=state)
    for i, line in enumerate(lines):
        want = alone.embed_sentence(line.split())[2]
        assert data[str(i)].shape == (len(line.split()), 32)
        assert np.allclose(data[str(i)], want, atol=1e-5), i
    assert data["5"].shape == (0, 32) and index[""] == "5"


def test_layers_dtype_and_empty_lines(fixture_model_dir, tmp_path, capsys):
    d = fixture_model_dir
    (tmp_path / "in.txt").write_text("a b c\n\n   \nd e\n")
    out = {}
    for layers in ("all", "top", "average"):
        for dtype in ("float32", "float16"):
            path = tmp_path / f"{layers}-{dtype}.hdf5"
            rc, err = _run(capsys, "--model", d, "--input", tmp_path / "in.txt", "--output", path,
                           "--layers", layers, "--dtype", dtype, "--state", "zero")
            assert rc == 0, err
            out[layers, dtype] = _read(path)[0]
    full = out["all", "float32"]
    assert full["0"].shape == (3, 3, 32) and full["1"].shape == (3, 0, 32)
    assert full["2"].shape == (3, 0, 32) and full["3"].shape == (3, 2, 32)
    assert np.array_equal(out["top", "float32"]["0"], full["0"][2])
    assert np.allclose(out["average", "float32"]["3"], full["3"].mean(axis=0), atol=1e-6)
    half = out["all", "float16"]
    assert half["0"].dtype == np.float16 and half["1"].shape == (3, 0, 32)
    assert np.allclose(half["0"], full["0"], atol=2e-3, rtol=1e-3)


def test_long_line_is_windowed(fixture_model_dir, tmp_path, capsys):
    d = fixture_model_dir
    words = "the cat sat on a mat and then it ran off".split()
    long_line = " ".join(words[i % len(words)] for i in range(5000))
    (tmp_path / "in.txt").write_text(f"short one\n{long_line}\nlast\n")
    rc, err = _run(capsys, "--model", d, "--input", tmp_path / "in.txt", "--output",
                   tmp_path / "out.hdf5", "--max-tokens", 400, "--state", "warm",
                   "--layers", "top")
    assert rc == 0, err
    data, _ = _read(tmp_path / "out.hdf5")
    assert data["1"].shape == (5000, 32) and np.isfinite(data["1"]).all()
    assert data["0"].shape == (2, 32) and data["2"].shape == (1, 32)
    # the first window's kept part equals embedding the first 400 tokens alone
    bilm = load_bilm(d / "options.json", d / "lm_weights.hdf5")
    first = ElmoEmbedder(model=bilm, state="warm").embed_sentence(long_line.split()[:400])[2]
    assert np.allclose(data["1"][:300], first[:300], atol=1e-5)


def test_binary_junk_is_decoded_with_a_warning(fixture_model_dir, tmp_path, capsys):
    d = fixture_model_dir
    junk = bytes(b for b in range(256) if b != 10) * 3           # one line, invalid UTF-8
    (tmp_path / "in.txt").write_bytes(b"ok line\n" + junk + b"\n\xff\xfe tail\nfine\n")
    rc, err = _run(capsys, "--model", d, "--input", tmp_path / "in.txt", "--output",
                   tmp_path / "out.hdf5", "--state", "zero")
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "in.txt:2: not valid UTF-8" in warning[0]
    data, _ = _read(tmp_path / "out.hdf5")
    n_lines = (b"ok line\n" + junk + b"\n\xff\xfe tail\nfine\n").count(b"\n")
    assert sorted(data, key=int) == [str(i) for i in range(n_lines)]
    assert all(np.isfinite(v).all() for v in data.values())


def test_bad_model_and_paths_are_one_line_errors(fixture_model_dir, tmp_path, capsys):
    d = fixture_model_dir
    (tmp_path / "in.txt").write_text("a b\n")
    out = tmp_path / "out.hdf5"
    rc, err = _run(capsys, "--model", tmp_path / "none", "--input", tmp_path / "in.txt",
                   "--output", out)
    assert rc == 2 and err.count("\n") == 1 and "not a pretrained name" in err
    half = tmp_path / "half"
    half.mkdir()
    (half / "options.json").write_bytes((d / "options.json").read_bytes())
    (half / "weights.hdf5").write_bytes((d / "lm_weights.hdf5").read_bytes()[:5000])
    rc, err = _run(capsys, "--model", half, "--input", tmp_path / "in.txt", "--output", out)
    assert rc == 2 and err.count("\n") == 1 and "truncated" in err, err
    rc, err = _run(capsys, "--model", d, "--input", tmp_path / "missing.txt", "--output", out)
    assert rc == 2 and err.count("\n") == 1 and "input file not found" in err
    rc, err = _run(capsys, "--model", d, "--input", tmp_path / "in.txt", "--output",
                   tmp_path / "no" / "dir" / "out.hdf5")
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    assert not out.exists()


def test_sentence_keys_that_clash_as_hdf5_paths_are_one_line(fixture_model_dir, tmp_path, capsys):
    # "a" is a dataset, so "a/b" (a key with a slash: a path below it) cannot be stored
    (tmp_path / "in.txt").write_text("a\na/b\n")
    out = tmp_path / "out.hdf5"
    rc, err = _run(capsys, "--model", fixture_model_dir, "--input", tmp_path / "in.txt",
                   "--output", out, "--use-sentence-keys")
    assert rc == 2 and err.count("\n") == 1, err
    assert "line 2: cannot store under the key 'a/b'" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_progress_bar_only_on_a_terminal_or_with_progress(fixture_model_dir, tmp_path, capsys):
    """capsys's stderr is no terminal: no bar redraws unless --progress forces them."""
    d = fixture_model_dir
    (tmp_path / "in.txt").write_text("the cat sat\na dog\n")
    args = ["--model", d, "--input", tmp_path / "in.txt", "--state", "zero"]
    rc, err = _run(capsys, *args, "--output", tmp_path / "a.hdf5")
    assert rc == 0 and "\r" not in err and "line/s" not in err, err
    rc, err = _run(capsys, *args, "--output", tmp_path / "b.hdf5", "--progress")
    assert rc == 0 and "\r" in err and "2/2" in err, err
    rc, err = _run(capsys, *args, "--output", tmp_path / "c.hdf5", "--no-progress")
    assert rc == 0 and "\r" not in err, err


def test_a_disk_too_small_for_the_output_is_one_line(fixture_model_dir, small_disk, tmp_path):
    """HDF5 on a full disk crashed the process (a segfault after pages of tracebacks): the size
    is checked first. A subprocess, so that a regression cannot take the test run down."""
    import subprocess
    import sys
    from conftest import REPO
    (tmp_path / "in.txt").write_text("the cat sat on the mat again and again\n" * 100)
    p = subprocess.run([sys.executable, "-m", "torch_elmo", "embed", "--model",
                        str(fixture_model_dir), "--input", str(tmp_path / "in.txt"), "--output",
                        str(small_disk / "out.hdf5"), "--state", "zero"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and len(p.stderr) < 200, p.stderr
    assert "out.hdf5: not enough disk space for the embeddings" in p.stderr
    assert os.listdir(small_disk) == []


def test_a_disk_that_fills_midway_is_one_line(fixture_model_dir, small_disk, tmp_path, capsys,
                                              monkeypatch):
    """Space taken by another writer after the check: the vectors' write fails cleanly."""
    import torch_elmo.embed as embed_mod
    layout = embed_mod.write_layout

    def layout_then_fill_the_disk(*args, **kwargs):
        layout(*args, **kwargs)
        with open(small_disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
            except OSError:
                pass
    monkeypatch.setattr(embed_mod, "write_layout", layout_then_fill_the_disk)
    (tmp_path / "in.txt").write_text("the cat sat on the mat again and again\n" * 12)
    rc, err = _run(capsys, "--model", fixture_model_dir, "--input", tmp_path / "in.txt",
                   "--output", small_disk / "out.hdf5", "--state", "zero")
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"elmo embed: error: {small_disk / 'out.hdf5'}: cannot write (No space "
                          f"left on device); nothing was written"), err
    assert os.listdir(small_disk) == ["filler"]
