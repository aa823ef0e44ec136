"""The user-facing error type: every ElmoError message is one line naming the file, flag or line
at fault and what to do; the command line prints it as `elmo <command>: error: ...`, exit 2.

What a message quotes of a library's exception goes through `quote`: one line, the cause first,
at most QUOTE_LIMIT characters (HDF5 alone writes 300 characters of buffer addresses and offsets
around the "No space left on device" that matters)."""
from __future__ import annotations

import os
import re

QUOTE_LIMIT = 100

# HDF5 (through h5py) reports a failed system call inside its own text
_LIBRARY_ERRNO = re.compile(r"errno = (\d+)")


class ElmoError(ValueError):
    """A user-facing error: its message is one line that names the file/key/line at fault."""


def quote(e: BaseException | str, limit: int = QUOTE_LIMIT) -> str:
    """The part of a library's exception (or message) an ElmoError quotes: an OS error's
    strerror where there is one (also one buried in HDF5's text), else the text on one line;
    cut to `limit` characters with '...'."""
    text = e if isinstance(e, str) else str(e)
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    elif m := _LIBRARY_ERRNO.search(text):
        text = os.strerror(int(m.group(1)))
    text = " ".join(text.split()) or (type(e).__name__ if isinstance(e, BaseException) else "")
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def one_line(message: str) -> str:
    """A message on one line (a path or a quoted text with a newline would break it)."""
    return " ".join(message.splitlines())


def short_path(path: str, limit: int = 60) -> str:
    """A path as a message shows it: relative to the working directory when inside it, and a
    long one cut to '.../' + its last parts."""
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    if not rel.startswith(".."):
        path = rel
    if len(path) <= limit:
        return path
    parts = path.split(os.sep)
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(tail) + 5 > limit:
            break
        tail = part + os.sep + tail
    return "..." + os.sep + tail
