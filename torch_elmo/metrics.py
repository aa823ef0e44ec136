"""Run metrics: `metrics.jsonl` (one JSON record a log line or evaluation), the perplexity plot,
and the time format of the log."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from .outputs import atomic_path

METRICS = "metrics.jsonl"
PLOT = "perplexity.png"


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str, max_step: Optional[int] = None) -> list[dict]:
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
