"""The exact integer GEMMs of the deployed modules, on every path this machine can run: the VNNI
``torch._int_mm`` path (where the CPU has it) and the int32-matmul path, against an int64 product."""
import pytest
import torch

from iseg_plugin.ops import gemm

PATHS = [False] + ([True] if gemm._cpu_has_vnni() else [])  # (_int_mm without VNNI is a slow naive loop)


def extremes(shape, generator):
    x = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    x.view(-1)[:3] = torch.tensor([-128, 127, -128], dtype=torch.int8)  # the corners of the range
    return x


@pytest.mark.parametrize("vnni", PATHS, ids=lambda v: "int_mm-vnni" if v else "int32-matmul")
def test_int8_matmul_is_exact(monkeypatch, vnni):
    monkeypatch.setattr(gemm, "INT8_KERNEL", vnni)
    g = torch.Generator().manual_seed(0)
    for shape_a, shape_b in (((17, 64), (64, 33)), ((2, 3, 20, 48), (2, 3, 48, 20))):
        a, b = extremes(shape_a, g), extremes(shape_b, g)
        assert torch.equal(gemm.int8_matmul(a, b).long(), a.long() @ b.long())
    worst = torch.full((4, 1024), -128, dtype=torch.int8)  # the largest sums: -128 * -128 * K
    assert torch.equal(gemm.int8_matmul(worst, worst.t().contiguous()).long(), worst.long() @ worst.long().t())


@pytest.mark.parametrize("vnni", PATHS, ids=lambda v: "int_mm-vnni" if v else "int32-matmul")
def test_uint16_probabilities_matmul_is_exact(monkeypatch, vnni):
    monkeypatch.setattr(gemm, "INT8_KERNEL", vnni)
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 2**15 + 1, (2, 3, 20, 20), generator=g)
    p[..., 0, :] = 2**15  # a one-hot row's full probability
    v = extremes((2, 3, 20, 16), g)
    assert torch.equal(gemm.uint16_matmul(p, v).long(), p @ v.long())
