"""What this CPU has (read from /proc/cpuinfo once): the kernels' and the GEMM paths' choices depend on it."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_isa() -> str:
    """The widest integer SIMD of this CPU that the kernels care about (printed by benchmarks)."""
    flags = cpu_flags()
    for isa in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2"):
        if isa in flags:
            return isa
    return "generic"
