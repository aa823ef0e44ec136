"""`elmo info` (cli/info.py): versions, CPU, peaks, chosen precision and kernels, cache."""
import json

import torch

from torch_elmo import autotune, precision
from torch_elmo.cli import main


def test_info_text_and_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_ELMO_AUTOTUNE", "1")
    monkeypatch.setattr(precision, "measure", lambda *a, **k: {"speedup": 0.5})
    autotune.forget()
    try:
        assert main(["info", "--preset", "tiny", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["versions"]["torch"] == torch.__version__
        assert info["cpu"]["cores"] >= 1 and info["cpu"]["torch_threads"] == torch.get_num_threads()
        assert all(v > 0 for v in info["peaks_gflops"]["fp32"].values())
        assert info["cache"]["root"] == str(tmp_path)
        tiny = info["presets"]["tiny"]
        if info["cpu"]["bf16_native"]:
            assert tiny["precision"] == {"bf16": False, "reason": "fp32: bf16 measured x0.50 here",
                                         "speedup": 0.5}
        assert tiny["kernels"]["source"].startswith("measured now")
        assert set(tiny["kernels"]["timings_ms"]) >= {"step_onednn", "tanh_sigmoid"}
        autotune.forget()                                   # as a new process would
        assert main(["info", "--preset", "tiny"]) == 0      # text, from the cache now
        out = capsys.readouterr().out
        assert f"cache: {tmp_path}" in out and "matmul peaks (GFLOP/s): fp32" in out
        assert "tiny: training precision (fast recipe): " in out and "(lstm16-64-16, cached" in out
    finally:
        autotune.forget()
