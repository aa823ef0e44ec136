"""torch_elmo.textio: corpus globs, the skip policy for corpus files, read_lines' two policies, BOM."""
import warnings

import pytest

from torch_elmo.config import ElmoError
from torch_elmo.textio import BadLines, expand_glob, iter_sentences, iter_text, read_lines
from torch_elmo.vocab import count_tokens


def test_glob_matching_nothing(tmp_path):
    pat = str(tmp_path / "nothing*.txt")
    with pytest.raises(ElmoError, match=r"^glob '.*nothing\*\.txt' matches no files$"):
        expand_glob(pat)
    with pytest.raises(ElmoError, match="matches no files"):
        count_tokens(pat)


def test_blank_lines_skipped_with_their_line_numbers(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("\n\nthe unknown .\n  \n\nth .\n\t\nthe\n\n")
    assert [n for n, _ in iter_sentences(str(p))] == [3, 6, 8]


def test_non_utf8_lines_skipped_counted_and_named(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"the .\n\xff\xfe oops\nthe the\n" + b"the\n" * 20 + b"bad \xc3\x28 here\n.\n")
    with pytest.warns(UserWarning) as rec:
        sents = list(iter_sentences(str(p)))
        n_tokens = count_tokens(str(p))
    assert [n for n, _ in sents][:3] == [1, 3, 4] and len(sents) == 23
    assert n_tokens == 2 + 2 + 20 + 1
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 4, msgs                # each names both lines
    assert "bad.txt:2: not valid UTF-8" in msgs[0] and "bad.txt:24: not valid UTF-8" in msgs[1]
    assert "bad.txt:2: not valid UTF-8" in msgs[2] and "bad.txt:24: not valid UTF-8" in msgs[3]


def test_bad_lines_named_then_only_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\xff\n" * 8 + b"ok\n")
    with pytest.warns(UserWarning) as rec:
        bad = BadLines(named=2)
        assert [t for _, t in iter_sentences(str(p), bad)] == [["ok"]]
    assert bad.count == 8 and len(rec) == 3   # two named, one "further bad lines" notice
    assert "further bad lines" in str(rec[2].message)


@pytest.mark.parametrize("chunk", [3, 4, 1 << 20])
def test_bom_is_dropped_from_the_first_token(tmp_path, chunk):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfHello world\nHello\n")
    assert [t for _, t in iter_sentences(str(p))] == [["Hello", "world"], ["Hello"]]
    text = " ".join(iter_text(str(p), BadLines(), chunk_bytes=chunk))
    assert text.split() == ["Hello", "world", "Hello"]
    assert read_lines(p) == ["Hello world", "Hello"]
    one_line = tmp_path / "one.txt"             # no newline at all
    one_line.write_bytes(b"\xef\xbb\xbfHi")
    assert " ".join(iter_text(str(one_line), BadLines(), chunk_bytes=chunk)).split() == ["Hi"]


def test_read_lines_policies(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"a b\r\n\nc \xff d\nlast")    # \r stays (whitespace), no final newline
    with pytest.raises(ElmoError, match=r"x\.txt:3: not valid UTF-8$"):
        read_lines(p)
    seen = []
    lines = read_lines(p, errors="replace", warn=seen.append)
    assert lines == ["a b\r", "", "c \ufffd d", "last"]
    assert len(seen) == 1 and "x.txt:3: not valid UTF-8" in seen[0] and "(1 line affected)" in seen[0]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        read_lines(p, errors="replace")
    assert len(rec) == 1
    with pytest.raises(ElmoError, match=r"nope\.txt: input file not found"):
        read_lines(tmp_path / "nope.txt", what="input file")
    with pytest.raises(ElmoError, match="is a directory"):
        read_lines(tmp_path)
    with pytest.raises(ValueError):
        read_lines(p, errors="ignore")
