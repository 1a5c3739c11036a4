"""What this CPU has (read from /proc/cpuinfo once): the kernels' and the GEMM paths' choices depend on it.

``ISEG_KERNELS_ISA`` in the environment (``avx2`` or ``generic``; default ``native``) makes the process act as a CPU
of that lower level: the flags read here lose what lies above it, and the kernels are built for it (``-mno-avx512f``:
AVX2 and FMA; ``-mno-avx``: SSE only). It exists so that every ISA branch of the kernels' source is built and
tested on one machine (tests/test_isa_builds.py), and so that an AVX2-only CPU's speed can be approached on a wider
one (benchmarks; peers such as onnxruntime still use the whole CPU). One level per process: the kernels' ops are
registered once.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

ISA_ENV = "ISEG_KERNELS_ISA"
# level: (cpuinfo flag prefixes dropped, compiler flags added after -march=native)
ISA_LEVELS = {
    "native": ((), ()),
    "avx2": (("avx512", "amx", "avx_vnni"), ("-mno-avx512f", "-mno-avxvnni")),
    "generic": (("avx", "amx", "fma"), ("-mno-avx",)),
}


@functools.lru_cache(maxsize=None)
def isa_level() -> str:
    """The ISA level this process acts as (``ISEG_KERNELS_ISA``); a ValueError naming the choices otherwise."""
    level = os.environ.get(ISA_ENV, "native") or "native"
    if level not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={level!r} is not an ISA level; use one of: {', '.join(ISA_LEVELS)}")
    return level


def isa_compile_flags() -> tuple[str, ...]:
    """The compiler flags that build the kernels for :func:`isa_level` (after ``-march=native``)."""
    return ISA_LEVELS[isa_level()][1]


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """This CPU's flags, cut to :func:`isa_level`."""
    try:
        flags = frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()
    dropped = ISA_LEVELS[isa_level()][0]
    return frozenset(flag for flag in flags if not flag.startswith(dropped))


def cpu_has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_isa() -> str:
    """The widest integer SIMD of this CPU that the kernels care about (printed by benchmarks); a lower level
    forced by ``ISEG_KERNELS_ISA`` says so."""
    flags = cpu_flags()
    isa = next((isa for isa in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2") if isa in flags), "generic")
    return isa if isa_level() == "native" else f"{isa} ({ISA_ENV}={isa_level()})"
