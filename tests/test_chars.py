import torch

from torch_elmo.chars import batch_to_ids, char_ids, mask_from_ids, raw_char_ids
from conftest import shared_path


def _filled(prefix, width=50, fill=261):
    return prefix + [fill] * (width - len(prefix))


def test_char_batcher_values_of_fixture_section_c():
    shared_path("fixtures", "bilm-tf", "data", "vocab_test.txt")  # the section C setting
    ids = batch_to_ids([["The", "first", "sentence"], ["Second", "."]], add_boundaries=True)
    assert ids.shape == (2, 5, 50) and ids.dtype == torch.long
    expected = [
        [[259, 257, 260], [259, 85, 105, 102, 260], [259, 103, 106, 115, 116, 117, 260],
         [259, 116, 102, 111, 117, 102, 111, 100, 102, 260], [259, 258, 260]],
        [[259, 257, 260], [259, 84, 102, 100, 112, 111, 101, 260], [259, 47, 260],
         [259, 258, 260], None],
    ]
    for b, row in enumerate(expected):
        for t, prefix in enumerate(row):
            want = [0] * 50 if prefix is None else _filled(prefix)
            assert ids[b, t].tolist() == want, (b, t)


def test_raw_training_encodings_width_5():
    assert raw_char_ids("th", 5) == [258, 116, 104, 259, 260]
    assert raw_char_ids("thhhhh", 5) == [258, 116, 104, 104, 259]
    assert raw_char_ids(chr(256) + "t", 5) == [258, 196, 128, 116, 259]
    assert raw_char_ids("<S>", 5) == [258, 256, 259, 260, 260]
    assert raw_char_ids("</S>", 5) == [258, 257, 259, 260, 260]


def test_offset_examples_of_the_char_encoding():
    assert char_ids("<S>") == _filled([259, 257, 260])
    assert char_ids("</S>") == _filled([259, 258, 260])
    assert char_ids(chr(256) + "t") == _filled([259, 197, 129, 117, 260])


def test_huge_token_truncated_to_48_bytes():
    ids = char_ids("é" * 10_000)  # 2 bytes each: truncation by bytes, not characters
    assert len(ids) == 50
    assert ids[0] == 259 and ids[49] == 260
    assert ids[1:49] == [0xC3 + 1, 0xA9 + 1] * 24


def test_multibyte_character_cut_in_half():
    ids = raw_char_ids("a" * 47 + "é")
    assert ids[48] == 0xC3 and ids[49] == 259


def test_lone_surrogates_dropped_not_raised():
    assert raw_char_ids("a\udc80b") == raw_char_ids("ab")
    assert raw_char_ids("\ud800") == raw_char_ids("")


def test_default_has_no_boundaries_as_allennlp():
    plain = batch_to_ids([["The", "first", "sentence"], ["Second", "."]])
    assert plain.shape == (2, 3, 50) and plain.dtype == torch.long
    both = batch_to_ids([["The", "first", "sentence"], ["Second", "."]], add_boundaries=True)
    assert torch.equal(plain[0], both[0, 1:4]) and torch.equal(plain[1, :2], both[1, 1:3])
    assert torch.all(plain[1, 2] == 0)
    assert batch_to_ids([["a"]], 10).shape == (1, 1, 10)


def test_empty_batch_and_empty_sentence():
    assert batch_to_ids([]).shape == (0, 0, 50)
    assert batch_to_ids([[]]).shape == (1, 0, 50)
    assert batch_to_ids([], add_boundaries=True).shape == (0, 2, 50)
    ids = batch_to_ids([[]], add_boundaries=True)
    assert ids.shape == (1, 2, 50)
    assert mask_from_ids(ids).tolist() == [[True, True]]


def test_mask_marks_padding_tokens():
    ids = batch_to_ids([["a", "b", "c"], ["d"]], add_boundaries=True)
    assert mask_from_ids(ids).tolist() == [[True] * 5, [True, True, True, False, False]]
    assert mask_from_ids(batch_to_ids([["a", "b", "c"], ["d"]])).tolist() == \
        [[True] * 3, [True, False, False]]
