"""torch_elmo.checkpoint: the run-directory lock (two processes), atomic checkpoint writes."""
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from torch_elmo.checkpoint import LOCK, atomic_torch_save, load_checkpoint, lock_run_dir
from torch_elmo.config import ElmoError


def test_a_second_run_into_a_locked_save_dir_is_refused_at_once(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from torch_elmo.checkpoint import lock_run_dir; "
         "l = lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(ElmoError, match=rf"in use by another `elmo train` \(pid {holder.pid}\)"):
            lock_run_dir(str(tmp_path))
        assert time.time() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    lock = lock_run_dir(str(tmp_path))          # a killed holder leaves no stale lock
    assert (tmp_path / LOCK).read_text().strip() == f"pid {os.getpid()}"
    lock.close()


def test_atomic_torch_save_keeps_the_old_checkpoint_when_the_save_fails(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_torch_save({"format": 1, "x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"format": 1, "bad": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
