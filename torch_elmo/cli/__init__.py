"""Command line: `elmo <command>` (also `python -m torch_elmo <command>`).

One module per command group (lm: vocab / train / test / export; embed; tasks: classify / ner;
predict; quickstart; serve; info), each with its parsers, its handlers and a `COMMANDS` table; this
package joins the tables and owns the error policy: a user error (ElmoError, a missing file, bad
input) prints ONE line `elmo <command>: error: ...` and exits 2, never a trace; a warning is one
line `elmo <command>: warning: ...` (common.py). Handlers validate flags, then call the stage modules
(imported when the command runs, so `elmo --help` stays light); the `add_<command>_flags`
functions are the only place flags are defined, so `elmo <command> --help` is the reference.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .. import progress
from ..config import ElmoError
from ..errors import one_line
from . import embed, info, lm, predict, quickstart, serve, tasks
from .common import HelpFormatter

COMMANDS = {**lm.COMMANDS, **embed.COMMANDS, **tasks.COMMANDS, **predict.COMMANDS,
            **quickstart.COMMANDS, **serve.COMMANDS, **info.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elmo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (help_, _, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        help_, add_flags, run = COMMANDS[name]
        p = argparse.ArgumentParser(prog=f"elmo {name}", description=help_,
                                    formatter_class=HelpFormatter)
        add_flags(p)
        args = p.parse_args(argv[1:])
        try:
            with progress.policy(getattr(args, "progress", None)):   # --progress / --no-progress
                return run(args) or 0
        except ElmoError as e:
            print(f"elmo {name}: error: {one_line(str(e))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"elmo {name}: interrupted", file=sys.stderr)
            return 130
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
