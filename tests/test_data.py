"""torch_elmo.data: the bilm-tf batch packing, streaming, exact resume, ranks,
bad input, `elmo vocab`."""
import io
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch

from torch_elmo import cli
from torch_elmo.chars import raw_char_ids
from torch_elmo.config import ElmoError
from torch_elmo.data import LMBatchStream
from torch_elmo.textio import iter_sentences
from torch_elmo.vocab import Vocabulary

SPEC_VOCAB = ["<S>", "</S>", "<UNK>", "the", ".", chr(256) + "t"]


def spec_stream(tmp_path, **kw):
    p = tmp_path / "data.txt"
    p.write_text("the unknown .\nth .\nthe\n", encoding="utf-8")
    kw = {"shuffle": False, **kw}
    return LMBatchStream(str(p), Vocabulary(SPEC_VOCAB), batch_size=2, unroll_steps=3,
                         max_chars=5, **kw)


def raw5(tok):
    return raw_char_ids(tok, 5)


# --------------------------------------------------------------------- the worked example
def test_worked_example(tmp_path):
    it = iter(spec_stream(tmp_path))
    b1, b2 = next(it), next(it)
    assert b1["fwd_inputs"].tolist() == [[0, 3, 2], [0, 2, 4]]
    assert b1["fwd_targets"].tolist() == [[3, 2, 4], [2, 4, 1]]
    assert b2["fwd_inputs"].tolist() == [[4, 0, 3], [0, 3, 2]]
    assert b2["fwd_targets"].tolist() == [[1, 3, 1], [3, 2, 4]]
    # raw char encodings (width 5, docs/formats.md), +1 as delivered
    enc = {"the": [258, 116, 104, 101, 259], "unknown": [258, 117, 110, 107, 259],
           ".": [258, 46, 259, 260, 260], "<S>": [258, 256, 259, 260, 260]}
    for tok, raw in enc.items():
        assert raw5(tok) == raw
    want1 = [["<S>", "the", "unknown"], ["<S>", "th", "."]]
    want2 = [[".", "<S>", "the"], ["<S>", "the", "unknown"]]
    for b, want in ((b1, want1), (b2, want2)):
        assert b["fwd_chars"].dtype == torch.int64 and b["fwd_chars"].shape == (2, 3, 5)
        assert b["fwd_chars"].tolist() == [[[c + 1 for c in raw5(t)] for t in row] for row in want]
        assert b["n_tokens"] == 6
    assert b1["fwd_chars"][0, 1].tolist() == [c + 1 for c in enc["the"]]


def test_worked_example_backward(tmp_path):
    # derived by hand from the same rules: reversed sentences [</S>, wn..w1, <S>]
    # s1 = [1,4,2,3,0], s2 = [1,4,2,0], s3 = [1,3,0]
    it = iter(spec_stream(tmp_path))
    b1, b2 = next(it), next(it)
    assert b1["bwd_inputs"].tolist() == [[1, 4, 2], [1, 4, 2]]
    assert b1["bwd_targets"].tolist() == [[4, 2, 3], [4, 2, 0]]
    assert b2["bwd_inputs"].tolist() == [[3, 1, 3], [1, 4, 2]]
    assert b2["bwd_targets"].tolist() == [[0, 3, 0], [4, 2, 3]]
    assert b1["bwd_chars"][0].tolist() == [[c + 1 for c in raw5(t)]
                                           for t in ["</S>", ".", "unknown"]]
    for b in (b1, b2):       # the final boundary token is never an input
        assert 1 not in b["fwd_inputs"].tolist()[0] + b["fwd_inputs"].tolist()[1]
        assert 0 not in b["bwd_inputs"].flatten().tolist()


def test_unidirectional_has_no_bwd(tmp_path):
    b = next(iter(spec_stream(tmp_path, bidirectional=False)))
    assert not any(k.startswith("bwd") for k in b)
    assert b["fwd_inputs"].tolist() == [[0, 3, 2], [0, 2, 4]]


def test_test_mode_drops_final_partial_batch_and_ends_cleanly(tmp_path):
    s = spec_stream(tmp_path, loop=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no RuntimeError from a StopIteration, no warnings
        batches = list(s)
        assert len(batches) == 1            # batch 2 would need a 4th sentence: dropped
        assert batches[0]["fwd_inputs"].tolist() == [[0, 3, 2], [0, 2, 4]]
        assert s.next_batch() is None
        again = list(s)                     # a finished finite stream starts over
    assert len(again) == 1 and torch.equal(again[0]["fwd_chars"], batches[0]["fwd_chars"])


# --------------------------------------------------------------------- corpus helpers
def write_corpus(tmp_path, n_files, n_lines, words=1, name="f"):
    """Files of lines 'w<k>' (or 'w<k>_0 .. w<k>_m') with globally unique k; returns tokens."""
    k, files = 0, []
    for i in range(n_files):
        lines = []
        for _ in range(n_lines):
            lines.append(" ".join([f"w{k}"] if words == 1 else [f"w{k}_{j}" for j in range(words)]))
            k += 1
        p = tmp_path / f"{name}{i:02d}.txt"
        p.write_text("\n".join(lines) + "\n")
        files.append(str(p))
    return files


def vocab_for(files):
    toks = sorted({t for f in files for _, s in iter_sentences(f) for t in s})
    return Vocabulary(["<S>", "</S>", "<UNK>", *toks])


def sentence_order(stream, n_batches):
    """With batch 1, unroll 2 and one-word lines, each batch is exactly one sentence [<S>, w]."""
    out = []
    for _ in range(n_batches):
        b = stream.next_batch()
        if b is None:
            break
        assert b["fwd_inputs"][0, 0] == stream.vocab.bos
        out.append(stream.vocab.id_to_word(int(b["fwd_inputs"][0, 1])))
    return out


def test_test_mode_reads_files_in_order_for_any_block_size(tmp_path):
    files = write_corpus(tmp_path, 3, 7)
    v = vocab_for(files)
    want = [f"w{k}" for k in range(21)]
    for bb in (1, 2, 3, 5, 8, 1 << 20):
        s = LMBatchStream(files, v, 1, 2, shuffle=False, loop=False, block_bytes=bb)
        assert sentence_order(s, 100) == want, bb


def test_block_boundaries_lines_crossing_and_long_lines(tmp_path):
    # lines of varied length (one far longer than the blocks), no final newline, blank lines
    lines = ["a", "bb ccc", "", "d " * 40, "e", "   ", "ffff ggggg h", "i"]
    p = tmp_path / "x.txt"
    p.write_text("\n".join(lines))
    v = Vocabulary(["<S>", "</S>", "<UNK>"])
    ref = [toks for _, toks in iter_sentences(str(p))]
    for bb in range(1, 30):
        s = LMBatchStream(str(p), v, 1, 1, shuffle=False, loop=False, block_bytes=bb,
                          bidirectional=False)
        got = [list(s._dirs[0].next_sentence()[1]) for _ in range(len(ref))]
        assert got == ref, bb
        assert s._dirs[0].next_sentence() is None


# --------------------------------------------------------------------- shuffling
def test_shuffled_passes_cover_everything_each_with_a_new_order(tmp_path):
    files = write_corpus(tmp_path, 3, 10)
    v = vocab_for(files)
    s = LMBatchStream(files, v, 1, 2, seed=3, block_bytes=12)   # 3 lines a block
    passes = [sentence_order(s, 30) for _ in range(3)]
    everything = sorted(f"w{k}" for k in range(30))
    for p in passes:
        assert sorted(p) == everything
    assert passes[0] != passes[1] != passes[2]
    assert passes[0] != [f"w{k}" for k in range(30)]
    # forward and backward are independently shuffled sources
    s = LMBatchStream(files, v, 1, 2, seed=3, block_bytes=12)
    b = s.next_batch()
    fwd, bwd = [], []
    for _ in range(30):
        fwd.append(int(b["fwd_inputs"][0, 1]))
        bwd.append(int(b["bwd_inputs"][0, 1]))
        b = s.next_batch()
    assert sorted(fwd) == sorted(bwd) and fwd != bwd
    # the same seed gives the same stream, another seed another one
    s1 = LMBatchStream(files, v, 1, 2, seed=3, block_bytes=12)
    s2 = LMBatchStream(files, v, 1, 2, seed=4, block_bytes=12)
    assert sentence_order(s1, 30) == passes[0] != sentence_order(s2, 30)


# --------------------------------------------------------------------- exact resume
def run(stream, n):
    out = []
    for _ in range(n):
        b = stream.next_batch()
        out.append(None if b is None else {k: v.clone() if torch.is_tensor(v) else v
                                           for k, v in b.items()})
    return out


def same(a, b):
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("loop", [True, False])
def test_exact_resume_everywhere(tmp_path, loop):
    # 3 files of 9 three-word lines, blocks of ~3 lines, rows of 3 x unroll 4: sentences
    # straddle batches, and the run crosses block, shard and (loop) pass boundaries.
    files = write_corpus(tmp_path, 3, 9, words=3)
    v = vocab_for(files)
    mk = lambda: LMBatchStream(files, v, 3, 4, seed=7, block_bytes=40, loop=loop)
    n = 40
    ref = run(mk(), n)
    s, states = mk(), []
    for _ in range(n):
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        states.append(buf.getvalue())
        s.next_batch()
    seen_shards = {(st["pass"], st["shard"]) for st in
                   (torch.load(io.BytesIO(x), weights_only=True)["directions"][0] for x in states)}
    if loop:
        assert {p for p, _ in seen_shards} >= {0, 1, 2}         # several passes
    assert len({sh for _, sh in seen_shards}) == 3                 # every shard
    for k in range(n):
        st = torch.load(io.BytesIO(states[k]), weights_only=True)
        assert len(states[k]) < 20_000
        r = mk()
        r.load_state_dict(st)
        assert r.batches == st["batches"] == (k if loop else min(k, r.batches))
        got = run(r, min(6, n - k))
        assert all(same(a, b) for a, b in zip(got, ref[k:k + 6])), k


def test_resume_state_mismatch_is_an_error(tmp_path):
    files = write_corpus(tmp_path, 2, 5)
    v = vocab_for(files)
    s = LMBatchStream(files, v, 2, 3)
    s.next_batch()
    st = s.state_dict()
    with pytest.raises(ElmoError, match="batch_size was 2, now 4"):
        LMBatchStream(files, v, 4, 3).load_state_dict(st)
    with pytest.raises(ElmoError, match="files"):
        LMBatchStream(files[:1], v, 2, 3).load_state_dict(st)


# --------------------------------------------------------------------- ranks
def one_pass_tokens(stream, n):
    return sentence_order(stream, n)


def test_ranks_by_shards_are_disjoint(tmp_path):
    files = write_corpus(tmp_path, 5, 4)       # 5 files >= 2 ranks: files 0,2,4 / 1,3
    v = vocab_for(files)
    r0 = LMBatchStream(files, v, 1, 2, seed=1, rank=0, world_size=2)
    r1 = LMBatchStream(files, v, 1, 2, seed=1, rank=1, world_size=2)
    a, b = one_pass_tokens(r0, 12), one_pass_tokens(r1, 8)
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(f"w{k}" for k in range(20))
    assert set(a) == {f"w{k}" for f in (0, 2, 4) for k in range(4 * f, 4 * f + 4)}


def test_ranks_by_lines_are_disjoint(tmp_path):
    files = write_corpus(tmp_path, 1, 20)      # 1 file < 2 ranks: lines i % 2 == rank
    v = vocab_for(files)
    for bb in (1 << 20, 7):                    # one block, and many (line numbers by scan)
        r0 = LMBatchStream(files, v, 1, 2, seed=1, rank=0, world_size=2, block_bytes=bb)
        r1 = LMBatchStream(files, v, 1, 2, seed=1, rank=1, world_size=2, block_bytes=bb)
        a, b = one_pass_tokens(r0, 10), one_pass_tokens(r1, 10)
        assert set(a) == {f"w{k}" for k in range(0, 20, 2)}
        assert set(b) == {f"w{k}" for k in range(1, 20, 2)}
    with pytest.raises(ElmoError, match="rank"):
        LMBatchStream(files, v, 1, 2, rank=2, world_size=2)


# --------------------------------------------------------------------- bad input
def test_glob_matching_nothing(tmp_path):
    pat = str(tmp_path / "nothing*.txt")
    with pytest.raises(ElmoError, match="matches no files"):
        LMBatchStream(pat, Vocabulary(SPEC_VOCAB), 2, 3)


def test_empty_files(tmp_path):
    v = Vocabulary(SPEC_VOCAB)
    e1, e2 = tmp_path / "e1.txt", tmp_path / "e2.txt"
    e1.write_text("")
    e2.write_text("")
    with pytest.raises(ElmoError, match=r"e1\.txt: file is empty"):
        LMBatchStream(str(e1), v, 2, 3)
    with pytest.raises(ElmoError, match=r"all 2 files are empty: .*e1\.txt, .*e2\.txt"):
        LMBatchStream(str(tmp_path / "e*.txt"), v, 2, 3)
    # blank-only file: caught on the first pass, naming it
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    s = LMBatchStream(str(blank), v, 2, 3)
    with pytest.raises(ElmoError, match=r"blank\.txt: no sentences"):
        s.next_batch()
    # one empty file among good ones: skipped with a warning
    good = tmp_path / "good.txt"
    good.write_text("the .\n")
    with pytest.warns(UserWarning, match=r"skipping 1 empty file.*e1\.txt"):
        s = LMBatchStream([str(e1), str(good)], v, 2, 3)
    assert s.next_batch()["fwd_inputs"].tolist() == [[0, 3, 4], [0, 3, 4]]


def test_blank_lines_skipped(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("\n\nthe unknown .\n  \n\nth .\n\t\nthe\n\n")
    b = next(iter(LMBatchStream(str(p), Vocabulary(SPEC_VOCAB), 2, 3, max_chars=5,
                                shuffle=False)))
    assert b["fwd_inputs"].tolist() == [[0, 3, 2], [0, 2, 4]]


def test_non_utf8_lines_skipped_counted_and_named(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"the .\n\xff\xfe oops\nthe the\n" + b"the\n" * 20 + b"bad \xc3\x28 here\n.\n")
    v = Vocabulary(SPEC_VOCAB)
    for bb in (1 << 20, 5):                    # the second line number needs the block scan
        with pytest.warns(UserWarning) as rec:
            s = LMBatchStream(str(p), v, 1, 2, shuffle=False, block_bytes=bb,
                              bidirectional=True)
            for _ in range(3 * 23):            # three passes: each bad line counted once
                s.next_batch()
        msgs = [str(w.message) for w in rec]
        assert any("bad.txt:2: not valid UTF-8" in m for m in msgs), msgs
        assert any("bad.txt:24: not valid UTF-8" in m for m in msgs), msgs
        assert s.n_bad_lines == 2


def test_huge_token_is_truncated(tmp_path):
    p = tmp_path / "h.txt"
    huge = "x" * 100_000
    p.write_text(f"the {huge} .\n")
    s = LMBatchStream(str(p), Vocabulary(SPEC_VOCAB), 1, 3, shuffle=False)
    b = s.next_batch()
    assert b["fwd_inputs"].tolist() == [[0, 3, 2]]
    row = b["fwd_chars"][0, 2].tolist()
    assert len(row) == 50 and row == [c + 1 for c in raw_char_ids(huge, 50)]
    assert row[0] == 259 and row[1:49] == [ord("x") + 1] * 48 and row[49] == 260


def test_single_sentence_shorter_than_unroll(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("the\n")
    s = LMBatchStream(str(p), Vocabulary(SPEC_VOCAB), 2, 7, max_chars=5)
    b1, b2 = s.next_batch(), s.next_batch()     # every sentence pulled starts a new pass
    assert b1["fwd_inputs"].tolist() == [[0, 3, 0, 3, 0, 3, 0]] * 2
    assert b1["fwd_targets"].tolist() == [[3, 1, 3, 1, 3, 1, 3]] * 2
    assert b1["bwd_inputs"].tolist() == [[1, 3, 1, 3, 1, 3, 1]] * 2
    assert b2["fwd_inputs"].tolist() == [[3, 0, 3, 0, 3, 0, 3]] * 2
    assert b2["fwd_targets"].tolist() == [[1, 3, 1, 3, 1, 3, 1]] * 2
    assert s.epoch == 13                        # 14 sentences pulled: pass 13 under way
    # test mode: not enough for one batch -> no batch, no error
    assert list(LMBatchStream(str(p), Vocabulary(SPEC_VOCAB), 2, 7, loop=False)) == []


def test_bad_arguments(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("the\n")
    v = Vocabulary(SPEC_VOCAB)
    for kw, msg in (({"batch_size": 0}, "batch_size"), ({"unroll_steps": 0}, "unroll_steps"),
                    ({"max_chars": 2}, "max_chars")):
        args = {"batch_size": 2, "unroll_steps": 3, **kw}
        with pytest.raises(ElmoError, match=msg):
            LMBatchStream(str(p), v, **args)
    with pytest.raises(ElmoError, match="<S>, </S> and <UNK>"):
        LMBatchStream(str(p), Vocabulary(["a", "b"], require_specials=False), 2, 3)


# --------------------------------------------------------------------- counting, elmo vocab
def test_cli_vocab(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat\nthe dog\n\n")
    (tmp_path / "b.txt").write_text("the cat .\n")
    out = tmp_path / "sub" / "vocab.txt"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["vocab", "--train", str(tmp_path / "*.txt"), "--out", str(out)])
    assert rc == 0
    assert out.read_text().split("\n") == ["<S>", "</S>", "<UNK>", "the", "cat", ".", "dog",
                                           "sat", ""]
    printed = buf.getvalue()
    assert "8 tokens" in printed and "vocabulary size 8" in printed
    assert "n_train_tokens = 8" in printed
    Vocabulary.read(out)
    with redirect_stdout(io.StringIO()):
        cli.main(["vocab", "--train", str(tmp_path / "*.txt"), "--out", str(out),
                  "--min-count", "2"])
    assert out.read_text().split() == ["<S>", "</S>", "<UNK>", "the", "cat"]
    with redirect_stdout(io.StringIO()):
        cli.main(["vocab", "--train", str(tmp_path / "*.txt"), "--out", str(out),
                  "--max-size", "4"])
    assert out.read_text().split() == ["<S>", "</S>", "<UNK>", "the"]
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli.main(["vocab", "--train", str(tmp_path / "zz*.txt"), "--out", str(out)])
    assert rc == 2
    assert err.getvalue().count("\n") == 1
    msg = err.getvalue()
    assert msg.startswith("elmo vocab: error: glob '") and "zz*.txt' matches no files" in msg


# --------------------------------------------------------------------- speed
def test_token_cache_trimming_changes_nothing(tmp_path, monkeypatch):
    files = write_corpus(tmp_path, 2, 30, words=4)
    v = vocab_for(files)
    ref = run(LMBatchStream(files, v, 3, 5, seed=2, block_bytes=64), 40)
    import torch_elmo.data as data
    monkeypatch.setattr(data, "_CACHE_TOKENS", 8)       # trimmed before nearly every batch
    s = LMBatchStream(files, v, 3, 5, seed=2, block_bytes=64)
    got = run(s, 20)
    st = s.state_dict()
    assert len(s._row_tokens) < 60
    r = LMBatchStream(files, v, 3, 5, seed=2, block_bytes=64)
    r.load_state_dict(st)
    got += run(r, 20)
    assert all(same(a, b) for a, b in zip(got, ref))


def test_memory_is_bounded_by_the_block_not_the_file(tmp_path):
    import tracemalloc
    p = tmp_path / "big.txt"
    line = " ".join(["the", "cat", "sat", "on", "a", "mat"] * 3) + "\n"
    p.write_text(line * 40_000)                            # ~1.5 MB
    v = Vocabulary(["<S>", "</S>", "<UNK>", "the", "cat"])
    s = LMBatchStream(str(p), v, 16, 20, block_bytes=32 << 10)
    tracemalloc.start()
    try:
        for _ in range(400):                               # a sixth of the file, ~13 blocks
            s.next_batch()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s._dirs[0].block > 5
    # ~1 MB measured (blocks, batch arrays, torch); one block = the whole file: ~11 MB
    assert peak < 3_000_000, peak


def test_cli_vocab_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n \n")
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli.main(["vocab", "--train", str(tmp_path / "*.txt"), "--out",
                       str(tmp_path / "v.txt")])
    assert rc == 2 and "no tokens" in err.getvalue() and "a.txt" in err.getvalue()
    assert not (tmp_path / "v.txt").exists()


def test_cli_vocab_refuses_an_empty_vocabulary_and_overwriting_its_input(tmp_path, capsys):
    corpus = tmp_path / "a.txt"
    corpus.write_text("the cat sat\nthe dog\n")
    rc = cli.main(["vocab", "--train", str(corpus), "--out", str(tmp_path / "v.txt"),
                   "--min-count", "50"])
    err = capsys.readouterr().err
    assert rc == 2 and "--min-count 50 keeps no word (the most frequent occurs 2 times)" in err
    assert not (tmp_path / "v.txt").exists()
    rc = cli.main(["vocab", "--train", str(corpus), "--out", str(corpus)])
    assert rc == 2 and "is also an input" in capsys.readouterr().err
    assert corpus.read_text() == "the cat sat\nthe dog\n"
    rc = cli.main(["vocab", "--train", str(corpus), "--out", str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err


def test_a_bom_is_not_part_of_the_first_token(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfthe .\nthe\n")
    s = LMBatchStream(str(p), Vocabulary(SPEC_VOCAB), 1, 3, shuffle=False)
    assert s.next_batch()["fwd_inputs"].tolist() == [[0, 3, 4]]   # 'the', not '\ufeffthe' (<UNK>)


def test_a_directory_or_fifo_as_corpus_is_named(tmp_path):
    import os
    with pytest.raises(ElmoError, match=r"is a directory; give a glob of its text files"):
        LMBatchStream(str(tmp_path), Vocabulary(SPEC_VOCAB), 2, 3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ElmoError, match=r"pipe is not a regular file"):
        LMBatchStream(str(fifo), Vocabulary(SPEC_VOCAB), 2, 3)
