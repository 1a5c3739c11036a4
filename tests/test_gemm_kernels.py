"""The exact integer GEMMs of the deployed modules, on every path this machine runs when forced (the
``gemm_path`` fixture: ``torch._int_mm``, the kernels' AVX2 one, the int32 matmul), against an int64 product."""
import pytest
import torch

from iseg_plugin.ops import gemm

def extremes(shape, generator):
    x = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    corners = torch.tensor([-128, 127, -128], dtype=torch.int8)  # the corners of the range
    x.view(-1)[:3] = corners[:x.numel()]
    return x


def test_int8_matmul_is_exact(gemm_path):
    g = torch.Generator().manual_seed(0)
    # odd K (the AVX2 kernel's int16 pairs), N beyond one 16-column panel, M beyond one 6-row tile (and not a
    # multiple of it) and one 48-row task, K beyond one and two 512-deep cache blocks, empty K, batches
    for shape_a, shape_b in (((17, 64), (64, 33)), ((2, 3, 20, 48), (2, 3, 48, 20)), ((1, 1), (1, 1)),
                             ((53, 7), (7, 40)), ((100, 301), (301, 17)), ((6, 600), (600, 16)), ((13, 1101), (1101, 19)),
                             ((3, 0), (0, 5))):
        a, b = extremes(shape_a, g), extremes(shape_b, g)
        assert torch.equal(gemm.int8_matmul(a, b).long(), a.long() @ b.long())
    worst = torch.full((4, 1024), -128, dtype=torch.int8)  # the largest sums: -128 * -128 * K
    assert torch.equal(gemm.int8_matmul(worst, worst.t().contiguous()).long(), worst.long() @ worst.long().t())


def test_uint16_probabilities_matmul_is_exact(gemm_path):
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 2**15 + 1, (2, 3, 20, 20), generator=g)
    p[..., 0, :] = 2**15  # a one-hot row's full probability
    v = extremes((2, 3, 20, 16), g)
    assert torch.equal(gemm.uint16_matmul(p, v).long(), p @ v.long())


def test_a_path_this_cpu_cannot_run_is_refused_by_name():
    with pytest.raises(ValueError, match="GEMM path 'amx' does not run here; this CPU runs: .*int_mm"):
        with gemm.forced("amx"):
            pass
    assert gemm.GEMM is None and gemm.runnable_gemm_paths()[-1] == "int32"
