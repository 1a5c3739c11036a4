"""Time the deployed model's heaviest fused kernels alone, on ViT-S 512x512 shapes (for A/B runs of kernel changes).

    .venv/bin/python benchmarks/kernel_speed.py [--threads 1]

* attention: 6 heads x 1025 query rows x 1025 keys x 64, int16 scores, bit-exp softmax (its element-wise form, and
  its table as Shiftmax reads one), int8 context;
* linear: the four Linears of a ViT-S block (qkv, proj, fc1 with a GELU table, fc2 from an int16 input), on the
  GEMM path this CPU takes: on ``at::_int_mm`` (not on the AVX2 path, where it is a naive loop) and with the weights
  packed for the kernels' VNNI or AVX2 GEMM where the path is one of those;
* class map: 150 x 32 x 32 int16 logits upsampled to 512 x 512, then argmax, against the one-pass kernel.

Prints the ISA, the GEMM path and the median of 15 runs per kernel (ms). Each timed call is checked equal to its
counterpart (the same integers) before it is timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from iseg_plugin import kernels
from iseg_plugin.intops import Dyadic
from iseg_plugin.intops.exp import bit_exp_form, bit_exp_table
from iseg_plugin.ops.gemm import cpu_isa, gemm_path


class _Requant:  # what the kernels read of a Requant module
    def __init__(self, multiplier: int, shift: int, bounds: tuple[int, int]):
        self.multiplier, self.shift, self.bounds = torch.tensor(multiplier), torch.tensor(shift), bounds


def median_ms(fn, runs: int = 15) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def attention_rows(gemm: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q, kt, v = (torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
                for shape in ((6, 1025, 64), (6, 64, 1025), (6, 1025, 64)))
    params = Dyadic(torch.tensor(1395864371), torch.tensor(33))  # scores of scale ~2.7e-5 (a random-weight ViT-S's)
    scores, context = _Requant(1325733322, 28, (-32768, 32767)), _Requant(1344874781, 40, (-128, 127))
    forms = {"attention, bit-exp element-wise": bit_exp_form(params), "attention, exponential table": bit_exp_table(params, 65535)}
    outs = {name: kernels.attention(q, kt, v, scores, exp, context, torch.int8, 15, gemm) for name, exp in forms.items()}
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 1, "the two exponential forms differ"
    return {name: median_ms(lambda exp=exp: kernels.attention(q, kt, v, scores, exp, context, torch.int8, 15, gemm))
            for name, exp in forms.items()}


def linear_rows(gemm: str) -> dict[str, float]:
    ops = torch.ops.iseg_kernels
    g = torch.Generator().manual_seed(1)
    rows = {}
    for name, (k, n, dtype, offset, then) in {"qkv": (384, 1152, torch.int8, 0, False), "proj": (384, 384, torch.int8, 0, False),
                                              "fc1 + GELU table": (384, 1536, torch.int8, 0, True),
                                              "fc2 (int16 input)": (1536, 384, torch.int16, 5, False)}.items():
        x = torch.randint(-128, 128, (1025, k), generator=g).to(dtype)
        w = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        bias = torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int32)
        m = torch.randint(2**30, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
        e = torch.full((n,), 38, dtype=torch.int64)
        table = torch.randint(-4, 252, (256,), generator=g, dtype=torch.int16) if then else None
        # (_int_mm: a naive loop ~50x slower than FP32 on the AVX2 path's CPUs, so not timed there)
        packings = {} if gemm == "avx2" else {"_int_mm": []}
        if gemm in ("vnni", "avx2"):
            packings[f"{gemm}, packed"] = list(kernels.pack_weight(w, gemm))
        outs = {}
        for how, packed in packings.items():
            call = lambda packed=packed: ops.linear(x, w, bias, m, e, -128, 127, offset, torch.int8, table, packed)  # noqa: E731
            outs[how] = call()
            rows[f"linear {name}, {how}"] = median_ms(call)
        first = next(iter(outs.values()))
        assert all(torch.equal(o, first) for o in outs.values()), f"linear {name}: the GEMMs differ"
    return rows


def class_map_rows() -> dict[str, float]:
    x = torch.randint(-3000, 3000, (1, 150, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.int16)
    size = (512, 512)
    up = kernels.upsample(x, "bilinear", size, False)
    assert torch.equal(kernels.upsample_class_map(x, "bilinear", size, False, size), kernels.class_map(up, size))
    return {"upsample, then argmax": median_ms(lambda: kernels.class_map(kernels.upsample(x, "bilinear", size, False), size)),
            "class map in the upsampling's pass": median_ms(lambda: kernels.upsample_class_map(x, "bilinear", size, False, size)),
            "logits and class map in one pass": median_ms(
                lambda: kernels.upsample_class_map(x, "bilinear", size, False, size, logits=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.enabled():
        raise SystemExit(f"the fused kernels are not available here: {kernels.describe()}")
    gemm = gemm_path()
    print(f"ISA {cpu_isa()}, GEMM path {gemm}, {torch.get_num_threads()} threads, {kernels.describe()}")
    attention_gemm = gemm if gemm in kernels.ATTENTION_GEMMS else "int_mm"
    # (the blocked Linear kernel runs on the int8 GEMM paths, not on the int32 matmul)
    linears = linear_rows(gemm) if gemm in ("int_mm", "vnni", "avx2") else {}
    for name, ms in {**attention_rows(attention_gemm), **linears, **class_map_rows()}.items():
        print(f"{name:45s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
