"""Which mixed precision a training run uses: ``train.mixed_precision: auto`` picks bf16 where it is fast.

bf16 autocast pays where the hardware has native bf16 matrix units: CUDA GPUs from Ampere on, and CPUs
with AVX512-BF16 or AMX (on this project's 2-core AVX512-BF16 CPU a quick-preset UNet step runs about
1.4x faster). Elsewhere bf16 is emulated and slower than fp32, so ``auto`` falls back to fp32 ("no").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """(has fast bf16, why) for a device; ``flags`` overrides the CPU flags (tests)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        found = [f for f in CPU_BF16_FLAGS if f in flags]
        if found:
            return True, f"CPU has {'/'.join(found).upper()}"
        return False, "CPU has no native bf16 (no AVX512-BF16 or AMX)"
    return False, f"{device.type} is not tested with bf16 here"


def resolve_mixed_precision(setting: str | None, device: torch.device, flags: set[str] | None = None,
                            announce: bool = True) -> str | None:
    """``auto`` -> "bf16" or "no" (saying which on stderr if ``announce``); other settings pass through unchanged."""
    if setting != "auto":
        return setting
    ok, why = native_bf16(device, flags)
    choice = "bf16" if ok else "no"
    if announce:
        print(f"mixed precision: {'bf16 autocast' if ok else 'fp32'} (train.mixed_precision=auto: {why})",
              file=sys.stderr, flush=True)
    return choice
