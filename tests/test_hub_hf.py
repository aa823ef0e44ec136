"""hf://owner/name[@revision][/subfolder]: models from the Hugging Face Hub, tested offline.

The cache is laid out by hand the way huggingface_hub lays it out (models--owner--name/ with
blobs/<sha256>, refs/<branch or tag> holding a commit hash, snapshots/<commit>/<file> symlinks
into blobs/), under a temp HF_HOME. Each check runs in a fresh interpreter because huggingface_hub
reads HF_HOME and HF_HUB_OFFLINE when it is imported; HF_HUB_OFFLINE=1 and an endpoint on a closed
local port make sure nothing can reach the network."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_elmo import BiLM, ElmoError, export_model, preset
from torch_elmo.hub import parse_hf, resolve_model

pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]
MAIN, OLD = "a" * 40, "b" * 40  # commit hashes


def add_snapshot(repo: Path, commit: str, src: Path, subfolder: str = "") -> None:
    """Copy src's files into blobs/ (named by sha256) and link them from snapshots/commit/."""
    for f in src.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / subfolder / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def set_ref(repo: Path, ref: str, commit: str) -> None:
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with owner/name: main = model A; tag v1 = commit OLD = model B; main's subfolder
    small/ = model B as options.json + weights.safetensors only."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for key, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        export_model(BiLM(preset("tiny")).eval(), root / key, safetensors=True)
        dirs[key] = root / key
    only_st = root / "B-safetensors"
    only_st.mkdir()
    for name in ("options.json", "weights.safetensors"):
        (only_st / name).write_bytes((dirs["B"] / name).read_bytes())
    hdf5_only = {}
    for key in ("A", "B"):
        hdf5_only[key] = root / f"{key}-hdf5"
        hdf5_only[key].mkdir()
        for name in ("options.json", "weights.hdf5"):
            (hdf5_only[key] / name).write_bytes((dirs[key] / name).read_bytes())
    repo = root / "home" / "hub" / "models--owner--name"
    add_snapshot(repo, MAIN, hdf5_only["A"])
    add_snapshot(repo, MAIN, only_st, "small")
    add_snapshot(repo, OLD, hdf5_only["B"])
    set_ref(repo, "main", MAIN)
    set_ref(repo, "v1", OLD)
    return root / "home", dirs, repo


def offline_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _py(home: Path, code: str) -> dict:
    """Run code in a fresh interpreter offline against `home`; it prints one JSON line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=offline_env(home),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parse_hf():
    assert parse_hf("hf://owner/name") == ("owner/name", None, None)
    assert parse_hf("hf://owner/name@v1") == ("owner/name", "v1", None)
    assert parse_hf("hf://owner/name@" + OLD + "/sub/dir") == ("owner/name", OLD, "sub/dir")
    assert parse_hf("hf://owner/name/small/") == ("owner/name", None, "small")
    for bad in ("hf://", "hf://owner", "hf://owner/", "hf://@x/name"):
        with pytest.raises(ElmoError, match="expected hf://owner/name"):
            parse_hf(bad)


def test_every_front_door_resolves_hf_from_the_cache(hf_home):
    home, dirs, repo = hf_home
    out = _py(home, f"""
        import json, numpy as np, torch
        import torch_elmo
        from torch_elmo.hub import resolve_model
        s = ["a", "small", "test"]
        ref = torch_elmo.load({str(dirs["A"])!r}, state="zero").embed_sentence(s)
        paths = resolve_model("hf://owner/name")
        a = torch_elmo.load("hf://owner/name", state="zero").embed_sentence(s)
        b = torch_elmo.ElmoEmbedder("hf://owner/name", state="zero").embed_sentence(s)
        elmo = torch_elmo.Elmo("hf://owner/name", None, 1, dropout=0.0, state="zero")
        c = elmo([s])["elmo_representations"][0]
        print(json.dumps({{"paths": paths, "load": bool(np.array_equal(a, ref)),
                          "embedder": bool(np.array_equal(b, ref)), "elmo": list(c.shape)}}))
    """)
    snap = repo / "snapshots" / MAIN
    assert out["paths"] == [str(snap / "options.json"), str(snap / "weights.hdf5")]
    assert out["load"] and out["embedder"] and out["elmo"] == [1, 3, 32]


def test_revision_pinning_and_subfolder(hf_home):
    home, dirs, repo = hf_home
    out = _py(home, f"""
        import json, numpy as np
        import torch_elmo
        from torch_elmo.hub import resolve_model
        s = ["pinned", "text"]
        old = torch_elmo.load({str(dirs["B"])!r}, state="zero").embed_sentence(s)
        new = torch_elmo.load({str(dirs["A"])!r}, state="zero").embed_sentence(s)
        res = {{}}
        for addr in ("hf://owner/name@v1", "hf://owner/name@{OLD}", "hf://owner/name@main",
                     "hf://owner/name/small", "hf://owner/name@main/small"):
            e = torch_elmo.load(addr, state="zero").embed_sentence(s)
            res[addr] = [resolve_model(addr)[1], bool(np.array_equal(e, old)),
                         bool(np.array_equal(e, new))]
        print(json.dumps(res))
    """)
    old_w = str(repo / "snapshots" / OLD / "weights.hdf5")
    small_w = str(repo / "snapshots" / MAIN / "small" / "weights.safetensors")
    assert out["hf://owner/name@v1"] == [old_w, True, False]
    assert out[f"hf://owner/name@{OLD}"] == [old_w, True, False]
    assert out["hf://owner/name@main"] == [str(repo / "snapshots" / MAIN / "weights.hdf5"), False, True]
    assert out["hf://owner/name/small"] == [small_w, True, False]
    assert out["hf://owner/name@main/small"] == [small_w, True, False]


def test_offline_misses_are_one_line_errors(hf_home):
    home, _, _ = hf_home
    out = _py(home, """
        import json
        from torch_elmo import ElmoError, load
        res = {}
        for addr in ("hf://owner/other", "hf://owner/name@v2", "hf://owner/name/nowhere",
                     "hf://owner/na me", "hf://justname"):
            try:
                load(addr)
                res[addr] = "loaded"
            except ElmoError as e:
                res[addr] = str(e)
        print(json.dumps(res))
    """)
    for addr in ("hf://owner/other", "hf://owner/name@v2", "hf://owner/name/nowhere"):
        assert out[addr].startswith(f"{addr}: no options.json in the local cache (HF_HUB_OFFLINE=1"), out
    assert out["hf://owner/na me"].startswith("hf://owner/na me: ")
    assert "expected hf://owner/name" in out["hf://justname"]
    assert all("\n" not in msg for msg in out.values())


def test_elmo_embed_cli_with_hf_model(hf_home, tmp_path):
    home, dirs, _ = hf_home
    (tmp_path / "in.txt").write_text("a b c\nd e\n")
    for model, out in (("hf://owner/name", "hf.hdf5"), (str(dirs["A"]), "dir.hdf5")):
        proc = subprocess.run([sys.executable, "-m", "torch_elmo", "embed", "--model", model,
                               "--input", str(tmp_path / "in.txt"), "--output",
                               str(tmp_path / out), "--no-progress", "--device", "cpu"],
                              env=offline_env(home), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    import h5py
    with h5py.File(tmp_path / "hf.hdf5") as a, h5py.File(tmp_path / "dir.hdf5") as b:
        assert sorted(a) == sorted(b)
        for k in a:
            if isinstance(a[k], h5py.Dataset):
                assert np.array_equal(a[k][...], b[k][...]), k


def test_missing_huggingface_hub_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ElmoError, match=r"pip install 'torch-elmo\[hub\]'") as e:
        resolve_model("hf://owner/name")
    assert "\n" not in str(e.value)
