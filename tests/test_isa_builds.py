"""Every ISA branch of the kernels' source is built and tested here, not only this CPU's: the kernels' tests run again
in a process acting as each lower ISA level (``ISEG_KERNELS_ISA``, iseg_plugin.kernels.cpu), whose kernels are
compiled without AVX-512 (AVX2's GEMM and its plain loops vectorised for AVX2) or without AVX at all (the portable
branch). Each run must pass with the kernels built at that level (not silently fall back to the reference)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iseg_plugin import kernels
from iseg_plugin.kernels import cpu

# the tests that compare kernels with intops, and whole converted models on each GEMM path, with intops
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_gemm_kernels.py", "tests/test_ops_registry.py",
                "tests/test_select.py", "tests/test_deploy.py::test_deployed_is_integer_only_bit_exact_and_close_to_float",
                "tests/test_fx_per_op.py::test_hand_written_vit_becomes_integer_only"]
REPO = Path(__file__).resolve().parents[1]
# what each level must report (its widest SIMD) and must not offer (the GEMM paths above it)
LEVEL_ISA = {"avx2": "avx2", "generic": "generic"}
ABOVE = {"avx2": ("vnni",), "generic": ("vnni", "avx2")}


def lower_levels() -> list[str]:
    """The levels below this CPU's (an AVX2-only CPU tests the portable build alone)."""
    native = cpu.cpu_flags() if cpu.isa_level() == "native" else frozenset()
    has_avx512 = any(flag.startswith("avx512") for flag in native)
    return [level for level in LEVEL_ISA if level == "generic" and "avx2" in native or level == "avx2" and has_avx512]


def run_at(level: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, cpu.ISA_ENV: level}
    env.pop("ISEG_KERNELS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(not kernels.enabled(), reason="the kernels do not build here")
@pytest.mark.parametrize("level", list(LEVEL_ISA))
def test_kernels_built_for_a_lower_isa_give_the_intops_integers(level):
    if level not in lower_levels():
        pytest.skip(f"this CPU ({cpu.cpu_isa()}) is not above ISA level {level}")
    probe = run_at(level, "-c", "from iseg_plugin import kernels; from iseg_plugin.ops import gemm; "
                   "print(kernels.describe()); print(*gemm.available_gemm_paths())")
    assert probe.returncode == 0, probe.stderr[-2000:]
    described, paths = probe.stdout.strip().splitlines()[-2:]
    assert described == f"fused C++ kernels ({LEVEL_ISA[level]} ({cpu.ISA_ENV}={level}))"
    assert not set(ABOVE[level]) & set(paths.split()), paths
    tests = run_at(level, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout.splitlines()[-1], tests.stdout[-2000:]


def test_an_unknown_isa_level_is_refused_by_name():
    probe = run_at("avx9000", "-c", "from iseg_plugin.kernels import cpu; cpu.cpu_flags()")
    assert probe.returncode != 0
    assert "ISEG_KERNELS_ISA='avx9000' is not an ISA level; use one of: native, avx2, generic" in probe.stderr
