"""Where an encoder runs and in what precision: `--device` and `--precision`."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from pipeline.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


# The device types an encoder runs on. torch knows more (mps, xpu, meta, ...), but ours fail
# there deep in torch, with a traceback, or (meta) compute nothing.
DEVICE_TYPES = ("cpu", "cuda")


def available_devices() -> list[str]:
    """The --device names this machine takes: cpu, then cuda:N for each GPU."""
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def pick_device(name: str | None = None) -> torch.device:
    """`name` (cpu, cuda, cuda:N), or CUDA where there is a GPU, else the CPU. "cuda" becomes
    the current GPU by number, so that every encoder names its GPU the same way."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # not a device name at all ("bogus", "cuda:x")
        device = None
    here = f"devices here: {', '.join(available_devices())}"
    if device is None or device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {name}: not a device we run on; {here}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device here; {here}")
        if device.index is None:  # "cuda": the current GPU, by number
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: no such GPU; {here}")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: units that make bf16 matmuls faster than fp32 on the CPU."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device,
                      fast_cpu_bf16: Callable[[], bool] | None = None,
                      notice: Callable[[str], None] | None = None) -> str:
    """auto: bf16 on CUDA and on CPUs with bf16 units, else fp32 (cosine to fp32 >= 0.999).
    fp8: the FP8 linear layers (model/fp8.py) where the GPU and torch have them, else what
    auto picks, with a one-line `notice` (default: to stderr) saying why. `fast_cpu_bf16`
    answers whether this CPU has bf16 units (default: `cpu_has_fast_bf16`)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if precision == "fp8":
        from pipeline.model.fp8 import unsupported_reason

        reason = unsupported_reason(device)
        if reason is None:
            return "fp8"
        fallback = resolve_precision("auto", device, fast_cpu_bf16)
        (notice or print_notice)(f"--precision fp8: {reason}; using {fallback}")
        return fallback
    if precision != "auto":
        return precision
    has_fast_bf16 = fast_cpu_bf16 or cpu_has_fast_bf16
    return "bf16" if device.type == "cuda" or has_fast_bf16() else "fp32"


def print_notice(line: str) -> None:
    print(line, file=sys.stderr)


def quiet(line: str) -> None:
    """A `notice` that says nothing: for a second resolution of a precision already told."""
