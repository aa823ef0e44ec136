"""torch_elmo.autotune: kernel choices measured once per machine and shape class, cached, a corrupt
cache rebuilt, TORCH_ELMO_AUTOTUNE=0 keeps the defaults. (That every candidate computes the
reference's results is tests/test_kernels.py's test_every_kernel_choice_equals_reference.)"""
import json
from dataclasses import asdict

import pytest
import torch

from torch_elmo import BiLM, autotune, batch_to_ids, kernels, preset
from torch_elmo.model import LSTMP


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Autotune on, a fresh cache, this process's decisions forgotten before and after."""
    monkeypatch.setenv("TORCH_ELMO_AUTOTUNE", "1")
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path))
    autotune.forget()
    yield tmp_path
    autotune.forget()


def _cell():
    torch.manual_seed(0)
    return LSTMP(16, 64, 16, 3.0, 3.0)


def test_measures_once_then_reads_the_cache(tuning, monkeypatch):
    calls = []
    real = autotune.measure
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    r = autotune.ensure(_cell())
    assert calls == [(16, 64, 16)] and r["source"].startswith("measured now")
    assert 0 < r["seconds"] <= autotune.BUDGET_S + 1.0
    assert set(r["timings_ms"]) == ({"step_onednn", "tanh_sigmoid", "input_onednn", "block_mb"} |
                                    ({"two_threads"} if torch.get_num_threads() >= 2 else set()))
    for field, t in r["timings_ms"].items():    # every candidate timed; the choice is one of them
        assert set(t) == {str(v) for v in kernels.CANDIDATES[field]}
        assert r["choices"][field] in kernels.CANDIDATES[field]
    shape = kernels.shape_class(_cell())
    assert kernels.TUNED[shape] == kernels.Choices(**r["choices"])
    files = list(tuning.rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["result"]["choices"] == r["choices"]
    assert autotune.ensure(_cell()) is r       # this process: remembered
    autotune.forget()                          # a new process: the cache
    again = autotune.ensure(_cell())
    assert calls == [(16, 64, 16)] and again["source"].startswith("cached")
    assert again["choices"] == r["choices"]


def test_a_corrupt_cache_file_is_measured_again(tuning):
    r = autotune.ensure(_cell())
    (path,) = tuning.rglob("*.json")
    for bad in ["{\"format\": 1, \"machine\": {}, \"res", json.dumps({"format": 1})]:
        path.write_text(bad)
        autotune.forget()
        again = autotune.ensure(_cell())
        assert again["source"].startswith("measured now")
        assert set(again["choices"]) == set(r["choices"])
        assert json.loads(path.read_text())["result"]["choices"] == again["choices"]


def test_stored_choices_outside_the_candidates_are_measured_again(tuning):
    from torch_elmo.machine import Measurements
    shape = kernels.shape_class(_cell())
    good = asdict(kernels.DEFAULT)
    for bad in [{**good, "block_mb": 3}, {**good, "block_mb": True}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "two_threads"}, ["x"]]:
        Measurements().store(autotune.WHAT, shape, {"choices": bad, "timings_ms": {}})
        autotune.forget()
        r = autotune.ensure(_cell())
        assert r["source"].startswith("measured now") and autotune.usable(r["choices"]), bad


def test_switched_off_keeps_the_defaults(tuning, monkeypatch):
    monkeypatch.setenv("TORCH_ELMO_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    r = autotune.ensure(_cell())
    assert r["choices"] == asdict(kernels.DEFAULT) and "TORCH_ELMO_AUTOTUNE=0" in r["source"]
    assert list(tuning.rglob("*.json")) == []


def test_model_inference_triggers_it_training_does_not(tuning, monkeypatch):
    seen = []
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: seen.append(a) or
                        {"choices": {**asdict(kernels.DEFAULT), "tanh_sigmoid": False},
                         "timings_ms": {}, "seconds": 0.0})
    model = BiLM(preset("tiny"))
    ids = batch_to_ids([["a", "b", "c"]], add_boundaries=True)
    model(ids)["layers"][-1].sum().backward()           # autograd: no autotune
    assert seen == []
    with torch.no_grad():
        model(ids)
        model(ids)
    lstm = model.options.lstm
    assert seen == [(lstm.projection_dim, lstm.dim, lstm.projection_dim)]
    keys = [k for k in model.forward_layers[0].fast_weights.entries if k[0] == "lstm"]
    assert keys == [("lstm", torch.float32, False, True, True)]   # the tuned tanh choice ran
