"""Several processes (torchrun, PyTorch's launcher; `elmo train --nproc N` starts it).

Rank r streams its own disjoint part of the data (LMBatchStream rank/world_size) with batch B, so
the global batch is B x world_size and an epoch has world_size times fewer updates. After backward
the gradients are averaged over ranks in ONE flattened all-reduce (`all_reduce_gradients`), then
clipped and applied by every rank identically, so every update equals one process's update with
the global batch (bilm-tf averages its towers' gradients the same way; each tower's loss is a mean
over its B x T positions, so the average of the towers' means is the mean over the global batch).
The negatives of the sampled softmax are one set per step shared by all ranks; rank 0 logs,
evaluates and writes the checkpoint, which holds every rank's data position, LSTM state and RNGs.

This module owns the process group (join, leave), the one all-reduce, the wrapper that turns a
lost peer into one line, the stream that emulates k ranks in one process (tests), the SIGTERM
notice of a stopped worker, and spawning torchrun.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from datetime import timedelta
from typing import Callable, Optional

import torch

from .config import ElmoError
from .errors import quote
from .outputs import remove_in_progress


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
            union = union_of_rows(g.indices()[0], world_size)              # (u,), every rank
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


def union_of_rows(rows: torch.Tensor, world_size: int) -> torch.Tensor:
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


def collective(rank: int, fn: Callable):
    """Run one torch.distributed call; a peer that died or hung (the socket closed, the
    --dist-timeout expired) becomes one line instead of a C++ trace."""
    try:
        return fn()
    except Exception as e:   # RuntimeError / DistBackendError from gloo or NCCL
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)   # gloo's source path
        raise ElmoError(f"rank {rank} lost contact with the group ({type(e).__name__}: "
                        f"{quote(first)})") from None


class ConcatStreams:
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


def init_distributed(device: torch.device, timeout_s: float) -> tuple[int, int, torch.device]:
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
                        f"{quote(str(e).splitlines()[0] if str(e) else type(e).__name__)}"
                        ) from None
    return rank, world, device


def leave_group(rank: int, exit_code: int) -> None:
    """A torchrun worker that finished (or stopped on Ctrl-C with all the others) leaves: a
    barrier (every rank done with its collectives), destroy_process_group, flush, os._exit.
    Interpreter finalisation after destroy_process_group can abort in C++ ("terminate called
    without an active exception"), which torchrun reports as a failed job; os._exit skips it."""
    import torch.distributed as dist
    collective(rank, dist.barrier)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def spawn_torchrun(nproc: int, command: str, argv: list[str]) -> int:
    """`elmo <command> --nproc N ...` = `torchrun --standalone --nproc_per_node N -m torch_elmo
    <command> <argv>` (one node; torchrun picks a free port, restarts nothing, and stops all
    workers when one fails). `argv`: the command's arguments without --nproc."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), "-m", "torch_elmo", command, *argv]
    print(f"running: torchrun --standalone --nproc_per_node {nproc} -m torch_elmo {command} "
          + " ".join(argv), flush=True)
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


def on_sigterm_say_why(rank: int, command: str = "train") -> None:
    """torchrun stops the other workers with SIGTERM when one fails; this rank may get it before
    its next collective notices the dead peer: say why in one line, then exit 143."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum, frame):
        print(f"elmo {command}: error: rank {rank} lost contact with the group (stopped by "
              f"torchrun with SIGTERM: another rank failed or the job was cancelled)",
              file=sys.stderr, flush=True)
        remove_in_progress()        # os._exit runs no `finally`: no temp file left behind
        os._exit(128 + signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_sigterm)
