"""Training: the optimizer of each recipe, clipping, the plan, and the loop (bilm-tf's train_elmo.py
and restart.py by default; `recipe: fast` is ours, config.RECIPES).

One step (per batch of B rows x T = unroll_steps positions, both directions; lm.py has the loss):

    loss = LanguageModel.training_loss(batch, carried state)     # 0.5 * (fwd mean + bwd mean)
    backward(loss * T);  [all-reduce over ranks];  clip global norm;  Adagrad(lr, acc 1.0)
                                                             (fast: AdamW, warm-up + cosine lr)

The carried LSTM state is detached after every batch (truncated BPTT). Updates = epochs x
floor(n_train_tokens / (B x T x world_size)); --max-tokens / --max-time stop earlier. `train()`
sets a run up (`start_run`: a new run, `--resume` or `--init-from`), then reads as one loop; the
checkpoint (checkpoint.py), the metrics (metrics.py) and the ranks (distributed.py) live beside it.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ck
from .config import RECIPES, ElmoError, Options
from .data import LMBatchStream
from .distributed import ConcatStreams, all_reduce_gradients, collective
from .evaluate import perplexity
from .lm import LanguageModel, LogUniformSampler
from .metrics import METRICS, PLOT, append_jsonl, fmt_time, plot_perplexity, read_metrics
from .outputs import atomic_text
from .precision import Precision, choose
from .progress import progress_bar
from .textio import BadLines
from .vocab import Vocabulary, count_words


def make_optimizer(params, learning_rate: float) -> torch.optim.Optimizer:
    """TF Adagrad: acc starts at 1.0, acc += g^2, theta -= lr * g / sqrt(acc), no epsilon.
    Takes the sparse softmax gradient as it is (torch's Adagrad updates only its rows)."""
    # torch's sparse Adagrad builds its own COO tensors; invariant checks are off by default and
    # saying so explicitly silences the per-process warning about it
    torch.sparse.check_sparse_tensor_invariants.disable()
    return torch.optim.Adagrad(params, lr=learning_rate, initial_accumulator_value=1.0, eps=0.0)


def recipe_optimizer(params, options: Options) -> torch.optim.Optimizer:
    """The optimizer of options.recipe: bilm-tf's Adagrad, or the fast recipe's AdamW."""
    r = RECIPES[options.recipe]
    if r["optimizer"] == "adagrad":
        return make_optimizer(params, options.learning_rate)
    return torch.optim.AdamW(params, lr=options.learning_rate, betas=r["betas"], eps=r["eps"],
                             weight_decay=r["weight_decay"])


def learning_rate_at(options: Options, step: int, progress: float) -> float:
    """The learning rate of update `step` (0-based) at `progress` (0..1, the fraction of the run's
    horizon done): constant for bilm-tf; linear warm-up then cosine decay for the fast recipe."""
    r = RECIPES[options.recipe]
    lr = options.learning_rate
    if r["schedule"] == "constant":
        return lr
    if step < r["warmup_steps"]:
        return lr * (step + 1) / r["warmup_steps"]
    final = r["final_lr_fraction"]
    return lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


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


def updates_per_epoch(n_train_tokens: int, batch_size: int, unroll_steps: int,
                      world_size: int = 1) -> int:
    return n_train_tokens // (batch_size * unroll_steps * world_size)


# a vocabulary covering less of the training tokens than this draws a warning
COVERAGE_WARNING = 0.95


def count_training_tokens(files: list[str], vocab: Vocabulary) -> tuple[int, float]:
    """One pass over the training data: the number of tokens (n_train_tokens) and the fraction
    the vocabulary covers, and checks of the vocabulary against it: refused when it covers none
    of the tokens (every target would be <UNK>), a warning when it covers less than 95% or is not
    sorted by descending frequency."""
    bad = BadLines()
    counts = count_words(files, bad)                  # the one corpus count (vocab.py)
    if bad.count > bad.named:
        warnings.warn(f"{bad.count} non-UTF-8 line(s) skipped in total")
    total = sum(counts.values())
    covered = sum(c for t, c in counts.items() if t in vocab)
    if total and covered == 0:
        raise ElmoError(f"{vocab.source}: covers none of the {total:,} training tokens (every "
                        f"target would be <UNK>): build it from this corpus with `elmo vocab`")
    if total and covered < COVERAGE_WARNING * total:
        warnings.warn(f"{vocab.source} covers {100 * covered / total:.1f}% of the training "
                      f"tokens; the rest train <UNK> (build the vocabulary from this corpus with "
                      f"`elmo vocab` unless that is meant)")
    vocab.check_frequency_sorted(counts)
    return total, (covered / total if total else 0.0)


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


# ================================================================================ the run
@dataclass
class Run:
    """Everything a training run carries from step to step, and its plan."""
    options: Options
    vocab: Vocabulary
    lm: Optional[LanguageModel]          # None only while start_run builds the run
    optimizer: Optional[torch.optim.Optimizer]
    sampler: Optional[LogUniformSampler]
    stream: object                       # LMBatchStream, or ConcatStreams when emulating ranks
    state: tuple                         # carried LSTM (c, h): (n_dirs, n_layers, B, .)
    device: torch.device
    save_dir: str
    train_files: list[str]
    seed: int
    rank: int = 0
    world_size: int = 1
    vocab_path: Optional[str] = None
    # the plan
    n_train_tokens: int = 0
    per_epoch: int = 0
    epochs: float = 1.0
    total_steps: int = sys.maxsize       # sys.maxsize: only max_tokens / max_time stop the run
    data_seed: int = 0
    step_offset: int = 0
    # the counters
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0                 # seconds of the whole run (resumed parts included)
    step_time: float = 0.0               # seconds in updates only
    window: dict = field(default_factory=lambda: {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0})
    metrics: list = field(default_factory=list)
    resumed: bool = False
    coverage: Optional[float] = None     # of the training tokens by the vocabulary (if counted)
    lock: object = None                  # the save_dir lock (rank 0), held until the run ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.lm.parameters() if p.requires_grad]


def make_stream(options: Options, vocab: Vocabulary, files: list[str], seed: int, rank: int,
                world_size: int, emulate: int = 1):
    """This rank's endless shuffled stream; `emulate=k` (tests): the k rank streams of a
    k-process run read as one batch of B rows in one process."""
    kw = dict(max_chars=options.char_cnn.max_characters_per_token, seed=seed, shuffle=True,
              loop=True, bidirectional=options.bidirectional)
    B, T = options.batch_size, options.unroll_steps
    if emulate > 1:
        return ConcatStreams([LMBatchStream(files, vocab, B // emulate, T, rank=r,
                                            world_size=emulate, **kw) for r in range(emulate)])
    return LMBatchStream(files, vocab, B, T, rank=rank, world_size=world_size, **kw)


def plan_run(run: Run, n_train_tokens: Optional[int], ckpt: Optional[dict], reshard: bool,
             max_tokens: Optional[int], max_time: Optional[float]) -> Optional[bool]:
    """Fill run.n_train_tokens / per_epoch / total_steps / step_offset; returns whether the
    tokens were counted from the data (then the stream's bad-line reports are muted)."""
    o = run.options
    B, T = o.batch_size, o.unroll_steps
    counted = n_train_tokens is None
    if counted:  # reports bad lines once, up front
        n_train_tokens, run.coverage = count_training_tokens(run.train_files, run.vocab)
    if n_train_tokens <= 0:
        files = run.train_files
        raise ElmoError(f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}: "
                        f"no tokens (only blank or undecodable lines)")
    run.options = o = o.replace(n_train_tokens=int(n_train_tokens))
    run.n_train_tokens = int(n_train_tokens)
    run.per_epoch = updates_per_epoch(n_train_tokens, B, T, run.world_size)
    total_steps = int(math.floor(run.epochs * run.per_epoch))
    if reshard:
        # the steps done so far were of another global batch: count the tokens done in steps of
        # this world's global batch, and plan the remaining updates from there
        done = int(ckpt["tokens"]) // (B * T * run.world_size)
        run.step_offset = int(ckpt["step"]) - done
    if total_steps <= 0 and max_tokens is None and max_time is None:
        raise ElmoError(f"{n_train_tokens} training tokens make no full batch of {B} x {T} "
                        f"tokens per epoch: lower --batch-size / --unroll-steps or add data")
    run.total_steps = (sys.maxsize if total_steps <= 0
                       else max(0, total_steps + run.step_offset))   # 0: the planned updates are done
    return counted


def coverage_line(run: Run, counted: bool) -> str:
    """The training header's line on the vocabulary: how much of the training tokens it covers
    (the rest are <UNK> targets)."""
    name = run.vocab_path or run.vocab.source
    if run.coverage is None:
        return (f"vocabulary {name}: {len(run.vocab):,} tokens; its coverage of the training "
                f"tokens was not counted (" + ("the checkpoint does not record it" if run.resumed
                                               else "--n-train-tokens given") + ")")
    return (f"vocabulary {name}: {len(run.vocab):,} tokens, covering {100 * run.coverage:.1f}% "
            f"of the training tokens" + ("" if counted else " (counted when the run started)"))


def init_from(run: Run, path: str, log) -> None:
    """--init-from: the biLM (and the softmax when the vocabulary is the same) of another run or
    of an exported model."""
    src_options, bilm_state, softmax, src_vocab = ck.resolve_init_from(path)
    if not ck.same_architecture(src_options, run.options):
        raise ElmoError(ck.architecture_mismatch(path, src_options, run.options))
    same_vocab = softmax is not None and src_vocab is not None and \
        src_vocab["sha1"] == ck.vocab_fingerprint(run.vocab)
    ck.load_model_state(run.lm, bilm_state, softmax if same_vocab else None)
    log(f"init from {path}: " + ("biLM and softmax (same vocabulary)" if same_vocab
                                  else f"biLM weights, new softmax for {len(run.vocab)} words"))


def restore(run: Run, ckpt: dict, reshard: bool, log) -> None:
    """--resume: model, softmax, optimizer, sampler, counters; this rank's data position, carried
    LSTM state and RNGs (unless the world size changed: then the data is dealt out anew)."""
    ck.load_model_state(run.lm, ckpt["model"], ckpt["softmax"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.sampler is not None:
        run.sampler.load_state_dict(ckpt["sampler"])
    mine = ckpt["ranks"][run.rank] if ckpt.get("ranks") and not reshard else ckpt
    if not reshard:
        run.state = (mine["lstm_state"]["c"].to(run.device), mine["lstm_state"]["h"].to(run.device))
        run.stream.load_state_dict(mine["data"])
        ck.set_rng_state(mine["rng"])
    else:   # zero LSTM states for the new rows, per-rank dropout streams from the seed
        torch.manual_seed(run.data_seed * 1000 + 7919 * run.rank)
    run.step, run.tokens, run.elapsed = int(ckpt["step"]), int(ckpt["tokens"]), float(ckpt["elapsed"])
    run.step_time = float(ckpt["step_time"])
    run.window.update(loss=float(ckpt["window"]["loss"]), n=int(ckpt["window"]["n"]))
    run.resumed = True
    if reshard:
        log(f"resume: world size {ckpt['run']['world_size']} -> {run.world_size}: data re-sharded "
            f"(new streams, fresh order), LSTM states reset; model, optimizer, sampler and "
            f"counters kept")


def start_run(options: Options, vocab: Vocabulary, train_files: list[str], save_dir: str,
              **kw) -> tuple[Run, bool]:
    """A new, resumed or initialised run, planned and on its device, holding the save_dir lock
    (rank 0); (run, counted). The lock is let go if setting up fails."""
    lock = ck.lock_run_dir(save_dir) if kw["rank"] == 0 else None   # before anything is read
    try:
        return build_run(options, vocab, train_files, save_dir, lock=lock, **kw)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def build_run(options: Options, vocab: Vocabulary, train_files: list[str], save_dir: str, *,
              epochs: Optional[float], n_train_tokens: Optional[int], max_tokens, max_time,
              seed: int, resume: bool, init_from_path: Optional[str], device: torch.device,
              rank: int, world_size: int, vocab_path: Optional[str], emulate: int,
              log, lock=None) -> tuple[Run, bool]:
    if emulate > 1 and (world_size > 1 or options.batch_size % emulate):
        raise ElmoError("_emulate_world_size needs one process and a batch divisible by it")
    V = len(vocab)
    options = options.replace(n_tokens_vocab=V, n_gpus=world_size)
    train_files = [os.path.abspath(f) for f in train_files]
    if epochs is None:
        epochs = float(options.n_epochs)
    if float(epochs).is_integer():
        options = options.replace(n_epochs=int(epochs))
    ckpt, reshard, data_seed = None, False, seed    # data_seed: the seed of the data order
    if resume:
        path = os.path.join(save_dir, ck.CHECKPOINT)
        ckpt = ck.load_checkpoint(path)
        ck.check_resume_compatible(ckpt, options, vocab, seed, train_files, world_size, path)
        if n_train_tokens is None:
            n_train_tokens = int(ckpt["run"]["n_train_tokens"])
        data_seed = int(ckpt["run"].get("data_seed", seed))
        reshard = int(ckpt["run"]["world_size"]) != world_size
        if reshard:
            # The saved per-rank positions describe another split of the files, which no rank of
            # this world can continue; new streams with a fresh order (seed from the step, so
            # the run does not replay the order it started with) re-deal every shard/line.
            data_seed = seed + 1_000_003 * int(ckpt["step"])
    if n_train_tokens is None:
        n_train_tokens = options.n_train_tokens
    # the stream first: it refuses empty files / bad settings with its own one-line messages
    stream = make_stream(options, vocab, train_files, data_seed, rank, world_size, emulate)
    run = Run(options=options, vocab=vocab, lm=None, optimizer=None, sampler=None, stream=stream,
              state=None, device=device, save_dir=save_dir, train_files=train_files, seed=seed,
              rank=rank, world_size=world_size, vocab_path=vocab_path, epochs=float(epochs),
              data_seed=data_seed, lock=lock,
              step_offset=int(ckpt["run"].get("step_offset", 0)) if ckpt is not None else 0)
    counted = plan_run(run, n_train_tokens, ckpt, reshard, max_tokens, max_time)
    if run.coverage is None and ckpt is not None:
        run.coverage = ckpt["run"].get("vocab_coverage")
    options = run.options
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    # the sparse softmax gradient is for Adagrad (AdamW keeps dense moments of every row)
    sparse = RECIPES[options.recipe]["optimizer"] == "adagrad"
    run.lm = lm = LanguageModel(options, V, sparse_softmax=sparse)
    if init_from_path is not None and ckpt is None:
        init_from(run, init_from_path, log)
    lm.to(device)
    run.optimizer = recipe_optimizer(run.params, options)
    n_samples = options.n_negative_samples_batch
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
            run.sampler = LogUniformSampler(V, seed=seed * 1000 + 17)
    if world_size > 1 and rank > 0:
        # dropout masks must differ between ranks (they are different rows); rank 0 keeps the
        # one-process stream. Model init above drew from the same seed on every rank.
        torch.manual_seed(seed * 1000 + 7919 * rank)
    run.state = lm.zero_state(options.batch_size)
    if ckpt is not None:
        restore(run, ckpt, reshard, log)
    if world_size > 1:   # the same start on every rank, whatever each one loaded
        import torch.distributed as dist
        with torch.no_grad():
            for p in lm.parameters():
                collective(rank, lambda: dist.broadcast(p.data, 0))
    if run.is_main:
        write_run_files(run, ckpt is not None)
    return run, counted


def write_run_files(run: Run, resumed: bool) -> None:
    """save_dir/options.json, and metrics.jsonl cut back to the checkpoint's step."""
    os.makedirs(run.save_dir, exist_ok=True)
    metrics_path = os.path.join(run.save_dir, METRICS)
    run.metrics = read_metrics(metrics_path, max_step=run.step) if resumed else []
    with atomic_text(metrics_path) as f:        # drop lines newer than the checkpoint
        f.writelines(json.dumps(m) + "\n" for m in run.metrics)
    with atomic_text(os.path.join(run.save_dir, ck.OPTIONS)) as f:
        json.dump(ck.training_options_dict(run.options), f, indent=2)
        f.write("\n")


def save_checkpoint(run: Run) -> None:
    """Every rank's data position, LSTM state and RNGs, gathered to rank 0, which writes the
    checkpoint (a collective: every rank calls this at the same step)."""
    mine = {"data": run.stream.state_dict(),
            "lstm_state": {"c": run.state[0].detach().cpu(), "h": run.state[1].detach().cpu()},
            "rng": ck.rng_state(run.device)}
    ranks = [mine]
    if run.world_size > 1:
        import torch.distributed as dist
        ranks = [None] * run.world_size if run.is_main else None
        collective(run.rank, lambda: dist.gather_object(mine, ranks, dst=0))
    if not run.is_main:
        return
    ck.atomic_torch_save({
        "format": ck.CHECKPOINT_FORMAT,
        "model": run.lm.bilm.state_dict(),
        "softmax": {"W": run.lm.softmax_W.detach(), "b": run.lm.softmax_b.detach()},
        "optimizer": run.optimizer.state_dict(),
        "lstm_state": ranks[0]["lstm_state"],     # rank 0's (all of them for one process)
        "rng": ranks[0]["rng"],
        "sampler": run.sampler.state_dict() if run.sampler is not None else None,
        "data": ranks[0]["data"],
        "ranks": ranks if run.world_size > 1 else None,
        "step": run.step, "tokens": run.tokens, "elapsed": run.elapsed,
        "step_time": run.step_time,
        "window": {"loss": run.window["loss"], "n": run.window["n"]},  # the next log line's average
        "options": json.dumps(ck.training_options_dict(run.options)),
        "vocab": {"path": os.path.abspath(run.vocab_path or run.vocab.source),
                  "size": len(run.vocab), "sha1": ck.vocab_fingerprint(run.vocab)},
        "run": {"seed": run.seed, "train_files": run.train_files, "world_size": run.world_size,
                "data_seed": run.data_seed, "step_offset": run.step_offset,
                "n_train_tokens": run.n_train_tokens, "epochs": run.epochs,
                "vocab_coverage": run.coverage,
                "total_steps": run.total_steps if run.total_steps != sys.maxsize else None},
    }, os.path.join(run.save_dir, ck.CHECKPOINT))


def heldout_stream(run: Run, files: list[str], batch_size: int) -> LMBatchStream:
    o = run.options
    return LMBatchStream(files, run.vocab, batch_size, 1, max_chars=o.char_cnn.max_characters_per_token,
                         seed=0, shuffle=False, loop=False, bidirectional=o.bidirectional)


def stop_reason(run: Run, max_tokens, max_time, check_time: bool = True) -> Optional[str]:
    """Steps and tokens are the same on every rank; the clock is not, so with several ranks the
    time (and Ctrl-C) decision travels in the gradient all-reduce instead."""
    if run.step >= run.total_steps:
        return f"{run.step} updates done"
    if max_tokens is not None and run.tokens >= max_tokens:
        return f"--max-tokens {max_tokens} reached"
    if check_time and max_time is not None and run.elapsed >= max_time:
        return f"--max-time {max_time:g}s reached"
    return None


def horizon_done(run: Run, max_tokens, max_time) -> float:
    """The fraction of the run's horizon done: its planned updates, or --max-tokens / --max-time,
    whichever ends first (the fast recipe's schedule follows it)."""
    parts = [run.step / run.total_steps] if run.total_steps not in (0, sys.maxsize) else []
    if max_tokens is not None:
        parts.append(run.tokens / max_tokens)
    if max_time is not None:
        parts.append(run.elapsed / max_time)
    return max(parts) if parts else 0.0


def log_record(run: Run) -> tuple[dict, str]:
    """The metrics record and log line of the window since the last one (then reset)."""
    w = run.window
    mean_loss = w["loss"] / max(w["n"], 1)
    record = {"step": run.step, "tokens": run.tokens, "train_loss": round(mean_loss, 6),
              "train_ppl": round(math.exp(min(mean_loss, 50.0)), 4),
              "tokens_per_s": round(w["tokens"] / max(w["time"], 1e-9), 1),
              "elapsed": round(run.elapsed, 2)}
    msg = (f"step {run.step:,}" + ("" if run.total_steps == sys.maxsize else f"/{run.total_steps:,}")
           + f" | tokens {run.tokens:,} | loss {mean_loss:.4f} (sampled-softmax ppl "
           f"{record['train_ppl']:.1f}) | {record['tokens_per_s']:,.0f} tok/s | "
           f"elapsed {fmt_time(run.elapsed)}")
    run.window.update(loss=0.0, n=0, tokens=0, time=0.0)
    return record, msg


class SigintFlag:
    """Ctrl-C during training: finish the step, checkpoint, stop (a second Ctrl-C aborts in one
    process; under torchrun the launcher's forwarded SIGINT arrives too, so the flag stays)."""

    def __init__(self, active: bool, distributed: bool):
        self.set, self.previous = False, None
        if active and threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if not distributed:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                self.set = True
            self.previous = signal.signal(signal.SIGINT, on_sigint)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ================================================================================ the loop
def train(options: Options, vocab: Vocabulary, train_files: list[str], save_dir: str, *,
          heldout_files: Optional[list[str]] = None, epochs: Optional[float] = None,
          n_train_tokens: Optional[int] = None, max_tokens: Optional[int] = None,
          max_time: Optional[float] = None, seed: int = 0, resume: bool = False,
          init_from: Optional[str] = None, log_every: int = 100, eval_every: int = 1000,
          checkpoint_every: int = 1250, heldout_batch_size: int = 256,
          heldout_max_batches: Optional[int] = None, device: str | torch.device = "cpu",
          bf16: bool = False, progress: Optional[bool] = None, rank: int = 0, world_size: int = 1,
          vocab_path: Optional[str] = None, _emulate_world_size: int = 1) -> dict:
    """Train (or continue training) a biLM; returns the last metrics record.

    `options` carries the model and bilm-tf's hyperparameters (batch_size, unroll_steps,
    n_negative_samples_batch, learning_rate, all_clip_norm_val, dropout, sample_softmax).
    Only rank 0 logs, evaluates and checkpoints. world_size > 1: torch.distributed must be
    initialised (the `elmo train` handler does it from torchrun's environment); options.batch_size
    is the per-rank batch. `_emulate_world_size=k` (tests, one process): the batch is built from
    the k rank streams of a k-process run, so one process reproduces a k-process run."""
    device = torch.device(device)
    log = print if rank == 0 else (lambda msg: None)
    run, counted = start_run(options, vocab, train_files, save_dir, epochs=epochs,
                             n_train_tokens=n_train_tokens, max_tokens=max_tokens,
                             max_time=max_time, seed=seed, resume=resume, init_from_path=init_from,
                             device=device, rank=rank, world_size=world_size,
                             vocab_path=vocab_path, emulate=int(_emulate_world_size), log=log)
    try:
        return loop(run, counted, heldout_files=heldout_files, max_tokens=max_tokens,
                    max_time=max_time, log_every=log_every, eval_every=eval_every,
                    checkpoint_every=checkpoint_every, heldout_batch_size=heldout_batch_size,
                    heldout_max_batches=heldout_max_batches,
                    precision=run_precision(run, bf16), progress=progress)
    finally:
        if run.lock is not None:
            run.lock.close()


def run_precision(run: Run, requested: bool) -> Precision:
    """fp32 or bf16 for this run (precision.choose: --bf16 obeyed, the recipe's bf16 only where
    it measured faster); under torchrun every rank takes rank 0's decision. The warning, if any,
    is printed here, once."""
    auto = RECIPES[run.options.recipe].get("bf16", False)
    prec = choose(run.device, run.options, requested, auto)
    if run.world_size > 1:
        import torch.distributed as dist
        flag = torch.tensor([float(prec.bf16)])
        collective(run.rank, lambda: dist.broadcast(flag, 0))
        if bool(flag.item()) != prec.bf16:
            prec = Precision(bool(flag.item()), "rank 0's choice")
    if prec.warning and run.is_main:
        print(f"warning: {prec.warning}", file=sys.stderr)
    return prec


def loop(run: Run, counted: bool, *, heldout_files, max_tokens, max_time, log_every: int,
         eval_every: int, checkpoint_every: int, heldout_batch_size: int, heldout_max_batches,
         precision: Precision, progress: Optional[bool]) -> dict:
    """The training loop of `train`, from the run's current step to its stop, in `precision`."""
    device, rank, world_size, save_dir, vocab = (run.device, run.rank, run.world_size,
                                                 run.save_dir, run.vocab)
    bar = None
    log = lambda msg: (bar.write if bar is not None else print)(msg)  # noqa: E731 (rank 0 only)
    lm, o, params, dist_on = run.lm, run.options, run.params, world_size > 1
    T, n_samples = o.unroll_steps, o.n_negative_samples_batch
    scheduled = RECIPES[o.recipe]["schedule"] != "constant"
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision.bf16
                else nullcontext)
    if heldout_files is not None and run.is_main:   # fail now, not after hours of training
        if heldout_stream(run, heldout_files, heldout_batch_size).next_batch() is None:
            raise ElmoError(f"--heldout: no complete batch of {heldout_batch_size} rows (fewer "
                            f"sentences than --heldout-batch-size?)")
    if run.is_main:
        planned = "until a limit" if run.total_steps == sys.maxsize else f"{run.total_steps:,} updates"
        print(f"training {sum(p.numel() for p in lm.bilm.parameters()):,} biLM parameters + "
              f"softmax {len(vocab):,} x {o.lstm.projection_dim}; {run.n_train_tokens:,} "
              f"tokens/epoch, {run.per_epoch:,} updates/epoch x {run.epochs:g} epochs = {planned}; "
              f"batch {o.batch_size} x unroll {T} x {world_size} process(es); device {device}"
              + f"; {precision.reason}"
              + (f"; resumed at step {run.step:,}" if run.resumed else ""), flush=True)
        # off a terminal, the step lines every log_every batches are the progress (no bar)
        bar = progress_bar(None if run.total_steps == sys.maxsize else run.total_steps,
                           initial=run.step, unit="batch", enabled=progress, every=None,
                           interval=None, dynamic_ncols=True, smoothing=0.05)
        log(coverage_line(run, counted))
    record: dict = {}
    sigint = SigintFlag(run.is_main or dist_on, dist_on)
    it = iter(run.stream)
    t_last = time.perf_counter()
    reason = stop_reason(run, max_tokens, max_time)
    with warnings.catch_warnings():
        if counted:   # the token count reported the bad lines once already
            warnings.filterwarnings("ignore", message=r".*not valid UTF-8")
        try:
            while reason is None:
                t0 = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    raise ElmoError("the training data stream ended (no sentences?)")
                batch = batch_to(batch, device)
                c, h = run.state
                if o.state_reset_prob > 0:   # rows that start this batch from the zero state
                    # global CPU RNG: saved in checkpoints (exact resume), per rank under torchrun
                    keep = torch.rand(c.shape[2]) >= o.state_reset_prob
                    keep = keep.to(device=c.device, dtype=c.dtype).view(1, 1, -1, 1)
                    c, h = c * keep, h * keep
                lm.train()
                with autocast():
                    loss, _, new_state = lm.training_loss(batch, (c, h), run.sampler, n_samples)
                run.state = (new_state[0].detach(), new_state[1].detach())  # truncated BPTT
                run.optimizer.zero_grad(set_to_none=True)
                (loss * T).backward()
                # the one place ranks meet: gradients, the loss and the stop flags in one message
                # [loss, rank 0's clock ran out, some rank saw Ctrl-C, rank 0's progress]
                out_of_time = (run.is_main and max_time is not None
                               and run.elapsed + time.perf_counter() - t_last >= max_time)
                done = horizon_done(run, max_tokens, max_time) if run.is_main else 0.0
                extra = torch.tensor([float(loss.detach()), float(out_of_time), float(sigint.set),
                                      done], dtype=torch.float64)
                if dist_on:
                    extra = collective(rank, lambda: all_reduce_gradients(params, world_size, extra))
                    done = float(extra[3]) * world_size   # rank 0's: the same lr on every rank
                if scheduled:
                    for group in run.optimizer.param_groups:
                        group["lr"] = learning_rate_at(o, run.step, done)
                clip_by_global_norm(params, o.all_clip_norm_val)
                run.optimizer.step()
                run.step += 1
                run.tokens += int(batch["n_tokens"]) * world_size
                loss_value = float(extra[0])   # the mean over the global batch (all ranks)
                if not math.isfinite(loss_value):
                    raise ElmoError(f"step {run.step}: the loss is {loss_value} (diverged); try a "
                                    f"lower --learning-rate or --clip-norm")
                now = time.perf_counter()
                run.elapsed += now - t_last
                t_last = now
                w = run.window
                w["loss"] += loss_value
                w["n"] += 1
                w["tokens"] += int(batch["n_tokens"]) * world_size
                w["time"] += now - t0
                run.step_time += now - t0
                if dist_on:
                    # decide on the all-reduced flags only: a Ctrl-C that lands on this rank after
                    # the all-reduce is in the next step's message; acting on it now would stop
                    # this rank one step before the others (which then wait for it forever)
                    reason = (stop_reason(run, max_tokens, max_time, check_time=False)
                              or (f"--max-time {max_time:g}s reached" if float(extra[1]) > 0 else None)
                              or ("interrupted (Ctrl-C); continue with --resume"
                                  if float(extra[2]) > 0 else None))
                else:
                    reason = stop_reason(run, max_tokens, max_time) or (
                        "interrupted (Ctrl-C); continue with --resume" if sigint.set else None)
                if not run.is_main:
                    if run.step % checkpoint_every == 0 and reason is None:
                        save_checkpoint(run)
                    continue
                bar.update(1)
                if run.step % 10 == 0 or reason is not None:
                    bar.set_postfix(loss=f"{loss_value:.3f}",
                                    tok_s=f"{w['tokens'] / max(w['time'], 1e-9):,.0f}")
                do_eval = heldout_files is not None and (run.step % eval_every == 0 or reason is not None)
                if run.step % log_every == 0 or reason is not None or do_eval:
                    record, msg = log_record(run)
                    if do_eval:
                        t_eval = time.perf_counter()
                        with warnings.catch_warnings():   # the probe above reported bad lines
                            warnings.simplefilter("ignore")
                            with autocast():
                                ppl = perplexity(lm, heldout_stream(run, heldout_files,
                                                                    heldout_batch_size),
                                                 max_batches=heldout_max_batches, device=device)
                        record.update(heldout_ppl_fwd=round(ppl["forward"], 4),
                                      heldout_ppl_bwd=round(ppl["backward"], 4),
                                      heldout_ppl_avg=round(ppl["average"], 4))
                        msg += (f" | held-out ppl (full softmax) fwd {ppl['forward']:.2f} "
                                f"bwd {ppl['backward']:.2f} avg {ppl['average']:.2f}")
                        t_last = time.perf_counter()
                        run.elapsed += t_last - t_eval
                        record["elapsed"] = round(run.elapsed, 2)
                    log(msg)
                    run.metrics.append(record)
                    append_jsonl(os.path.join(save_dir, METRICS), record)
                    if do_eval:
                        plot_perplexity(run.metrics, os.path.join(save_dir, PLOT))
                if run.step % checkpoint_every == 0 and reason is None:
                    save_checkpoint(run)
        finally:
            sigint.restore()
            if bar is not None:
                bar.close()
    save_checkpoint(run)
    if run.is_main:
        plot_perplexity(run.metrics, os.path.join(save_dir, PLOT))
        print(f"stopped: {reason}; checkpoint {os.path.join(save_dir, ck.CHECKPOINT)}", flush=True)
    if sigint.set or (reason or "").startswith("interrupted"):  # this rank's Ctrl-C or another's
        raise KeyboardInterrupt   # after the checkpoint: `elmo train` exits 130
    return record
