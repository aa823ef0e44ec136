"""Kernel choices by measurement: which of kernels.py's fp32 implementations is fastest here.

The fastest choice differs by machine (benchmarks/README.md has the figures). So at the first CPU
inference of a layer shape on a machine, `ensure(cell)` times the candidates of each
`kernels.Choices` field, one field at a time, the others at their defaults, on random weights of
the layer's shapes (B = 64 rows, the inference batch), in alternating rounds, and keeps the
fastest:

    two_threads   8 steps of both directions over rows of lengths 1..8, on two threads vs one
                  after the other
                  (only with 2+ torch threads)
    step_onednn   one recurrent step (state matmul + gate update + projection), oneDNN vs MKL
    input_onednn  the hoisted input-to-gate matmul (with its bias) over the rows of the largest
                  block, oneDNN vs MKL
    tanh_sigmoid  one step with tanh through sigmoid vs torch.tanh
    block_mb      the hoisted matmul's rows in one 16 MB block or two 8 MB ones

All in <= BUDGET_S (2 s) of measuring, warm-up calls included (in the order above: what paid
most elsewhere first); a field left when the budget is spent keeps its default.
A candidate must be faster by MARGIN (5%) to replace the default, so noise does not flip it.
The result is stored per machine and shape class (machine.Measurements: atomic, a corrupt file
is measured again) and put in `kernels.TUNED`, which `kernels.lstmp_layer` reads.
`TORCH_ELMO_AUTOTUNE=0`: nothing is measured, kernels.DEFAULT runs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Optional

import torch

from . import kernels
from .machine import Measurements, alternate, autotune_enabled, machine_hash

BUDGET_S = 2.0
MARGIN = 1.05
ROWS = 64
WHAT = "kernels"


class _Cell:
    """The attributes kernels.py reads from an LSTMP, on random weights of given shapes."""

    def __init__(self, input_dim: int, H: int, P: int, cell_clip: Optional[float],
                 proj_clip: Optional[float], g: torch.Generator):
        self.hidden_dim, self.proj_dim, self.cell_clip, self.proj_clip = H, P, cell_clip, proj_clip
        self.input_weight = torch.randn(4 * H, input_dim, generator=g) / input_dim ** 0.5
        self.state_weight = torch.randn(4 * H, P, generator=g) / P ** 0.5
        self.bias = torch.zeros(4 * H)
        self.proj_weight = torch.randn(P, H, generator=g) / H ** 0.5
        self.fast_weights = kernels.PackCache()

    def run_bias(self) -> torch.Tensor:
        return self.bias


def measure(input_dim: int, H: int, P: int, budget_s: float = BUDGET_S) -> dict:
    """Time the candidates; returns {"choices": {...}, "timings_ms": {field: {candidate: ms}},
    "seconds": total}."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    cells = [_Cell(input_dim, H, P, 3.0, 3.0, g) for _ in range(2)]
    best, timings = kernels.DEFAULT, {}
    left = lambda: budget_s - (time.perf_counter() - start)  # noqa: E731
    with torch.no_grad():
        h = torch.randn(ROWS, P, generator=g)
        gx = torch.randn(ROWS, 4 * H, generator=g)

        def step(ch: kernels.Choices):
            _, _, lin_hh, lin_p = kernels.inference_weights(cells[0], torch.float32, ch)
            c = torch.zeros(ROWS, H)

            def run():
                z = lin_hh(h, add=gx)
                lin_p(kernels.cell_update(z, c, 3.0, ch.tanh_sigmoid), clip=3.0)
            return run

        def layer(ch: kernels.Choices, T: int):
            # rows of lengths 1..T, so the steps shrink as in a batch of sentences (the step
            # matmuls at few rows are where one thread per direction pays)
            lengths = torch.arange(ROWS) % T + 1
            pk = kernels.Packing(torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1))
            rep = torch.randn(8, input_dim, generator=g)        # few distinct inputs: the step
            idx = torch.randint(0, 8, (pk.N,), generator=g)     # loop dominates, as in the model
            xs = [rep.index_select(0, idx)] * 2
            z = [torch.zeros(ROWS, H)] * 2, [torch.zeros(ROWS, P)] * 2
            return lambda: kernels.lstmp_layer(cells, xs, pk, *z, unique=(rep, [idx, idx]),
                                               choices=ch)

        def hoisted(ch: kernels.Choices, rows: int):
            lin_ih, b, _, _ = kernels.inference_weights(cells[0], torch.float32, ch)
            x = torch.randn(rows, input_dim, generator=g)
            per = max(1, (ch.block_mb << 20) // (4 * H * 4))

            def run():
                for r0 in range(0, rows, per):
                    lin_ih(x[r0:r0 + per], b)
            return run

        rows = max(1, (max(kernels.CANDIDATES["block_mb"]) << 20) // (4 * H * 4))
        fields = [("two_threads", lambda ch: layer(ch, 8)), ("step_onednn", step),
                  ("input_onednn", lambda ch: hoisted(ch, rows)), ("tanh_sigmoid", step),
                  ("block_mb", lambda ch: hoisted(ch, rows))]
        for i, (name, make) in enumerate(fields):
            values = kernels.CANDIDATES[name]
            if left() <= 0:
                break
            if name == "two_threads" and torch.get_num_threads() < 2:
                continue
            cands = {v: replace(kernels.DEFAULT, **{name: v}) for v in values}
            fns = {str(v): make(ch) for v, ch in cands.items()}
            t = alternate(fns, rounds=5, budget_s=max(left() / (len(fields) - i), 0.05))
            timings[name] = {k: round(1e3 * v, 3) for k, v in t.items()}
            default = str(getattr(kernels.DEFAULT, name))
            fastest = min(t, key=t.get)
            if fastest != default and t[default] > MARGIN * t[fastest]:
                best = replace(best, **{name: next(v for v in values if str(v) == fastest)})
    for cell in cells:
        cell.fast_weights.clear()
    return {"choices": asdict(best), "timings_ms": timings,
            "seconds": round(time.perf_counter() - start, 3)}


def usable(choices) -> bool:
    """A stored choice set names every field once, each with one of its candidates (a file from
    another version, or edited by hand, is measured again)."""
    return (isinstance(choices, dict) and set(choices) == set(kernels.CANDIDATES)
            and all(any(v == c and type(v) is type(c) for c in kernels.CANDIDATES[k])
                    for k, v in choices.items()))


_DONE: dict[str, dict] = {}


def ensure(cell, measurements: Optional[Measurements] = None) -> dict:
    """The kernel choices for `cell`'s shapes on this machine: measured once (then read from the
    cache), put in kernels.TUNED. Returns {"choices", "timings_ms", "seconds", "source"}."""
    key = kernels.shape_class(cell)
    memo = f"{key}@{machine_hash()}"
    if memo in _DONE:
        return _DONE[memo]
    if not autotune_enabled():
        result = {"choices": asdict(kernels.DEFAULT), "timings_ms": {}, "seconds": 0.0,
                  "source": "fixed defaults (TORCH_ELMO_AUTOTUNE=0)"}
    else:
        store = measurements or Measurements()
        result = store.load(WHAT, key)
        if result is not None and usable(result.get("choices")):
            result = {**result, "source": f"cached ({store.path(WHAT, key)})"}
        else:
            result = measure(cell.input_weight.shape[1], cell.hidden_dim, cell.proj_dim)
            where = store.store(WHAT, key, result)
            result = {**result, "source": f"measured now ({where or 'cache not writable'})"}
    kernels.TUNED[key] = kernels.Choices(**result["choices"])
    _DONE[memo] = result
    return result


def forget() -> None:
    """Drop this process's decisions (tests; after TORCH_ELMO_CACHE or the threads change)."""
    _DONE.clear()
    kernels.TUNED.clear()
