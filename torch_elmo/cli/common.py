"""What every command handler shares: the one-line warning format, the progress flags, bilm-tf's
flag spellings (aliases hidden from --help), flag range checks, and the argv of a parsed command
(to re-run it under torchrun)."""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from ..config import ElmoError


def one_line_warnings(command: str):
    """Show warnings as `elmo <command>: warning: ...` single lines on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"elmo {command}: warning: {message}", file=sys.stderr, flush=True)
    return show


@contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = one_line_warnings(command)
        yield


# bilm-tf's spellings of our flags (its bin/train_elmo.py, restart.py, run_test.py,
# dump_weights.py): accepted, so its walkthrough runs with `elmo` in front, and left out of --help
# (README, "bilm-tf's flags"); each add_<command>_flags marks its own with `bilm_tf`
BILM_TF_SPELLINGS: set[str] = set()


def bilm_tf(flag: str) -> str:
    """`flag` as bilm-tf spelled it: an alias that --help does not show."""
    BILM_TF_SPELLINGS.add(flag)
    return flag


class HelpFormatter(argparse.HelpFormatter):
    """--help shows our spelling of each flag, not bilm-tf's aliases."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if s not in BILM_TF_SPELLINGS]
        if action.option_strings and shown != action.option_strings:
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def add_progress_flags(p: argparse.ArgumentParser) -> None:
    """--progress / --no-progress (default: a bar on a terminal, periodic lines otherwise;
    torch_elmo/progress.py owns the policy, cli/__init__.py applies the flags to the command)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="a progress bar even when stderr is not a terminal (default: a bar on a "
                        "terminal, a plain progress line now and then in a log file or pipe)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   default=None, help="no progress bar and no progress lines")


def at_least(flag: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise ElmoError(f"{flag} must be >= {minimum}, got {value}")


def argv_from_args(args, add_flags: Callable, drop: tuple = ("nproc",)) -> list[str]:
    """The command-line arguments that give `args` under the parser `add_flags` builds (flags at
    their default left out): `--nproc N` re-runs the command under torchrun with them."""
    p = argparse.ArgumentParser(add_help=False)
    add_flags(p)
    out = []
    for a in p._actions:
        if not a.option_strings or a.dest in drop:
            continue
        v = getattr(args, a.dest, a.default)
        if v == a.default:
            continue
        if isinstance(a, argparse._StoreConstAction):   # store_true, --progress / --no-progress
            if v == a.const:
                out.append(a.option_strings[0])
        else:
            out += [a.option_strings[0], str(v)]
    return out
