"""The one device policy of every front door (CLI flags, load(), ElmoEmbedder, Elmo): a name or
torch.device, else a default, else CUDA when available; a CUDA request on a machine without CUDA
(or a GPU index it does not have) is one line. Also whether a device computes bf16 natively
(`bf16_native`), which decides if the fast recipe trains in bf16."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ElmoError


def resolve_device(name: Optional[str], flag: str = "--device", default: Optional[str] = None):
    """THE device policy: `name` (cpu, cuda, cuda:1, or a torch.device), else `default`, else cuda
    when available. A CUDA request on a machine without CUDA is one line."""
    name = name if name is not None else default
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ElmoError(f"{flag} {name}: not a device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ElmoError(f"{flag} {name}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ElmoError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def bf16_native(device: torch.device) -> bool:
    """Does `device` compute bf16 matmuls natively? A CUDA GPU with bf16 (Ampere and later), or a
    CPU with AVX512-BF16 or AMX, the check oneDNN itself uses. Elsewhere bf16 is emulated: on an
    AVX2-only CPU a bf16 matmul ran ~57x slower than fp32 (benchmarks/README.md), so the fast
    recipe keeps fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(probe()) if probe is not None else False
        except RuntimeError:
            return False
    return False
