"""Precision by measurement: fp32 or bf16 for a training run, decided in one place (`choose`).

bf16 pays only where the hardware makes it faster, and "native bf16" is not enough (a CPU with
AVX512-BF16 but no AMX can run bf16 matmuls slower than fp32; benchmarks/README.md). So where bf16
would be chosen automatically (the fast recipe, RECIPES[...]["bf16"]), a CPU with native bf16 first
times the part of a training step that bf16 changes (the token encoder), at the run's own shapes,
in both precisions (`bf16_speedup`: well under a second, once per machine and shape class, cached
by machine.Measurements), and bf16 is used only where it measured at least MARGIN (5%) faster. An
explicit `--bf16` is always obeyed, with a one-line warning where it is emulated or measured
slower. CUDA: bf16 where the GPU has it natively (no timing). `TORCH_ELMO_AUTOTUNE=0`: nothing is
measured and automatic bf16 stays off on CPU (fp32).

What bf16 autocast changes in a training step is the token encoder: the char CNN, highway and
projection run through F.linear / conv under autocast, while the LSTM (kernels.LSTMPFunction gets
fp32 inputs and calls oneDNN in fp32) and the sampled softmax (SampledSoftmaxCE computes in fp32)
stay fp32 either way. So the check times exactly that part: CharCNN.encode of the run's options,
forward and backward, on min(B x T, 32) distinct made-up tokens, fp32 against bf16 autocast,
best of alternating rounds (<= ~0.6 s); the speedup is that part's fp32 / bf16 time. A whole step
gains less (its fp32 parts cost the same), and at few rows autocast's per-call cast of each fp32
weight to bf16 weighs more than in a real step, so the check errs towards fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .device import bf16_native
from .machine import Measurements, alternate, autotune_enabled

MARGIN = 1.05
MAX_ROWS = 32
WHAT = "precision"


@dataclass(frozen=True)
class Precision:
    """The decision: bf16 autocast or fp32, why (one phrase for the training header), a warning
    to print (or None), and the measured bf16 / fp32 speed ratio (None where not measured)."""
    bf16: bool
    reason: str
    warning: Optional[str] = None
    speedup: Optional[float] = None


def shape_class(options, rows: int) -> str:
    cnn = options.char_cnn
    return (f"encoder{cnn.embedding.dim}-{cnn.n_filters}x{len(cnn.filters)}-hw{cnn.n_highway}-"
            f"p{options.lstm.projection_dim}-r{rows}")


def measure(options, budget_s: float = 0.6) -> dict:
    """Seconds of the token encoder's forward + backward (module docstring) in fp32 and under
    bf16 autocast; {"speedup": fp32 s / bf16 s, "fp32_ms", "bf16_ms", "rows"}."""
    from .chars import batch_to_ids
    from .model import CharCNN
    rows = min(options.batch_size * options.unroll_steps, MAX_ROWS)
    g = torch.Generator().manual_seed(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(letters[c] for c in torch.randint(0, 26, (int(n),), generator=g).tolist())
             + str(k) for k, n in enumerate(torch.randint(2, 12, (rows,), generator=g))]
    ids = batch_to_ids([words], options.char_cnn.max_characters_per_token)[0]   # (rows, C)
    torch.manual_seed(0)
    cnn = CharCNN(options)

    def step(bf16: bool):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = cnn.encode(ids)
            y.sum().backward()
        return run
    t = alternate({"fp32": step(False), "bf16": step(True)}, rounds=3, budget_s=budget_s)
    return {"speedup": round(t["fp32"] / t["bf16"], 3), "fp32_ms": round(1e3 * t["fp32"], 2),
            "bf16_ms": round(1e3 * t["bf16"], 2), "rows": rows}


def bf16_speedup(options, measurements: Optional[Measurements] = None) -> dict:
    """`measure`, once per machine and shape class (then read from the cache)."""
    store = measurements or Measurements()
    key = shape_class(options, min(options.batch_size * options.unroll_steps, MAX_ROWS))
    hit = store.load(WHAT, key)
    if hit is not None and isinstance(hit.get("speedup"), (int, float)) and hit["speedup"] > 0:
        return hit
    result = measure(options)
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
    x = bf16_speedup(options)["speedup"]
    if requested:
        warning = (f"--bf16: bf16 measured x{x:.2f} of fp32's speed on this CPU (slower); "
                   f"training in bf16 as asked" if x < 1.0 else None)
        return Precision(True, f"bf16 (asked): measured x{x:.2f} of fp32 here", warning, x)
    if x >= MARGIN:
        return Precision(True, f"bf16: measured x{x:.2f} of fp32 here", None, x)
    return Precision(False, f"fp32: bf16 measured x{x:.2f} here", None, x)
