"""A straightforward step-by-step reference of the biLM in PyTorch: char CNN, highway, projection,
LSTM cells with projection and clipping, stacking.

No tricks: the char CNN convolves every position of every token (padding tokens and repeats
included), each LSTM step is one concat([x_t, h]) @ W_0 matmul (TF's LSTMCell), the directions
run one after the other in a Python loop over time, masks by torch.where, and the backward
direction reverses each row within its length by copying. It reads the parameters of a
torch_elmo BiLM, so it checks the fast paths of model.py (tests/test_model_fast.py) and is the
baseline that benchmarks/speed.py compares them with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_char_cnn(cnn, char_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, C) char ids -> (B, T, P), every position computed."""
    B, T, C = char_ids.shape
    table = torch.cat([cnn.char_embed.new_zeros(1, cnn.char_embed.shape[1]), cnn.char_embed])
    x = F.embedding(char_ids.reshape(B * T, C), table).transpose(1, 2)   # (B*T, D, C)
    act = torch.relu if cnn.activation == "relu" else torch.tanh
    x = torch.cat([act(F.conv1d(x, conv.weight, conv.bias).amax(dim=2)) for conv in cnn.convs], 1)
    for hw in cnn.highways:
        t = torch.sigmoid(F.linear(x, hw.carry.weight, hw.carry.bias))
        x = t * torch.relu(F.linear(x, hw.transform.weight, hw.transform.bias)) + (1.0 - t) * x
    if cnn.projection is not None:
        x = F.linear(x, cnn.projection.weight, cnn.projection.bias)
    return x.reshape(B, T, -1)


def reference_lstm(cell, x: torch.Tensor, lengths: torch.Tensor, c: torch.Tensor, h: torch.Tensor):
    """One LSTMP layer: x (B, T, in), rows valid for t < lengths; c (B, H), h (B, P).
    Returns outputs (B, T, P) (zero past each length) and the state after each row's last step."""
    B, T, _ = x.shape
    W = torch.cat([cell.input_weight, cell.state_weight], dim=1).t()   # (in + P, 4H) like TF W_0
    b = cell.run_bias()
    outputs = []
    for t in range(T):
        z = torch.cat([x[:, t], h], dim=1) @ W + b
        i, f, j, o = z.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(j)
        if cell.cell_clip is not None:
            c_new = c_new.clamp(-cell.cell_clip, cell.cell_clip)
        h_new = (torch.sigmoid(o) * torch.tanh(c_new)) @ cell.proj_weight.t()
        if cell.proj_clip is not None:
            h_new = h_new.clamp(-cell.proj_clip, cell.proj_clip)
        m = (t < lengths).unsqueeze(1)
        c = torch.where(m, c_new, c)
        h = torch.where(m, h_new, h)
        outputs.append(h_new * m)
    if not outputs:
        return x.new_zeros(B, 0, cell.proj_dim), c, h
    return torch.stack(outputs, dim=1), c, h


def reverse_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first `length` positions, by copying."""
    out = x.clone()
    for b, L in enumerate(lengths.tolist()):
        out[b, :L] = x[b, :L].flip(0)
    return out


def reference_run_direction(model, d: int, x: torch.Tensor, lengths: torch.Tensor,
                            c0: torch.Tensor, h0: torch.Tensor):
    """BiLM.run_direction without dropout: per-layer outputs (residual included), final (c, h)."""
    valid = (torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)
    outputs, cs, hs = [], [], []
    for l, cell in enumerate(model.directions[d]):
        y, c, h = reference_lstm(cell, x, lengths, c0[l], h0[l])
        if l > 0 and model.use_skip_connections:
            y = y + x * valid
        outputs.append(y)
        cs.append(c)
        hs.append(h)
        x = y
    return outputs, torch.stack(cs), torch.stack(hs)


def reference_forward(model, char_ids: torch.Tensor, state=None) -> dict:
    """BiLM.forward, the plain way: same dict (token_embedding, layers, mask, state)."""
    B, T, _ = char_ids.shape
    mask = (char_ids > 0).any(dim=2)
    lengths = mask.sum(dim=1)
    token = reference_char_cnn(model.char_cnn, char_ids) * mask.unsqueeze(2)
    c0, h0 = state if state is not None else model.zero_state(B)
    per_dir, cs, hs = [], [], []
    for d in range(model.n_dirs):
        x = token if d == 0 else reverse_rows(token, lengths)
        outs, c, h = reference_run_direction(model, d, x, lengths, c0[d], h0[d])
        per_dir.append(outs if d == 0 else [reverse_rows(y, lengths) for y in outs])
        cs.append(c)
        hs.append(h)
    layers = [torch.cat([token] * model.n_dirs, dim=2)]
    layers += [torch.cat([outs[l] for outs in per_dir], dim=2) for l in range(model.n_layers)]
    return {"token_embedding": token, "layers": layers, "mask": mask,
            "state": (torch.stack(cs), torch.stack(hs))}
