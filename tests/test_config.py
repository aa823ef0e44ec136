import json

import pytest

from torch_elmo.config import ElmoError, Options, preset, read_options, write_options
from conftest import shared_path


def test_fixture_options_round_trip(tmp_path):
    path = shared_path("fixtures", "bilm-tf", "model", "options.json")
    o = read_options(path)
    assert o.lstm.dim == 64 and o.lstm.projection_dim == 16 and not o.lstm.use_skip_connections
    assert o.char_cnn.n_filters == 124
    write_options(o, tmp_path / "o.json", inference=True)
    assert json.loads((tmp_path / "o.json").read_text()) == json.loads(path.read_text())


def test_n_characters_261_and_262_resolve_to_the_same_model():
    d = preset("small").to_dict()
    d["char_cnn"]["n_characters"] = 261
    assert Options.from_dict(d).char_cnn.n_characters == 262
    d["char_cnn"]["n_characters"] = 263
    with pytest.raises(ElmoError, match="261 or 262"):
        Options.from_dict(d)


@pytest.mark.parametrize("path,key", [(("lstm",), "dim"), (("char_cnn",), "filters"),
                                      (("char_cnn", "embedding"), "dim"), ((), "lstm")])
def test_missing_key_named(tmp_path, path, key):
    d = preset("tiny").to_dict()
    node = d
    for p in path:
        node = node[p]
    del node[key]
    f = tmp_path / "options.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ElmoError, match=rf"options\.json: missing key '{'.'.join(path + (key,))}'"):
        read_options(f)


def test_wrong_types_and_bad_json(tmp_path):
    d = preset("tiny").to_dict()
    d["lstm"]["dim"] = "big"
    with pytest.raises(ElmoError, match="lstm.dim' must be int"):
        Options.from_dict(d)
    f = tmp_path / "o.json"
    f.write_text("{not json")
    with pytest.raises(ElmoError, match="not valid JSON"):
        read_options(f)


def test_training_keys_round_trip():
    o = preset("small").replace(batch_size=64, n_negative_samples_batch=16)
    assert Options.from_dict(o.to_dict()) == o
    assert "batch_size" not in o.to_dict(inference=True)


def test_state_reset_prob_round_trips_and_defaults_to_bilm_tf():
    assert preset("tiny").state_reset_prob == 0.0
    o = preset("tiny").replace(state_reset_prob=0.1)
    assert Options.from_dict(o.to_dict()).state_reset_prob == 0.1
    assert "state_reset_prob" not in o.to_dict(inference=True)
