import collections

import pytest

from torch_elmo.config import ElmoError
from torch_elmo.vocab import Vocabulary, build_vocabulary, count_tokens, count_words
from conftest import shared_path


def test_fixture_vocab_ids_and_token_batcher_values():
    v = Vocabulary.read(shared_path("fixtures", "bilm-tf", "data", "vocab_test.txt"))
    assert len(v) == 100
    assert (v.eos, v.bos, v.unk) == (0, 1, 2)
    # section C token batcher: vocab line index + 1 (0 = padding)
    assert [i + 1 for i in v.encode(["The", "first", "."])] == [2, 18, 75, 6, 1]
    assert [i + 1 for i in v.encode(["It", "said"])] == [2, 67, 21, 1]
    assert v.encode(["a", "b"], reverse=True)[0] == v.eos


def test_missing_specials_named(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("<S>\nthe\n")
    with pytest.raises(ElmoError, match=r"v\.txt.*</S>, <UNK>"):
        Vocabulary.read(p)


def test_maxtermid_and_blank_lines_skipped(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("<S>\n</S>\n!!!MAXTERMID\n\n<UNK>\n  the  \n")
    v = Vocabulary.read(p)
    assert v.tokens == ["<S>", "</S>", "<UNK>", "the"]
    assert v.word_to_id("zebra") == v.unk


def test_non_utf8_vocab_line_named(tmp_path):
    p = tmp_path / "v.txt"
    p.write_bytes(b"<S>\n</S>\n<UNK>\n\xff\xfe\n")
    with pytest.raises(ElmoError, match=r"v\.txt:4: not valid UTF-8"):
        Vocabulary.read(p)


def test_empty_and_duplicate(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("")
    with pytest.raises(ElmoError, match="empty"):
        Vocabulary.read(p)
    p.write_text("<S>\n</S>\n<UNK>\nthe\nthe\n")
    with pytest.raises(ElmoError, match="twice"):
        Vocabulary.read(p)


def test_build_sorted_and_round_trip(tmp_path):
    counts = collections.Counter("b a b c b a".split())
    v = build_vocabulary(counts)
    assert v.tokens == ["<S>", "</S>", "<UNK>", "b", "a", "c"]
    assert build_vocabulary(counts, min_count=2).tokens[3:] == ["b", "a"]
    assert build_vocabulary(counts, max_size=4).tokens == ["<S>", "</S>", "<UNK>", "b"]
    v.write(tmp_path / "out.txt")
    assert Vocabulary.read(tmp_path / "out.txt").tokens == v.tokens
    assert v.check_frequency_sorted(counts)
    with pytest.warns(UserWarning, match="not sorted"):
        Vocabulary(["<S>", "</S>", "<UNK>", "c", "b"]).check_frequency_sorted(counts)


def test_count_tokens_and_words(tmp_path):
    (tmp_path / "f0.txt").write_text("a b\n\n  c \u3000d\n")   # unicode whitespace splits too
    (tmp_path / "f1.txt").write_text("a a\nb\n")
    files = [str(tmp_path / "f0.txt"), str(tmp_path / "f1.txt")]
    assert count_tokens(str(tmp_path / "f*.txt")) == 7
    assert count_tokens(files) == 7
    assert count_words(files) == collections.Counter({"a": 3, "b": 2, "c": 1, "d": 1})


def test_vocabulary_file_with_a_bom_keeps_its_specials(tmp_path):
    p = tmp_path / "v.txt"
    p.write_bytes(b"\xef\xbb\xbf<S>\n</S>\n<UNK>\nHello\n")
    v = Vocabulary.read(p)
    assert v.tokens == ["<S>", "</S>", "<UNK>", "Hello"] and v.bos == 0


@pytest.mark.parametrize("line", ["the 12345", "new york"])
def test_vocabulary_lines_with_whitespace_inside_are_refused(tmp_path, line):
    p = tmp_path / "v.txt"
    p.write_text(f"<S>\n</S>\n<UNK>\n{line}\n")
    with pytest.raises(ElmoError, match=r"v\.txt:4: .* has whitespace inside; .*one token per line"):
        Vocabulary.read(p)


def test_unk_words_are_left_out_so_they_map_to_the_unk_class():
    counts = collections.Counter({"the": 5, "<unk>": 4, "cat": 2})
    kept = build_vocabulary(counts)
    assert kept.word_to_id("<unk>") != kept.unk            # a word of its own: <UNK> never a target
    v = build_vocabulary(counts, unk_words=["<unk>"])
    assert "<unk>" not in v and v.tokens[3:] == ["the", "cat"]
    assert v.word_to_id("<unk>") == v.unk == v.word_to_id("never-seen")
