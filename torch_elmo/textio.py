"""Reading text files: corpus globs, line-by-line UTF-8 decoding, and the policy for bad bytes.

Every text file torch_elmo reads goes through here, under one of two named policies:

* corpus files (training, held-out, vocabulary counts), streamed: `iter_sentences` / `iter_text`.
  A line that is not valid UTF-8 is SKIPPED and reported to a `BadLines`, which warns naming
  `file:line` for the first few and counts the rest (a corpus is data; one bad line must not stop
  a run of hours);
* whole files whose lines are addressed by number (embedding input, task data): `read_lines`;
  the same policy streamed, for inputs of any size (`elmo predict`): `iter_lines`.
  `errors="replace"` keeps every line (line i stays line i) with undecodable bytes as U+FFFD and one
  warning; `errors="strict"` stops with `file:line: not valid UTF-8`.

Lines split on `\n` only. A UTF-8 byte-order mark at the start of a file is dropped.
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .config import ElmoError

READ_BYTES = 4 << 20       # chunk for sequential scans (token counting, line numbering)
NAMED_BAD_LINES = 5        # non-UTF-8 lines named one by one before only counting
BOM = b"\xef\xbb\xbf"         # UTF-8 byte-order mark: dropped at the start of a file


# ----------------------------------------------------------------------------------- files
def expand_glob(pattern: str) -> list[str]:
    """Sorted regular files matching `pattern` (`~` and `**` understood); a plain path matches
    itself. ElmoError naming the pattern when nothing matches, and naming the path when the
    pattern is a directory or a special file (FIFO, device) rather than text files."""
    pat = os.path.expanduser(os.fspath(pattern))
    files = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
    if not files:
        if os.path.isdir(pat):
            raise ElmoError(f"{pattern} is a directory; give a glob of its text files, e.g. "
                            f"'{os.path.join(pattern, '*.txt')}' (quoted)")
        if os.path.exists(pat):
            raise ElmoError(f"{pattern} is not a regular file (a FIFO or device?); give a text "
                            f"file or a glob of them")
        raise ElmoError(f"glob '{pattern}' matches no files")
    return files


def as_files(files: Sequence[str] | str) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        return expand_glob(files)
    out: list[str] = []
    for f in files:
        f = os.fspath(f)
        out.extend([f] if os.path.isfile(f) else expand_glob(f))
    if not out:
        raise ElmoError("no training files given")
    return out


def name_files(files: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" (and {len(files) - limit} more)" if len(files) > limit else "")


class BadLines:
    """Counts skipped non-UTF-8 lines; warns naming `file:line` for the first few, then once that
    further ones are only counted. `count` is the total."""

    def __init__(self, named: int = NAMED_BAD_LINES):
        self.count = 0
        self.named = named

    def report(self, path: str, lineno: Optional[int]) -> None:
        self.count += 1
        where = f"{path}:{lineno}" if lineno is not None else path
        if self.count <= self.named:
            warnings.warn(f"{where}: not valid UTF-8, line skipped "
                          f"(bad line #{self.count})", stacklevel=3)
        elif self.count == self.named + 1:
            warnings.warn(f"{where}: not valid UTF-8, line skipped; further bad lines are "
                          f"skipped without being named (see the total count)", stacklevel=3)


def iter_sentences(path: str, bad: Optional[BadLines] = None) -> Iterator[tuple[int, list[str]]]:
    """Stream `(line_number, tokens)` of one file (1-based line numbers, whitespace tokens).
    Blank lines are skipped; a non-UTF-8 line is skipped and reported to `bad`."""
    bad = bad if bad is not None else BadLines()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                tokens = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                bad.report(path, lineno)
                continue
            if tokens:
                yield lineno, tokens


def iter_text(path: str, bad: BadLines, chunk_bytes: int = READ_BYTES) -> Iterator[str]:
    """Decoded text of `path` in chunks of whole lines (fast path for counting). Joining the
    chunks with whitespace gives the same `.split()` tokens as `iter_sentences`."""
    lines_before = 0

    def decode(chunk: bytes) -> str:
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError:
            good = []
            for i, raw in enumerate(chunk.split(b"\n")):
                try:
                    good.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    bad.report(path, lines_before + i + 1)
            return "\n".join(good)

    with open(path, "rb") as f:
        pending: list[bytes] = []           # a line longer than one chunk, in pieces
        while True:
            data = f.read(chunk_bytes)
            if not data:
                if pending:
                    rest = b"".join(pending)
                    yield decode(rest[len(BOM):] if lines_before == 0 and rest.startswith(BOM)
                                 else rest)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending.append(data)
                continue
            chunk = b"".join([*pending, data[:cut]])
            if lines_before == 0 and chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
            pending = [data[cut:]] if cut < len(data) else []
            yield decode(chunk)
            lines_before += chunk.count(b"\n")


def iter_lines(path: str | os.PathLike, errors: str = "replace",
               warn: Optional[Callable[[str], None]] = None) -> Iterator[tuple[str, int]]:
    """read_lines streamed: (line, bytes read so far) for every line of `path`, split on `\n`
    only (no line end; a trailing `\r` stays), a leading BOM dropped. `errors="replace"`: bad
    bytes become U+FFFD and ONE message naming the first bad `file:line` goes to `warn` (the
    count is unknown while streaming); `"strict"`: ElmoError `path:line: not valid UTF-8`."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ElmoError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ElmoError(f"{path}: is a directory, expected a text file") from None
    warned = False
    done = 0
    with f:
        for i, raw in enumerate(f, 1):
            done += len(raw)
            if i == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if errors == "strict":
                    raise ElmoError(f"{path}:{i}: not valid UTF-8") from None
                line = raw.decode("utf-8", errors="replace")
                if not warned:
                    warned = True
                    msg = (f"{path}:{i}: not valid UTF-8; undecodable bytes replaced by U+FFFD "
                           f"(later such lines are not named)")
                    (warn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
            yield line, done


# --------------------------------------------------------------------------------- whole files
def read_lines(path: str | os.PathLike, errors: str = "strict",
               warn: Optional[Callable[[str], None]] = None, what: str = "file",
               not_found: Optional[str] = None) -> list[str]:
    """All lines of a text file, split on `\n` only (no line ends; a trailing `\r` stays, it is
    whitespace to every tokenizer here), a leading BOM dropped. `errors="strict"`: ElmoError
    `path:line: not valid UTF-8`; `errors="replace"`: undecodable bytes become U+FFFD, and ONE
    message naming the first bad `file:line` and the count goes to `warn` (default
    `warnings.warn`), so line numbers stay aligned with the file. A missing file is ElmoError
    `path: {what} not found`, or `path: {not_found}` when given."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ElmoError(f"{path}: {not_found or what + ' not found'}") from None
    except IsADirectoryError:
        raise ElmoError(f"{path}: is a directory, expected a text file") from None
    if data.startswith(BOM):
        data = data[len(BOM):]
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines, bad = [], []
    for i, b in enumerate(raw):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            if errors == "strict":
                raise ElmoError(f"{path}:{i + 1}: not valid UTF-8") from None
            lines.append(b.decode("utf-8", errors="replace"))
            bad.append(i + 1)
    if bad:
        msg = (f"{path}:{bad[0]}: not valid UTF-8; undecodable bytes replaced by U+FFFD "
               f"({len(bad)} line{'s' if len(bad) > 1 else ''} affected)")
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
    return lines
