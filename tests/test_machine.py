"""torch_elmo.machine: the one cache root, the machine identity, and the measurement store (atomic
writes, corrupt or foreign files ignored, two processes writing at once)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from torch_elmo import hub, machine


def test_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path / "c"))
    assert machine.cache_root() == hub.cache_dir() == tmp_path / "c"
    assert machine.Measurements().folder.parent.parent == tmp_path / "c"
    monkeypatch.delenv("TORCH_ELMO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert machine.cache_root() == hub.cache_dir() == tmp_path / "xdg" / "torch_elmo"


def test_identity_names_the_cpu_and_threads():
    ident = machine.identity()
    assert ident["torch"] == torch.__version__ and ident["cores"] == os.cpu_count()
    assert ident["threads"] == torch.get_num_threads() and ident["cpu"]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = machine.machine_hash()
    finally:
        torch.set_num_threads(n)
    assert (one == machine.machine_hash()) == (n == 1)   # another thread count, another key


def test_identity_follows_the_openmp_wait_policy(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    passive = machine.machine_hash()
    assert machine.identity()["omp_wait_policy"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert machine.machine_hash() != passive


def test_store_load_and_unusable_files_ignored(tmp_path):
    m = machine.Measurements(tmp_path)
    assert m.load("kernels", "s") is None
    path = m.store("kernels", "s", {"x": 1})
    assert path == m.path("kernels", "s") and m.load("kernels", "s") == {"x": 1}
    assert [p.name for p in path.parent.iterdir()] == [path.name]      # no temporaries left
    good = path.read_text()
    for bad in ["{not json", "", "[1, 2]", json.dumps({"format": 99, "result": {"x": 1}}),
                good.replace(torch.__version__, "0.0.0"), json.dumps({"format": 1})]:
        path.write_text(bad)
        assert m.load("kernels", "s") is None, bad
    assert m.store("kernels", "s", {"x": 2}) == path and m.load("kernels", "s") == {"x": 2}


def test_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    m = machine.Measurements(blocker)          # its folder would be under a plain file
    assert m.store("kernels", "s", {"x": 1}) is None
    assert m.load("kernels", "s") is None


WRITER = """
import sys, torch
torch.set_num_threads({threads})
from pathlib import Path
from torch_elmo.machine import Measurements
m = Measurements(Path(sys.argv[1]))
for k in range(300):
    assert m.store("kernels", "s", {{"writer": sys.argv[2], "k": k, "pad": "x" * 20000}})
"""


def test_two_processes_writing_at_once_leave_a_whole_file(tmp_path):
    """Two writers store the same entry 300 times each while this process reads it: every read
    is a whole file of one of them (never torn, never unparsable), and no temporaries remain."""
    code = WRITER.format(threads=torch.get_num_threads())
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), w]) for w in "ab"]
    m = machine.Measurements(tmp_path)
    seen, deadline = set(), time.monotonic() + 60
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if m.path("kernels", "s").exists():
                r = m.load("kernels", "s")
                assert r is not None and r["pad"] == "x" * 20000
                seen.add(r["writer"])
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0]
    assert m.load("kernels", "s")["k"] == 299
    assert seen <= {"a", "b"}
    assert [p.name for p in Path(m.folder).iterdir()] == ["kernels-s.json"]


def test_alternate_times_every_candidate():
    calls = []
    t = machine.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          rounds=3, budget_s=10)
    assert calls == ["a", "b"] * 4 and set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    calls.clear()
    machine.alternate({"a": lambda: calls.append("a") or time.sleep(0.02)}, rounds=50,
                      budget_s=0.01)
    assert calls == ["a", "a"]                  # warm-up + one round, then the budget stops it
