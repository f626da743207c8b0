"""The machine a result was measured on, for the reports."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info() -> dict[str, str]:
    """CPU model, core count, memory, GPU (if any) and library versions, for the reports."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()), "memory": mem,
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NATIVE_HALF = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
"""CPU flags under which oneDNN runs half-precision matmuls natively (else they are emulated, slower)."""


def native_half(dtype: torch.dtype) -> bool | None:
    """Whether this CPU computes ``dtype`` matmuls natively (None for float32 / float64: not a question)."""
    if dtype not in NATIVE_HALF:
        return None
    return bool(cpu_flags() & set(NATIVE_HALF[dtype]))
