"""Training data: corpus files -> packed language-model batches, streamed.

This module owns `LMBatchStream`, the exact bilm-tf `_get_batch` packing of a corpus (one
whitespace-tokenized sentence per line; reading and the bad-byte policy are textio's):

* every batch row is an endless stream of sentences `[<S>, w1..wn, </S>]` (backward direction:
  `[</S>, wn..w1, <S>]`); a row takes a token as input and the following one as its target, and
  when only the final boundary token is left it starts a new sentence, so the final boundary is
  only ever a target; a sentence not finished at the end of a batch continues in the next one;
* rows are filled one after another (row 0 completely, then row 1, ...), each pulling the next
  sentence from the direction's shared sentence source when it needs one;
* the forward and backward directions read two independently shuffled sources.

Memory is bounded whatever a file's size (bilm-tf loaded a whole shard as char ids). A file is cut
into blocks of `block_bytes` bytes; a block owns the lines that START inside it. One pass visits
this rank's files in a random order, each file's blocks in a random order, each block's lines in
a random order; every pass draws new orders. All orders are derived from
(seed, rank, direction, pass, file, block) on demand, so the position in the data is a handful of
integers and a stream restored from `state_dict()` yields exactly the batches the original would
have (a row's unfinished sentence is re-read from its block on restore, never stored).

  position = (pass, shard, block, line)          # all indices into derived orders
  shard order  = perm(n_files;  seed, rank, dir, pass)
  block order  = perm(n_blocks; seed, rank, dir, pass, file)
  line order   = perm(n_lines;  seed, rank, dir, pass, file, block)

With shuffle=False every order is the identity, so the stream is the files read in order
(test mode).
"""
from __future__ import annotations

import os
import warnings
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .chars import BOS_TOKEN, EOS_TOKEN, char_ids
from .config import ElmoError
from .textio import BOM, BadLines, as_files, name_files
from .vocab import Vocabulary

BLOCK_BYTES = 8 << 20       # shuffle unit: ~2x this in memory per direction while it is read
_CACHE_TOKENS = 100_000     # char-id cache entries before it is cleared


# ------------------------------------------------------------------------- the batch stream
def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % (1 << 64) for k in keys]))


_TAG_SHARDS, _TAG_BLOCKS, _TAG_LINES = 1, 2, 3


class _Row:
    """A row's current sentence: its position in the source, its tokens as rows of the token
    table (`[<S>, w1..wn, </S>]`, or reversed), and how many of them were consumed as inputs."""
    __slots__ = ("ptr", "ids", "pos")

    def __init__(self, ptr, ids: list[int], pos: int = 0):
        self.ptr, self.ids, self.pos = ptr, ids, pos


class _Direction:
    """One direction's sentence source (position = pass, shard, block, line) and its B rows."""

    def __init__(self, stream: "LMBatchStream", direction: int):
        self.st = stream
        self.d = direction
        self.pass_ = self.shard = self.block = self.line = 0
        self.pass_sentences = 0
        self.exhausted = False
        self.rows: list[Optional[_Row]] = [None] * stream.batch_size
        self._key = None
        self._block = ([], np.zeros(0, dtype=np.int64), 0, 0)   # raw lines, order, file, block

    # -- sentence source -------------------------------------------------------------------
    def next_sentence(self) -> Optional[tuple[tuple[int, int, int, int], list[str]]]:
        st = self.st
        while not self.exhausted:
            key = (self.pass_, self.shard, self.block)
            if key != self._key:
                self._block = st._load_block(self.d, *key)
                self._key = key
            raw, order, fi, bi = self._block
            if self.line < len(order):
                j = self.line
                self.line += 1
                tokens = st._tokens(raw, int(order[j]), fi, bi,
                                    count_bad=self.d == 0 and self.pass_ == 0)
                if tokens is None:
                    continue
                self.pass_sentences += 1
                return (self.pass_, self.shard, self.block, j), tokens
            self.line = 0
            self.block += 1
            if self.block < st._n_blocks[fi]:
                continue
            self.block = 0
            self.shard += 1
            if self.shard < len(st.shards):
                continue
            if self.pass_sentences == 0:
                where = name_files(st.shards)
                if st.world_size > 1:
                    where += f" for rank {st.rank} of {st.world_size}"
                raise ElmoError(f"{where}: no sentences (only blank or undecodable lines); "
                                f"no batch could ever be made")
            self.shard = 0
            self.pass_ += 1
            self.pass_sentences = 0
            if not st.loop:
                self.exhausted = True
        return None

    # -- packing -----------------------------------------------------------------------------
    # One batch, B rows x T steps (here B=2, T=3, ids of the vocab
    # [<S>, </S>, <UNK>, the, ., chr(256)+t]; sentences s1 = "the unknown .", s2 = "th .",
    # s3 = "the"; each sentence is [<S> w1 .. wn </S>], a row consumes len-1 inputs of it):
    #
    #            batch 1                      batch 2
    #          t=0   t=1   t=2             t=0   t=1   t=2
    #  row 0 | <S>   the   unk |  -->   |  .  | <S>   the |       inputs  (chars + word ids)
    #        | the   unk    .  |        | </S>| the  </S> |       targets (input shifted by one)
    #          \---- s1 ----------------/     \--- s3 ---/
    #  row 1 | <S>   unk    .  |        | <S>   the   unk |  ...  (s1 again: pass 2)
    #        | unk    .   </S> |        | the   unk    .  |
    #          \---- s2 -----/            \---- s1 ------------> continues in batch 3
    #
    # Row 0 is filled completely before row 1; a row whose sentence has only its final token
    # left (</S>, or <S> backwards) pulls the next sentence from the shared source, so that
    # token is only ever a target. Unfinished sentences stay in `rows` for the next batch.
    # Positions are first collected as rows of the stream's token table (flat lists, row-major
    # B x T), then turned into arrays with one gather each: inputs/targets (B, T) int64 word
    # ids = wids[rows], chars (B, T, C) int64 char ids (+1) = table[input rows].
    def batch(self) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        st = self.st
        B, T = st.batch_size, st.unroll_steps
        ins: list[int] = []
        outs: list[int] = []
        rows = self.rows
        reverse = self.d == 1
        for i in range(B):
            t = 0
            while t < T:
                row = rows[i]
                if row is None or len(row.ids) - row.pos <= 1:
                    got = self.next_sentence()
                    if got is None:           # data ran out: this batch is discarded
                        return None
                    row = rows[i] = _Row(got[0], st._encode(got[1], reverse))
                a = row.pos
                k = min(len(row.ids) - a - 1, T - t)
                ids = row.ids
                ins += ids[a:a + k]
                outs += ids[a + 1:a + k + 1]
                row.pos = a + k
                t += k
        inp = np.array(ins, dtype=np.int64).reshape(B, T)
        out = np.array(outs, dtype=np.int64).reshape(B, T)
        return st._wids[inp], st._wids[out], st._table[inp].astype(np.int64)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        rows = []
        for r in self.rows:
            # a row with only its final token left pulls a new sentence next: same as no row
            if r is None or len(r.ids) - r.pos <= 1:
                rows.append([])
            else:
                rows.append([*r.ptr, r.pos])
        return {"pass": self.pass_, "shard": self.shard, "block": self.block, "line": self.line,
                "pass_sentences": self.pass_sentences, "exhausted": self.exhausted, "rows": rows}

    def load(self, d: dict) -> None:
        st = self.st
        self.pass_, self.shard, self.block, self.line = (int(d["pass"]), int(d["shard"]),
                                                          int(d["block"]), int(d["line"]))
        self.pass_sentences = int(d["pass_sentences"])
        self.exhausted = bool(d["exhausted"])
        self._key = None
        blocks: dict = {}
        rows: list[Optional[_Row]] = []
        for r in d["rows"]:
            if not r:
                rows.append(None)
                continue
            p, s, b, j, pos = (int(x) for x in r)
            if (p, s, b) not in blocks:
                blocks[(p, s, b)] = st._load_block(self.d, p, s, b)
            raw, order, fi, bi = blocks[(p, s, b)]
            tokens = st._tokens(raw, int(order[j]), fi, bi, count_bad=False)
            if tokens is None:
                raise ElmoError("data state does not match the files (a row's sentence is gone)")
            rows.append(_Row((p, s, b, j), st._encode(tokens, reverse=self.d == 1), pos))
        if len(rows) != st.batch_size:
            raise ElmoError(f"data state has {len(rows)} rows, this stream {st.batch_size}")
        self.rows = rows


class LMBatchStream:
    """Packed bidirectional LM batches from text files, streamed.

    Each batch is a dict: "fwd_chars" (B, T, C) char ids with the +1 offset (never padding),
    "fwd_targets" (B, T) vocab ids of the next token (OOV -> <UNK>), "fwd_inputs" (B, T) vocab
    ids of the inputs (not needed by the model: inputs are characters), the same three with
    "bwd_" for the reversed stream (absent if not bidirectional), and "n_tokens" = B*T.

    loop=True (training): this rank's files forever, a new random order every pass.
    loop=False (test): one pass; with shuffle=False the files in the given order, lines in file
    order; the final batch that cannot be completed is dropped and the iteration ends.

    `iter(stream)` continues from the current position (a finite stream that has reached its
    end starts over); `reset()` rewinds; `state_dict()` / `load_state_dict()` resume exactly.
    The state describes the position after the last batch handed out, so do not prefetch
    batches ahead of the consumer (e.g. in a DataLoader worker) if the state is saved.

    rank/world_size: with at least world_size (non-empty) files rank r reads files r::world_size,
    otherwise all files and, inside each, the lines with (0-based) number i % world_size == r.
    Orders are drawn from (seed, rank, direction, ...), so ranks are independent streams.

    block_bytes: the shuffle unit (see the module docstring). Lines are shuffled within a block
    and blocks within a file; memory holds about two blocks per direction, whatever the file
    size. A file smaller than one block is shuffled as a whole, as bilm-tf shuffled a shard.
    Empty files are skipped with a warning (ElmoError when all are empty).
    """

    def __init__(self, files: Sequence[str] | str, vocab: Vocabulary, batch_size: int,
                 unroll_steps: int, max_chars: int = 50, seed: int = 0, shuffle: bool = True,
                 loop: bool = True, bidirectional: bool = True, rank: int = 0,
                 world_size: int = 1, block_bytes: int = BLOCK_BYTES):
        for name, v, lo in (("batch_size", batch_size, 1), ("unroll_steps", unroll_steps, 1),
                            ("max_chars", max_chars, 3), ("world_size", world_size, 1),
                            ("block_bytes", block_bytes, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ElmoError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise ElmoError(f"rank must be in [0, {world_size}), got {rank}")
        if min(vocab.bos, vocab.eos, vocab.unk) < 0:
            raise ElmoError(f"{vocab.source}: a training vocabulary needs <S>, </S> and <UNK>")
        self.vocab = vocab
        self.batch_size, self.unroll_steps = int(batch_size), int(unroll_steps)
        self.max_chars = int(max_chars)
        self.seed, self.shuffle, self.loop = int(seed), bool(shuffle), bool(loop)
        self.bidirectional = bool(bidirectional)
        self.rank, self.world_size, self.block_bytes = int(rank), int(world_size), int(block_bytes)

        self.files = as_files(files)
        sizes = []
        for f in self.files:
            try:
                sizes.append(os.path.getsize(f))
            except OSError:
                raise ElmoError(f"{f}: file not found") from None
        empty = [f for f, n in zip(self.files, sizes) if n == 0]
        if len(empty) == len(self.files):
            if len(empty) == 1:
                raise ElmoError(f"{empty[0]}: file is empty; no batch could ever be made")
            raise ElmoError(f"all {len(empty)} files are empty: {name_files(empty)}; "
                            f"no batch could ever be made")
        if empty:
            warnings.warn(f"skipping {len(empty)} empty file(s): {name_files(empty)}",
                          stacklevel=2)
        full = [(f, n) for f, n in zip(self.files, sizes) if n > 0]
        self.split_lines = len(full) < self.world_size
        mine = full if self.split_lines else full[self.rank::self.world_size]
        self.shards = [f for f, _ in mine]
        self._sizes = [n for _, n in mine]
        self._n_blocks = [-(-n // self.block_bytes) for n in self._sizes]
        self._line_bases: dict[int, list[int]] = {}
        self._orders: dict = {}
        # The token table: token -> row; row r holds its char ids (+1) and its vocab id. Rows 0
        # and 1 are <S> and </S>. Trimmed between batches when it has grown past _CACHE_TOKENS.
        self._cache: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
        self._row_tokens: list[str] = [BOS_TOKEN, EOS_TOKEN]
        self._table = np.zeros((1024, self.max_chars), dtype=np.int16)
        self._wids = np.zeros(1024, dtype=np.int64)
        self._table[0], self._wids[0] = char_ids(BOS_TOKEN, self.max_chars), vocab.bos
        self._table[1], self._wids[1] = char_ids(EOS_TOKEN, self.max_chars), vocab.eos
        self.bad = BadLines()
        self._count_bad = True
        self.reset()

    # ------------------------------------------------------------------------------ public
    @property
    def n_bad_lines(self) -> int:
        """Non-UTF-8 lines skipped (each counted once, in the first pass of the forward source)."""
        return self.bad.count

    @property
    def epoch(self) -> int:
        """Index of the pass over this rank's files that the forward source is in (0-based)."""
        return self._dirs[0].pass_

    def reset(self) -> None:
        """Back to the start of the data (pass 0, no sentence in progress)."""
        dirs = getattr(self, "_dirs", None)
        if dirs is not None and (dirs[0].pass_ > 0 or dirs[0].pass_sentences > 0):
            self._count_bad = False       # bad lines are counted on the first traversal only
        self._dirs = [_Direction(self, d) for d in range(2 if self.bidirectional else 1)]
        self.batches = 0

    def __iter__(self) -> Iterator[dict]:
        if any(d.exhausted for d in self._dirs):
            self.reset()
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> Optional[dict]:
        """The next batch, or None when a finite stream has run out (never raises StopIteration)."""
        if len(self._row_tokens) > _CACHE_TOKENS:
            self._trim_cache()
        out: dict = {}
        for d, prefix in zip(self._dirs, ("fwd", "bwd")):
            got = d.batch()
            if got is None:
                for other in self._dirs:
                    other.exhausted = True
                return None
            inputs, targets, chars = got
            out[f"{prefix}_chars"] = torch.from_numpy(chars)
            out[f"{prefix}_targets"] = torch.from_numpy(targets)
            out[f"{prefix}_inputs"] = torch.from_numpy(inputs)
        out["n_tokens"] = self.batch_size * self.unroll_steps
        self.batches += 1
        return out

    def _config(self) -> dict:
        return {"files": [os.path.abspath(f) for f in self.shards], "sizes": list(self._sizes),
                "batch_size": self.batch_size, "unroll_steps": self.unroll_steps,
                "max_chars": self.max_chars, "seed": self.seed, "shuffle": self.shuffle,
                "loop": self.loop, "bidirectional": self.bidirectional, "rank": self.rank,
                "world_size": self.world_size, "block_bytes": self.block_bytes}

    def state_dict(self) -> dict:
        """Small (plain ints, bools, strs, lists): loads with torch.load(weights_only=True)."""
        return {"format": "torch_elmo.LMBatchStream/1", "config": self._config(),
                "batches": self.batches, "n_bad_lines": self.bad.count,
                "count_bad": self._count_bad, "directions": [d.state() for d in self._dirs]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that wrote `state` was. ElmoError if it was made
        over other files (or other sizes) or with other batch/shuffle/rank settings."""
        if not isinstance(state, dict) or state.get("format") != "torch_elmo.LMBatchStream/1":
            raise ElmoError("not an LMBatchStream state")
        mine = self._config()
        diff = [k for k in mine if state["config"].get(k) != mine[k]]
        if diff:
            k = diff[0]
            old, new = state["config"].get(k), mine[k]
            if k in ("files", "sizes"):
                old, new = (name_files([str(x) for x in old or []]),
                            name_files([str(x) for x in new]))
            raise ElmoError(f"data state does not match this stream: {k} was {old}, now {new}"
                            + (f" (also {', '.join(diff[1:])})" if len(diff) > 1 else ""))
        self.reset()
        for d, ds in zip(self._dirs, state["directions"]):
            d.load(ds)
        self.batches = int(state["batches"])
        self.bad.count = int(state["n_bad_lines"])
        self._count_bad = bool(state["count_bad"])

    # --------------------------------------------------------------------------- internals
    def _shard_order(self, d: int, p: int) -> np.ndarray:
        key = ("s", d, p)
        order = self._orders.get(key)
        if order is None:
            n = len(self.shards)
            order = (_rng(self.seed, self.rank, d, p, _TAG_SHARDS).permutation(n)
                     if self.shuffle else np.arange(n))
            self._remember(key, order)
        return order

    def _block_order(self, d: int, p: int, fi: int) -> np.ndarray:
        key = ("b", d, p, fi)
        order = self._orders.get(key)
        if order is None:
            n = self._n_blocks[fi]
            order = (_rng(self.seed, self.rank, d, p, _TAG_BLOCKS, fi).permutation(n)
                     if self.shuffle else np.arange(n))
            self._remember(key, order)
        return order

    def _remember(self, key, order) -> None:
        if len(self._orders) > 64:
            self._orders.clear()
        self._orders[key] = order

    def _read_block(self, fi: int, bi: int) -> list[bytes]:
        """The lines that start in bytes [a, b) of shard fi (the last may run past b)."""
        a = bi * self.block_bytes
        b = min(a + self.block_bytes, self._sizes[fi])
        with open(self.shards[fi], "rb") as f:
            if a == 0:
                buf = f.read(b)
                if buf.startswith(BOM):       # a byte-order mark is not part of the first token
                    buf = buf[len(BOM):]
            else:
                f.seek(a - 1)
                buf = f.read(b - a + 1)
                nl = buf.find(b"\n")
                if nl < 0:                    # inside one long line that started earlier
                    return []
                buf = buf[nl + 1:]
            if buf and not buf.endswith(b"\n"):
                buf += f.readline()           # finish the last line
        if not buf:
            return []
        lines = buf.split(b"\n")
        if buf.endswith(b"\n"):
            lines.pop()
        return lines

    def _line_base(self, fi: int, bi: int) -> int:
        """0-based number of the first line starting in block bi (one scan per file, lazily)."""
        if bi == 0:
            return 0
        bases = self._line_bases.get(fi)
        if bases is None:
            bases, newlines = [0], 0
            with open(self.shards[fi], "rb") as f:
                for _ in range(1, self._n_blocks[fi]):
                    data = f.read(self.block_bytes)
                    newlines += data.count(b"\n")
                    # lines starting before this block: the first + one per newline before its
                    # last byte... i.e. every newline except one ending exactly at the boundary
                    bases.append(1 + newlines - (data[-1:] == b"\n"))
            self._line_bases[fi] = bases
        return bases[bi]

    def _load_block(self, d: int, p: int, s: int,
                    b: int) -> tuple[list[bytes], np.ndarray, int, int]:
        """The block at position (pass p, shard s, block b) of direction d: its raw lines, the
        order to read them in (this rank's lines only, shuffled), its file and block index."""
        fi = int(self._shard_order(d, p)[s])
        bi = int(self._block_order(d, p, fi)[b])
        raw = self._read_block(fi, bi)
        idx = np.arange(len(raw), dtype=np.int64)
        if self.split_lines:
            base = self._line_base(fi, bi)
            idx = idx[(base + idx) % self.world_size == self.rank]
        if self.shuffle and len(idx) > 1:
            idx = _rng(self.seed, self.rank, d, p, _TAG_LINES, fi, bi).permutation(idx)
        return raw, idx, fi, bi

    def _tokens(self, raw: list[bytes], j: int, fi: int, bi: int,
                count_bad: bool) -> Optional[list[str]]:
        """Tokens of line j of block bi of shard fi; None for a blank or non-UTF-8 line."""
        try:
            tokens = raw[j].decode("utf-8").split()
        except UnicodeDecodeError:
            if count_bad and self._count_bad:
                self.bad.report(self.shards[fi], self._line_base(fi, bi) + j + 1)
            return None
        return tokens or None

    def _encode(self, tokens: list[str], reverse: bool) -> list[int]:
        """Table rows of `[<S>] + tokens + [</S>]` (reversed: `[</S>] + reversed + [<S>]`)."""
        get = self._cache.get
        rows = [get(t, -1) for t in tokens]
        if -1 in rows:
            for i, t in enumerate(tokens):
                if rows[i] == -1:
                    rows[i] = self._add_token(t)
        if reverse:
            rows.reverse()
            return [1, *rows, 0]
        return [0, *rows, 1]

    def _add_token(self, token: str) -> int:
        r = self._cache.get(token)
        if r is None:
            r = len(self._row_tokens)
            if r == len(self._table):
                self._table = np.concatenate([self._table, np.zeros_like(self._table)])
                self._wids = np.concatenate([self._wids, np.zeros_like(self._wids)])
            self._table[r] = char_ids(token, self.max_chars)
            self._wids[r] = self.vocab.word_to_id(token)
            self._cache[token] = r
            self._row_tokens.append(token)
        return r

    def _trim_cache(self) -> None:
        """Keep only the tokens of sentences in progress (renumbered), forget the rest."""
        live = [r for d in self._dirs for r in d.rows if r is not None]
        keep = sorted({0, 1}.union(*(r.ids for r in live)))
        new = {old: i for i, old in enumerate(keep)}
        cap = max(1024, 2 * len(keep))
        table = np.zeros((cap, self.max_chars), dtype=np.int16)
        wids = np.zeros(cap, dtype=np.int64)
        table[:len(keep)] = self._table[keep]
        wids[:len(keep)] = self._wids[keep]
        self._table, self._wids = table, wids
        self._row_tokens = [self._row_tokens[r] for r in keep]
        self._cache = {t: i for i, t in enumerate(self._row_tokens)}
        for r in live:
            r.ids = [new[x] for x in r.ids]
