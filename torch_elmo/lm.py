"""The language model of training: the biLM, one softmax shared by both directions, and losses.

    LanguageModel       = BiLM + softmax W (V, P), b (V) (not part of exported ELMo files)
    LogUniformSampler   = TF log_uniform_candidate_sampler(unique=True) with its expected counts
    sampled_softmax_loss  TF sampled_softmax_loss (log-Q correction, accidental hits removed)
    full_softmax_ce       exact per-row cross-entropy over the whole vocabulary (evaluation)

One training loss (per batch of B rows x T positions, both directions):

    fwd_chars, bwd_chars --char CNN--> forward stack / backward stack (state carried in)
        --dropout--> top output --sampled softmax (one set of negatives per direction)-->
    loss = 0.5 * (fwd mean + bwd mean)

The backward stream from data.py is already reversed (`</S> wn .. w1`), so the backward stack
reads it left to right with no per-row reversal.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ElmoError, Options
from .kernels import Linear, mm
from .model import BiLM

FLOAT32_MAX = float(np.finfo(np.float32).max)


class LogUniformSampler:
    """TF `log_uniform_candidate_sampler(unique=True, range_max=V)`.

    Draws k = floor(exp(u * log(V + 1))) - 1 (mod V), u ~ U[0, 1), one after another until
    `n` distinct classes are seen; `num_tries` = number of draws needed. P(k) = (log(k + 2) -
    log(k + 1)) / log(V + 1). The expected count of a class is TF's ExpectedCountHelper:
    p * n if no draw was repeated (num_tries == n), else -expm1(num_tries * log1p(-p)).
    Draws are made in vectorised chunks from a private torch.Generator (saved in checkpoints);
    the result equals drawing one at a time from the same stream of uniforms."""

    def __init__(self, n_classes: int, seed: int = 0):
        if n_classes < 1:
            raise ValueError("the sampler needs at least one class")
        self.n_classes = n_classes
        self.log_range = math.log1p(n_classes)
        self.generator = torch.Generator().manual_seed(seed)

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        k = ids.double()
        return torch.log((k + 2.0) / (k + 1.0)) / self.log_range

    def expected_count(self, ids: torch.Tensor, n: int, num_tries: int) -> torch.Tensor:
        p = self.probability(ids)
        if num_tries == n:
            return (p * n).float()
        return (-torch.expm1(num_tries * torch.log1p(-p))).float()

    def draw(self, m: int) -> torch.Tensor:
        """m independent (with replacement) draws, int64 on the CPU."""
        u = torch.rand(m, generator=self.generator, dtype=torch.float64)
        return (torch.exp(u * self.log_range).long() - 1) % self.n_classes

    def sample(self, n: int) -> tuple[torch.Tensor, int]:
        """n distinct classes (in order of first appearance) and num_tries."""
        if not 0 < n < self.n_classes:
            raise ValueError(f"cannot draw {n} distinct classes out of {self.n_classes}")
        chunk = max(2 * n, 256)
        draws = self.draw(chunk)
        while True:
            uniq, inverse = torch.unique(draws, return_inverse=True)
            if uniq.numel() >= n:
                break
            draws = torch.cat([draws, self.draw(chunk)])
        positions = torch.arange(draws.numel())
        first = torch.full((uniq.numel(),), draws.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, positions, reduce="amin")
        first = first.sort().values[:n]                 # first appearances, in draw order
        return draws[first], int(first[-1]) + 1

    def state_dict(self) -> dict:
        return {"n_classes": self.n_classes, "generator": self.generator.get_state()}

    def load_state_dict(self, d: dict) -> None:
        if int(d["n_classes"]) != self.n_classes:
            raise ElmoError(f"sampler state is for {d['n_classes']} classes, not {self.n_classes}")
        self.generator.set_state(d["generator"])


def sampled_softmax_loss(x: torch.Tensor, targets: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                         sampler: LogUniformSampler, n_samples: int,
                         sparse: bool = False) -> torch.Tensor:
    """TF `sampled_softmax_loss` defaults (removeaccidental_hits, subtract_log_q), mean over rows.

    x (N, P), targets (N,). ONE set of `n_samples` negatives for all N rows, ONE gather of the
    true and sampled rows of W and b, ONE (N, P) x (P, S) matmul (in `SampledSoftmaxCE`).
    `sparse`: W's gradient is a sparse tensor of the gathered rows (what TF's IndexedSlices are),
    not a dense (V, P) one that is zero almost everywhere; see LanguageModel.sparse_softmax."""
    N = targets.numel()
    sampled, num_tries = sampler.sample(n_samples)
    sampled = sampled.to(targets.device)
    ids = torch.cat([targets, sampled])
    log_q = torch.log(sampler.expected_count(ids.cpu(), n_samples, num_tries)).to(x.device)
    w = F.embedding(ids, W, sparse=True) if sparse else W.index_select(0, ids)   # (N + S, P)
    bias = b.index_select(0, ids) - log_q                            # (N + S,)
    hit_rows, hit_cols = accidental_hits(targets, sampled)
    return SampledSoftmaxCE.apply(x, w, bias, hit_rows, hit_cols, N)


def accidental_hits(targets: torch.Tensor, sampled: torch.Tensor):
    """(row, column) of every sampled class equal to its row's target, without the (N, S)
    comparison: the sampled classes are distinct, so a binary search over them finds each
    target's column, if any."""
    sorted_s, order = sampled.sort()
    pos = torch.searchsorted(sorted_s, targets).clamp_(max=sorted_s.numel() - 1)   # (N,)
    rows = (sorted_s[pos] == targets).nonzero().squeeze(1)
    return rows, order[pos[rows]]


class SampledSoftmaxCE(torch.autograd.Function):
    """mean_i [log(exp(t_i) + sum_s exp(L_is)) - t_i] with t_i = x_i.w_i + b_i (true class) and
    L = x w_S^T + b_S (N, S) (sampled classes; accidental hits at -FLOAT_MAX as in TF).

    The (N, S) logits are the one big tensor: written once by the matmul (bias fused), then
    max, exp and sum in place; the backward turns them into probabilities in place (one pass)
    and feeds them to the two gradient matmuls. The autograd version of the same formula (a
    masked copy, a concatenation with the true logit, log_softmax and its backward) makes
    several passes over (N, S). Computed in fp32 whatever the input dtype (bf16 logits would
    round the partition function); fp64 stays fp64."""

    @staticmethod
    def forward(ctx, x, w, bias, hit_rows, hit_cols, N):
        ct = torch.promote_types(x.dtype, torch.float32)
        xf, wf, bf = x.to(ct), w.to(ct), bias.to(ct)
        true = (xf * wf[:N]).sum(1) + bf[:N]                          # (N,)
        L = Linear(wf[N:], pack=False)(xf, bf[N:])                  # (N, S), bias fused
        L[hit_rows, hit_cols] = -FLOAT32_MAX
        m = torch.maximum(L.amax(1), true)                           # (N,) for stability
        true_m = true - m
        Z = L.sub_(m.unsqueeze(1)).exp_().sum(1) + torch.exp(true_m)  # L now holds exp(L - m)
        ctx.save_for_backward(xf, wf, Z, true_m)
        ctx.L, ctx.N, ctx.dtypes = L, N, (x.dtype, w.dtype, bias.dtype)
        return (torch.log(Z) - true_m).mean()

    @staticmethod
    def backward(ctx, g):
        xf, wf, Z, true_m = ctx.saved_tensors
        L, N = ctx.L, ctx.N
        if L is None:
            raise RuntimeError("SampledSoftmaxCE: backward twice through the same graph")
        ctx.L = None                                     # L becomes dLoss/dL in place
        scale = g.to(Z.dtype) / N
        P = L.mul_((scale / Z).unsqueeze(1))                                # (N, S) softmax / N
        d_true = (torch.exp(true_m) / Z - 1.0) * scale                      # (N,)
        d_x = mm(P, wf[N:]).add_(d_true.unsqueeze(1) * wf[:N])             # (N, P)
        d_w = torch.cat([d_true.unsqueeze(1) * xf, mm(P.t(), xf)])        # (N + S, P)
        d_b = torch.cat([d_true, P.sum(0)])                                 # (N + S,)
        dx_t, dw_t, db_t = ctx.dtypes
        return d_x.to(dx_t), d_w.to(dw_t), d_b.to(db_t), None, None, None


def full_softmax_ce(x: torch.Tensor, targets: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                    max_elements: int = 1 << 24) -> torch.Tensor:
    """Per-row cross-entropy (N,) over the whole vocabulary, in row chunks so that the (N, V)
    logits never exceed `max_elements` (a 793k-word vocabulary times 256 rows would not fit)."""
    rows = max(1, max_elements // W.shape[0])
    out = []
    for s in range(0, targets.numel(), rows):
        logits = torch.addmm(b, x[s:s + rows], W.t()).float()
        out.append(F.cross_entropy(logits, targets[s:s + rows], reduction="none"))
    return torch.cat(out) if out else x.new_zeros(0)


class LanguageModel(nn.Module):
    """BiLM + one softmax shared by both directions. The softmax is not exported.

    `sparse_softmax` (default on): with the sampled softmax, softmax_W's gradient is a sparse
    tensor holding only the rows of the step's targets and negatives (a few thousand of V). The
    update is the same as with a dense gradient, whose other rows are zero (Adagrad: acc += 0,
    theta -= 0; the global norm is the same), but clipping and Adagrad then touch those rows
    only instead of all V x P (the original model: 793k x 512 = 406M numbers, several passes
    over 1.6 GB per step); under torchrun only the union of the ranks' rows is all-reduced.
    softmax_b (V numbers) stays dense."""

    def __init__(self, options: Options, n_vocab: int, sparse_softmax: bool = True):
        super().__init__()
        self.options = options
        self.n_vocab = n_vocab
        self.sparse_softmax = sparse_softmax
        self.bilm = BiLM(options)
        P = options.lstm.projection_dim
        self.softmax_W = nn.Parameter(torch.empty(n_vocab, P))
        self.softmax_b = nn.Parameter(torch.zeros(n_vocab))
        nn.init.normal_(self.softmax_W, 0.0, 1.0 / math.sqrt(P))

    @property
    def n_dirs(self) -> int:
        return self.bilm.n_dirs

    def zero_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bilm.zero_state(batch_size)

    def top_outputs(self, batch: dict, state: tuple) -> tuple[list[torch.Tensor], tuple]:
        """Top LSTM output of each direction (B, T, P), dropout applied when training, and the
        final (c, h) of every row (n_dirs, n_layers, B, .). All positions are valid (packed rows)."""
        keys = ["fwd_chars", "bwd_chars"][: self.n_dirs]
        chars = [batch[k] for k in keys]
        B, T, _ = chars[0].shape
        tokens = self.bilm.char_cnn(torch.cat(chars, dim=0))   # both directions in one CNN call
        valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        xs = [tokens[d * B:(d + 1) * B] for d in range(self.n_dirs)]          # (B, T, P) each
        outs, c, h = self.bilm.run_directions(xs, valid, state[0], state[1])
        tops = []
        for d in range(self.n_dirs):
            top = outs[d][-1]
            if self.training and self.options.dropout > 0:
                top = F.dropout(top, self.options.dropout, training=True)  # before the softmax
            tops.append(top)
        return tops, (c, h)

    def _targets(self, batch: dict) -> list[torch.Tensor]:
        return [batch[k] for k in ["fwd_targets", "bwd_targets"][: self.n_dirs]]

    def training_loss(self, batch: dict, state: tuple, sampler: Optional[LogUniformSampler],
                      n_samples: int) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
        """Mean sampled-softmax loss per direction (full softmax if sampler is None);
        total = mean over directions = 0.5 * (fwd + bwd)."""
        tops, new_state = self.top_outputs(batch, state)
        losses = []
        for top, tgt in zip(tops, self._targets(batch)):
            x, y = top.reshape(-1, top.shape[-1]), tgt.reshape(-1)
            if sampler is not None:
                losses.append(sampled_softmax_loss(x, y, self.softmax_W, self.softmax_b, sampler,
                                                   n_samples, sparse=self.sparse_softmax))
            else:
                losses.append(full_softmax_ce(x, y, self.softmax_W, self.softmax_b).mean())
        return sum(losses) / len(losses), losses, new_state

    def eval_cross_entropy(self, batch: dict, state: tuple) -> tuple[list[torch.Tensor], tuple]:
        """Mean full-softmax cross-entropy per direction (no dropout when in eval mode)."""
        tops, new_state = self.top_outputs(batch, state)
        ces = [full_softmax_ce(top.reshape(-1, top.shape[-1]), tgt.reshape(-1),
                               self.softmax_W, self.softmax_b).mean()
               for top, tgt in zip(tops, self._targets(batch))]
        return ces, new_state
