"""`elmo quickstart`: train a small ELMo on a bundled corpus and show what it does."""
from __future__ import annotations

import argparse

from .common import add_progress_flags, at_least


def add_quickstart_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", default="runs/quickstart",
                   help="where the corpus files, the run and the exported model go")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--seed", type=int, default=0)
    add_progress_flags(p)


def cmd_quickstart(args) -> int:
    from .. import quickstart
    at_least("--minutes", args.minutes, 0.1)
    return quickstart.run_quickstart(args.work_dir, args.minutes, args.seed,
                                     progress=getattr(args, "progress", None))


COMMANDS = {
    "quickstart": ("train a small ELMo on a bundled corpus and show what it does",
                   add_quickstart_flags, cmd_quickstart),
}
