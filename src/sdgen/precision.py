"""Where and in what precision the networks run: decided once, at load, and kept on the pipeline.

A `Precision` is two dtypes: the one weights are STORED in, and the one the arithmetic runs in. On CUDA, and on
CPUs with native bf16 (AVX512_BF16/AMX), they are the same. Other CPUs emulate bf16/fp16 arithmetic 50-300x
slower than fp32, so half-precision storage computes in fp32 there: half the memory at full fp32 speed
(nets/layers.py casts one layer's weight at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import SdgenError

# every name a user may give for a precision (CLI, API, server), one table
PRECISIONS: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    storage: torch.dtype   # the weights' dtype in memory
    compute: torch.dtype   # the dtype of activations and arithmetic

    def __str__(self) -> str:
        if self.compute == self.storage:
            return _name(self.storage)
        return f"{_name(self.storage)} (computed in {_name(self.compute)})"


# oneDNN instruction-set limits (ONEDNN_MAX_CPU_ISA) below which bf16 matrix products are emulated
_ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX, and PyTorch allowed to use them: bf16 matrix products then run at fp32 speed or better.

    Elsewhere bf16 is emulated. PyTorch can be held below what the CPU has (ONEDNN_MAX_CPU_ISA for oneDNN's
    matmuls and convs, ATEN_CPU_CAPABILITY for its own kernels); both are honoured, which also lets an AVX-512
    machine run (and measure) what an AVX2-only CPU gets."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    if " avx512_bf16" not in flags and " amx_bf16" not in flags:
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_WITHOUT_BF16:
        return False
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "ZVECTOR", "VSX")


def resolve_device(device) -> torch.device:
    """'auto' (or None): CUDA when PyTorch sees a GPU, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str) and device not in DEVICES and not device.startswith("cuda:"):
        raise SdgenError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SdgenError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}") from None
    if device.type not in ("cpu", "cuda"):
        raise SdgenError(f"unsupported device {str(device)!r}: use one of {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdgenError("--device cuda was asked for, but this machine has no CUDA GPU that PyTorch can use")
    return device


def check_precision(name) -> None:
    """Refuse an unknown precision name (cheap; before anything loads)."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16, torch.float16):
            raise SdgenError(f"unsupported dtype {name}: use float32, bfloat16 or float16")
    elif name is not None and name not in PRECISIONS:
        raise SdgenError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")


def resolve_precision(name, device: torch.device) -> Precision:
    """'auto' stores fp16 on CUDA and bf16 on every CPU (computed in fp32 where bf16 is emulated): half the memory
    of fp32; see the module docstring."""
    check_precision(name)
    storage = name if isinstance(name, torch.dtype) else PRECISIONS[name or "auto"]
    if storage is None:
        storage = torch.float16 if device.type == "cuda" else torch.bfloat16
    native = device.type != "cpu" or storage.itemsize >= 4 or (storage == torch.bfloat16 and cpu_has_native_bf16())
    return Precision(storage, storage if native else torch.float32)
