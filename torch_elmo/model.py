"""Model: the ELMo biLM (Peters et al., 2018), as bilm-tf builds it.

    char ids (B, T, C) --CharCNN--> token representation x (B, T, P)           = ELMo layer 0
        CharCNN: char embedding (D) -> convolutions of several widths -> max over positions
                 -> activation -> highway layers -> linear projection to P
    forward stack:  LSTMP_0 -> LSTMP_1 (+ residual) -> ...   each output (B, T, P)
    backward stack: the same layers' shape, each row read in reverse within its own length
    ELMo layer l = concat(forward_l, backward_l)  (B, T, 2P), zeros at padding positions

LSTMP = TF's LSTMCell with a projection: cell state c (H), output h = clip(W_p (o * tanh(c)))
(P), c clipped to [-cell_clip, cell_clip], h to [-proj_clip, proj_clip]; from layer 1 on the
layer's input is added to its output (residual). Parameters are kept in PyTorch layout (gate
order i, f, j, o; Linear weights (out, in)); only export.py knows the TF names, shapes and gate
order. The stored LSTM bias does NOT contain the forget bias: +1.0 is added at run time, as TF's
LSTMCell does. Dropout (training only) is applied to every LSTM layer's input.

The LSTM state is explicit: `c` (n_dirs, n_layers, B, H) and `h` (n_dirs, n_layers, B, P) go
in and come out of every call. `RowStateBuffer` keeps them between calls keyed by batch row,
which is what bilm-tf and allennlp do at inference.

Every LSTM call goes through ONE loop over the layers (`BiLM._stacks`), which calls
kernels.lstmp_layer once per layer; that function decides autograd or not and which path
runs on which device (kernels.py). Rows run in a packed layout (kernels.Packing): sorted by
length, finished rows drop out of each step. The plain step-by-step reference lives in
tests/reference.py; the fast paths are tested against it. The char CNN encodes each distinct
token of a call once, over only the convolution windows that touch a real character (exact).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import autotune, kernels
from .chars import PAD_CHAR
from .config import Options
# TEMPORARY, until train.py imports `Linear, mm` from kernels (delete at merge)

FORGET_BIAS = 1.0
PAD_ID = PAD_CHAR + 1  # the within-word padding character, in model ids (+1 offset)


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
        self.highways = nn.ModuleList(Highway(n_filters) for _ in range(cnn.n_highway))
        self.projection = nn.Linear(n_filters, P) if n_filters != P else None
        self.output_dim = P if self.projection is not None else n_filters
        self.fast_weights = kernels.PackCache()    # prepacked inference weights
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """bilm-tf's training initialisation."""
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

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        """char ids (..., C) -> token representations (..., P). Each distinct token (padding
        included) is encoded once and gathered back; gradients of repeats are summed."""
        rep, inverse = self.forward_unique(char_ids)
        return rep.index_select(0, inverse).reshape(*char_ids.shape[:-1], self.output_dim)

    def forward_unique(self, char_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """char ids (..., C) -> (the representations of the distinct tokens (U, P), the index of
        each flattened position's token (N,))."""
        flat = char_ids.reshape(-1, char_ids.shape[-1])                # (N, C)
        if flat.shape[0] == 0:
            return (self.char_embed.new_zeros(0, self.output_dim),
                    torch.zeros(0, dtype=torch.long, device=char_ids.device))
        uniq, inverse = kernels.unique_rows(flat)
        return self.encode(uniq), inverse.reshape(-1)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(U, C) char ids -> (U, P), no deduplication. Without autograd on CPU (`fast`): the
        weights prepacked for oneDNN, in the inference dtype."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        dtype = torch.float32 if needs_grad else kernels.inference_dtype(ids.device)
        fast = not needs_grad and kernels.onednn_ok(self.char_embed)
        x = self._conv_features(ids, fast, dtype)                 # (U, F)
        for k, hw in enumerate(self.highways):
            x = hw.fused(x, self.fast_weights, k, dtype) if fast else hw(x)
        if self.projection is not None:
            if fast:
                w = self.projection.weight
                lin = self.fast_weights.get(("proj", dtype), (w,),
                                            lambda: kernels.Linear(w.detach().to(dtype)))
                bias = self.projection.bias.detach().to(dtype)
                x = lin(x.to(dtype), bias)
            else:
                x = kernels.linear(x, self.projection.weight, self.projection.bias)
        return x.float()

    def _conv_features(self, ids: torch.Tensor, fast: bool, dtype: torch.dtype) -> torch.Tensor:
        """conv + bias -> max over ALL char positions (pads included) -> activation.

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
                lin = self.fast_weights.get(("conv", i, dtype), (w,), lambda w=w: kernels.Linear(
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
            pad_values.append(w_(win, b_) if fast else kernels.linear(win, w_, b_))
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
                win = win.reshape(-1, win.shape[2] * width)        # (k * S, D * w)
                y = w_(win, b_) if fast else kernels.linear(win, w_, b_)
                y = y.reshape(e - s, S, -1).amax(dim=1)            # (k, n)
                if S < C - width + 1:                              # the all-pad windows
                    y = torch.maximum(y, pad_value)
                feats.append(act(y))
            chunks.append(torch.cat(feats, dim=1))                 # (k, F)
        x = torch.cat(chunks, dim=0)                               # (U, F), sorted by L
        return torch.zeros_like(x).index_copy(0, order, x)        # back to the input order


class Highway(nn.Module):
    """y = t * relu(transform(x)) + (1 - t) * x with t = sigmoid(carry(x)) (the gate bilm-tf
    calls "carry" multiplies the transform branch). ReLU whatever the CNN activation."""

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
        t = torch.sigmoid(kernels.linear(x, self.carry.weight, self.carry.bias))
        return t * torch.relu(kernels.linear(x, self.transform.weight, self.transform.bias)) \
            + (1.0 - t) * x

    def fused(self, x: torch.Tensor, cache: kernels.PackCache, k: int,
              dtype: torch.dtype) -> torch.Tensor:
        """CPU inference: carry and transform as ONE (2F, F) prepacked matmul."""
        src = (self.carry.weight, self.transform.weight, self.carry.bias, self.transform.bias)

        def build():
            w = torch.cat([self.transform.weight, self.carry.weight]).detach().to(dtype)
            b = torch.cat([self.transform.bias, self.carry.bias]).detach().to(dtype)
            return kernels.Linear(w, batch_hint=1024), b
        lin, b = cache.get(("highway", k, dtype), src, build)
        y = lin(x.to(dtype), b)                                    # (U, 2F)
        n = x.shape[1]
        t = torch.sigmoid(y[:, n:])
        return t * torch.relu(y[:, :n]) + (1.0 - t) * x


# ============================================================================ LSTM
class LSTMP(nn.Module):
    """TF LSTMCell(num_units=H, num_proj=P, cell_clip, proj_clip), no peepholes.

    Weights: input_weight (4H, in), state_weight (4H, P), bias (4H,), proj_weight (P, H),
    gates in PyTorch order i, f, j, o. The math of one step is kernels.lstmp_reference."""

    def __init__(self, input_dim: int, hidden_dim: int, proj_dim: int,
                 cell_clip: Optional[float], proj_clip: Optional[float]):
        super().__init__()
        self.hidden_dim, self.proj_dim = hidden_dim, proj_dim
        self.cell_clip, self.proj_clip = cell_clip, proj_clip
        self.input_weight = nn.Parameter(torch.empty(4 * hidden_dim, input_dim))
        self.state_weight = nn.Parameter(torch.empty(4 * hidden_dim, proj_dim))
        self.bias = nn.Parameter(torch.empty(4 * hidden_dim))
        self.proj_weight = nn.Parameter(torch.empty(proj_dim, hidden_dim))
        self.fast_weights = kernels.PackCache()    # prepacked inference weights
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

    def run_bias(self) -> torch.Tensor:
        """The bias used at run time: stored bias + forget bias on the f block."""
        H = self.hidden_dim
        return torch.cat([self.bias[:H], self.bias[H:2 * H] + FORGET_BIAS, self.bias[2 * H:]])

    def forward(self, x: torch.Tensor, valid: torch.Tensor, c: torch.Tensor, h: torch.Tensor):
        """This layer alone: x (B, T, in), valid (B, T) bool, c (B, H), h (B, P).

        A position that is not valid is skipped: its output is zero and the state goes past
        it unchanged. Returns outputs (B, T, P) and the state after each row's last valid step
        (rows with no valid step keep their state)."""
        pk = kernels.Packing(valid)
        (y,), (c,), (h,) = kernels.lstmp_layer([self], [pk.pack(x, pk.fwd_index)], pk,
                                               [c.index_select(0, pk.order)],
                                               [h.index_select(0, pk.order)])
        inv = pk.inverse_order
        return pk.unpack(y, pk.fwd_index), c.index_select(0, inv), h.index_select(0, inv)


# ============================================================================ biLM
class BiLM(nn.Module):
    """Char CNN + forward and backward stacks of LSTMP layers."""

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
        self.dropout = options.dropout  # on every LSTM layer input, training only

    @property
    def directions(self) -> list[nn.ModuleList]:
        return [self.forward_layers] + ([self.backward_layers] if self.n_dirs == 2 else [])

    def clear_fast_cache(self) -> None:
        """Drop the prepacked inference weights (rebuilt on the next call). Only needed after
        editing weights through `.data`; in-place updates and load_state_dict are detected."""
        for m in self.modules():
            if isinstance(getattr(m, "fast_weights", None), kernels.PackCache):
                m.fast_weights.clear()

    def zero_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.char_cnn.char_embed
        c = p.new_zeros(self.n_dirs, self.n_layers, batch_size, self.hidden_dim)
        h = p.new_zeros(self.n_dirs, self.n_layers, batch_size, self.proj_dim)
        return c, h

    def forward(self, char_ids: Optional[torch.Tensor] = None, state: Optional[tuple] = None,
                token_embedding: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> dict:
        """Inference-style run: both directions read the same sentences (with boundaries).

        char_ids (B, T, C) with 0 = padding token. Or, instead of char ids, a precomputed
        `token_embedding` (B, T, P) with its `mask` (B, T) (default: all positions valid).
        Returns token_embedding (B, T, P), layers: list of n_layers+1 tensors (B, T, 2P) with
        padding positions zero, mask (B, T) bool, state: (c, h) after each row's last valid
        step. Each row is read over its first mask.sum() positions."""
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
        valid = torch.arange(T, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        pk = kernels.Packing(valid)
        indices = [pk.fwd_index, pk.bwd_index][: self.n_dirs]     # backward: each row reversed
        xs = [pk.pack(token, idx) for idx in indices]              # packed (N, P) per direction
        if unique is not None and bool((valid == mask).all()):
            # layer 0's input is a distinct token's representation at every packed position
            unique = (unique[0], [unique[1].index_select(0, idx) for idx in indices])
        else:
            unique = None
        ys, c, h = self._stacks(list(range(self.n_dirs)), xs, pk, c0, h0, unique)
        layers = [torch.cat([token] * self.n_dirs, dim=2)]       # layer 0: (B, T, 2P)
        for l in range(self.n_layers):
            layers.append(torch.cat([pk.unpack(ys[d][l], idx) for d, idx in enumerate(indices)],
                                    dim=2))                        # (B, T, 2P)
        return {"token_embedding": token, "layers": layers, "mask": mask, "state": (c, h)}

    def run_directions(self, xs: list[torch.Tensor], valid: torch.Tensor, c0: torch.Tensor,
                       h0: torch.Tensor, dirs: Optional[list[int]] = None):
        """The stacks of directions `dirs` (default 0 .. len(xs) - 1), each on its own (already
        ordered) input xs[k] (B, T, P); valid (B, T) bool (a position that is not valid is
        skipped). c0 (len(xs), n_layers, B, H), h0 (len(xs), n_layers, B, P). Returns per
        direction its layer outputs (each (B, T, P), residual included, zeros where not valid)
        and the final (c, h) stacked like c0, h0."""
        dirs = list(range(len(xs))) if dirs is None else dirs
        pk = kernels.Packing(valid)
        ys, c, h = self._stacks(dirs, [pk.pack(x, pk.fwd_index) for x in xs], pk, c0, h0)
        return [[pk.unpack(y, pk.fwd_index) for y in per] for per in ys], c, h

    def run_direction(self, d: int, x: torch.Tensor, valid: torch.Tensor,
                      c0: torch.Tensor, h0: torch.Tensor):
        """`run_directions` for direction d alone: x (B, T, P), c0 (n_layers, B, H),
        h0 (n_layers, B, P); returns its layer outputs and final (c, h) stacked like c0, h0."""
        outs, c, h = self.run_directions([x], valid, c0.unsqueeze(0), h0.unsqueeze(0), dirs=[d])
        return outs[0], c[0], h[0]

    def _stacks(self, dirs: list[int], xs: list[torch.Tensor], pk: kernels.Packing,
                c0: torch.Tensor, h0: torch.Tensor, unique: Optional[tuple] = None):
        """THE layer-stack loop. For each layer, for every direction in `dirs`: dropout on the
        input (training only) -> the LSTMP layer -> residual -> collect.

        xs[k] packed (N, P) input of direction dirs[k]; c0 (len(dirs), n_layers, B, H),
        h0 (len(dirs), n_layers, B, P) in row order. `unique`: see kernels.lstmp_layer (layer 0
        only). Returns per direction its packed layer outputs [(N, P)] * n_layers and the final
        (c, h) stacked like c0, h0."""
        drop = self.training and self.dropout > 0
        if xs[0].device.type == "cpu" and not torch.is_grad_enabled():
            autotune.ensure(self.directions[dirs[0]][0])   # kernel choices of this machine
        c0s, h0s = c0.index_select(2, pk.order), h0.index_select(2, pk.order)  # rows by length
        outputs, cs, hs = [[] for _ in dirs], [], []
        for l in range(self.n_layers):
            if drop:
                # a fresh mask per position, drawn for layer 0 forward, layer 0 backward, layer 1
                # forward, ...; the residual adds the DROPPED input (TF DropoutWrapper around
                # ResidualWrapper(LSTMCell))
                xs = [F.dropout(x, self.dropout, training=True) for x in xs]
            cells = [self.directions[d][l] for d in dirs]
            ys, c, h = kernels.lstmp_layer(cells, xs, pk, [c0s[k, l] for k in range(len(dirs))],
                                           [h0s[k, l] for k in range(len(dirs))],
                                           unique if l == 0 and not drop else None)
            if l > 0 and self.use_skip_connections:
                ys = [y + x for y, x in zip(ys, xs)]  # added after proj clipping, not fed back
            for k in range(len(dirs)):
                outputs[k].append(ys[k])
            cs.append(torch.stack(c))                              # (len(dirs), B, H)
            hs.append(torch.stack(h))                              # (len(dirs), B, P)
            xs = ys
        inv = pk.inverse_order
        c = torch.stack(cs, dim=1).index_select(2, inv)            # (len(dirs), n_layers, B, H)
        h = torch.stack(hs, dim=1).index_select(2, inv)            # (len(dirs), n_layers, B, P)
        return outputs, c, h


class RowStateBuffer:
    """Per-row LSTM state kept between calls: a batch of b rows starts from rows 0..b-1 of the
    buffer and writes its final states back there; rows >= b are untouched. The buffer holds
    `max_batch_size` rows (bilm-tf) and grows with zero rows when a larger batch arrives
    (allennlp). States are detached: no gradient flows through carried state."""

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
