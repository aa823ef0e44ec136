"""Precision by measurement: fp32 or bf16 for a training run, decided in one place (`choose`).

bf16 pays only where the hardware makes it faster, and "native bf16" is not enough (a CPU with
AVX512-BF16 but no AMX can run bf16 matmuls slower than fp32; benchmarks/README.md). So where bf16
would be chosen automatically (the fast recipe, RECIPES[...]["bf16"]), a CPU with native bf16 first
times the matmuls of one training step at the run's own shapes in both precisions (`bf16_speedup`:
well under a second, once per machine and shape class, cached by machine.Measurements), and bf16 is
used only where it measured at least MARGIN (5%) faster. An explicit `--bf16` is always obeyed,
with a one-line warning where it is emulated or measured slower. CUDA: bf16 where the GPU has it
natively (no timing). `TORCH_ELMO_AUTOTUNE=0`: nothing is measured and automatic bf16 stays off on
CPU (fp32).

The timed matmuls, per direction and layer of a training step (B x T = batch x unroll rows;
S = sampled negatives; rows above 512 are timed on 512 and scaled): the input-to-gate matmul
(BT, P) x (P, 4H), T recurrent steps (B, P) x (P, 4H) and T projections (B, H) x (H, P); per
direction the sampled softmax (BT, P) x (P, S). fp32 runs them as fp32 training does
(kernels.Linear: oneDNN, prepacked for the steps); bf16 as autocast training does (F.linear
under bf16 autocast).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .device import bf16_native
from .kernels import Linear
from .machine import Measurements, alternate, autotune_enabled

MARGIN = 1.05
MAX_ROWS = 512
WHAT = "precision"


@dataclass(frozen=True)
class Precision:
    """The decision: bf16 autocast or fp32, why (one phrase for the training header), a warning
    to print (or None), and the measured bf16 / fp32 speed ratio (None where not measured)."""
    bf16: bool
    reason: str
    warning: Optional[str] = None
    speedup: Optional[float] = None


def step_matmuls(P: int, H: int, B: int, T: int, S: int) -> list[tuple[int, int, int, int]]:
    """(rows, in, out, times per step) of the matmuls of one training step, per direction."""
    return [(B * T, P, 4 * H, 1), (B, P, 4 * H, T), (B, H, P, T), (B * T, P, S, 1)]


def shape_class(P: int, H: int, B: int, T: int, S: int) -> str:
    return f"train{P}-{H}-{B}x{T}-{S}"


def measure(P: int, H: int, B: int, T: int, S: int, budget_s: float = 0.6) -> dict:
    """Seconds of one step's matmuls (`step_matmuls`, scaled to the real rows and counts) in fp32
    and bf16, best of alternating rounds; {"speedup": fp32 s / bf16 s, "fp32_ms", "bf16_ms"}."""
    g = torch.Generator().manual_seed(0)
    fns32, fns16, scale = {}, {}, {}
    for k, (rows, n_in, n_out, times) in enumerate(step_matmuls(P, H, B, T, S)):
        r = min(rows, MAX_ROWS)
        x, w = torch.randn(r, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
        lin = Linear(w, pack=times > 1, batch_hint=r)
        fns32[k] = lambda lin=lin, x=x: lin(x)

        def bf16(x=x, w=w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.linear(x, w)
        fns16[k] = bf16
        scale[k] = times * rows / r
    with torch.no_grad():
        t = alternate({**{f"fp32 {k}": f for k, f in fns32.items()},
                       **{f"bf16 {k}": f for k, f in fns16.items()}}, rounds=3, budget_s=budget_s)
    fp32 = sum(t[f"fp32 {k}"] * s for k, s in scale.items())
    bf16 = sum(t[f"bf16 {k}"] * s for k, s in scale.items())
    return {"speedup": round(fp32 / bf16, 3), "fp32_ms": round(1e3 * fp32, 2),
            "bf16_ms": round(1e3 * bf16, 2)}


def bf16_speedup(P: int, H: int, B: int, T: int, S: int,
                 measurements: Optional[Measurements] = None) -> dict:
    """`measure`, once per machine and shape class (then read from the cache)."""
    store = measurements or Measurements()
    key = shape_class(P, H, B, T, S)
    hit = store.load(WHAT, key)
    if hit is not None and isinstance(hit.get("speedup"), (int, float)) and hit["speedup"] > 0:
        return hit
    result = measure(P, H, B, T, S)
    store.store(WHAT, key, result)
    return result


def choose(device: torch.device, options, requested: bool, auto: bool) -> Precision:
    """bf16 or fp32 for training `options` on `device`. `requested`: --bf16 was given (always
    obeyed); `auto`: the recipe wants bf16 where it pays."""
    if not requested and not auto:
        return Precision(False, "fp32")
    if device.type == "cuda":
        native = bf16_native(device)
        if requested and not native:
            return Precision(True, "bf16 (asked)", f"--bf16 on {device}: this GPU has no native "
                                                   f"bf16, so it is emulated and slower than fp32")
        return Precision(native, "bf16: native on this GPU" if native else
                         "fp32: this GPU has no native bf16")
    if device.type != "cpu":
        return Precision(requested, "bf16 (asked)" if requested else "fp32")
    if not bf16_native(device):
        if requested:
            return Precision(True, "bf16 (asked; emulated here)",
                             f"--bf16 on {device}: this CPU has no native bf16 (no AVX512-BF16 or "
                             f"AMX), so bf16 is emulated and slower than fp32")
        return Precision(False, "fp32: this CPU has no native bf16")
    if not autotune_enabled():
        return Precision(requested, "bf16 (asked; not measured: TORCH_ELMO_AUTOTUNE=0)"
                         if requested else "fp32 (bf16 not measured: TORCH_ELMO_AUTOTUNE=0)")
    lstm = options.lstm
    m = bf16_speedup(lstm.projection_dim, lstm.dim, options.batch_size, options.unroll_steps,
                     options.n_negative_samples_batch)
    x = m["speedup"]
    if requested:
        warning = (f"--bf16: bf16 measured x{x:.2f} of fp32's speed on this CPU (slower); "
                   f"training in bf16 as asked" if x < 1.0 else None)
        return Precision(True, f"bf16 (asked): measured x{x:.2f} of fp32 here", warning, x)
    if x >= MARGIN:
        return Precision(True, f"bf16: measured x{x:.2f} of fp32 here", None, x)
    return Precision(False, f"fp32: bf16 measured x{x:.2f} here", None, x)
