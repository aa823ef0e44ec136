"""`elmo info`: this machine as torch-elmo sees it, for bug reports and speed questions.

Versions, the CPU and its vector / matrix flags, the measured fp32 and bf16 matmul peaks, and per
model preset the precision a fast-recipe training would choose (precision.py) and the kernel
choices of CPU inference (autotune.py) with the timings behind them, and where the cache is.
Measures what is not cached yet (a few seconds per preset); TORCH_ELMO_AUTOTUNE=0 shows the
fixed defaults instead.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

# the CPU flags that decide which kernels can run fast
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
         "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


def add_info_flags(p: argparse.ArgumentParser) -> None:
    from ..config import PRESETS
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="model preset(s) to report choices for (default: original and small)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def collect(presets: list[str]) -> dict:
    import numpy
    import torch

    from .. import __version__, autotune, kernels, machine, precision
    from ..config import RECIPES, preset, with_recipe
    from ..device import bf16_native
    cpu = machine.cpu_info()
    bf16 = bf16_native(torch.device("cpu"))
    out = {"versions": {"torch_elmo": __version__, "torch": torch.__version__,
                        "python": platform.python_version(), "numpy": numpy.__version__,
                        "platform": platform.platform()},
           "cpu": {"model": cpu["model"], "cores": machine.identity()["cores"],
                   "torch_threads": torch.get_num_threads(),
                   "capability": torch.backends.cpu.get_cpu_capability(),
                   "flags": [f for f in FLAGS if f in cpu["flags"]],
                   "onednn": kernels.ONEDNN, "bf16_native": bf16},
           "peaks_gflops": {"fp32": machine.matmul_peaks(torch.float32, (2048,), 3)},
           "cache": {"root": str(machine.cache_root()),
                     "measured": str(machine.Measurements().folder),
                     "autotune": machine.autotune_enabled()},
           "presets": {}}
    if bf16:
        out["peaks_gflops"]["bf16"] = machine.matmul_peaks(torch.bfloat16, (2048,), 3)
    for name in presets:
        o = with_recipe(preset(name), "fast")
        prec = precision.choose(torch.device("cpu"), o, False, RECIPES["fast"].get("bf16", False))
        torch.manual_seed(0)
        from ..model import LSTMP
        lo = o.lstm
        cell = LSTMP(lo.projection_dim, lo.dim, lo.projection_dim, lo.cell_clip, lo.proj_clip)
        tuned = autotune.ensure(cell)
        out["presets"][name] = {
            "precision": {"bf16": prec.bf16, "reason": prec.reason, "speedup": prec.speedup},
            "kernels": {"shape": kernels.shape_class(cell), **tuned}}
    return out


def cmd_info(args) -> int:
    info = collect(args.preset or ["original", "small"])
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
        return 0
    v, c = info["versions"], info["cpu"]
    print("versions: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    print(f"cpu: {c['model']}, {c['cores']} cores, {c['torch_threads']} torch threads, "
          f"torch capability {c['capability']}, flags {' '.join(c['flags']) or '-'}; oneDNN "
          f"{'on' if c['onednn'] else 'off'}, native bf16 {'yes' if c['bf16_native'] else 'no'}")
    print("matmul peaks (GFLOP/s): " + "; ".join(
        f"{dt} " + ", ".join(f"{k} {x:.0f}" for k, x in d.items())
        for dt, d in info["peaks_gflops"].items()))
    for name, p in info["presets"].items():
        k = p["kernels"]
        print(f"{name}: training precision (fast recipe): {p['precision']['reason']}")
        print(f"  kernels ({k['shape']}, {k['source']}): "
              + ", ".join(f"{f}={x}" for f, x in k["choices"].items()))
        for field, t in k["timings_ms"].items():
            print(f"    {field}: " + ", ".join(f"{cand} {ms:.2f} ms" for cand, ms in t.items()))
    ca = info["cache"]
    print(f"cache: {ca['root']} (measurements: {ca['measured']}; autotune "
          f"{'on' if ca['autotune'] else 'off: TORCH_ELMO_AUTOTUNE=0'})")
    return 0


COMMANDS = {
    "info": ("versions, CPU, measured matmul peaks, chosen precision and kernels, cache location",
             add_info_flags, cmd_info),
}
