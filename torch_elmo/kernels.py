"""Kernels: how the biLM's layers are computed fast, and the device seam of the LSTM layer.

model.py says WHAT the model computes; this file says HOW, per device. The one entry point of
the LSTM is `lstmp_layer` (one layer, every direction): it decides, in one place, whether
autograd is needed and which path runs:

    CPU, autograd       LSTMPFunction: one autograd node per direction, backprop through time
                        written out, weight gradients one large matmul each over all steps
    CPU, no autograd    infer_layer: in place, oneDNN weights prepacked once, the two
                        directions on two threads (`two_threads_ok`)
    any other device    lstmp_reference: the plain math with autograd (the place where a CUDA
                        fast path would go; there is none yet)

CPU-only tricks (applied only on the CPU); which of them the inference loop uses is a `Choices`
(fp32 candidates that all give the reference's results within 1e-5): `DEFAULT`, or the one
autotune.py measured fastest on this machine for the layer's shapes (`TUNED`, by `shape_class`):
* oneDNN inner product with prepacked weights (`Linear`, `mm`, `linear`), probed once at import
  (`ONEDNN`); TORCH_ELMO_NO_ONEDNN=1 turns it off. Anything it does not cover falls back to
  F.linear / addmm.
* tanh(x) = 2 sigmoid(2x) - 1 (torch.tanh is several times slower than torch.sigmoid on CPU);
  for the j gate the doubling is folded into the weights (`scale_j`).
* The two directions of a layer on two threads, one core each (TORCH_ELMO_SERIAL_DIRECTIONS=1
  turns it off).

Device-independent helpers: `Packing` (the packed time-major layout every path runs on),
`inference_dtype` (bf16 under CPU bf16 autocast, autocast's dtype on CUDA, else fp32: matmuls
in that dtype, cell state and element-wise math in fp32, outputs returned in fp32),
`PackCache` (prepacked inference weights, rebuilt when a parameter changes) and `unique_rows`.

The LSTM cells passed in are model.LSTMP modules, read through their attributes (input_weight,
state_weight, proj_weight, run_bias(), cell_clip, proj_clip, fast_weights); this module does
not import model.py.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .device import bf16_native


# ============================================================================ matmul backend
def _probe_onednn() -> bool:
    """oneDNN inner product with prepacked weights (torch.ops.mkldnn, private but stable since
    torch 2.0). Checked once against addmm; any failure falls back to torch.mm / F.linear."""
    if os.environ.get("TORCH_ELMO_NO_ONEDNN") == "1":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        lp = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((3, 8), (5, 8), (5,)))
        a = torch.randn(3, 5, generator=g)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        want = torch.addmm(b, x, w.t())
        ok = torch.allclose(lp(x, packed, b, "none", [], ""), want, atol=1e-5)
        ok = ok and torch.allclose(lp.binary(x, a, packed, b, "add"), want + a, atol=1e-5)
        ok = ok and torch.allclose(lp(x, w, None, "hardtanh", [-1.0, 1.0], ""),
                                   (x @ w.t()).clamp(-1, 1), atol=1e-5)
        return bool(ok)
    except Exception:  # noqa: BLE001 - any failure just means: use the portable path
        return False


ONEDNN = _probe_onednn()
# oneDNN's prepacked bf16 weights need a CPU with bf16 support (AVX512-BF16 / AMX; on an AVX2-only
# CPU the reorder raises): bf16 then takes the plain torch ops, emulated and slow, but it runs
ONEDNN_BF16 = ONEDNN and bf16_native(torch.device("cpu"))


def onednn_ok(t: torch.Tensor) -> bool:
    """Can oneDNN take this tensor? (CPU, fp32, or bf16 where the CPU has it; the probe passed.)"""
    return ONEDNN and t.device.type == "cpu" and (
        t.dtype == torch.float32 or (t.dtype == torch.bfloat16 and ONEDNN_BF16))


class Linear:
    """y = x @ weight.T (+ bias) (+ add), optionally clamped to [-clip, clip]; weight (out, in).

    On CPU the weight is handed to oneDNN once (prepacked when `pack`), which is what the time
    loop wants: the same weight times a few rows, every step. Elsewhere: F.linear / addmm.
    Used without autograd (inside no_grad or inside an autograd.Function)."""

    __slots__ = ("weight", "w", "onednn")

    def __init__(self, weight: torch.Tensor, pack: bool = True, batch_hint: int = 64,
                 onednn: bool = True):
        self.weight = weight
        self.onednn = onednn and onednn_ok(weight)
        self.w = weight
        if self.onednn:
            w = weight.detach().contiguous()
            self.w = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) if pack else w

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 add: Optional[torch.Tensor] = None, clip: Optional[float] = None) -> torch.Tensor:
        if self.onednn and x.dtype == self.weight.dtype and x.device.type == "cpu":
            lp = torch.ops.mkldnn._linear_pointwise
            if add is not None:
                y = lp.binary(x, add.contiguous(), self.w, bias, "add")
                return y.clamp_(-clip, clip) if clip is not None else y
            if clip is not None:
                return lp(x, self.w, bias, "hardtanh", [-clip, clip], "")
            return lp(x, self.w, bias, "none", [], "")
        if add is not None:
            y = torch.addmm(add if bias is None else add + bias, x, self.weight.t())
        else:
            y = F.linear(x, self.weight, bias)
        return y.clamp_(-clip, clip) if clip is not None else y


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for the large one-shot matmuls of a backward pass, with oneDNN on CPU.

    Input gradients (a row-major): a @ b directly. Weight gradients (a = g.t(), a transposed
    view, b = x): computed as (x.t() @ g).t() with g as oneDNN's weight operand, so only the
    small x is transposed (a contiguous copy of a large g can cost more than the matmul)."""
    if onednn_ok(a) and a.dtype == b.dtype and a.numel() > 0 and b.numel() > 0:
        lp = torch.ops.mkldnn._linear_pointwise
        if a.is_contiguous():
            return lp(a, b.t(), None, "none", [], "")
        if a.t().is_contiguous():
            return lp(b.t().contiguous(), a, None, "none", [], "").t()
    return a @ b


class _LinearFunction(torch.autograd.Function):
    """F.linear with its three matmuls done by oneDNN on CPU. Same math as F.linear."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return Linear(weight, pack=False)(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = mm(dy, weight)
        if ctx.needs_input_grad[1]:
            dw = mm(dy.t(), x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Differentiable linear on 2-D x; oneDNN on CPU fp32 under autograd, F.linear otherwise."""
    if (torch.is_grad_enabled() and onednn_ok(x) and x.dtype == weight.dtype == torch.float32
            and x.dim() == 2 and not torch.is_autocast_enabled("cpu")):
        return _LinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class PackCache:
    """Prepacked / derived weights for inference, rebuilt when a source parameter changes
    (in-place updates bump `_version`; `.to()` / re-assignment change the storage). Weights
    edited through `.data` bypass the version counter: call `BiLM.clear_fast_cache()` then.
    Pickles and deep-copies as an empty cache (prepacked oneDNN tensors can do neither)."""

    def __init__(self):
        self.entries: dict = {}

    def get(self, name, sources: tuple, build):
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in sources)
        hit = self.entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self.entries[name] = (key, value)
        return value

    def clear(self) -> None:
        self.entries.clear()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.entries = {}


def inference_dtype(device: torch.device) -> torch.dtype:
    """The matmul dtype without autograd: bf16 under CPU autocast with bf16, autocast's dtype
    on CUDA, else fp32."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return torch.bfloat16
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.float32


def unique_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of an integer matrix (N, C) and, per row, the index of its distinct row.

    torch.unique(dim=0) does a row-by-row lexicographic sort (slow on CPU); instead rows are
    hashed to one int64 (wrapping arithmetic), the hashes made unique, and the result checked
    against the input: on a hash collision, fall back to torch.unique(dim=0)."""
    g = torch.Generator().manual_seed(12345)
    mult = torch.randint(1, 2 ** 62, (ids.shape[1],), generator=g).to(ids.device) | 1
    h = (ids.long() * mult).sum(dim=1)
    uniq_h, inverse = torch.unique(h, return_inverse=True)
    first = torch.empty(uniq_h.numel(), dtype=torch.long, device=ids.device)
    first.scatter_(0, inverse, torch.arange(ids.shape[0], device=ids.device))
    uniq = ids.index_select(0, first)
    if not torch.equal(uniq.index_select(0, inverse), ids):
        return torch.unique(ids, dim=0, return_inverse=True)
    return uniq, inverse


# ============================================================================ choices
@dataclass(frozen=True)
class Choices:
    """How the CPU inference loop computes a layer. Every combination is exact to the reference
    (tests/test_kernels.py checks each); which is fastest depends on the machine.

    step_onednn   the recurrent step and the projection through oneDNN with prepacked weights
                  (else MKL addmm / F.linear)
    input_onednn  the same for the input-to-gate matmul hoisted out of the time loop
    two_threads   the two directions of a layer on two threads, one core each (`two_threads_ok`)
    tanh_sigmoid  tanh(x) = 2 sigmoid(2x) - 1 (`cell_update`), else torch.tanh
    block_mb      the input-to-gate matmul hoisted out of the time loop in blocks of at most this
                  many MB of gates (`infer_layer`)"""
    step_onednn: bool = True
    input_onednn: bool = True
    two_threads: bool = True
    tanh_sigmoid: bool = True
    block_mb: int = 16

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


DEFAULT = Choices()
# the values autotune.py times for each field (the default first); tests check every combination
CANDIDATES: dict[str, tuple] = {"step_onednn": (True, False), "input_onednn": (True, False),
                                "two_threads": (True, False), "tanh_sigmoid": (True, False),
                                "block_mb": (16, 8)}
# shape_class -> Choices measured on this machine (filled by autotune.py; DEFAULT where absent)
TUNED: dict[str, Choices] = {}


def shape_class(cell) -> str:
    """The shapes a layer's timings depend on: input, hidden and projection sizes."""
    return f"lstm{cell.input_weight.shape[1]}-{cell.hidden_dim}-{cell.proj_dim}"


# ============================================================================ packed layout
class Packing:
    """The packed time-major layout of a (B, T) validity mask (like a PackedSequence).

    Rows are sorted by their number of valid positions (descending, stable); step t holds the
    sorted rows 0 .. n_t - 1 (those with more than t valid positions) at packed positions
    offsets[t] + r, so finished rows drop out of the step matmul and no per-step mask is
    needed. A row's k-th step is its k-th valid position (for a prefix mask: position k); a
    position that is not valid is skipped (the state goes past it unchanged).
    fwd_index maps packed positions to flat (B * T) positions; bwd_index is the same layout with
    each row's valid positions taken in reverse (the backward direction: an index, no copies)."""

    def __init__(self, valid: torch.Tensor):
        device = valid.device
        v = valid.detach().to("cpu")
        B, T = v.shape
        lens = v.sum(dim=1)
        sorted_len, order = torch.sort(lens, descending=True, stable=True)
        self.B, self.T = B, T
        max_len = int(sorted_len[0]) if B else 0
        counts = torch.bincount(sorted_len, minlength=max_len + 1)
        sizes = (B - torch.cumsum(counts, 0))[:max_len]            # n_t = rows longer than t
        offsets = torch.cumsum(sizes, 0) - sizes
        self.batch_sizes: list[int] = sizes.tolist()
        self.offsets: list[int] = offsets.tolist()
        self.N = int(sizes.sum())
        self.full = max_len == T and bool((sorted_len == T).all())
        self.identity = bool((order == torch.arange(B)).all())
        step = torch.repeat_interleave(torch.arange(max_len), sizes)          # (N,)
        rank = torch.arange(self.N) - offsets[step]                           # sorted row
        row = order[rank]
        # time of each row's k-th valid position (B, T): the valid ones first, in order
        times = torch.argsort((~v).to(torch.int8), dim=1, stable=True)
        self.order = order.to(device)
        self.inverse_order = torch.argsort(order).to(device)
        self.fwd_index = (row * T + times[row, step]).to(device)
        self.bwd_index = (row * T + times[row, sorted_len[rank] - 1 - step]).to(device)
        last = offsets[(sorted_len - 1).clamp(min=0)] + torch.arange(B) if max_len else \
            torch.zeros(B, dtype=torch.long)
        # packed position of the same row one step earlier; N + row for step 0 (the initial
        # state, when indexing cat([packed, initial]))
        prev = torch.where(step > 0, offsets[(step - 1).clamp(min=0)] + rank, self.N + rank)
        self.prev_index = prev.to(device)
        self.has_steps = (sorted_len > 0).to(device)                          # (B,) sorted
        self.last_index = last.clamp(max=max(self.N - 1, 0)).to(device)       # (B,) sorted

    def blocks(self, max_rows: int):
        """Consecutive steps grouped into blocks of at most max_rows packed rows (at least one
        step each): yields ([(n_t, offset_t), ...], first row, end row)."""
        steps, r0 = [], 0
        for n, o in zip(self.batch_sizes, self.offsets):
            if steps and o + n - r0 > max_rows:
                yield steps, r0, o
                steps, r0 = [], o
            steps.append((n, o))
        if steps:
            yield steps, r0, self.N

    def final(self, packed: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """Per sorted row: the packed value at its last step, or `initial` if it has none."""
        if self.N == 0:
            return initial.clone()
        last = packed.index_select(0, self.last_index)
        return torch.where(self.has_steps.unsqueeze(1), last, initial)

    def pack(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> packed (N, F) through `index` (fwd_index or bwd_index)."""
        return x.reshape(self.B * self.T, x.shape[2]).index_select(0, index)

    def unpack(self, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Packed (N, F) -> (B, T, F) through `index`, with zeros where not valid."""
        if self.full and self.identity and index is self.fwd_index:
            return y.reshape(self.T, self.B, y.shape[1]).transpose(0, 1)
        out = y.new_zeros(self.B * self.T, y.shape[1])
        return out.index_copy(0, index, y).reshape(self.B, self.T, y.shape[1])


# ============================================================================ the LSTM layer
def lstmp_layer(cells: list, xs: list[torch.Tensor], pk: Packing, c0s: list[torch.Tensor],
                h0s: list[torch.Tensor], unique: Optional[tuple] = None,
                choices: Optional[Choices] = None):
    """One LSTMP layer of one or more directions over the same packing: THE device seam.

    cells[d]: the layer's LSTMP of direction d; xs[d] packed input (N, in); c0s[d] (B, H),
    h0s[d] (B, P) in sorted row order. Returns lists of packed outputs (N, P) and sorted final
    c (B, H), h (B, P); without autograd all of them in fp32.
    `unique` = (rep (U, in), [index (N,) per direction]) when every xs[d] is rep[index[d]]: the
    CPU inference loop then computes the input-to-gate matmul once per distinct input.
    `choices`: how the CPU inference loop runs (default: TUNED for these shapes, else DEFAULT)."""
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in xs + c0s + h0s)
        or any(p.requires_grad for cell in cells for p in cell.parameters()))
    if xs[0].device.type != "cpu":
        # ---- CUDA (and any other device): the plain math, for now. A CUDA fast path (a fused
        # kernel) would go here, beside the plain math, the way nanoGPT keeps `if self.flash:`.
        out = [lstmp_reference(cell, x, pk, c0, h0) for cell, x, c0, h0 in zip(cells, xs, c0s, h0s)]
        ys, cs, hs = [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
        if needs_grad:
            return ys, cs, hs
        return [y.float() for y in ys], [c.float() for c in cs], [h.float() for h in hs]
    if needs_grad:
        # ---- CPU training: one autograd node per direction, one after the other (the time
        # goes to large matmuls that already use every core)
        out = [LSTMPFunction.apply(x, c0, h0, cell.input_weight, cell.state_weight,
                                   cell.run_bias(), cell.proj_weight, pk, cell.cell_clip,
                                   cell.proj_clip)
               for cell, x, c0, h0 in zip(cells, xs, c0s, h0s)]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
    # ---- CPU inference: in place, prepacked weights, the directions on two threads
    dtype = inference_dtype(xs[0].device)
    ch = choices or TUNED.get(shape_class(cells[0]), DEFAULT)
    with torch.no_grad():
        if not (ch.two_threads and two_threads_ok(xs[0], len(cells))):
            ys, cs, hs = infer_layer(cells, xs, pk, c0s, h0s, dtype, unique, ch)
        else:
            us = [None, None] if unique is None else [(unique[0], [unique[1][d]]) for d in range(2)]
            out = on_two_threads(lambda d: infer_layer([cells[d]], [xs[d]], pk, [c0s[d]],
                                                       [h0s[d]], dtype, us[d], ch))
            ys, cs, hs = ([o[k][0] for o in out] for k in range(3))
    return [y.float() for y in ys], cs, hs


def lstmp_reference(cell, x: torch.Tensor, pk: Packing, c0: torch.Tensor, h0: torch.Tensor):
    """The plain math of one LSTMP layer (TF LSTMCell with projection), with autograd.

    x packed (N, in), c0 (B, H), h0 (B, P) sorted. Per step t (rows 0 .. n_t - 1):
        z = x_t W_ih^T + h W_hh^T + b            gates i, f, j, o  (b includes the forget bias)
        c = sigmoid(f) c + sigmoid(i) tanh(j)    clipped to [-cell_clip, cell_clip]
        h = (sigmoid(o) tanh(c)) W_p^T           clipped to [-proj_clip, proj_clip]
    Returns packed outputs h (N, P) and the sorted final c, h."""
    gates_x = F.linear(x, cell.input_weight, cell.run_bias())                # (N, 4H), hoisted
    w_hh, w_p = cell.state_weight.t(), cell.proj_weight.t()
    c, h = c0, h0
    cs, ys = [], []
    for n, o in zip(pk.batch_sizes, pk.offsets):
        z = torch.addmm(gates_x[o:o + n], h[:n], w_hh)                       # (n, 4H)
        i, f, j, og = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(j)
        if cell.cell_clip is not None:
            c = c.clamp(-cell.cell_clip, cell.cell_clip)
        h = (torch.sigmoid(og) * torch.tanh(c)) @ w_p                        # (n, P)
        if cell.proj_clip is not None:
            h = h.clamp(-cell.proj_clip, cell.proj_clip)
        cs.append(c)
        ys.append(h)
    if not ys:
        return x.new_zeros(0, w_p.shape[1]), c0.clone(), h0.clone()
    y = torch.cat(ys)
    return y, pk.final(torch.cat(cs), c0), pk.final(y, h0)


# tanh(x) = 2 sigmoid(2x) - 1, CPU only: torch.tanh costs several times torch.sigmoid there and
# the LSTM takes 2H tanh per position and step. The absolute error is below 2e-7 (torch.tanh's:
# 3e-8); the tests hold the fast path to 1e-5 and the bilm-tf fixture to 1e-6. For the j gate
# the doubling is folded into the weights (`scale_j`: exact), so one sigmoid covers all four
# gates: z_j' = 2 z_j, j = 2 sigmoid(z_j') - 1.
def scale_j(w: torch.Tensor) -> torch.Tensor:
    """Copy of a gate weight (4H, ...) or bias (4H,) with the j block doubled."""
    H = w.shape[0] // 4
    w = w.clone()
    w[2 * H:3 * H] *= 2.0
    return w


def tanh_via_sigmoid(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    t = torch.mul(x, 2.0, out=out) if out is not None else torch.mul(x, 2.0)
    return t.sigmoid_().mul_(2.0).sub_(1.0)


def cell_update(z: torch.Tensor, c: torch.Tensor, cell_clip: Optional[float],
                tanh_sigmoid: bool = True) -> torch.Tensor:
    """In place, no autograd: z (n, 4H) pre-activations i, f, j, o -> activations; c (n, H) fp32
    -> new c. Returns m = o * tanh(c) (n, H) in z's dtype. `tanh_sigmoid`: z's j block is 2 j
    (doubled by the weights, `scale_j`) and every tanh is taken through a sigmoid; else the
    plain torch.tanh on an undoubled j."""
    H = c.shape[1]
    s = z if z.dtype == torch.float32 else z.float()
    if tanh_sigmoid:
        s.sigmoid_()
        i, f, sj, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
        # c = f c + i j with j = 2 sj - 1:  f c + 2 i sj - i
        c.mul_(f).addcmul_(i, sj, value=2.0).sub_(i)
    else:
        s[:, :2 * H].sigmoid_()
        s[:, 3 * H:].sigmoid_()
        i, f, j, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H].tanh_(), s[:, 3 * H:]
        c.mul_(f).addcmul_(i, j)
    if cell_clip is not None:
        c.clamp_(-cell_clip, cell_clip)
    t = tanh_via_sigmoid(c) if tanh_sigmoid else torch.tanh(c)
    if z.dtype == torch.float32:
        return t.mul_(o)
    return torch.mul(t, o, out=t.new_empty(t.shape, dtype=z.dtype))   # rounded once, to bf16


def inference_weights(cell, dtype: torch.dtype, ch: Choices = DEFAULT):
    """(input Linear, run bias, state Linear, projection Linear) of an LSTMP for inference,
    cached in cell.fast_weights. With ch.tanh_sigmoid the j block of the gate weights and bias is
    doubled (exact) for `cell_update`'s tanh via sigmoid; ch.step_onednn / input_onednn: the
    state and projection / the input weights prepacked for oneDNN (else MKL)."""
    src = (cell.input_weight, cell.state_weight, cell.bias, cell.proj_weight)
    j = scale_j if ch.tanh_sigmoid else (lambda w: w)

    def build():
        return (Linear(j(cell.input_weight.detach()).to(dtype), batch_hint=1024,
                       onednn=ch.input_onednn),
                j(cell.run_bias().detach()).to(dtype),
                Linear(j(cell.state_weight.detach()).to(dtype), onednn=ch.step_onednn),
                Linear(cell.proj_weight.detach().to(dtype), onednn=ch.step_onednn))
    key = ("lstm", dtype, ch.tanh_sigmoid, ch.step_onednn, ch.input_onednn)
    return cell.fast_weights.get(key, src, build)


def infer_layer(cells: list, xs: list[torch.Tensor], pk: Packing, c0s: list[torch.Tensor],
                h0s: list[torch.Tensor], dtype: torch.dtype, unique: Optional[tuple] = None,
                ch: Choices = DEFAULT):
    """CPU inference of one layer of one or more directions, advanced together step by step,
    no autograd. Arguments as `lstmp_layer`'s. Returns packed outputs (N, P) in `dtype` and the
    sorted final (c, h) in fp32. Cell state kept in fp32.

    The input-to-gate matmul is hoisted out of the time loop, in blocks of consecutive steps of
    at most ch.block_mb MB of gates (16 by default): one (N, 4H) block would be a fresh mmap'ed
    allocation per call, whose first-touch page faults cost as much as a good part of the
    matmul; blocks of this size are recycled by malloc."""
    D = len(cells)
    lin = [inference_weights(cell, dtype, ch) for cell in cells]
    H4 = cells[0].state_weight.shape[0]
    budget = max(pk.batch_sizes[0] if pk.N else 1,
                 (ch.block_mb << 20) // (H4 * torch.finfo(dtype).bits // 8))
    gx_u = None
    if unique is not None:
        rep, index = unique
        gx_u = [lin_ih(rep.to(dtype), b) for lin_ih, b, _, _ in lin]          # (U, 4H)
    ys = [x.new_empty(pk.N, cell.proj_dim, dtype=dtype) for x, cell in zip(xs, cells)]
    cs = [c0.float().clone() for c0 in c0s]
    h_prev = [h0.to(dtype) for h0 in h0s]
    for steps, r0, r1 in pk.blocks(budget):
        if gx_u is not None:
            gx = [g.index_select(0, idx[r0:r1]) for g, idx in zip(gx_u, index)]
        else:
            gx = [lin_ih(x[r0:r1].to(dtype), b) for x, (lin_ih, b, _, _) in zip(xs, lin)]
        for n, o in steps:
            for d in range(D):
                cell = cells[d]
                _, _, lin_hh, lin_p = lin[d]
                z = lin_hh(h_prev[d][:n], add=gx[d][o - r0:o - r0 + n])       # (n, 4H)
                m = cell_update(z, cs[d][:n], cell.cell_clip, ch.tanh_sigmoid)  # (n, H)
                h = ys[d][o:o + n]
                h.copy_(lin_p(m, clip=cell.proj_clip))                       # (n, P)
                h_prev[d] = h
    hs = [pk.final(y, h0.to(dtype)).float() for y, h0 in zip(ys, h0s)]
    return ys, cs, hs


# ============================================================================ two directions
def two_threads_ok(x: torch.Tensor, n_dirs: int) -> bool:
    """Run the two directions on two threads? On a CPU with 2+ intra-op threads: the step
    matmuls (n <= 128 rows) split badly over cores, every core waiting for the slowest at each of
    the ~10 ops of a step, while two independent directions, one per core, never wait.
    TORCH_ELMO_SERIAL_DIRECTIONS=1 turns it off."""
    return (n_dirs == 2 and x.device.type == "cpu" and torch.get_num_threads() >= 2
            and os.environ.get("TORCH_ELMO_SERIAL_DIRECTIONS") != "1")


def on_two_threads(fn):
    """[fn(0), fn(1)] with fn(1) on a worker thread, each with half of the caller's intra-op
    threads and no autograd recording (grad mode is per thread; so is autocast, which is why
    the inference loop takes its dtype as an argument). The same ops as calling fn(0) then
    fn(1): the same results."""
    n = torch.get_num_threads()
    share = [max(1, n // 2), max(1, n - n // 2)]

    def run(d):
        torch.set_num_threads(share[d])
        try:
            with torch.no_grad():
                return fn(d)
        finally:
            torch.set_num_threads(n)
    other = _direction_pool().submit(run, 1)
    try:
        first = run(0)
    finally:
        second = other.result()          # waits (and re-raises) even if run(0) failed
    return [first, second]


_POOL = None


def _direction_pool():
    """One worker thread for the second direction, started on first use."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elmo-direction")
    return _POOL


def _forget_pool_after_fork() -> None:
    global _POOL      # a forked child has the executor but not its thread: start a new one
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


# ============================================================================ CPU training
class LSTMPFunction(torch.autograd.Function):
    """One LSTMP layer over a packed sequence, with backpropagation through time written out.

    Inputs: x (N, in) packed, c0 (B, H), h0 (B, P) sorted, the weights, the run-time bias (4H,)
    (forget bias included), the Packing and the clips. Saved per position: gate activations
    (4H), clipped c (H), tanh(c) (H), the output (P). Everything the backward can compute for
    all positions at once (the gate derivatives, the clip masks, previous states) is computed
    before its time loop with large element-wise ops; per step it does two matmuls (through the
    projection and the recurrent weight) and a few element-wise ops. The weight gradients are
    one matmul each over all positions."""

    @staticmethod
    def forward(ctx, x, c0, h0, w_ih, w_hh, run_bias, w_p, pk, cell_clip, proj_clip):
        H, P = w_hh.shape[0] // 4, w_p.shape[0]
        x = x.contiguous()
        gates = Linear(scale_j(w_ih), pack=False)(x, scale_j(run_bias))       # (N, 4H)
        cs = x.new_empty(pk.N, H)
        tcs = x.new_empty(pk.N, H)
        y = x.new_empty(pk.N, P)
        hint = max(pk.B, 1)
        lin_hh, lin_p = Linear(scale_j(w_hh), batch_hint=hint), Linear(w_p, batch_hint=hint)
        prev = None
        for n, o in zip(pk.batch_sizes, pk.offsets):
            if prev is None:
                h_prev, c_prev = h0[:n], c0[:n]
            else:
                h_prev, c_prev = y[prev:prev + n], cs[prev:prev + n]
            g = gates[o:o + n]
            torch.sigmoid(lin_hh(h_prev, add=g), out=g)            # i, f, (j+1)/2, o
            j = g[:, 2 * H:3 * H]
            j.mul_(2.0).sub_(1.0)
            c = cs[o:o + n]
            torch.mul(g[:, H:2 * H], c_prev, out=c)
            c.addcmul_(g[:, :H], j)
            if cell_clip is not None:
                c.clamp_(-cell_clip, cell_clip)
            tc = tanh_via_sigmoid(c, out=tcs[o:o + n])
            y[o:o + n] = lin_p(tc * g[:, 3 * H:], clip=proj_clip)
            prev = o
        c_fin, h_fin = pk.final(cs, c0), pk.final(y, h0)
        ctx.save_for_backward(x, c0, h0, w_ih, w_hh, w_p, gates, cs, tcs, y)
        ctx.pk, ctx.cell_clip, ctx.proj_clip = pk, cell_clip, proj_clip
        return y, c_fin, h_fin

    @staticmethod
    def backward(ctx, d_y, d_c, d_h):
        x, c0, h0, w_ih, w_hh, w_p, gates, cs, tcs, y = ctx.saved_tensors
        pk, cell_clip, proj_clip = ctx.pk, ctx.cell_clip, ctx.proj_clip
        H, P, B, N = w_hh.shape[0] // 4, w_p.shape[0], pk.B, pk.N
        need = ctx.needs_input_grad
        # ---- everything that does not depend on the recurrence, for all positions at once
        i, f, j, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        c_prev = torch.cat([cs, c0]).index_select(0, pk.prev_index)             # (N, H)
        K = torch.empty_like(gates)       # d gate pre-activation / d (dc or dm), then dZ in place
        torch.mul(i, 1.0 - i, out=K[:, :H]).mul_(j)                             # di = dc K_i
        torch.mul(f, 1.0 - f, out=K[:, H:2 * H]).mul_(c_prev)                   # df = dc K_f
        torch.mul(j, j, out=K[:, 2 * H:3 * H]).neg_().add_(1.0).mul_(i)         # dj = dc K_j
        torch.mul(o, 1.0 - o, out=K[:, 3 * H:]).mul_(tcs)                       # do = dm K_o
        del c_prev
        E = torch.mul(tcs, tcs).neg_().add_(1.0).mul_(o)                        # dc += dm E
        Mc = None
        if cell_clip is not None:
            Mc = (cs.abs() < cell_clip).to(cs.dtype)
            E.mul_(Mc)
        d_y = d_y.contiguous() if d_y is not None else y.new_zeros(N, P)
        Mh = (y.abs() < proj_clip).to(y.dtype) if proj_clip is not None else None
        if Mh is not None:
            d_y = d_y * Mh
        dh_state = d_h.clone() if d_h is not None else h0.new_zeros(B, P)
        dc_state = d_c.clone() if d_c is not None else c0.new_zeros(B, H)
        dY = y.new_empty(N, P)                                                  # grad of h pre-clip
        lin_p_t = Linear(w_p.t(), batch_hint=max(B, 1))                         # (n, P) -> (n, H)
        lin_hh_t = Linear(w_hh.t(), batch_hint=max(B, 1))                       # (n, 4H) -> (n, P)
        K3 = K.view(N, 4, H)
        for n, o_ in zip(reversed(pk.batch_sizes), reversed(pk.offsets)):
            dh = dY[o_:o_ + n]
            if Mh is not None:
                torch.addcmul(d_y[o_:o_ + n], dh_state[:n], Mh[o_:o_ + n], out=dh)
            else:
                torch.add(d_y[o_:o_ + n], dh_state[:n], out=dh)
            dm = lin_p_t(dh)                                                    # (n, H)
            if Mc is not None:
                dc = dc_state[:n] * Mc[o_:o_ + n]
                dc.addcmul_(dm, E[o_:o_ + n])
            else:
                dc = torch.addcmul(dc_state[:n], dm, E[o_:o_ + n])
            K3[o_:o_ + n, :3].mul_(dc.unsqueeze(1))
            K[o_:o_ + n, 3 * H:].mul_(dm)
            torch.mul(dc, f[o_:o_ + n], out=dc_state[:n])
            dh_state[:n] = lin_hh_t(K[o_:o_ + n])
        dZ = K
        d_x = mm(dZ, w_ih) if need[0] else None
        d_w_ih = mm(dZ.t(), x) if need[3] else None
        d_w_hh = mm(dZ.t(), torch.cat([y, h0]).index_select(0, pk.prev_index)) if need[4] else None
        d_bias = dZ.sum(0) if need[5] else None
        d_w_p = mm(dY.t(), o * tcs) if need[6] else None
        return (d_x, dc_state if need[1] else None, dh_state if need[2] else None,
                d_w_ih, d_w_hh, d_bias, d_w_p, None, None, None)
