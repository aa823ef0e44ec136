"""Evaluation: held-out perplexity exactly as bilm-tf's run_test.py.

Full softmax over the vocabulary, no dropout, the held-out files read once in file order without
shuffling (the stream is built with unroll_steps 1 and the batch size of the command line, 256 by
default), the final partial batch dropped, the LSTM state carried from batch to batch starting
from zeros. For every batch i:

    fwd_i = mean cross-entropy of the forward direction over its B positions
    bwd_i = the same for the backward direction
    loss_i = 0.5 * (fwd_i + bwd_i)

    average perplexity  = exp(mean_i loss_i)      (bilm-tf's number)
    forward perplexity  = exp(mean_i fwd_i)
    backward perplexity = exp(mean_i bwd_i)

so average = sqrt(forward * backward). A forward-only model reports forward = average.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from .config import ElmoError


@torch.no_grad()
def perplexity(lm, stream: Iterable[dict], max_batches: Optional[int] = None,
               device: Optional[torch.device | str] = None) -> dict:
    """Full-softmax perplexity of `lm` (a train.LanguageModel) on `stream` (an LMBatchStream with
    shuffle=False, loop=False). Starts from a zero state of its own and leaves the model's
    training mode as it found it, so a training run's carried state and RNG are untouched.

    Returns dict(forward, backward, average, n_batches, n_tokens)."""
    device = torch.device(device) if device is not None else next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    sums = [0.0] * lm.n_dirs
    n_batches = n_tokens = 0
    state = None
    try:
        for batch in stream:
            if max_batches is not None and n_batches >= max_batches:
                break
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if state is None:
                state = lm.zero_state(batch["fwd_chars"].shape[0])
            ces, state = lm.eval_cross_entropy(batch, state)
            for d, ce in enumerate(ces):
                sums[d] += float(ce)
            n_batches += 1
            n_tokens += int(batch["n_tokens"])
    finally:
        lm.train(was_training)
    if n_batches == 0:
        raise ElmoError("the held-out data gave no complete batch (blank files, or fewer "
                        "sentences than the batch size: every row reads its own sentences)")
    means = [s / n_batches for s in sums]
    avg = sum(means) / len(means)
    return {"forward": math.exp(means[0]),
            "backward": math.exp(means[1]) if len(means) > 1 else math.exp(means[0]),
            "average": math.exp(avg), "n_batches": n_batches, "n_tokens": n_tokens}
