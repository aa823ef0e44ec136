"""This machine: who it is, the one cache root of torch-elmo, and what was measured on it.

* `cache_root()`: `$TORCH_ELMO_CACHE`, else the user cache directory (platformdirs: ~/.cache/
  torch_elmo on Linux). The pretrained downloads (hub.py) and the measurements live under it.
* `identity()`: what a measurement depends on: the CPU model and a hash of its feature flags
  (under a hypervisor the model name can be a generic "Intel Xeon Processor", the flags tell
  the CPUs apart), the core count, the torch threads, OMP_WAIT_POLICY (whether idle OpenMP
  threads spin or sleep decides which kernels win), the torch version and whether oneDNN's fast
  path is on (TORCH_ELMO_NO_ONEDNN).
* `Measurements`: one small JSON file per (machine, what, shape class) under
  `cache_root()/measured/<machine hash>/`. Written atomically (outputs.atomic_text: a per-process
  temporary renamed over the target, so two processes writing at once leave one whole file); a
  file that does not parse, has another format version or another machine is ignored and
  measured again; a cache that cannot be written (read-only home) only costs a re-measurement.
* `autotune_enabled()`: `TORCH_ELMO_AUTOTUNE=0` turns every measurement off (fixed defaults).
* `alternate(fns, ...)`: the timing rule of every measurement here: the candidates in alternating
  rounds (a load change hits all of them alike), best time of each, within a time budget.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = 1


def cache_root() -> Path:
    """`$TORCH_ELMO_CACHE`, else the user cache directory of torch_elmo."""
    env = os.environ.get("TORCH_ELMO_CACHE")
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("torch_elmo", appauthor=False))


def autotune_enabled() -> bool:
    return os.environ.get("TORCH_ELMO_AUTOTUNE", "1") != "0"


def cpu_info() -> dict:
    """{"model": ..., "flags": [...]} from /proc/cpuinfo (platform.processor() elsewhere)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())
                if not key.strip():          # the end of the first processor's block
                    break
    except OSError:
        pass
    return {"model": found.get("model name") or platform.processor() or platform.machine(),
            "flags": sorted((found.get("flags") or found.get("Features") or "").split())}


_IDENTITY: Optional[dict] = None


def identity() -> dict:
    """What a measurement on this machine depends on (computed once per process; the torch
    thread count and the OpenMP wait policy are read each time: they can change)."""
    global _IDENTITY
    if _IDENTITY is None:
        from .kernels import ONEDNN
        cpu = cpu_info()
        _IDENTITY = {"cpu": cpu["model"],
                     "cpu_flags": hashlib.sha1(" ".join(cpu["flags"]).encode()).hexdigest()[:12],
                     "cores": os.cpu_count(), "torch": torch.__version__, "onednn": ONEDNN}
    return {**_IDENTITY, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").upper()}


def machine_hash() -> str:
    return hashlib.sha1(json.dumps(identity(), sort_keys=True).encode()).hexdigest()[:16]


class Measurements:
    """The measured results of this machine, one JSON file per (what, shape class)."""

    def __init__(self, root: Optional[Path] = None):
        self.folder = (root or cache_root()) / "measured" / machine_hash()

    def path(self, what: str, shape: str) -> Path:
        return self.folder / f"{what}-{shape}.json"

    def load(self, what: str, shape: str) -> Optional[dict]:
        """The stored result, or None when absent or unusable (corrupt, other format, other
        machine): then the caller measures again and stores over it."""
        try:
            data = json.loads(self.path(what, shape).read_text())
            if (data.get("format") == FORMAT and data.get("machine") == identity()
                    and isinstance(data.get("result"), dict)):
                return data["result"]
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def store(self, what: str, shape: str, result: dict) -> Optional[Path]:
        """Write atomically; returns the path, or None when the cache cannot be written."""
        from .errors import ElmoError
        from .outputs import atomic_text
        path = self.path(what, shape)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_text(path) as f:
                json.dump({"format": FORMAT, "machine": identity(), "result": result}, f, indent=1)
            return path
        except (OSError, ElmoError):
            return None


def alternate(fns: dict[str, Callable[[], object]], rounds: int = 3,
              budget_s: float = 0.5) -> dict[str, float]:
    """Best seconds of each fn over alternating rounds: one untimed warm-up call each, then
    rounds of one call each, stopping early when the budget (warm-up included) is spent, after
    at least one timed round."""
    start = time.perf_counter()
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def matmul_peaks(dtype: torch.dtype, sizes: tuple = (2048, 4096), reps: int = 5) -> dict:
    """GFLOP/s of large square matmuls in `dtype`, best of `reps`: torch.mm (MKL for fp32) and,
    where kernels.py uses it, oneDNN's inner product with a prepacked weight."""
    from .kernels import ONEDNN, onednn_ok
    lp = torch.ops.mkldnn._linear_pointwise
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        flops = 2 * n ** 3
        fns = {f"torch.mm {n}": lambda a=a, b=b: torch.mm(a, b)}
        if ONEDNN and onednn_ok(b):
            w = torch.ops.mkldnn._reorder_linear_weight(b, n)
            fns[f"oneDNN {n}"] = lambda a=a, w=w: lp(a, w, None, "none", [], "")
        for k, s in alternate(fns, rounds=reps, budget_s=float("inf")).items():
            out[k] = flops / s / 1e9
    return out
