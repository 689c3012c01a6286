"""What a benchmark ran on: the CPU model and the flags that decide which kernels run."""

from __future__ import annotations

import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu() -> str:
    """'Intel(R) Xeon(R) Processor (avx2 avx512f avx512_bf16 amx_bf16 ...)', from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    have = [f for f in FLAGS if f in flags]
    return f"{model or platform.machine()} ({' '.join(have) or 'none of ' + ' '.join(FLAGS)})"
