"""torch_elmo.precision: automatic bf16 only where it measured faster, --bf16 always obeyed (with a
warning where it is emulated or measured slower), the timing cached per machine and shapes."""
import pytest
import torch

from torch_elmo import precision, preset
from torch_elmo.config import with_recipe

CPU = torch.device("cpu")


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """Autotune on, a fresh cache, native bf16, and `measure` answering speedups[0] (recorded)."""
    monkeypatch.setenv("TORCH_ELMO_AUTOTUNE", "1")
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    calls, speedups = [], [1.0]
    monkeypatch.setattr(precision, "measure", lambda *a, **k: calls.append(a) or
                        {"speedup": speedups[0], "fp32_ms": 1.0, "bf16_ms": 1.0 / speedups[0]})
    return calls, speedups


def _opts():
    return with_recipe(preset("tiny"), "fast")


def test_auto_bf16_only_where_measured_faster(timed, tmp_path):
    calls, speedups = timed
    speedups[0] = 0.6
    p = precision.choose(CPU, _opts(), requested=False, auto=True)
    assert (p.bf16, p.reason, p.warning, p.speedup) == (False, "fp32: bf16 measured x0.60 here",
                                                        None, 0.6)
    assert [a[0] for a in calls] == [_opts()]
    # cached per machine and shapes: the second decision reads the file, a new shape measures
    speedups[0] = 2.0
    assert not precision.choose(CPU, _opts(), False, True).bf16 and len(calls) == 1
    p = precision.choose(CPU, _opts().replace(batch_size=1), False, True)   # 20 rows: new shape
    assert (p.bf16, p.reason) == (True, "bf16: measured x2.00 of fp32 here") and len(calls) == 2
    speedups[0] = 1.02                             # within the margin: not worth bf16's rounding
    assert not precision.choose(CPU, _opts().replace(batch_size=1, unroll_steps=10), False,
                                True).bf16


def test_explicit_bf16_is_obeyed_with_a_warning_when_slower(timed):
    calls, speedups = timed
    speedups[0] = 0.6
    p = precision.choose(CPU, _opts(), requested=True, auto=False)
    assert p.bf16 and "x0.60" in p.warning and "slower" in p.warning and "\n" not in p.warning
    speedups[0] = 1.5
    p = precision.choose(CPU, _opts().replace(batch_size=3, unroll_steps=1), requested=True,
                         auto=False)
    assert p.bf16 and p.warning is None


def test_nothing_measured_where_bf16_is_not_wanted_or_not_native_or_switched_off(timed,
                                                                                monkeypatch):
    calls, _ = timed
    assert precision.choose(CPU, _opts(), False, False) == precision.Precision(False, "fp32")
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    p = precision.choose(CPU, _opts(), False, True)
    assert not p.bf16 and "no native bf16" in p.reason
    p = precision.choose(CPU, _opts(), True, False)
    assert p.bf16 and "emulated" in p.warning
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    monkeypatch.setenv("TORCH_ELMO_AUTOTUNE", "0")
    p = precision.choose(CPU, _opts(), False, True)
    assert not p.bf16 and "TORCH_ELMO_AUTOTUNE=0" in p.reason
    assert precision.choose(CPU, _opts(), True, False).bf16
    assert calls == []


def test_measure_times_both_precisions_quickly():
    """The real timing of the tiny model's token encoder: a positive ratio, both times, well
    under a second, at min(B x T, 32) rows."""
    import time
    t = time.perf_counter()
    r = precision.measure(_opts().replace(batch_size=8, unroll_steps=5))          # 40 rows
    assert time.perf_counter() - t < 1.0
    assert r["rows"] == 32 and r["speedup"] > 0 and r["fp32_ms"] > 0 and r["bf16_ms"] > 0
    assert r["speedup"] == pytest.approx(r["fp32_ms"] / r["bf16_ms"], rel=0.1)
