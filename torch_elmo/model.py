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
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Options

FORGET_BIAS = 1.0


class CharCNN(nn.Module):
    """Context-independent token encoder: char embedding -> CNN -> max-pool -> highway -> proj."""

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

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        B, T, C = char_ids.shape
        table = torch.cat([self.char_embed.new_zeros(1, self.char_embed.shape[1]), self.char_embed])
        x = F.embedding(char_ids.reshape(B * T, C), table)        # (B*T, C, D)
        x = x.transpose(1, 2)                                      # (B*T, D, C) for Conv1d
        act = torch.relu if self.activation == "relu" else torch.tanh
        # conv + bias -> max over ALL char positions (pads included) -> activation (section 3)
        x = torch.cat([act(conv(x).amax(dim=2)) for conv in self.convs], dim=1)  # (B*T, F)
        for hw in self.highways:
            x = hw(x)
        if self.projection is not None:
            x = self.projection(x)                                 # (B*T, P)
        return x.reshape(B, T, -1)                                 # (B, T, P)


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
        t = torch.sigmoid(self.carry(x))
        return t * torch.relu(self.transform(x)) + (1.0 - t) * x


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
        """x (B, T, in), valid (B, T) bool prefix mask, c (B, H), h (B, P).

        Returns outputs (B, T, P) (zeros where not valid) and the state after each row's last
        valid step. The input-to-gate matmul is hoisted out of the time loop."""
        B, T, _ = x.shape
        gates_x = torch.addmm(self.run_bias(), x.reshape(B * T, -1), self.input_weight.t())
        gates_x = gates_x.reshape(B, T, 4 * self.hidden_dim)      # (B, T, 4H)
        w_hh, w_p = self.state_weight.t(), self.proj_weight.t()
        outputs = []
        for t in range(T):
            z = torch.addmm(gates_x[:, t], h, w_hh)               # (B, 4H)
            i, f, j, o = z.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(j)
            if self.cell_clip is not None:
                c_new = c_new.clamp(-self.cell_clip, self.cell_clip)
            h_new = (torch.sigmoid(o) * torch.tanh(c_new)) @ w_p  # (B, P)
            if self.proj_clip is not None:
                h_new = h_new.clamp(-self.proj_clip, self.proj_clip)
            m = valid[:, t].unsqueeze(1)                           # (B, 1)
            c = torch.where(m, c_new, c)
            h = torch.where(m, h_new, h)
            outputs.append(h_new * m)
        if not outputs:
            return x.new_zeros(B, 0, self.proj_dim), c, h
        return torch.stack(outputs, dim=1), c, h                   # (B, T, P)


def reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) time index that reverses each row's first `length` positions and leaves padding in
    place; applying it twice is the identity."""
    t = torch.arange(T, device=lengths.device).unsqueeze(0)       # (1, T)
    L = lengths.unsqueeze(1)                                       # (B, 1)
    return torch.where(t < L, L - 1 - t, t)                        # (B, T)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))


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
        outputs, cs, hs = [], [], []
        for l, layer in enumerate(self.directions[d]):
            if self.training and self.dropout > 0:
                # fresh mask per position; the residual adds the DROPPED input (TF DropoutWrapper
                # around ResidualWrapper(LSTMCell))
                x = F.dropout(x, self.dropout, training=True)
            y, c, h = layer(x, valid, c0[l], h0[l])
            if l > 0 and self.use_skip_connections:
                y = y + x * valid.unsqueeze(2)  # added after proj clipping, not fed back
            outputs.append(y)
            cs.append(c)
            hs.append(h)
            x = y
        return outputs, torch.stack(cs), torch.stack(hs)

    def forward(self, char_ids: torch.Tensor, state: Optional[tuple] = None) -> dict:
        """Inference-style run: both directions read the same sentences (with boundaries).

        char_ids (B, T, C) with 0 = padding token. Returns
          token_embedding (B, T, P), layers: list of n_layers+1 tensors (B, T, 2P) with padding
          positions zero, mask (B, T) bool, state: (c, h) after each row's last valid step."""
        B, T, _ = char_ids.shape
        mask = (char_ids > 0).any(dim=2)                           # (B, T)
        lengths = mask.sum(dim=1)                                  # (B,)
        valid = torch.arange(T, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        token = self.char_cnn(char_ids) * mask.unsqueeze(2)        # (B, T, P)
        c0, h0 = state if state is not None else self.zero_state(B)
        fwd, c_f, h_f = self.run_direction(0, token, valid, c0[0], h0[0])
        per_dir = [fwd]
        cs, hs = [c_f], [h_f]
        if self.n_dirs == 2:
            rev = reverse_index(lengths, T)                        # reverse within each length
            bwd, c_b, h_b = self.run_direction(1, _gather_time(token, rev), valid, c0[1], h0[1])
            per_dir.append([_gather_time(y, rev) for y in bwd])
            cs.append(c_b)
            hs.append(h_b)
        layers = [torch.cat([token] * self.n_dirs, dim=2)]       # layer 0: (B, T, 2P)
        for l in range(self.n_layers):
            layers.append(torch.cat([outs[l] for outs in per_dir], dim=2))
        return {"token_embedding": token, "layers": layers, "mask": mask,
                "state": (torch.stack(cs), torch.stack(hs))}


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
