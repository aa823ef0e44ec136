"""Shared test helpers: locating ../shared, tiny models."""
import os
import subprocess

# Spinning OpenMP threads made 2-thread torch up to 10x slower when the 2 cores were shared; must be
# set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# No kernel autotune or precision timing in tests (fixed defaults, nothing written to the user's
# cache, no seconds of measuring in timed code); tests of the measuring itself turn it back on
# with monkeypatch and a temporary TORCH_ELMO_CACHE. Inherited by the CLI subprocesses.
os.environ.setdefault("TORCH_ELMO_AUTOTUNE", "0")

from pathlib import Path  # noqa: E402

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ELMO_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "bilm-tf"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips the test when it is absent, fails under ELMO_REQUIRE_SHARED=1."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"{p} not found: these tests need ../shared beside the checkout"
        if os.environ.get("ELMO_REQUIRE_SHARED") == "1":
            pytest.fail(msg + " (ELMO_REQUIRE_SHARED=1)")
        pytest.skip(msg)
    return p


@pytest.fixture
def fixture_model_dir() -> Path:
    return shared_path("fixtures", "bilm-tf", "model")


@pytest.fixture
def tiny_model():
    from torch_elmo import BiLM, preset
    torch.manual_seed(1234)
    return BiLM(preset("tiny")).eval()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs (needs root and mount; skipped where the machine does not allow it)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes spinning threads slow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
