"""Training: the bilm-tf recipe of spec section 9 (train_elmo.py, restart.py, dump_weights.py).

    LanguageModel      = BiLM + one softmax W (V, P), b (V) shared by both directions
    LogUniformSampler  = TF log_uniform_candidate_sampler(unique=True) with its expected counts
    sampled_softmax_loss / full_softmax_loss
    train(...)         = the whole loop in one function: step, log, evaluate, checkpoint
    cli_train / cli_export

One training step (per batch of B rows x T = unroll_steps positions, both directions):

    fwd_chars, bwd_chars --char CNN--> forward stack / backward stack (state carried, detached)
        --dropout--> top output --sampled softmax (one set of negatives per direction)-->
    loss = 0.5 * (fwd mean + bwd mean);  backward(loss * T);  [all-reduce];  clip global norm;
    Adagrad(lr, initial accumulator 1.0).

The backward stream from data.py is already reversed (`</S> wn .. w1`), so the backward stack
reads it left to right with no per-row reversal. Checkpoints (`save_dir/checkpoint.pt`) hold
everything needed to continue bit for bit: model, softmax, optimizer, carried LSTM states, every
RNG, the data-stream position and the counters; they load with torch.load(weights_only=True).

Several processes (torchrun, PyTorch's launcher; `elmo train --nproc N` starts it): rank r streams
its own disjoint part of the data (LMBatchStream rank/world_size) with batch B, so the global batch
is B x world_size and an epoch has world_size times fewer updates. After backward the gradients
are averaged over ranks in ONE flattened all-reduce (`all_reduce_gradients`), then clipped and
applied by every rank identically, so every update equals one process's update with the global
batch (bilm-tf averages its towers' gradients the same way; each tower's loss is a mean over its
B x T positions, so the average of the towers' means is the mean over the global batch). The
negatives of the sampled softmax are one set per step shared by all ranks; rank 0 logs,
evaluates and writes the checkpoint, which holds every rank's data position, LSTM state and RNGs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import N_CHARACTERS_TRAIN, ElmoError, Options, preset, read_options
from .model import BiLM, _Linear, _mm
from .vocab import Vocabulary

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "perplexity.png"
OPTIONS = "options.json"
CHECKPOINT_FORMAT = 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Options keys that change the trajectory of a run: --resume refuses if any differs. n_epochs and
# n_train_tokens only decide when to stop, so a resumed run may extend them (bilm-tf restart.py).
_STOPPING_KEYS = ("n_epochs", "n_train_tokens")


# ============================================================================ sampler and losses
class LogUniformSampler:
    """TF `log_uniform_candidate_sampler(unique=True, range_max=V)` (spec section 9).

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
    """TF `sampled_softmax_loss` defaults (remove_accidental_hits, subtract_log_q), mean over rows.

    x (N, P), targets (N,). ONE set of `n_samples` negatives for all N rows, ONE gather of the
    true and sampled rows of W and b, ONE (N, P) x (P, S) matmul (in `_SampledSoftmaxCE`).
    `sparse`: W's gradient is a sparse tensor of the gathered rows (what TF's IndexedSlices are),
    not a dense (V, P) one that is zero almost everywhere; see LanguageModel.sparse_softmax."""
    N = targets.numel()
    sampled, num_tries = sampler.sample(n_samples)
    sampled = sampled.to(targets.device)
    ids = torch.cat([targets, sampled])
    log_q = torch.log(sampler.expected_count(ids.cpu(), n_samples, num_tries)).to(x.device)
    w = F.embedding(ids, W, sparse=True) if sparse else W.index_select(0, ids)   # (N + S, P)
    bias = b.index_select(0, ids) - log_q                            # (N + S,)
    hit_rows, hit_cols = _accidental_hits(targets, sampled)
    return _SampledSoftmaxCE.apply(x, w, bias, hit_rows, hit_cols, N)


def _accidental_hits(targets: torch.Tensor, sampled: torch.Tensor):
    """(row, column) of every sampled class equal to its row's target, without the (N, S)
    comparison: the sampled classes are distinct, so a binary search over them finds each
    target's column, if any."""
    sorted_s, order = sampled.sort()
    pos = torch.searchsorted(sorted_s, targets).clamp_(max=sorted_s.numel() - 1)   # (N,)
    rows = (sorted_s[pos] == targets).nonzero().squeeze(1)
    return rows, order[pos[rows]]


class _SampledSoftmaxCE(torch.autograd.Function):
    """mean_i [log(exp(t_i) + sum_s exp(L_is)) - t_i] with t_i = x_i.w_i + b_i (true class) and
    L = x w_S^T + b_S (N, S) (sampled classes; accidental hits at -FLOAT_MAX as in TF).

    The (N, S) logits are the one big tensor: written once by the matmul (bias fused), then
    max, exp and sum in place; the backward turns them into probabilities in place (one pass)
    and feeds them to the two gradient matmuls. The autograd version of the same formula (a masked copy, a
    concatenation with the true logit, log_softmax and its backward) makes ~4x the memory
    traffic over (N, S), which on a CPU costs as much as the matmuls. Computed in fp32 whatever
    the input dtype (bf16 logits would round the partition function); fp64 stays fp64."""

    @staticmethod
    def forward(ctx, x, w, bias, hit_rows, hit_cols, N):
        ct = torch.promote_types(x.dtype, torch.float32)
        xf, wf, bf = x.to(ct), w.to(ct), bias.to(ct)
        true = (xf * wf[:N]).sum(1) + bf[:N]                          # (N,)
        L = _Linear(wf[N:], pack=False)(xf, bf[N:])                  # (N, S), bias fused
        L[hit_rows, hit_cols] = -_FLOAT32_MAX
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
            raise RuntimeError("_SampledSoftmaxCE: backward twice through the same graph")
        ctx.L = None                                     # L becomes dLoss/dL in place
        scale = g.to(Z.dtype) / N
        P = L.mul_((scale / Z).unsqueeze(1))                                # (N, S) softmax / N
        d_true = (torch.exp(true_m) / Z - 1.0) * scale                      # (N,)
        d_x = _mm(P, wf[N:]).add_(d_true.unsqueeze(1) * wf[:N])             # (N, P)
        d_w = torch.cat([d_true.unsqueeze(1) * xf, _mm(P.t(), xf)])        # (N + S, P)
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


# ============================================================================ the language model
class LanguageModel(nn.Module):
    """BiLM + softmax shared by both directions (spec section 9). The softmax is not exported.

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


def make_optimizer(params, learning_rate: float) -> torch.optim.Optimizer:
    """TF Adagrad: acc starts at 1.0, acc += g^2, theta -= lr * g / sqrt(acc), no epsilon.
    Takes the sparse softmax gradient as it is (torch's Adagrad updates only its rows)."""
    # torch's sparse Adagrad builds its own COO tensors; invariant checks are off by default and
    # saying so explicitly silences the per-process warning about it
    torch.sparse.check_sparse_tensor_invariants.disable()
    return torch.optim.Adagrad(params, lr=learning_rate, initial_accumulator_value=1.0, eps=0.0)


def clip_by_global_norm(params: list[torch.Tensor], clip_norm: float) -> float:
    """TF clip_by_global_norm: g *= clip / max(norm, clip). Returns the norm before clipping.
    A sparse gradient (the softmax rows) is coalesced first: its norm is that of the dense
    gradient it stands for (repeated rows summed)."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    values = [g.values() if g.is_sparse else g for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in values]))
    scale = clip_norm / torch.clamp(norm, min=clip_norm)
    torch._foreach_mul_(values, scale.to(values[0].dtype))
    return float(norm)


def all_reduce_gradients(params: list[torch.Tensor], world_size: int,
                         extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """THE place where gradients of all ranks are averaged (bilm-tf averages tower gradients
    before clipping). A no-op for one process. With torch.distributed initialised, every
    gradient and `extra` (a small float vector riding along: the loss, the stop flags) go into
    ONE flat buffer and ONE all-reduce (sum, then / world_size); returns the averaged `extra`.
    A sparse gradient goes in as its rows over the union of the ranks' row sets, found first
    with one small all-gather of row ids; it comes out sparse over that union.

    Why not DistributedDataParallel: a step here is not one module forward (two direction passes
    share one char-CNN call, the LSTM backward is a hand-written autograd.Function, the sampled
    softmax runs outside the module), and DDP's gain, overlapping bucketed all-reduces with the
    backward pass, needs the same flat gradients anyway; an explicit all-reduce after backward
    keeps the step one plain function, lets the loss and the stop decision travel in the same
    message (no extra collective per step), and is easy to check against one process."""
    if world_size <= 1:
        return extra
    import torch.distributed as dist
    if not dist.is_initialized():
        raise ElmoError("world_size > 1 needs torch.distributed to be initialised (use torchrun)")
    # A sparse gradient (the softmax rows each rank gathered) travels as the rows of the union
    # of all ranks' row sets (one small all-gather first), not as the dense (V, P) matrix: at
    # the 1B-Word vocabulary that is ~16k rows instead of 793k.
    sparse = {}
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            g = p.grad.coalesce()
            union = _union_of_rows(g.indices()[0], world_size)              # (u,), every rank
            rows = g.values().new_zeros(union.numel(), *g.shape[1:])        # (u, P)
            rows.index_copy_(0, torch.searchsorted(union, g.indices()[0]), g.values())
            sparse[p] = (union, rows)
    grads = [sparse[p][1] if p in sparse else p.grad for p in params if p.grad is not None]
    parts = [g.reshape(-1) for g in grads]                     # each (numel,)
    if extra is not None:
        parts.append(extra.to(device=parts[0].device if parts else extra.device,
                              dtype=parts[0].dtype if parts else extra.dtype).reshape(-1))
    flat = torch.cat(parts)                                    # (sum of numels + len(extra),)
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    for p, (union, rows) in sparse.items():
        p.grad = torch.sparse_coo_tensor(union.unsqueeze(0), rows, p.shape, is_coalesced=True)
    return flat[offset:].cpu() if extra is not None else None


def _union_of_rows(rows: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sorted union of every rank's row indices (k,) (k may differ between ranks)."""
    import torch.distributed as dist
    n = torch.tensor([rows.numel()], device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    padded = rows.new_full((int(max(sizes)),), -1)
    padded[:rows.numel()] = rows
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    union = torch.unique(torch.cat(gathered))                  # sorted
    return union[union >= 0]


def _collective(rank: int, fn: Callable):
    """Run one torch.distributed call; a peer that died or hung (the socket closed, the
    --dist-timeout expired) becomes one line instead of a C++ trace."""
    try:
        return fn()
    except Exception as e:   # RuntimeError / DistBackendError from gloo or NCCL
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)   # gloo's source path
        if len(first) > 160:
            first = first[:157] + "..."
        raise ElmoError(f"rank {rank} lost contact with the group ({type(e).__name__}: {first})"
                        ) from None


class _ConcatStreams:
    """k LMBatchStreams (ranks 0..k-1 of a world of k) read as ONE stream whose batch is theirs
    concatenated along rows: rank 0's rows, then rank 1's, ...  With it one process sees exactly
    the rows a k-process run sees in one step (train(_emulate_world_size=k)), which is how the
    equivalence of k processes and one process with the global batch is tested."""

    def __init__(self, streams: list):
        self.streams = streams

    def __iter__(self):
        its = [iter(s) for s in self.streams]
        while True:
            parts = []
            for it in its:
                b = next(it, None)
                if b is None:
                    return
                parts.append(b)
            out = {k: torch.cat([b[k] for b in parts], dim=0)          # (k * B, T[, C])
                   for k in parts[0] if torch.is_tensor(parts[0][k])}
            out["n_tokens"] = sum(int(b["n_tokens"]) for b in parts)
            yield out

    def state_dict(self) -> dict:
        return {"format": "torch_elmo._ConcatStreams/1",
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, d: dict) -> None:
        if d.get("format") != "torch_elmo._ConcatStreams/1" or len(d["streams"]) != len(self.streams):
            raise ElmoError("data state does not match this stream (emulated world size differs)")
        for s, sd in zip(self.streams, d["streams"]):
            s.load_state_dict(sd)


# ============================================================================ checkpoints & runs
def vocab_fingerprint(vocab: Vocabulary) -> str:
    return hashlib.sha1("\n".join(vocab.tokens).encode("utf-8")).hexdigest()


def training_options_dict(options: Options) -> dict:
    """options.json in bilm-tf's training form (n_characters 261, training keys included)."""
    d = options.to_dict()
    d["char_cnn"]["n_characters"] = N_CHARACTERS_TRAIN
    return d


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
           "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    n = d["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = d["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temp file, fsync, rename over `path`, fsync the directory: a kill at any
    moment leaves either the old or the new checkpoint, never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise ElmoError(f"{path}: no checkpoint found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated / foreign file
        raise ElmoError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ElmoError(f"{path}: not a torch_elmo training checkpoint")
    return ckpt


def checkpoint_options(ckpt: dict, source: str = "checkpoint") -> Options:
    return Options.from_dict(json.loads(ckpt["options"]), source=source)


def load_language_model(save_dir: str, device="cpu") -> tuple[LanguageModel, dict]:
    """The LanguageModel (BiLM + softmax) of a run directory's checkpoint, in eval mode."""
    ckpt = load_checkpoint(save_dir)
    options = checkpoint_options(ckpt, os.path.join(save_dir, CHECKPOINT))
    lm = LanguageModel(options, int(ckpt["vocab"]["size"]))
    lm.bilm.load_state_dict(ckpt["model"])
    with torch.no_grad():
        lm.softmax_W.copy_(ckpt["softmax"]["W"])
        lm.softmax_b.copy_(ckpt["softmax"]["b"])
    return lm.to(device).eval(), ckpt


def _options_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if not prefix and (k in _STOPPING_KEYS or k == "n_gpus"):   # n_gpus: the world size
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _options_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k} ({vb!r} in the checkpoint, {va!r} now)")
    return keys


def check_resume_compatible(ckpt: dict, options: Options, vocab: Vocabulary, seed: int,
                            train_files: list[str], world_size: int, path: str) -> None:
    """One-line refusal when a resumed run would not continue the checkpointed one."""
    v = ckpt["vocab"]
    if int(v["size"]) != len(vocab) or v["sha1"] != vocab_fingerprint(vocab):
        raise ElmoError(f"--resume: vocabulary {vocab.source} ({len(vocab)} tokens) differs from "
                        f"the checkpoint's ({v['path']}, {v['size']} tokens)")
    diff = _options_diff(training_options_dict(options), json.loads(ckpt["options"]))
    if diff:
        raise ElmoError(f"--resume: options differ from {path}: {'; '.join(diff)}")
    run = ckpt["run"]
    if int(run["seed"]) != seed:
        raise ElmoError(f"--resume: --seed {seed} differs from the checkpoint's {run['seed']}")
    if [os.path.abspath(f) for f in train_files] != list(run["train_files"]):
        raise ElmoError(f"--resume: the --train files differ from the checkpoint's "
                        f"({len(train_files)} now, {len(run['train_files'])} then)")
    # a different world size is allowed: train() re-shards the data and says so


def resolve_init_from(path: str) -> tuple[Options, dict, Optional[dict], Optional[dict]]:
    """--init-from: (architecture options, BiLM state_dict, softmax or None, vocab info or None).

    Accepts a run directory (its checkpoint.pt), an exported model directory (options.json +
    weights.hdf5) or the path of a weights.hdf5 (options.json beside it)."""
    from .export import load_weights
    ckpt_path = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
    if os.path.isfile(ckpt_path) and ckpt_path.endswith(".pt"):
        ckpt = load_checkpoint(ckpt_path)
        return (checkpoint_options(ckpt, ckpt_path), ckpt["model"], ckpt["softmax"], ckpt["vocab"])
    if os.path.isdir(path):
        weights = os.path.join(path, "weights.hdf5")
        if not os.path.exists(weights):
            raise ElmoError(f"--init-from {path}: neither {CHECKPOINT} nor weights.hdf5 found there")
    elif os.path.isfile(path):
        weights = path
    else:
        raise ElmoError(f"--init-from {path}: no such file or directory")
    options_file = os.path.join(os.path.dirname(os.path.abspath(weights)), "options.json")
    options = read_options(options_file)
    bilm = BiLM(options)
    load_weights(bilm, weights)
    return options, bilm.state_dict(), None, None


def _same_architecture(a: Options, b: Options) -> bool:
    da, db = a.to_dict(inference=True), b.to_dict(inference=True)
    return da == db and a.bidirectional == b.bidirectional


def updates_per_epoch(n_train_tokens: int, batch_size: int, unroll_steps: int,
                      world_size: int = 1) -> int:
    return n_train_tokens // (batch_size * unroll_steps * world_size)


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(path: str, max_step: Optional[int] = None) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if max_step is None or rec.get("step", 0) <= max_step:
                    out.append(rec)
    return out


def plot_perplexity(metrics: list[dict], path: str) -> bool:
    """perplexity.png: train (sampled softmax) and held-out (full softmax) perplexity vs tokens.
    matplotlib is optional: returns False (after one warning) when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_perplexity, "_warned", False):
            warnings.warn("matplotlib is not installed: no perplexity.png "
                          "(pip install matplotlib)")
            plot_perplexity._warned = True
        return False
    train = [(m["tokens"], m["train_ppl"]) for m in metrics if m.get("train_ppl") is not None]
    held = [(m["tokens"], m["heldout_ppl_fwd"], m["heldout_ppl_bwd"], m["heldout_ppl_avg"])
            for m in metrics if m.get("heldout_ppl_avg") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train (sampled softmax, optimistic)", color="tab:gray", lw=1)
    if held:
        t, f, b, a = zip(*held)
        ax.plot(t, a, "o-", label="held-out average (full softmax)", color="tab:blue")
        ax.plot(t, f, ".--", label="held-out forward", color="tab:green", lw=1)
        ax.plot(t, b, ".--", label="held-out backward", color="tab:orange", lw=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("perplexity")
    if train or held:
        ax.set_yscale("log")
        ax.legend()
    ax.grid(True, alpha=0.3)
    ax.set_title("biLM perplexity")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _batch_to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def _sentence_count_check(files: list[str], vocab: Vocabulary) -> int:
    """One pass over the training data: the number of tokens (n_train_tokens) and a frequency
    check of the vocabulary (warns if it is not sorted by descending count, section 2)."""
    from . import data, textio
    counts: dict[str, int] = {}
    total = 0
    bad = data.BadLines()
    for path in files:
        for _, tokens in textio.iter_sentences(path, bad):
            total += len(tokens)
            for t in tokens:
                if t in vocab:
                    counts[t] = counts.get(t, 0) + 1
    if bad.count > bad.named:
        warnings.warn(f"{bad.count} non-UTF-8 line(s) skipped in total")
    vocab.check_frequency_sorted(counts)
    return total


# ============================================================================ the training loop
def train(options: Options, vocab: Vocabulary, train_files: list[str], save_dir: str, *,
          heldout_files: Optional[list[str]] = None, epochs: Optional[float] = None,
          n_train_tokens: Optional[int] = None, max_tokens: Optional[int] = None,
          max_time: Optional[float] = None, seed: int = 0, resume: bool = False,
          init_from: Optional[str] = None, log_every: int = 100, eval_every: int = 1000,
          checkpoint_every: int = 1250, heldout_batch_size: int = 256,
          heldout_max_batches: Optional[int] = None, device: str | torch.device = "cpu",
          bf16: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1,
          vocab_path: Optional[str] = None, _emulate_world_size: int = 1) -> dict:
    """Train (or continue training) a biLM; returns the last metrics record.

    `options` carries the model and the section-9 hyperparameters (batch_size, unroll_steps,
    n_negative_samples_batch, learning_rate, all_clip_norm_val, dropout, sample_softmax).
    Updates = epochs x floor(n_train_tokens / (batch_size x unroll_steps x world_size)), with
    n_train_tokens counted from the data unless given; max_tokens / max_time (seconds, whole
    run including resumed parts) stop earlier. Only rank 0 logs, evaluates and checkpoints.

    world_size > 1: torch.distributed must be initialised (cli_train does it from torchrun's
    environment); `options.batch_size` is the per-rank batch. `_emulate_world_size=k` (tests,
    one process): the batch of `options.batch_size` rows is built from the k rank streams of a
    k-process run, each of batch_size / k rows, so one process reproduces a k-process run."""
    from . import data
    from .evaluate import perplexity

    device = torch.device(device)
    is_main = rank == 0
    dist_on = world_size > 1
    if dist_on:
        import torch.distributed as dist
    k_emul = int(_emulate_world_size)
    if k_emul > 1 and (dist_on or options.batch_size % k_emul):
        raise ElmoError("_emulate_world_size needs one process and a batch divisible by it")
    B, T = options.batch_size, options.unroll_steps
    V = len(vocab)
    options = options.replace(n_tokens_vocab=V, n_gpus=world_size)
    ckpt_path = os.path.join(save_dir, CHECKPOINT)
    metrics_path = os.path.join(save_dir, METRICS)
    train_files = [os.path.abspath(f) for f in train_files]
    if epochs is None:
        epochs = float(options.n_epochs)
    if float(epochs).is_integer():
        options = options.replace(n_epochs=int(epochs))

    def log(msg: str) -> None:
        if is_main:
            (bar.write if bar is not None else print)(msg)

    bar = None
    # ---------------------------------------------------------------- resume / init / new run
    ckpt = None
    reshard = False       # resumed with another world size: the data is dealt out anew
    data_seed = seed      # the seed of the data order (a re-shard draws a fresh order)
    step_offset = 0       # updates a re-shard added to / removed from epochs x per_epoch
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resume_compatible(ckpt, options, vocab, seed, train_files, world_size, ckpt_path)
        if n_train_tokens is None:
            n_train_tokens = int(ckpt["run"]["n_train_tokens"])
        data_seed = int(ckpt["run"].get("data_seed", seed))
        step_offset = int(ckpt["run"].get("step_offset", 0))
        reshard = int(ckpt["run"]["world_size"]) != world_size
        if reshard:
            # The saved per-rank positions describe another split of the files, which no rank of
            # this world can continue; new streams with a fresh order (seed from the step, so
            # the run does not replay the order it started with) re-deal every shard/line.
            data_seed = seed + 1_000_003 * int(ckpt["step"])
    if n_train_tokens is None:
        n_train_tokens = options.n_train_tokens
    # the stream first: it refuses empty files / bad settings with its own one-line messages
    if k_emul > 1:
        stream = _ConcatStreams([
            data.LMBatchStream(train_files, vocab, B // k_emul, T,
                               max_chars=options.char_cnn.max_characters_per_token, seed=data_seed,
                               shuffle=True, loop=True, bidirectional=options.bidirectional,
                               rank=r, world_size=k_emul) for r in range(k_emul)])
    else:
        stream = data.LMBatchStream(train_files, vocab, B, T,
                                    max_chars=options.char_cnn.max_characters_per_token,
                                    seed=data_seed, shuffle=True, loop=True,
                                    bidirectional=options.bidirectional,
                                    rank=rank, world_size=world_size)
    counted = n_train_tokens is None
    if counted:  # reports bad lines once, up front; the stream's reports are then muted
        n_train_tokens = _sentence_count_check(train_files, vocab)
    if n_train_tokens <= 0:
        raise ElmoError(f"{', '.join(train_files[:3])}{' ...' if len(train_files) > 3 else ''}: "
                        f"no tokens (only blank or undecodable lines)")
    options = options.replace(n_train_tokens=int(n_train_tokens))
    per_epoch = updates_per_epoch(n_train_tokens, B, T, world_size)
    total_steps = int(math.floor(epochs * per_epoch))
    if reshard:
        # the steps done so far were of another global batch: count the tokens done in steps of
        # this world's global batch, and plan the remaining updates from there
        done = int(ckpt["tokens"]) // (B * T * world_size)
        step_offset = int(ckpt["step"]) - done
    if total_steps <= 0 and max_tokens is None and max_time is None:
        raise ElmoError(f"{n_train_tokens} training tokens make no full batch of {B} x {T} "
                        f"tokens per epoch: lower --batch-size / --unroll-steps or add data")
    if total_steps <= 0:
        total_steps = sys.maxsize  # only max_tokens / max_time stop the run
    else:
        total_steps = max(0, total_steps + step_offset)   # 0: the planned updates are done

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    lm = LanguageModel(options, V)
    if init_from is not None and ckpt is None:
        src_options, bilm_state, softmax, src_vocab = resolve_init_from(init_from)
        if not _same_architecture(src_options, options):
            raise ElmoError(f"--init-from {init_from}: its architecture (lstm / char_cnn) differs "
                            f"from the options of this run")
        lm.bilm.load_state_dict(bilm_state)
        if softmax is not None and src_vocab is not None and src_vocab["sha1"] == vocab_fingerprint(vocab):
            with torch.no_grad():
                lm.softmax_W.copy_(softmax["W"])
                lm.softmax_b.copy_(softmax["b"])
            log(f"init from {init_from}: biLM and softmax (same vocabulary)")
        else:
            log(f"init from {init_from}: biLM weights, new softmax for {V} words")
    lm.to(device)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, options.learning_rate)
    n_samples = options.n_negative_samples_batch
    sampler = None
    if options.sample_softmax:
        if n_samples >= V:
            warnings.warn(f"n_negative_samples_batch {n_samples} >= vocabulary size {V}: "
                          f"training with the full softmax")
        else:
            # ONE set of negatives per step shared by all ranks (every rank's sampler has the same
            # seed and draws once per direction per step): then the update is exactly the one of
            # one process with the global batch (the tested equivalence), and a run's result
            # does not depend on how many processes it had. bilm-tf's towers each drew their
            # own set; with 8192 negatives per set the variance gained by distinct sets is small.
            sampler = LogUniformSampler(V, seed=seed * 1000 + 17)
    if dist_on and rank > 0:
        # dropout masks must differ between ranks (they are different rows); rank 0 keeps the
        # one-process stream. Model init above drew from the same seed on every rank.
        torch.manual_seed(seed * 1000 + 7919 * rank)
    state = lm.zero_state(B)
    step, tokens, elapsed, step_time = 0, 0, 0.0, 0.0   # step_time: seconds in updates only
    if ckpt is not None:
        lm.bilm.load_state_dict(ckpt["model"])
        with torch.no_grad():
            lm.softmax_W.copy_(ckpt["softmax"]["W"])
            lm.softmax_b.copy_(ckpt["softmax"]["b"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if sampler is not None:
            sampler.load_state_dict(ckpt["sampler"])
        # this rank's part: data position, carried LSTM state, RNGs ("ranks" when world > 1)
        mine = ckpt["ranks"][rank] if ckpt.get("ranks") and not reshard else ckpt
        if not reshard:
            state = (mine["lstm_state"]["c"].to(device), mine["lstm_state"]["h"].to(device))
            stream.load_state_dict(mine["data"])
            _set_rng_state(mine["rng"])
        else:   # zero LSTM states for the new rows, per-rank dropout streams from the seed
            torch.manual_seed(data_seed * 1000 + 7919 * rank)
        step, tokens, elapsed = int(ckpt["step"]), int(ckpt["tokens"]), float(ckpt["elapsed"])
        step_time = float(ckpt["step_time"])
        if reshard:
            log(f"resume: world size {ckpt['run']['world_size']} -> {world_size}: data re-sharded "
                f"(new streams, fresh order), LSTM states reset; model, optimizer, sampler and "
                f"counters kept")
    if dist_on:   # the same start on every rank, whatever each one loaded
        with torch.no_grad():
            for p in lm.parameters():
                _collective(rank, lambda: dist.broadcast(p.data, 0))
    metrics = _read_metrics(metrics_path, max_step=step) if is_main and ckpt is not None else []
    if is_main:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):   # temp files of a checkpoint cut by a kill
            if name.startswith(f"{CHECKPOINT}.tmp."):
                os.remove(os.path.join(save_dir, name))
        with open(metrics_path, "w", encoding="utf-8") as f:  # drop lines newer than the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        with open(os.path.join(save_dir, OPTIONS), "w", encoding="utf-8") as f:
            json.dump(training_options_dict(options), f, indent=2)
            f.write("\n")

    def checkpoint() -> None:
        # every rank's data position, LSTM state and RNGs, gathered to rank 0 (a collective:
        # every rank calls checkpoint() at the same step)
        mine = {"data": stream.state_dict(),
                "lstm_state": {"c": state[0].detach().cpu(), "h": state[1].detach().cpu()},
                "rng": _rng_state(device)}
        ranks = [mine]
        if dist_on:
            ranks = [None] * world_size if is_main else None
            _collective(rank, lambda: dist.gather_object(mine, ranks, dst=0))
        if not is_main:
            return
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT,
            "model": lm.bilm.state_dict(),
            "softmax": {"W": lm.softmax_W.detach(), "b": lm.softmax_b.detach()},
            "optimizer": optimizer.state_dict(),
            "lstm_state": ranks[0]["lstm_state"],     # rank 0's (all of them for one process)
            "rng": ranks[0]["rng"],
            "sampler": sampler.state_dict() if sampler is not None else None,
            "data": ranks[0]["data"],
            "ranks": ranks if world_size > 1 else None,
            "step": step, "tokens": tokens, "elapsed": elapsed, "step_time": step_time,
            "window": {"loss": window_loss, "n": window_n},  # the next log line's average
            "options": json.dumps(training_options_dict(options)),
            "vocab": {"path": os.path.abspath(vocab_path or vocab.source), "size": V,
                      "sha1": vocab_fingerprint(vocab)},
            "run": {"seed": seed, "train_files": train_files, "world_size": world_size,
                    "data_seed": data_seed, "step_offset": step_offset,
                    "n_train_tokens": int(n_train_tokens), "epochs": float(epochs),
                    "total_steps": total_steps if total_steps != sys.maxsize else None},
        }, ckpt_path)

    n_evals = []
    if heldout_files is not None and is_main:   # fail now, not after hours of training
        probe = data.LMBatchStream(heldout_files, vocab, heldout_batch_size, 1,
                                   max_chars=options.char_cnn.max_characters_per_token,
                                   shuffle=False, loop=False, bidirectional=options.bidirectional)
        if probe.next_batch() is None:
            raise ElmoError(f"--heldout: no complete batch of {heldout_batch_size} rows (fewer "
                            f"sentences than --heldout-batch-size?)")
        n_evals.append(0)   # the probe reported the held-out files' warnings; evals stay quiet

    def evaluate_heldout() -> dict:
        with warnings.catch_warnings():
            # the first evaluation reports bad / empty held-out files, later ones stay quiet
            warnings.simplefilter("ignore" if n_evals else "always")
            n_evals.append(1)
            hs = data.LMBatchStream(heldout_files, vocab, heldout_batch_size, 1,
                                    max_chars=options.char_cnn.max_characters_per_token, seed=0,
                                    shuffle=False, loop=False, bidirectional=options.bidirectional)
            with autocast():
                return perplexity(lm, hs, max_batches=heldout_max_batches, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # ---------------------------------------------------------------------------------- loop
    def stop_reason(check_time: bool = True) -> Optional[str]:
        """Steps and tokens are the same on every rank; the clock is not, so with several
        ranks the time (and Ctrl-C) decision travels in the gradient all-reduce instead."""
        if step >= total_steps:
            return f"{step} updates done"
        if max_tokens is not None and tokens >= max_tokens:
            return f"--max-tokens {max_tokens} reached"
        if check_time and max_time is not None and elapsed >= max_time:
            return f"--max-time {max_time:g}s reached"
        return None

    if is_main:
        from tqdm import tqdm
        planned = "until a limit" if total_steps == sys.maxsize else f"{total_steps:,} updates"
        print(f"training {sum(p.numel() for p in lm.bilm.parameters()):,} biLM parameters + "
              f"softmax {V:,} x {options.lstm.projection_dim}; {n_train_tokens:,} tokens/epoch, "
              f"{per_epoch:,} updates/epoch x {epochs:g} epochs = {planned}; "
              f"batch {B} x unroll {T} x {world_size} process(es); device {device}"
              + (f"; resumed at step {step:,}" if ckpt is not None else ""), flush=True)
        bar = tqdm(total=None if total_steps == sys.maxsize else total_steps, initial=step,
                   unit="batch", disable=not progress, dynamic_ncols=True, file=sys.stderr,
                   smoothing=0.05)
    record: dict = {}
    window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
    if ckpt is not None:
        window_loss, window_n = float(ckpt["window"]["loss"]), int(ckpt["window"]["n"])
    muted = warnings.catch_warnings()
    muted.__enter__()
    if counted:
        warnings.filterwarnings("ignore", message=r".*not valid UTF-8")
    it = iter(stream)
    t_last = time.perf_counter()
    reason = stop_reason()
    interrupted = []
    previous_handler = None
    if (is_main or dist_on) and threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):  # finish the step, checkpoint, stop; a 2nd Ctrl-C aborts
            if not dist_on:
                # under torchrun every worker gets the terminal's Ctrl-C AND the launcher's
                # forwarded SIGINT, so there the handler stays (the launcher kills after 30 s)
                signal.signal(signal.SIGINT, signal.default_int_handler)
            interrupted.append(True)
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while reason is None:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise ElmoError("the training data stream ended (no sentences?)") from None
            batch = _batch_to(batch, device)
            if options.state_reset_prob > 0:   # rows that start this batch from the zero state
                # global CPU RNG: saved in checkpoints (exact resume), per rank under torchrun
                keep = torch.rand(state[0].shape[2]) >= options.state_reset_prob
                keep = keep.to(device=state[0].device, dtype=state[0].dtype).view(1, 1, -1, 1)
                state = (state[0] * keep, state[1] * keep)
            lm.train()
            with autocast():
                loss, _, new_state = lm.training_loss(batch, state, sampler, n_samples)
            state = (new_state[0].detach(), new_state[1].detach())  # truncated BPTT
            optimizer.zero_grad(set_to_none=True)
            (loss * T).backward()
            # the one place ranks meet: gradients, the loss and the stop flags in one message
            # [loss, rank 0's clock ran out, some rank saw Ctrl-C]
            out_of_time = (is_main and max_time is not None
                           and elapsed + time.perf_counter() - t_last >= max_time)
            extra = torch.tensor([float(loss.detach()), float(out_of_time), float(bool(interrupted))],
                                 dtype=torch.float64)
            if dist_on:
                extra = _collective(rank, lambda: all_reduce_gradients(params, world_size, extra))
            else:
                all_reduce_gradients(params, world_size)
            clip_by_global_norm(params, options.all_clip_norm_val)
            optimizer.step()
            step += 1
            tokens += int(batch["n_tokens"]) * world_size
            loss_value = float(extra[0])   # the mean over the global batch (all ranks)
            if not math.isfinite(loss_value):
                raise ElmoError(f"step {step}: the loss is {loss_value} (diverged); try a lower "
                                f"--learning-rate or --clip-norm")
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            window_loss += loss_value
            window_n += 1
            window_tokens += int(batch["n_tokens"]) * world_size
            window_time += now - t0
            step_time += now - t0
            if dist_on:
                # decide on the all-reduced flags only: a Ctrl-C that lands on this rank after
                # the all-reduce is in the next step's message; acting on it now would stop
                # this rank one step before the others (which then wait for it forever)
                reason = (stop_reason(check_time=False)
                          or (f"--max-time {max_time:g}s reached" if float(extra[1]) > 0 else None)
                          or ("interrupted (Ctrl-C); continue with --resume"
                              if float(extra[2]) > 0 else None))
            else:
                reason = stop_reason() or ("interrupted (Ctrl-C); continue with --resume"
                                           if interrupted else None)
            if not is_main:
                if step % checkpoint_every == 0 and reason is None:
                    checkpoint()
                continue
            bar.update(1)
            if step % 10 == 0 or reason is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}",
                                tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}")
            do_log = step % log_every == 0 or reason is not None
            do_eval = heldout_files is not None and (step % eval_every == 0 or reason is not None)
            if do_log or do_eval:
                mean_loss = window_loss / max(window_n, 1)
                record = {"step": step, "tokens": tokens, "train_loss": round(mean_loss, 6),
                          "train_ppl": round(math.exp(min(mean_loss, 50.0)), 4),
                          "tokens_per_s": round(window_tokens / max(window_time, 1e-9), 1),
                          "elapsed": round(elapsed, 2)}
                msg = (f"step {step:,}" + ("" if total_steps == sys.maxsize else f"/{total_steps:,}")
                       + f" | tokens {tokens:,} | loss {mean_loss:.4f} (sampled-softmax ppl "
                       f"{record['train_ppl']:.1f}) | {record['tokens_per_s']:,.0f} tok/s | "
                       f"elapsed {_fmt_time(elapsed)}")
                window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
                if do_eval:
                    t_eval = time.perf_counter()
                    ppl = evaluate_heldout()
                    record.update(heldout_ppl_fwd=round(ppl["forward"], 4),
                                  heldout_ppl_bwd=round(ppl["backward"], 4),
                                  heldout_ppl_avg=round(ppl["average"], 4))
                    msg += (f" | held-out ppl (full softmax) fwd {ppl['forward']:.2f} "
                            f"bwd {ppl['backward']:.2f} avg {ppl['average']:.2f}")
                    t_last = time.perf_counter()
                    elapsed += t_last - t_eval
                    record["elapsed"] = round(elapsed, 2)
                log(msg)
                metrics.append(record)
                _append_jsonl(metrics_path, record)
                if do_eval:
                    plot_perplexity(metrics, os.path.join(save_dir, PLOT))
            if step % checkpoint_every == 0 and reason is None:
                checkpoint()
    finally:
        muted.__exit__(None, None, None)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if bar is not None:
            bar.close()
    checkpoint()
    if is_main:
        plot_perplexity(metrics, os.path.join(save_dir, PLOT))
        print(f"stopped: {reason}; checkpoint {ckpt_path}", flush=True)
    if interrupted or (reason or "").startswith("interrupted"):  # this rank's Ctrl-C or another's
        raise KeyboardInterrupt   # after the checkpoint: `elmo train` exits 130
    return record


# ============================================================================ command line
def _one_line_warnings(prefix: str):
    """Show warnings as `elmo <cmd>: warning: ...` single lines on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr, flush=True)
    return show


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ElmoError(f"--device {name}: CUDA is not available on this machine")
    return dev


def options_from_args(args, base: Optional[Options] = None) -> Options:
    """--options FILE | --preset NAME | `base` (resume / init-from) | the small preset, then the
    per-flag overrides. A preset brings section 9's training defaults (Options' defaults)."""
    if args.options:
        options = read_options(args.options)
    elif args.preset:
        options = preset(args.preset)
    elif base is not None:
        options = base
    else:
        options = preset("small")
    overrides = {"batch_size": args.batch_size, "unroll_steps": args.unroll_steps,
                 "n_negative_samples_batch": args.n_negative_samples,
                 "learning_rate": args.learning_rate, "all_clip_norm_val": args.clip_norm,
                 "dropout": args.dropout,
                 "state_reset_prob": getattr(args, "state_reset_prob", None)}
    options = options.replace(**{k: v for k, v in overrides.items() if v is not None})
    for k in ("batch_size", "unroll_steps", "n_negative_samples_batch"):
        if getattr(options, k) < 1:
            raise ElmoError(f"{k} must be >= 1, got {getattr(options, k)}")
    if not 0.0 <= options.dropout < 1.0:
        raise ElmoError(f"dropout must be in [0, 1), got {options.dropout}")
    if not 0.0 <= options.state_reset_prob < 1.0:
        raise ElmoError(f"state_reset_prob must be in [0, 1), got {options.state_reset_prob}")
    if options.learning_rate <= 0 or options.all_clip_norm_val <= 0:
        raise ElmoError("learning_rate and all_clip_norm_val must be > 0")
    return options


def _argv_from_args(args, drop: tuple = ("nproc",)) -> list[str]:
    """The `elmo train` arguments that give `args` (flags at their default left out)."""
    import argparse
    from .cli import _train_parser
    p = argparse.ArgumentParser(add_help=False)
    _train_parser(p)
    out = []
    for a in p._actions:
        if not a.option_strings or a.dest in drop:
            continue
        v = getattr(args, a.dest, a.default)
        if v == a.default:
            continue
        if isinstance(a, argparse._StoreTrueAction):
            out.append(a.option_strings[0])
        else:
            out += [a.option_strings[0], str(v)]
    return out


def _spawn_torchrun(nproc: int, args) -> int:
    """`elmo train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m torch_elmo train
    ...` (one node; torchrun picks a free port, restarts nothing, and stops all workers when one
    fails)."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), "-m", "torch_elmo", "train", *_argv_from_args(args)]
    print("running: torchrun --standalone --nproc_per_node " + str(nproc) + " -m torch_elmo train "
          + " ".join(cmd[cmd.index("train") + 1:]), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:   # the workers got the same Ctrl-C: let them checkpoint, then 130
        proc.wait()
        raise
    if rc != 0:
        raise ElmoError(f"torchrun with {nproc} processes exited with status {rc} "
                        f"(see the workers' messages above)")
    return 0


def _init_distributed(device: torch.device, timeout_s: float) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); the process group uses NCCL on GPU (device cuda:LOCAL_RANK) and gloo on
    CPU. `timeout_s` bounds every collective: a rank that hangs makes the others fail after it
    (one that dies is noticed at once by gloo, and torchrun stops the rest of the job)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as e:
        raise ElmoError(f"rank {rank}: cannot join the process group of {world} ({backend}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return rank, world, device


def cli_train(args) -> int:
    from . import data
    nproc = getattr(args, "nproc", None)
    in_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if nproc is not None and nproc < 1:
        raise ElmoError(f"--nproc must be >= 1, got {nproc}")
    if nproc is not None and nproc > 1:
        if in_torchrun:
            raise ElmoError("--nproc inside torchrun: use one or the other")
        return _spawn_torchrun(nproc, args)
    timeout = getattr(args, "dist_timeout", None) or 600.0
    if timeout <= 0:
        raise ElmoError(f"--dist-timeout must be > 0, got {timeout:g}")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warnings("elmo train")
        if args.epochs is not None and args.epochs <= 0:
            raise ElmoError(f"--epochs must be > 0, got {args.epochs:g}")
        for flag in ("log_every", "eval_every", "checkpoint_every", "heldout_batch_size"):
            if getattr(args, flag, 1) < 1:
                raise ElmoError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        device = resolve_device(args.device)
        rank, world_size, device = _init_distributed(device, timeout)
        if world_size > 1 and threading.current_thread() is threading.main_thread():
            # torchrun stops the other workers with SIGTERM when one fails; this rank may get
            # it before its next collective notices the dead peer: say why in the same line
            def on_sigterm(signum, frame):
                print(f"elmo train: error: rank {rank} lost contact with the group (stopped by "
                      f"torchrun with SIGTERM: another rank failed or the job was cancelled)",
                      file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGTERM)
            signal.signal(signal.SIGTERM, on_sigterm)
        train_files = data.expand_glob(args.train)
        heldout_files = data.expand_glob(args.heldout) if args.heldout else None
        vocab = Vocabulary.read(args.vocab)
        base = None
        if args.resume:
            base = checkpoint_options(load_checkpoint(args.save_dir),
                                      os.path.join(args.save_dir, CHECKPOINT))
        elif args.init_from and not (args.options or args.preset):
            base = resolve_init_from(args.init_from)[0]
            base = Options(lstm=base.lstm, char_cnn=base.char_cnn, bidirectional=base.bidirectional)
        options = options_from_args(args, base)
        if (not args.resume and os.path.exists(os.path.join(args.save_dir, CHECKPOINT))
                and args.init_from is None):
            raise ElmoError(f"{args.save_dir} already holds a checkpoint: add --resume to continue "
                            f"it, or choose another --save-dir")
        epochs = args.epochs
        if args.resume and epochs is None:
            epochs = float(load_checkpoint(args.save_dir)["run"]["epochs"])
        try:
            train(options, vocab, train_files, args.save_dir, heldout_files=heldout_files,
                  epochs=epochs, n_train_tokens=getattr(args, "n_train_tokens", None),
                  max_tokens=args.max_tokens, max_time=args.max_time, seed=args.seed,
                  resume=args.resume, init_from=args.init_from, log_every=args.log_every,
                  eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                  heldout_batch_size=getattr(args, "heldout_batch_size", 256),
                  heldout_max_batches=args.heldout_max_batches, device=device, bf16=args.bf16,
                  progress=not args.no_progress, vocab_path=args.vocab, rank=rank,
                  world_size=world_size)
        except KeyboardInterrupt:
            if world_size > 1:   # all ranks stopped at the same step: the group is healthy
                print("elmo train: interrupted", file=sys.stderr)
                _leave_group(rank, 130)
            raise
    if world_size > 1:   # only after a clean finish: a broken group may hang in teardown
        _leave_group(rank, 0)
    return 0


def _leave_group(rank: int, exit_code: int) -> None:
    """A torchrun worker that finished (or stopped on Ctrl-C with all the others) leaves: a
    barrier (every rank done with its collectives), destroy_process_group, flush, os._exit.
    Exiting through interpreter finalisation instead aborted in C++ after a clean destroy in
    about 1 run in 10 ("terminate called without an active exception", exit -6), which torchrun
    reports as a failed job; with os._exit, 40 runs in a row ended cleanly."""
    import torch.distributed as dist
    _collective(rank, dist.barrier)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def export_run(save_dir: str, out_dir: str) -> tuple[str, str]:
    """A run's biLM -> out_dir/options.json (inference form, n_characters 262) + weights.hdf5."""
    from .export import export_model
    lm, _ = load_language_model(save_dir)
    return export_model(lm.bilm, out_dir)


def cli_export(args) -> int:
    options_file, weight_file = export_run(args.save_dir, args.out)
    print(f"wrote {options_file} and {weight_file}")
    return 0
