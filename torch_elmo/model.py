"""Model: the ELMo biLM in one file (spec sections 3 to 7).

    char ids (B, T, C) --CharCNN--> token representation (B, T, P)          = ELMo layer 0
                        forward stack:  LSTMP_0 -> LSTMP_1 (+ residual)  -> (B, T, P) per layer
                        backward stack: the same, each row reversed within its own length
    ELMo layer l = concat(forward_l, backward_l)  (B, T, 2P)

Parameters are kept in PyTorch layout (gate order i, f, j, o; Linear weights (out, in)); only
export.py knows the TF names, shapes and gate order. The stored LSTM bias does NOT contain the
forget bias: +1.0 is added at run time, as TF's LSTMCell does (section 4).

The LSTM state is explicit: `c` (n_dirs, n_layers, B, H) and `h` (n_dirs, n_layers, B, P)
go in and come out of every call. `RowStateBuffer` keeps them between calls keyed by batch row,
which is what bilm-tf and allennlp do at inference (section 6).

How it is made fast (issue 6; the plain step-by-step reference lives in tests/reference.py and
the fast path is tested against it to 1e-5):

* Packed time-major layout (`_Packing`, like a PackedSequence): rows sorted by length
  (descending, stable); step t holds only the n_t rows still running, contiguously, so finished
  rows drop out of the step matmul and no per-step mask is needed. The backward direction is the
  same layout with each row's positions taken in reverse (an index, no reversing copies).
* Input-to-gate matmul hoisted out of the time loop (over all valid positions, in blocks of
  steps); at inference layer 0's is done once per distinct token and gathered.
* Inference (`BiLM.forward` without autograd): gate non-linearities and the cell update in
  place, the recurrent and projection matmuls with oneDNN weights prepacked once (`_Linear`,
  cached until a weight changes); on this CPU two such calls per step beat one batched
  (2, n, P) x (2, P, 4H) MKL bmm (the "one batched matmul per step" idea) by 1.1x to 2.5x, and
  MKL's skinny sgemm by more (benchmarks/speed.py prints it). With 2+ CPU threads the two
  directions run their time loops on two threads, one core each (`_infer_directions`): a
  (64-row) step matmul split over two cores makes both wait for the slower at every op; measured
  1.3x on the original model (fp32 and bf16). With one thread they advance together in one loop.
* tanh(x) computed as 2 sigmoid(2x) - 1: torch.tanh is ~7x slower than torch.sigmoid here.
* Training (`run_directions` with autograd): one autograd node per layer and direction
  (`_LSTMPFunction`) with a hand-written backward through time; the weight gradients are one
  large matmul each over all steps instead of one small one per step. Directions stay separate
  calls: fusing them cannot batch the matmuls (two weights; the batched bmm is the slower
  kernel) and gained nothing; running them on two threads (forward and backward) gained
  nothing measurable either (training time goes to large matmuls that already use all cores).
* Char CNN: computed once per distinct token of the call (padding and repeats gathered back,
  their gradients summed), and only over the convolution windows that touch a real character:
  the windows lying entirely in the within-word padding all give the same value, computed once.
  Exact: max over all windows is unchanged.
* bf16: under `torch.autocast("cpu", dtype=torch.bfloat16)` the inference path runs its matmuls
  in bf16 (cell state and element-wise math in fp32, outputs returned in fp32). fp32 stays the
  default and the exact path.
* Not used: torch.compile of the step's element-wise part (measured: within noise of eager,
  which is ~5% of inference time, for 17-22 s of compilation per process).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chars import PAD_CHAR
from .config import Options

FORGET_BIAS = 1.0
PAD_ID = PAD_CHAR + 1  # the within-word padding character, in model ids (+1 offset)


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


_ONEDNN = _probe_onednn()


def _onednn_ok(t: torch.Tensor) -> bool:
    return _ONEDNN and t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)


class _Linear:
    """y = x @ weight.T (+ bias) (+ add), optionally clamped to [-clip, clip]; weight (out, in).

    On CPU the weight is handed to oneDNN once (prepacked when `pack`), which is what the time
    loop wants: the same weight times a few rows, every step. Elsewhere: F.linear / addmm.
    Used without autograd (inside no_grad or inside an autograd.Function)."""

    __slots__ = ("weight", "w", "onednn")

    def __init__(self, weight: torch.Tensor, pack: bool = True, batch_hint: int = 64):
        self.weight = weight
        self.onednn = _onednn_ok(weight)
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


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for the large one-shot matmuls of the backward pass, with oneDNN on CPU.

    Input gradients (a row-major): a @ b directly. Weight gradients (a = g.t(), a transposed
    view, b = x): computed as (x.t() @ g).t() with g as oneDNN's weight operand, so only the
    small x is transposed; a contiguous copy of e.g. a (2560, 4096) g costs more than the
    matmul on this CPU (strided by a power of two), and MKL's sgemm is slower here."""
    if _onednn_ok(a) and a.dtype == b.dtype and a.numel() > 0 and b.numel() > 0:
        lp = torch.ops.mkldnn._linear_pointwise
        if a.is_contiguous():
            return lp(a, b.t(), None, "none", [], "")
        if a.t().is_contiguous():
            return lp(b.t().contiguous(), a, None, "none", [], "").t()
    return a @ b


class _LinearFunction(torch.autograd.Function):
    """F.linear with its three matmuls done by oneDNN on CPU (MKL's sgemm is far from this
    machine's peak on the char CNN's shapes). Same math as F.linear."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _Linear(weight, pack=False)(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy, weight)
        if ctx.needs_input_grad[1]:
            dw = _mm(dy.t(), x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Differentiable linear on 2-D x; oneDNN on CPU fp32 under autograd, F.linear otherwise."""
    if (torch.is_grad_enabled() and _onednn_ok(x) and x.dtype == weight.dtype == torch.float32
            and x.dim() == 2 and not torch.is_autocast_enabled("cpu")):
        return _LinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _PackCache:
    """Prepacked / derived weights for inference, rebuilt when a source parameter changes
    (in-place updates bump `_version`; `.to()` / re-assignment change the storage). Weights
    edited through `.data` bypass the version counter: call `BiLM.clear_fast_cache()` then."""

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


def _inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 under CPU autocast with bf16 (GPU: autocast's dtype), else fp32."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return torch.bfloat16
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.float32


# ============================================================================ char CNN
class CharCNN(nn.Module):
    """Context-independent token encoder: char embedding -> CNN -> max-pool -> highway -> proj."""

    # distinct tokens encoded per chunk (keeps the conv outputs in cache)
    CHUNK = 256

    def __init__(self, options: Options):
        super().__init__()
        cnn = options.char_cnn
        self.activation = cnn.activation
        D, n_filters, P = cnn.embedding.dim, cnn.n_filters, options.lstm.projection_dim
        # 261 trained rows (raw ids 0..260); forward() prepends the zero row of the padding token.
        self.char_embed = nn.Parameter(torch.empty(261, D))
        self.convs = nn.ModuleList(nn.Conv1d(D, n, w) for w, n in cnn.filters)
        self.highways = nn.ModuleList(_Highway(n_filters) for _ in range(cnn.n_highway))
        self.projection = nn.Linear(n_filters, P) if n_filters != P else None
        self.output_dim = P if self.projection is not None else n_filters
        self._cache = _PackCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """bilm-tf training inits (section 3)."""
        nn.init.uniform_(self.char_embed, -1.0, 1.0)
        for conv in self.convs:
            if self.activation == "relu":
                nn.init.uniform_(conv.weight, -0.05, 0.05)
            else:
                w, D = conv.kernel_size[0], conv.in_channels
                nn.init.normal_(conv.weight, 0.0, math.sqrt(1.0 / (w * D)))
            nn.init.zeros_(conv.bias)
        for hw in self.highways:
            hw.reset_parameters()
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, 0.0, math.sqrt(1.0 / self.projection.in_features))
            nn.init.zeros_(self.projection.bias)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = _PackCache()  # prepacked oneDNN tensors neither pickle nor deepcopy
        return state

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        """char ids (..., C) -> token representations (..., P). Each distinct token (padding
        included) is encoded once and gathered back; gradients of repeats are summed."""
        rep, inverse = self.forward_unique(char_ids)
        return rep.index_select(0, inverse).reshape(*char_ids.shape[:-1], self.output_dim)

    def forward_unique(self, char_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """char ids (..., C) -> (the representations of the distinct tokens (U, P), the index of
        each flattened position's token (N,))."""
        flat = char_ids.reshape(-1, char_ids.shape[-1])
        if flat.shape[0] == 0:
            return (self.char_embed.new_zeros(0, self.output_dim),
                    torch.zeros(0, dtype=torch.long, device=char_ids.device))
        uniq, inverse = _unique_rows(flat)
        return self.encode(uniq), inverse.reshape(-1)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(U, C) char ids -> (U, P), no deduplication."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        dtype = torch.float32 if needs_grad else _inference_dtype(ids.device)
        fast = not needs_grad and _onednn_ok(self.char_embed)
        x = self._conv_features(ids, fast, dtype)                 # (U, F)
        for k, hw in enumerate(self.highways):
            x = hw.fused(x, self._cache, k, dtype) if fast else hw(x)
        if self.projection is not None:
            if fast:
                lin = self._cache.get(("proj", dtype), (self.projection.weight,),
                                      lambda: _Linear(self.projection.weight.detach().to(dtype)))
                bias = self.projection.bias.detach().to(dtype)
                x = lin(x.to(dtype), bias)
            else:
                x = _linear(x, self.projection.weight, self.projection.bias)
        return x.float()

    def _conv_features(self, ids: torch.Tensor, fast: bool, dtype: torch.dtype) -> torch.Tensor:
        """conv + bias -> max over ALL char positions (pads included) -> activation (section 3).

        Only windows touching a real character are computed: with L = 1 + the last position
        whose id is not the within-word pad, every window starting at s >= L sees pad chars
        only and has one common value `pad_value`, computed once. Tokens are sorted by L and
        encoded in chunks, each over the windows s < max L of its chunk."""
        U, C = ids.shape
        table = torch.cat([self.char_embed.new_zeros(1, self.char_embed.shape[1]), self.char_embed])
        act = torch.relu if self.activation == "relu" else torch.tanh
        positions = torch.arange(1, C + 1, device=ids.device)
        L = ((ids != PAD_ID) * positions).amax(dim=1)              # (U,)
        L_sorted, order = torch.sort(L, stable=True)
        ids = ids.index_select(0, order)
        L_host = L_sorted.tolist()
        widths = [conv.kernel_size[0] for conv in self.convs]
        weights = []
        for i, conv in enumerate(self.convs):
            w = conv.weight                                        # (n, D, w) -> (n, D * w)
            if fast:
                lin = self._cache.get(("conv", i, dtype), (conv.weight,), lambda w=w: _Linear(
                    w.detach().reshape(w.shape[0], -1).to(dtype), pack=True, batch_hint=1024))
                weights.append((lin, conv.bias.detach().to(dtype)))
            else:
                weights.append((w.reshape(w.shape[0], -1), conv.bias))
        if fast:
            table = table.detach().to(dtype)
        # the value of an all-pad window, per bank
        pad_window = table[PAD_ID].unsqueeze(1)                    # (D, 1)
        pad_values = []
        for (w_, b_), width in zip(weights, widths):
            win = pad_window.expand(-1, width).reshape(1, -1)       # (1, D * w), layout (D, w)
            pad_values.append(w_(win, b_) if fast else _linear(win, w_, b_))
        chunks = []
        for s in range(0, U, self.CHUNK):
            e = min(s + self.CHUNK, U)
            Lmax = max(L_host[e - 1], 1)
            span = min(C, Lmax + max(widths) - 1)
            emb = F.embedding(ids[s:e, :span], table)              # (k, span, D)
            feats = []
            for (w_, b_), width, pad_value in zip(weights, widths, pad_values):
                S = min(Lmax, C - width + 1)                       # windows s = 0 .. S-1
                win = emb[:, :S + width - 1].unfold(1, width, 1)   # (k, S, D, w)
                win = win.reshape(-1, win.shape[2] * width)
                y = w_(win, b_) if fast else _linear(win, w_, b_)
                y = y.reshape(e - s, S, -1).amax(dim=1)            # (k, n)
                if S < C - width + 1:                              # the all-pad windows
                    y = torch.maximum(y, pad_value)
                feats.append(act(y))
            chunks.append(torch.cat(feats, dim=1))
        x = torch.cat(chunks, dim=0)
        return torch.zeros_like(x).index_copy(0, order, x)        # back to the input order


def _unique_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class _Highway(nn.Module):
    """y = t * relu(transform(x)) + (1 - t) * x with t = sigmoid(carry(x)) (section 3: the gate
    TF calls "carry" multiplies the transform branch). ReLU whatever the CNN activation."""

    def __init__(self, dim: int):
        super().__init__()
        self.carry = nn.Linear(dim, dim)
        self.transform = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        std = math.sqrt(1.0 / self.carry.in_features)
        nn.init.normal_(self.carry.weight, 0.0, std)
        nn.init.normal_(self.transform.weight, 0.0, std)
        nn.init.constant_(self.carry.bias, -2.0)   # t ~ 0.12 at init: mostly pass-through
        nn.init.zeros_(self.transform.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(_linear(x, self.carry.weight, self.carry.bias))
        return t * torch.relu(_linear(x, self.transform.weight, self.transform.bias)) + (1.0 - t) * x

    def fused(self, x: torch.Tensor, cache: _PackCache, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Inference: carry and transform as ONE (2F, F) prepacked matmul."""
        src = (self.carry.weight, self.transform.weight, self.carry.bias, self.transform.bias)

        def build():
            w = torch.cat([self.transform.weight, self.carry.weight]).detach().to(dtype)
            b = torch.cat([self.transform.bias, self.carry.bias]).detach().to(dtype)
            return _Linear(w, batch_hint=1024), b
        lin, b = cache.get(("highway", k, dtype), src, build)
        y = lin(x.to(dtype), b)
        n = x.shape[1]
        t = torch.sigmoid(y[:, n:])
        return t * torch.relu(y[:, :n]) + (1.0 - t) * x


# ============================================================================ LSTM
class LSTMP(nn.Module):
    """TF LSTMCell(num_units=H, num_proj=P, cell_clip, proj_clip), no peepholes (section 4).

    Weights: input_weight (4H, in), state_weight (4H, P), bias (4H,), proj_weight (P, H),
    gates in PyTorch order i, f, j, o."""

    def __init__(self, input_dim: int, hidden_dim: int, proj_dim: int,
                 cell_clip: Optional[float], proj_clip: Optional[float]):
        super().__init__()
        self.hidden_dim, self.proj_dim = hidden_dim, proj_dim
        self.cell_clip, self.proj_clip = cell_clip, proj_clip
        self.input_weight = nn.Parameter(torch.empty(4 * hidden_dim, input_dim))
        self.state_weight = nn.Parameter(torch.empty(4 * hidden_dim, proj_dim))
        self.bias = nn.Parameter(torch.empty(4 * hidden_dim))
        self.proj_weight = nn.Parameter(torch.empty(proj_dim, hidden_dim))
        self._cache = _PackCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TF glorot-uniform over the concatenated kernel (in + P, 4H) and (H, P); bias 0."""
        fan_in = self.input_weight.shape[1] + self.proj_dim
        limit = math.sqrt(6.0 / (fan_in + 4 * self.hidden_dim))
        nn.init.uniform_(self.input_weight, -limit, limit)
        nn.init.uniform_(self.state_weight, -limit, limit)
        nn.init.zeros_(self.bias)
        limit = math.sqrt(6.0 / (self.hidden_dim + self.proj_dim))
        nn.init.uniform_(self.proj_weight, -limit, limit)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = _PackCache()
        return state

    def run_bias(self) -> torch.Tensor:
        """The bias used at run time: stored bias + forget bias on the f block."""
        H = self.hidden_dim
        return torch.cat([self.bias[:H], self.bias[H:2 * H] + FORGET_BIAS, self.bias[2 * H:]])

    def forward(self, x: torch.Tensor, valid: torch.Tensor, c: torch.Tensor, h: torch.Tensor):
        """x (B, T, in), valid (B, T) bool prefix mask, c (B, H), h (B, P).

        Returns outputs (B, T, P) (zeros where not valid) and the state after each row's last
        valid step (rows with no valid step keep their state)."""
        B, T, _ = x.shape
        lengths = _prefix_lengths(valid)
        if lengths is None:
            return self.forward_masked(x, valid, c, h)
        pk = _Packing(lengths, T)
        xp = x.reshape(B * T, x.shape[2]).index_select(0, pk.fwd_index)
        y, c_s, h_s = self.run_packed(xp, pk, c.index_select(0, pk.order), h.index_select(0, pk.order))
        inv = pk.inverse_order
        return pk.unpack(y, pk.fwd_index), c_s.index_select(0, inv), h_s.index_select(0, inv)

    def run_packed(self, xp: torch.Tensor, pk: "_Packing", c0: torch.Tensor, h0: torch.Tensor):
        """Packed input (N, in), sorted initial state (B, H), (B, P) -> packed outputs (N, P) and
        the sorted final state. Autograd through time when needed, else the in-place loop."""
        needs_grad = torch.is_grad_enabled() and (
            xp.requires_grad or c0.requires_grad or h0.requires_grad
            or any(p.requires_grad for p in self.parameters()))
        if needs_grad:
            return _LSTMPFunction.apply(xp, c0, h0, self.input_weight, self.state_weight, self.bias,
                                        self.proj_weight, pk, self.cell_clip, self.proj_clip)
        with torch.no_grad():
            dtype = _inference_dtype(xp.device)
            (y,), (c,), (h,) = _infer_layer([self], [xp], pk, [c0], [h0], dtype)
        return y, c, h

    def packed_weights(self, dtype: torch.dtype):
        """(input _Linear, run bias, state _Linear, projection _Linear) for inference, cached.
        The j block of the gate weights and bias is doubled (exact) for `_tanh_j`."""
        src = (self.input_weight, self.state_weight, self.bias, self.proj_weight)

        def build():
            return (_Linear(_scale_j(self.input_weight.detach()).to(dtype), batch_hint=1024),
                    _scale_j(self.run_bias().detach()).to(dtype),
                    _Linear(_scale_j(self.state_weight.detach()).to(dtype)),
                    _Linear(self.proj_weight.detach().to(dtype)))
        return self._cache.get(("lstm", dtype), src, build)

    def forward_masked(self, x: torch.Tensor, valid: torch.Tensor, c: torch.Tensor,
                       h: torch.Tensor):
        """Any (B, T) mask, not only prefixes: a step where a row is not valid leaves its state
        alone and outputs zeros. Plain autograd, one step at a time (slow, general)."""
        B, T, _ = x.shape
        gates_x = torch.addmm(self.run_bias(), x.reshape(B * T, x.shape[2]), self.input_weight.t())
        gates_x = gates_x.reshape(B, T, 4 * self.hidden_dim)
        w_hh, w_p = self.state_weight.t(), self.proj_weight.t()
        outputs = []
        for t in range(T):
            z = torch.addmm(gates_x[:, t], h, w_hh)
            i, f, j, o = z.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(j)
            if self.cell_clip is not None:
                c_new = c_new.clamp(-self.cell_clip, self.cell_clip)
            h_new = (torch.sigmoid(o) * torch.tanh(c_new)) @ w_p
            if self.proj_clip is not None:
                h_new = h_new.clamp(-self.proj_clip, self.proj_clip)
            m = valid[:, t].unsqueeze(1)
            c = torch.where(m, c_new, c)
            h = torch.where(m, h_new, h)
            outputs.append(h_new * m)
        if not outputs:
            return x.new_zeros(B, 0, self.proj_dim), c, h
        return torch.stack(outputs, dim=1), c, h


def _prefix_lengths(valid: torch.Tensor) -> Optional[torch.Tensor]:
    """Row lengths if `valid` (B, T) is a prefix mask, else None."""
    lengths = valid.sum(dim=1)
    T = valid.shape[1]
    if bool(valid.all()):
        return lengths
    prefix = torch.arange(T, device=valid.device).unsqueeze(0) < lengths.unsqueeze(1)
    return lengths if bool((prefix == valid).all()) else None


class _Packing:
    """Rows sorted by length (descending, stable) in a time-major packed layout: step t holds
    sorted rows 0 .. n_t - 1 (those longer than t) at packed positions offsets[t] + r. The
    backward direction uses the same layout with each row's positions reversed (bwd_index)."""

    def __init__(self, lengths: torch.Tensor, T: int):
        device = lengths.device
        lens = lengths.detach().to("cpu", torch.long)
        B = lens.numel()
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
        self.order = order.to(device)
        self.inverse_order = torch.argsort(order).to(device)
        self.fwd_index = (row * T + step).to(device)
        self.bwd_index = (row * T + sorted_len[rank] - 1 - step).to(device)
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

    def unpack(self, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Packed (N, P) -> (B, T, P) with zeros where not valid."""
        if self.full and self.identity and index is self.fwd_index:
            return y.reshape(self.T, self.B, y.shape[1]).transpose(0, 1)
        out = y.new_zeros(self.B * self.T, y.shape[1])
        return out.index_copy(0, index, y).reshape(self.B, self.T, y.shape[1])


# tanh(x) = 2 sigmoid(2x) - 1. torch.tanh on this CPU costs ~5 ns per element against ~0.4 for
# torch.sigmoid (benchmarks/speed.py's notes), and the LSTM takes 2H tanh per position and step.
# The absolute error is below 2e-7 (torch.tanh's: 3e-8); the tests hold the fast path to 1e-5 and
# the bilm-tf fixture to 1e-6. For the j gate the doubling is folded into the weights
# (`_scale_j`: exact), so one sigmoid covers all four gates: z_j' = 2 z_j, j = 2 sigmoid(z_j') - 1.
def _scale_j(w: torch.Tensor) -> torch.Tensor:
    """Copy of a gate weight (4H, ...) or bias (4H,) with the j block doubled."""
    H = w.shape[0] // 4
    w = w.clone()
    w[2 * H:3 * H] *= 2.0
    return w


def _tanh_via_sigmoid(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    t = torch.mul(x, 2.0, out=out) if out is not None else torch.mul(x, 2.0)
    return t.sigmoid_().mul_(2.0).sub_(1.0)


def _cell_update(z: torch.Tensor, c: torch.Tensor, cell_clip: Optional[float]) -> torch.Tensor:
    """In place, no autograd: z (n, 4H) pre-activations i, f, j' = 2 j, o (j doubled by the
    weights) -> sigmoids; c (n, H) fp32 -> new c. Returns m = o * tanh(c) (n, H) in z's dtype."""
    H = c.shape[1]
    s = z.sigmoid_() if z.dtype == torch.float32 else z.float().sigmoid_()
    i, f, sj, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
    # c = f c + i j with j = 2 sj - 1:  f c + 2 i sj - i
    c.mul_(f).addcmul_(i, sj, value=2.0).sub_(i)
    if cell_clip is not None:
        c.clamp_(-cell_clip, cell_clip)
    t = _tanh_via_sigmoid(c)
    if z.dtype == torch.float32:
        return t.mul_(o)
    return torch.mul(t, o, out=t.new_empty(t.shape, dtype=z.dtype))   # rounded once, to bf16


def _infer_layer(cells: list[LSTMP], xs: list[torch.Tensor], pk: _Packing,
                 c0s: list[torch.Tensor], h0s: list[torch.Tensor], dtype: torch.dtype,
                 unique: Optional[tuple] = None):
    """One layer of one or more directions, advanced together step by step, no autograd.

    xs[d] packed (N, in); c0s[d] (B, H), h0s[d] (B, P) sorted. Returns packed outputs (N, P) in
    the activation dtype and the sorted final (c, h) in fp32. Cell state kept in fp32.
    `unique` = (rep (U, in), [index (N,) per direction]) when every xs[d] is rep[index[d]]: the
    input-to-gate matmul is then done once per distinct input and gathered.

    The input-to-gate matmul is hoisted out of the time loop, in blocks of consecutive steps of
    at most ~16 MB of gates: one (N, 4H) block would be a fresh mmap'ed allocation per call, and
    first-touch page faults cost ~1 ms/MB on this machine (as much as a good part of the matmul);
    blocks of this size are recycled by malloc."""
    D = len(cells)
    lin = [cell.packed_weights(dtype) for cell in cells]
    H4 = cells[0].state_weight.shape[0]
    budget = max(pk.batch_sizes[0] if pk.N else 1,
                 (16 << 20) // (H4 * torch.finfo(dtype).bits // 8))
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
                z = lin_hh(h_prev[d][:n], add=gx[d][o - r0:o - r0 + n])
                m = _cell_update(z, cs[d][:n], cell.cell_clip)
                h = ys[d][o:o + n]
                h.copy_(lin_p(m, clip=cell.proj_clip))
                h_prev[d] = h
    hs = [pk.final(y, h0.to(dtype)).float() for y, h0 in zip(ys, h0s)]
    return ys, cs, hs


def _two_threads_ok(x: torch.Tensor, n_dirs: int) -> bool:
    """Run the two directions on two threads? On a CPU with 2+ intra-op threads: the step
    matmuls (n <= 128 rows) split badly over cores, every core waiting for the slowest at each of
    the ~10 ops of a step, while two independent directions, one per core, never wait.
    TORCH_ELMO_SERIAL_DIRECTIONS=1 turns it off."""
    return (n_dirs == 2 and x.device.type == "cpu" and torch.get_num_threads() >= 2
            and os.environ.get("TORCH_ELMO_SERIAL_DIRECTIONS") != "1")


def _on_two_threads(fn):
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


def _infer_directions(cells: list[LSTMP], xs: list[torch.Tensor], pk: _Packing,
                      c0s: list[torch.Tensor], h0s: list[torch.Tensor], dtype: torch.dtype,
                      unique: Optional[tuple] = None):
    """`_infer_layer` for all directions: both in one time loop, or one per thread."""
    if not _two_threads_ok(xs[0], len(cells)):
        return _infer_layer(cells, xs, pk, c0s, h0s, dtype, unique)
    us = [None, None] if unique is None else [(unique[0], [unique[1][d]]) for d in range(2)]
    out = _on_two_threads(
        lambda d: _infer_layer([cells[d]], [xs[d]], pk, [c0s[d]], [h0s[d]], dtype, us[d]))
    return [out[0][0][0], out[1][0][0]], [out[0][1][0], out[1][1][0]], [out[0][2][0], out[1][2][0]]


class _LSTMPFunction(torch.autograd.Function):
    """One LSTMP layer over a packed sequence, with backpropagation through time written out.

    Saved per position: gate activations (4H), clipped c (H), tanh(c) (H), the output (P).
    Everything the backward can compute for all positions at once (the gate derivatives, the
    clip masks, previous states) is computed before its time loop with large element-wise ops;
    per step it does two matmuls (through the projection and the recurrent weight) and a few
    element-wise ops. The weight gradients are one matmul each over all positions."""

    @staticmethod
    def forward(ctx, x, c0, h0, w_ih, w_hh, bias, w_p, pk, cell_clip, proj_clip):
        H, P = w_hh.shape[0] // 4, w_p.shape[0]
        x = x.contiguous()
        run_bias = torch.cat([bias[:H], bias[H:2 * H] + FORGET_BIAS, bias[2 * H:]])
        gates = _Linear(_scale_j(w_ih), pack=False)(x, _scale_j(run_bias))   # (N, 4H)
        cs = x.new_empty(pk.N, H)
        tcs = x.new_empty(pk.N, H)
        y = x.new_empty(pk.N, P)
        hint = max(pk.B, 1)
        lin_hh, lin_p = _Linear(_scale_j(w_hh), batch_hint=hint), _Linear(w_p, batch_hint=hint)
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
            tc = _tanh_via_sigmoid(c, out=tcs[o:o + n])
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
        lin_p_t = _Linear(w_p.t(), batch_hint=max(B, 1))                        # (n, P) -> (n, H)
        lin_hh_t = _Linear(w_hh.t(), batch_hint=max(B, 1))                      # (n, 4H) -> (n, P)
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
        d_x = _mm(dZ, w_ih) if need[0] else None
        d_w_ih = _mm(dZ.t(), x) if need[3] else None
        d_w_hh = _mm(dZ.t(), torch.cat([y, h0]).index_select(0, pk.prev_index)) if need[4] else None
        d_bias = dZ.sum(0) if need[5] else None
        d_w_p = _mm(dY.t(), o * tcs) if need[6] else None
        return (d_x, dc_state if need[1] else None, dh_state if need[2] else None,
                d_w_ih, d_w_hh, d_bias, d_w_p, None, None, None)


def _layer_packed(cells: list[LSTMP], xps: list[torch.Tensor], pk: _Packing,
                  c0s: list[torch.Tensor], h0s: list[torch.Tensor]):
    """One layer of each direction over the same packing: lists of packed outputs (N, P) and
    sorted final c (B, H), h (B, P). Under autograd one `_LSTMPFunction` per direction, one
    after the other (measured: running them on two threads, forward and backward, gained
    nothing for training, whose time goes to large matmuls); without, the inference loop with
    the directions on two threads (`_infer_directions`)."""
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in xps + c0s + h0s)
        or any(p.requires_grad for cell in cells for p in cell.parameters()))
    if not needs_grad:
        with torch.no_grad():
            return _infer_directions(cells, xps, pk, c0s, h0s, _inference_dtype(xps[0].device))
    out = [cell.run_packed(x, pk, c0, h0) for cell, x, c0, h0 in zip(cells, xps, c0s, h0s)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) time index that reverses each row's first `length` positions and leaves padding in
    place; applying it twice is the identity."""
    t = torch.arange(T, device=lengths.device).unsqueeze(0)       # (1, T)
    L = lengths.unsqueeze(1)                                       # (B, 1)
    return torch.where(t < L, L - 1 - t, t)                        # (B, T)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))


# ============================================================================ biLM
class BiLM(nn.Module):
    """Char CNN + forward and backward stacks of LSTMP layers (sections 3 to 5)."""

    def __init__(self, options: Options):
        super().__init__()
        self.options = options
        lstm = options.lstm
        self.n_layers, self.hidden_dim, self.proj_dim = lstm.n_layers, lstm.dim, lstm.projection_dim
        self.n_dirs = 2 if options.bidirectional else 1
        self.use_skip_connections = lstm.use_skip_connections
        self.char_cnn = CharCNN(options)
        if self.char_cnn.output_dim != self.proj_dim:
            raise ValueError("the char CNN output must have lstm.projection_dim features")

        def stack():
            return nn.ModuleList(LSTMP(self.proj_dim, lstm.dim, lstm.projection_dim,
                                       lstm.cell_clip, lstm.proj_clip) for _ in range(lstm.n_layers))
        self.forward_layers = stack()
        self.backward_layers = stack() if self.n_dirs == 2 else None
        self.dropout = options.dropout  # on every LSTM layer input, training only (section 9)

    @property
    def directions(self) -> list[nn.ModuleList]:
        return [self.forward_layers] + ([self.backward_layers] if self.n_dirs == 2 else [])

    def clear_fast_cache(self) -> None:
        """Drop the prepacked inference weights (rebuilt on the next call). Only needed after
        editing weights through `.data`; in-place updates and load_state_dict are detected."""
        for m in self.modules():
            if isinstance(getattr(m, "_cache", None), _PackCache):
                m._cache.clear()

    def zero_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.char_cnn.char_embed
        c = p.new_zeros(self.n_dirs, self.n_layers, batch_size, self.hidden_dim)
        h = p.new_zeros(self.n_dirs, self.n_layers, batch_size, self.proj_dim)
        return c, h

    def run_direction(self, d: int, x: torch.Tensor, valid: torch.Tensor,
                      c0: torch.Tensor, h0: torch.Tensor):
        """One direction's stack on its own (already ordered) input x (B, T, P).

        c0 (n_layers, B, H), h0 (n_layers, B, P). Returns the per-layer outputs (each (B, T, P),
        residual included) and the final (c, h) stacked like c0, h0."""
        B, T, _ = x.shape
        lengths = _prefix_lengths(valid)
        if lengths is None:
            return self._run_direction_masked(d, x, valid, c0, h0)
        pk = _Packing(lengths, T)
        xp = x.reshape(B * T, x.shape[2]).index_select(0, pk.fwd_index)   # packed (N, P)
        c0s, h0s = c0.index_select(1, pk.order), h0.index_select(1, pk.order)
        outputs, cs, hs = [], [], []
        for l, layer in enumerate(self.directions[d]):
            if self.training and self.dropout > 0:
                # fresh mask per position; the residual adds the DROPPED input (TF DropoutWrapper
                # around ResidualWrapper(LSTMCell))
                xp = F.dropout(xp, self.dropout, training=True)
            y, c, h = layer.run_packed(xp, pk, c0s[l], h0s[l])
            if l > 0 and self.use_skip_connections:
                y = y + xp  # added after proj clipping, not fed back
            outputs.append(pk.unpack(y, pk.fwd_index))
            cs.append(c)
            hs.append(h)
            xp = y
        inv = pk.inverse_order
        return outputs, torch.stack(cs).index_select(1, inv), torch.stack(hs).index_select(1, inv)

    def run_directions(self, xs: list[torch.Tensor], valid: torch.Tensor, c0: torch.Tensor,
                       h0: torch.Tensor):
        """Every direction's stack, each on its own (already ordered) input xs[d] (B, T, P),
        layer by layer: dropout masks are drawn for layer 0 forward, layer 0 backward, layer 1
        forward, ... whatever the path. c0 (n_dirs, n_layers, B, H), h0 (n_dirs, n_layers, B, P).
        Returns per direction its layer outputs (each (B, T, P)) and the final (c, h) stacked
        like c0, h0. Without autograd, on a multi-core CPU, the two directions of a layer run
        on two threads."""
        B, T, _ = xs[0].shape
        lengths = _prefix_lengths(valid)
        if lengths is None:
            per = [self._run_direction_masked(d, x, valid, c0[d], h0[d]) for d, x in enumerate(xs)]
            return ([p[0] for p in per], torch.stack([p[1] for p in per]),
                    torch.stack([p[2] for p in per]))
        pk = _Packing(lengths, T)
        xps = [x.reshape(B * T, x.shape[2]).index_select(0, pk.fwd_index) for x in xs]  # (N, P)
        c0s, h0s = c0.index_select(2, pk.order), h0.index_select(2, pk.order)
        outputs, cs, hs = [[] for _ in xs], [[] for _ in xs], [[] for _ in xs]
        for l in range(self.n_layers):
            if self.training and self.dropout > 0:
                xps = [F.dropout(xp, self.dropout, training=True) for xp in xps]
            cells = [stack[l] for stack in self.directions][:len(xs)]
            ys, c, h = _layer_packed(cells, xps, pk, [c0s[d, l] for d in range(len(xs))],
                                     [h0s[d, l] for d in range(len(xs))])
            for d in range(len(xs)):
                if l > 0 and self.use_skip_connections:
                    ys[d] = ys[d] + xps[d]  # added after proj clipping, not fed back
                outputs[d].append(pk.unpack(ys[d], pk.fwd_index))
                cs[d].append(c[d])
                hs[d].append(h[d])
            xps = ys
        inv = pk.inverse_order
        return (outputs, torch.stack([torch.stack(x) for x in cs]).index_select(2, inv),
                torch.stack([torch.stack(x) for x in hs]).index_select(2, inv))

    def _run_direction_masked(self, d, x, valid, c0, h0):
        outputs, cs, hs = [], [], []
        for l, layer in enumerate(self.directions[d]):
            if self.training and self.dropout > 0:
                x = F.dropout(x, self.dropout, training=True)
            y, c, h = layer.forward_masked(x, valid, c0[l], h0[l])
            if l > 0 and self.use_skip_connections:
                y = y + x * valid.unsqueeze(2)
            outputs.append(y)
            cs.append(c)
            hs.append(h)
            x = y
        return outputs, torch.stack(cs), torch.stack(hs)

    def forward(self, char_ids: Optional[torch.Tensor] = None, state: Optional[tuple] = None,
                token_embedding: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> dict:
        """Inference-style run: both directions read the same sentences (with boundaries).

        char_ids (B, T, C) with 0 = padding token. Or, instead of char ids, a precomputed
        `token_embedding` (B, T, P) with its `mask` (B, T) (default: all positions valid).
        Returns token_embedding (B, T, P), layers: list of n_layers+1 tensors (B, T, 2P) with
        padding positions zero, mask (B, T) bool, state: (c, h) after each row's last valid
        step. Without autograd both directions run together (`_forward_fast`)."""
        unique = None
        if token_embedding is None:
            if char_ids is None:
                raise ValueError("BiLM.forward needs char_ids or token_embedding")
            mask = (char_ids > 0).any(dim=2)                       # (B, T)
            unique = self.char_cnn.forward_unique(char_ids)        # distinct tokens, (N,) index
            token = unique[0].index_select(0, unique[1]).reshape(*mask.shape, self.proj_dim)
        else:
            token = token_embedding
            if mask is None:
                mask = torch.ones(token.shape[:2], dtype=torch.bool, device=token.device)
        B, T = mask.shape
        lengths = mask.sum(dim=1)                                  # (B,)
        token = token * mask.unsqueeze(2).to(token.dtype)          # (B, T, P)
        c0, h0 = state if state is not None else self.zero_state(B)
        needs_grad = torch.is_grad_enabled() and (
            token.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not needs_grad:
            if unique is not None:  # layer 0 from the distinct tokens: only if no mask holes
                valid = torch.arange(T, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
                unique = unique if bool((valid == mask).all()) else None
            layers, cs, hs = self._forward_fast(token, lengths, c0, h0, unique)
            return {"token_embedding": token, "layers": [torch.cat([token] * self.n_dirs, dim=2)]
                    + layers, "mask": mask, "state": (cs, hs)}
        valid = torch.arange(T, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        xs = [token]
        if self.n_dirs == 2:
            rev = reverse_index(lengths, T)                        # reverse within each length
            xs.append(_gather_time(token, rev))
        per_dir, c, h = self.run_directions(xs, valid, c0, h0)
        if self.n_dirs == 2:
            per_dir[1] = [_gather_time(y, rev) for y in per_dir[1]]
        layers = [torch.cat([token] * self.n_dirs, dim=2)]       # layer 0: (B, T, 2P)
        for l in range(self.n_layers):
            layers.append(torch.cat([outs[l] for outs in per_dir], dim=2))
        return {"token_embedding": token, "layers": layers, "mask": mask, "state": (c, h)}

    @torch.no_grad()
    def _forward_fast(self, token: torch.Tensor, lengths: torch.Tensor, c0: torch.Tensor,
                      h0: torch.Tensor, unique: Optional[tuple] = None):
        """Both directions together, packed, in place. Returns the n_layers ELMo layers
        (B, T, n_dirs * P) and the final state (c, h) (n_dirs, n_layers, B, .).
        `unique` = (distinct token representations (U, P), index (B*T,)) from the char CNN:
        layer 0's input-to-gate matmul then runs on the U distinct tokens only."""
        B, T, P = token.shape
        dtype = _inference_dtype(token.device)
        pk = _Packing(lengths, T)
        flat = token.reshape(B * T, P)
        indices = [pk.fwd_index, pk.bwd_index][: self.n_dirs]
        xs = [flat.index_select(0, idx) for idx in indices]        # packed, backward reversed
        c0s, h0s = c0.index_select(2, pk.order), h0.index_select(2, pk.order)
        layers, cs, hs = [], [], []
        for l in range(self.n_layers):
            cells = [stack[l] for stack in self.directions]
            u = None
            if l == 0 and unique is not None:
                u = (unique[0], [unique[1].index_select(0, idx) for idx in indices])
            ys, c, h = _infer_directions(cells, xs, pk, [c0s[d, l] for d in range(self.n_dirs)],
                                         [h0s[d, l] for d in range(self.n_dirs)], dtype, u)
            if l > 0 and self.use_skip_connections:
                ys = [y.float() + x for y, x in zip(ys, xs)]
            else:
                ys = [y.float() for y in ys]
            out = token.new_zeros(B * T, self.n_dirs * P)
            for d, (y, idx) in enumerate(zip(ys, indices)):
                out[:, d * P:(d + 1) * P].index_copy_(0, idx, y)
            layers.append(out.reshape(B, T, self.n_dirs * P))
            cs.append(torch.stack(c))
            hs.append(torch.stack(h))
            xs = ys
        inv = pk.inverse_order
        c = torch.stack(cs, dim=1).index_select(2, inv)            # (n_dirs, n_layers, B, H)
        h = torch.stack(hs, dim=1).index_select(2, inv)
        return layers, c, h


class RowStateBuffer:
    """Per-row LSTM state kept between calls (section 6): a batch of b rows starts from rows
    0..b-1 of the buffer and writes its final states back there; rows >= b are untouched.
    The buffer holds `max_batch_size` rows (bilm-tf) and grows with zero rows when a larger
    batch arrives (allennlp). States are detached: no gradient flows through carried state."""

    def __init__(self, model: BiLM, max_batch_size: int = 128):
        self.c, self.h = model.zero_state(max_batch_size)

    def read(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size > self.c.shape[2]:
            grow = batch_size - self.c.shape[2]
            self.c = torch.cat([self.c, self.c.new_zeros(*self.c.shape[:2], grow, self.c.shape[3])], 2)
            self.h = torch.cat([self.h, self.h.new_zeros(*self.h.shape[:2], grow, self.h.shape[3])], 2)
        return self.c[:, :, :batch_size].clone(), self.h[:, :, :batch_size].clone()

    def write(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        c, h = state
        b = c.shape[2]
        self.c[:, :, :b] = c.detach()
        self.h[:, :, :b] = h.detach()

    def reset(self) -> None:
        self.c.zero_()
        self.h.zero_()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
