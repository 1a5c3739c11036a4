"""The fused C++ kernels give the intops reference's integers, to the bit, on random and adversarial
inputs, alone and inside a whole converted model (on this CPU's ISA path)."""
import types

import pytest
import torch

import fx_patterns as fxp
from iseg_plugin import intops, kernels
from iseg_plugin.intops.exp import BitExpForm, bit_exp_table, row_span, shiftmax_table
from iseg_plugin.ops import gemm as gemm_kernels
from iseg_plugin.ops import modules as M
from iseg_plugin.ops.gemm import int8_matmul

from test_fx_per_op import HandViT, calibrated

pytestmark = pytest.mark.skipif(not kernels.enabled() and "ISEG_KERNELS=intops" in kernels.describe(),
                                reason="ISEG_KERNELS=intops: the reference path is selected")

I32 = (-(2**31) + 1, 2**31 - 1)


def test_kernels_are_built_here():
    assert kernels.enabled(), kernels.describe()


def adversarial_int32(g, shape):
    x = torch.randint(*I32, shape, generator=g, dtype=torch.int64)
    flat = x.view(-1)
    flat[:8] = torch.tensor([I32[0], I32[1], 0, 1, -1, 2**30, -(2**30), 12345])
    return x


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("in_dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("bounds", [(-128, 127), (-32768, 32767), (-4, 251), (-(2**31), 2**31 - 1)])
def test_requantize_equals_intops(per_channel, in_dtype, bounds):
    g = torch.Generator().manual_seed(hash((per_channel, in_dtype, bounds)) % 2**31)
    channels = 24
    for _ in range(20):
        x = adversarial_int32(g, (5, 7, channels))
        ratio = torch.rand(channels if per_channel else (), generator=g, dtype=torch.float64)
        ratio = ratio * 10.0 ** torch.randint(-12, 1, ratio.shape, generator=g).double()
        ratio = torch.where(torch.rand(ratio.shape, generator=g) < 0.2, -ratio, ratio)
        dyadic = intops.dyadic_from_ratio(ratio)
        bias = torch.randint(-(2**20), 2**20, (channels,), generator=g, dtype=torch.int32)
        x = x.clamp(I32[0] + 2**20, I32[1] - 2**20)  # |x + bias| < 2**31, the contract
        x = x.clamp(*intops.int_range(torch.iinfo(in_dtype).bits)).to(in_dtype)
        dtype = M.storage_dtype(bounds)
        ref = intops.requantize(x.long() + bias.long(), dyadic, bounds).to(dtype)
        out = kernels.requantize(x, bias, dyadic.multiplier, dyadic.shift, bounds, dtype)
        assert out.dtype == dtype and torch.equal(out, ref)
        ref = intops.requantize(x, dyadic, bounds).to(dtype)  # (the int32 input takes intops' clamp-first path)
        assert torch.equal(kernels.requantize(x, None, dyadic.multiplier, dyadic.shift, bounds, dtype), ref)


def test_requantize_shift_zero_and_large_ratio():
    x = torch.tensor([[-3, -1, 0, 1, 3, 100]], dtype=torch.int32)
    for ratio in (1.0, 3.0, 1e-9, 0.5):
        d = intops.dyadic_from_ratio(ratio)
        ref = intops.requantize(x, d, 16).to(torch.int16)
        assert torch.equal(kernels.requantize(x, None, d.multiplier, d.shift, (-32768, 32767), torch.int16), ref)


def test_requantize_add_equals_intops():
    g = torch.Generator().manual_seed(1)
    for bits in (8, 16):
        a = torch.randint(-32768, 32768, (4, 9, 33), generator=g, dtype=torch.int16)
        b = torch.randint(-128, 128, (4, 9, 33), generator=g).to(torch.int8 if bits == 8 else torch.int16)
        a[0, 0, :3] = torch.tensor([-32768, 32767, 0], dtype=torch.int16)
        da, db = intops.dyadic_from_ratio(0.37), intops.dyadic_from_ratio(2.9)
        dtype = M.storage_dtype(intops.int_range(bits))
        ref = intops.requantize_add(a, da, b, db, bits).to(dtype)
        out = kernels.requantize_add(a, b, da, db, intops.int_range(bits), dtype)
        assert torch.equal(out, ref)


def softmax_inputs(g):
    x = torch.randint(-32768, 32768, (3, 5, 17), generator=g, dtype=torch.int16)
    x[0, 0] = 7  # all equal
    x[0, 1] = -32768
    x[0, 1, 4] = 32767  # one huge value
    x[0, 2] = torch.randint(-40, 40, (17,), generator=g, dtype=torch.int16)  # a near-uniform row
    return x


@pytest.mark.parametrize("scale", [1e-4, 0.003, 0.05, 0.9])
def test_softmaxes_equal_intops(scale):
    g = torch.Generator().manual_seed(int(scale * 1e4))
    for dtype in (torch.int8, torch.int16):
        x = softmax_inputs(g).clamp(*intops.int_range(8 if dtype == torch.int8 else 16)).to(dtype)
        i0, params = intops.exp_i0(scale), intops.bit_exp_params(scale)
        for table, ref in ((shiftmax_table(i0, row_span(x)), intops.shiftmax(x, i0, k_out=16)),
                           (bit_exp_table(params, row_span(x)), intops.bit_exp_softmax(x, params, k_out=16))):
            assert table.values is not None
            out = kernels.table_softmax(x, table.values, table.low, 15)
            assert out.dtype == torch.int32 and torch.equal(out.long(), ref)


@pytest.mark.parametrize("in_bits,out_bits", [(16, 8), (16, 16), (8, 8)])
def test_layernorm_equals_intops(in_bits, out_bits):
    g = torch.Generator().manual_seed(in_bits * 100 + out_bits)
    lo, hi = intops.int_range(in_bits)
    in_dtype, out_dtype = M.storage_dtype((lo, hi)), M.storage_dtype(intops.int_range(out_bits))
    for eps in (0, 3, 10**6):
        x = torch.randint(lo, hi + 1, (6, 5, 48), generator=g).to(in_dtype)
        x[0, 0] = 17  # a constant row (eps 0: the bias alone)
        x[0, 1] = torch.tensor([lo, hi] * 24)  # the widest row
        x[0, 2] = torch.randint(-2, 3, (48,), generator=g)  # a row of tiny variance
        params = intops.layernorm_params(torch.randn(48, generator=g) * 2, torch.randn(48, generator=g))
        w, b = params.weight.long(), params.bias.long()
        out = intops.dyadic_from_ratio(params.out_scale / (10 ** -float(torch.rand((), generator=g) * 3)))
        bounds = intops.int_range(out_bits)
        ref = intops.i_layernorm(x, w, b, eps=eps, out=out, out_bits=bounds).to(out_dtype)
        assert torch.equal(kernels.layernorm(x, w, b, eps, out, bounds, out_dtype, 15), ref)


@pytest.mark.parametrize("scale", [0.004, 0.03, 0.2])
def test_poly_gelu_equals_intops(scale):
    g = torch.Generator().manual_seed(int(scale * 1000))
    a, b = intops.fit_poly_gelu(torch.randn(4096, generator=g) * 3)
    params = intops.poly_gelu_params(a, b, scale)
    for x in (torch.arange(-128, 128, dtype=torch.int8),
              torch.randint(-32768, 32768, (4, 333), generator=g, dtype=torch.int16)):
        for bounds, ratio in (((-128, 127), 0.9), ((-4, 251), 0.02), ((-32768, 32767), 1.0)):
            out = intops.dyadic_from_ratio(ratio)
            dtype = M.storage_dtype(bounds)
            ref = intops.requantize(intops.poly_gelu(x, params), out, bounds).to(dtype)
            assert torch.equal(kernels.poly_gelu(x, params, out, bounds, dtype, 8), ref)


@pytest.mark.parametrize("bounds", [(-128, 127), (-32768, 32767)])
def test_probabilities_matmul_equals_intops(bounds):
    from iseg_plugin.ops.gemm import uint16_matmul

    g = torch.Generator().manual_seed(bounds[1])
    p = torch.randint(0, 2**15 + 1, (2, 3, 20, 20), generator=g, dtype=torch.int32)
    p[0, 0, 0] = 0
    p[0, 0, 1] = 2**15  # one-hot row
    v = torch.randint(-128, 128, (2, 3, 20, 16), generator=g, dtype=torch.int8)
    v[0, 0, :, 0] = -128
    for ratio in (2.0**-15, 1e-5, 3e-7):
        out = intops.dyadic_from_ratio(ratio)
        dtype = M.storage_dtype(bounds)
        ref = intops.requantize(uint16_matmul(p.long(), v), out, bounds).to(dtype)
        assert torch.equal(kernels.uint16_matmul_requantize(p, v, out, bounds, dtype, int8_matmul), ref)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_upsample_equals_intops(mode, dtype):
    g = torch.Generator().manual_seed(7)
    info = torch.iinfo(dtype)
    bound = min(info.max, 2**26)  # (bilinear: max|x| D_h D_w < 2**61)
    x = torch.randint(-bound, bound + 1, (2, 3, 5, 7), generator=g).to(dtype)
    x[0, 0] = bound
    x[0, 1, ::2] = -bound - (bound == info.max)  # (int8 / int16: their minimum, one past -max)
    resize = intops.upsample_nearest if mode == "nearest" else intops.upsample_bilinear
    for size in ((80, 112), (5, 7), (13, 9)):
        assert torch.equal(kernels.upsample(x, mode, size, False), resize(x, size).to(dtype))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_class_map_equals_argmax(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (2, 5, 9, 11), generator=g).to(dtype)  # many ties: the first maximum wins
    x[0, :, 0, 0] = torch.iinfo(dtype).min
    assert torch.equal(kernels.class_map(x, (7, 10)), x[..., :7, :10].argmax(1))
    assert torch.equal(kernels.class_map(x, (9, 11)), x.argmax(1))


@pytest.mark.parametrize("mode,corners", [("bilinear", False), ("bilinear", True), ("nearest", False)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_upsample_class_map_equals_class_map_of_upsample(mode, corners, dtype):
    """The class map of upsampled logits in the upsampling's pass: the argmax (first maximum on ties) of the upsampled
    integers, cropped, without them or with them (the same as upsample's), for power-of-two denominators (x16: the
    Segmenter's) and others (x3 / 13 by 9: floor division)."""
    g = torch.Generator().manual_seed(11)
    info = torch.iinfo(dtype)
    bound = min(info.max, 2**26)
    for low, size, crop in (((4, 5), (64, 80), (60, 77)), ((5, 7), (15, 21), (15, 21)), ((5, 7), (13, 9), (12, 9))):
        x = torch.randint(-bound, bound + 1, (2, 6, *low), generator=g).to(dtype)
        x[0, :3] = bound  # ties between channels: the first wins
        x[1, :, 0] = -bound - (bound == info.max)  # the dtype's minimum (int8 / int16)
        x[1, 2, 1] = torch.arange(low[1], dtype=dtype) % 3  # a small spread among large ties
        up = kernels.upsample(x, mode, size, corners)
        assert torch.equal(kernels.upsample_class_map(x, mode, size, corners, crop), kernels.class_map(up, crop))
        assert torch.equal(kernels.class_map(up, crop), up[..., : crop[0], : crop[1]].argmax(1))
        full, classes = kernels.upsample_class_map(x, mode, size, corners, crop, logits=True)  # both in one pass
        assert full.dtype == dtype and torch.equal(full, up) and torch.equal(classes, kernels.class_map(up, crop))


@pytest.mark.parametrize("scale", [0.004, 0.03, 0.31])
@pytest.mark.parametrize("lam", [None, 6.0])
def test_shift_gelus_equal_intops(scale, lam):
    g = torch.Generator().manual_seed(int(scale * 1000))
    for x in (torch.arange(-128, 128, dtype=torch.int8).reshape(4, 64),
              torch.randint(-32768, 32768, (5, 96), generator=g, dtype=torch.int16)):
        x = x.clone()
        x[0] = x[0].min()  # an all-negative row (the reference clamps at 0)
        for bounds, ratio in (((-128, 127), 0.9), ((-4, 251), 0.02), ((-32768, 32767), 1.0)):
            out, dtype = intops.dyadic_from_ratio(ratio), M.storage_dtype(bounds)
            if lam is None:
                i0, cap, fb = intops.exp_i0(scale), None, 0
                gelu = intops.shift_gelu(x, i0)
            else:
                params = intops.lambda_shift_gelu_params(scale, lam)
                i0, cap, fb = params
                gelu = intops.lambda_shift_gelu(x, params)
            ref = intops.requantize(gelu, out, bounds).to(dtype)
            assert torch.equal(kernels.sigmoid_gelu(x, i0, cap, fb, out, bounds, dtype, intops.K_INTER_GELU, 8), ref)


@pytest.mark.parametrize("rows", [1, 129, 1025])  # one row; blocks of uneven length
@pytest.mark.parametrize("in_dtype,offset", [(torch.int8, 0), (torch.int16, 128), (torch.int16, -3), (torch.int8, 7)])
@pytest.mark.parametrize("bounds", [(-128, 127), (-4, 251), (-2**31, 2**31 - 1)])
# the GEMMs' padding: VNNI's k to groups of 4 and n to 64-column panels, AVX2's k to pairs and n to 16-column panels
@pytest.mark.parametrize("k,n", [(40, 24), (42, 70), (41, 17)])
def test_linear_kernel_equals_gemm_then_requantize(gemm_path, rows, in_dtype, offset, bounds, k, n):
    """The Linear module on each GEMM path (the blocked kernel on int_mm, vnni and avx2) gives the integers of its steps
    one after the other: the input shifted and cast (wrapping) into int8, the exact GEMM, the int32 bias add, the
    Requant."""
    g = torch.Generator().manual_seed(rows)
    info = torch.iinfo(in_dtype)
    x = torch.randint(max(info.min, -300), min(info.max, 300) + 1, (2, rows, k), generator=g).to(in_dtype)
    x[0, 0, :3] = torch.tensor([info.min, info.max, 0], dtype=in_dtype)  # shifted past int8: wraps
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    bias = torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    bias[0] = 2**31 - 1  # the bias add wraps in int32
    for per_channel in (False, True):
        ratio = torch.rand(n, generator=g, dtype=torch.float64) * 0.02 if per_channel else torch.tensor(3e-3)
        linear = M.Linear(weight, bias, M.Requant(intops.dyadic_from_ratio(ratio), bounds), offset)
        with torch.no_grad():
            out = linear(x)
            shifted = (x.to(torch.int64) - offset).to(torch.int8)  # torch's cast wraps
            acc = int8_matmul(shifted.reshape(-1, k), weight.t().contiguous()) + bias
            ref = intops.requantize(acc.reshape(2, rows, n), linear.out.dyadic(), bounds).to(M.storage_dtype(bounds))
        assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.parametrize("then_dtype,span", [(torch.int8, 128), (torch.int16, 2**15), (torch.int32, 2**20)])
@pytest.mark.parametrize("gemm_path", ["int_mm", "vnni", "avx2"])  # (the blocked Linear kernel's three GEMMs)
def test_linear_kernel_element_wise_table_on_each_gemm(gemm_path, then_dtype, span):
    """The blocked Linear's element-wise table (LinearThen's) gives the same integers on _int_mm and, where the CPU
    has them, on the packed AVX2 GEMM and on the packed VNNI GEMM, whose tile reads the table by word permutes where
    its values fit int16 and by a gather where they do not (int32 values past 2**15)."""
    if gemm_path not in gemm_kernels.runnable_gemm_paths():
        pytest.skip(f"the CPU lacks {gemm_kernels.NEEDS[gemm_path]} (or the kernels did not build)")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 128, (70, 36), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (36, 80), generator=g, dtype=torch.int8)
    m, e = torch.randint(2**30, 2**31, (80,), generator=g), torch.full((80,), 32)
    table = torch.randint(-span, span, (256,), generator=g).to(then_dtype)
    ints = intops.requantize(x.long() @ w.long(), intops.Dyadic(m, e), (-128, 127))
    assert ints.min() == -128 and ints.max() == 127 and ((ints + 128) // 64).unique().numel() == 4  # every quarter
    out = torch.ops.iseg_kernels.linear(x, w, None, m, e, -128, 127, 0, torch.int8, table,
                                        list(kernels.pack_weight(w, gemm_path)))
    assert out.dtype == then_dtype and torch.equal(out, table[ints + 128])


def _elementwise_modules() -> dict[type, torch.nn.Module]:
    """One module of each class flagged ``ELEMENTWISE`` (LinearThen reads them from their 256 int8 values)."""
    scale, out = 0.05, M.Requant.between(0.05 / 2**7, 0.02, (-128, 127))
    return {M.PolyGELU: M.PolyGELU(intops.poly_gelu_params(-0.3, -2.0, scale), M.Requant.between(0.05 / 2**7, 0.02, (-4, 251))),
            M.Clamp: M.Clamp((0, 100)),
            M.Sigmoid: M.Sigmoid(intops.sigmoid_params(scale), 16, 15, M.Requant.between(2.0**-15, 0.01, (-128, 127))),
            M.XSigmoid: M.XSigmoid(intops.sigmoid_params(scale, 1.702), 16, 15, out),
            M.HardSigmoid: M.HardSigmoid(intops.hard_params(scale), True, out)}


@pytest.mark.parametrize("kind", sorted(_elementwise_modules(), key=lambda cls: cls.__name__), ids=lambda c: c.__name__)
def test_linear_then_an_elementwise_module_equals_the_two_in_a_row(gemm_path, kind):
    """LinearThen reads the element-wise module's values from a table of its 256 int8 inputs inside the Linear's
    blocked kernel: the integers of the two modules one after the other, for every class flagged ``ELEMENTWISE``."""
    flagged = {cls for cls in vars(M).values() if isinstance(cls, type) and getattr(cls, "ELEMENTWISE", False)}
    assert flagged == set(_elementwise_modules())  # a newly flagged class needs its case here
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (2, 65, 32), generator=g, dtype=torch.int8)
    weight = torch.randint(-128, 128, (48, 32), generator=g, dtype=torch.int8)
    linear = M.Linear(weight, None, M.Requant.between(1.0, 1 / 40.0, (-128, 127)))
    then = _elementwise_modules()[kind]
    with torch.no_grad():
        fused = M.LinearThen(linear, then)(x)
        with kernels.reference():
            reference = then(linear(x))
    assert (linear(x) == -128).any() and (linear(x) == 127).any()  # every input of the table's range is reached
    assert fused.dtype == reference.dtype and torch.equal(fused, reference)


# bit-exp: its exponent clamped within ~500 of the row max; bit-exp-fine: never, over the whole int16 span (the real
# models' scores); shift-wide: table values past int32 (its int64 loop)
@pytest.mark.parametrize("softmax", ["bit-exp", "bit-exp-fine", "shift", "shift-wide"])
@pytest.mark.parametrize("rows", [1, 63, 64, 130])  # block edges (ATTENTION_BLOCK = 64)
@pytest.mark.parametrize("keys", [70, 1])  # 1: every probability is 2**15 (the AVX2 path's int16 edge)
@pytest.mark.parametrize("dim", [16, 18])  # the VNNI GEMM reads groups of 4: 18 pads q's rows, 70 and 1 the keys
def test_fused_attention_equals_its_three_operators(gemm_path, softmax, rows, keys, dim):
    """On each GEMM path this CPU runs (forced): on the int8 ones (``_int_mm``, VNNI, AVX2) the attention kernel runs,
    on the int32 matmul the three fused modules do; both give the reference integers."""
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-128, 128, (2, 3, rows, dim), generator=g, dtype=torch.int8)
    kt = torch.randint(-128, 128, (2, 3, dim, keys), generator=g, dtype=torch.int8)
    v = torch.randint(-128, 128, (2, 3, keys, 16), generator=g, dtype=torch.int8)
    q[0, 0, 0] = 127  # a row of huge scores: a near one-hot softmax
    kt[0, 0, :, keys // 2] = 127
    score_scale = 2e-5 if softmax == "bit-exp-fine" else 2e-2
    scores = M.MatMul(False, M.Requant.between(1e-3, score_scale, (-32768, 32767)))
    sm = M.BitExpSoftmax(intops.bit_exp_params(score_scale), 16, -1) if softmax.startswith("bit-exp") else M.Shiftmax(
        intops.exp_i0(2e-2 if softmax == "shift" else 1e-5), 16, -1)
    table = sm.table(row_span(torch.empty(0, dtype=torch.int16)))
    assert (int(table.values.max()) > 2**31 - 1) == (softmax == "shift-wide")
    if softmax.startswith("bit-exp"):  # (no saturation within the int16 span for the fine one)
        assert (table.low == -65535) == (softmax == "bit-exp-fine")
    context = M.MatMul(True, M.Requant.between(2.0**-15 * 0.05, 0.04, (-128, 127)))
    attention = M.Attention(scores, sm, context)
    calls = []
    fuse = kernels.attention
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "attention", lambda *a, **k: calls.append(1) or fuse(*a, **k))
        fused = attention(q, kt, v)
        # views as a qkv Linear's output gives them (rows apart by more than their length, kt a transposed view of
        # the keys' rows): the VNNI path reads them where they lie
        dense = (q, kt.transpose(-2, -1), v)
        views = [torch.zeros(*t.shape[:-1], t.shape[-1] + 7, dtype=torch.int8)[..., : t.shape[-1]] for t in dense]
        for view, t in zip(views, dense):
            view.copy_(t)
        assert torch.equal(attention(views[0], views[1].transpose(-2, -1), views[2]), fused)
        with kernels.reference():
            reference = attention(q, kt, v)
            assert (sm(scores(q, kt)) == 2**15).any() == (keys == 1)
    assert bool(calls) == (gemm_path != "int32")
    assert fused.dtype == reference.dtype == torch.int8 and torch.equal(fused, reference)


@pytest.mark.parametrize("multiplier", [2**31 - 1, 2**30 + 12345])
@pytest.mark.parametrize("shift", [16, 17, 32, 47, 48])  # the kernel's int32 split of the exponent's product: 17..47
def test_fused_bit_exp_over_the_whole_int16_span(gemm_path, multiplier, shift):
    """Scores clamped at both ends of int16 in one row (differences down to -(2**16 - 1)), the exponent's multiplier
    at its largest: the attention's bit-exp gives the reference integers with its exponent's product computed in int32
    halves (shifts 17 to 47) or widened (16, 48), with its clamp acting (16, 17) or not (32 and up)."""
    g = torch.Generator().manual_seed(shift)
    q = torch.randint(-128, 128, (2, 70, 16), generator=g, dtype=torch.int8)
    kt = torch.randint(-128, 128, (2, 16, 500), generator=g, dtype=torch.int8)  # rows of 2 sum chunks (240) and a tail
    v = torch.randint(-128, 128, (2, 500, 16), generator=g, dtype=torch.int8)
    scores = M.MatMul(False, M.Requant.between(1e-3, 5e-4, (-32768, 32767)))
    sm = M.BitExpSoftmax(intops.Dyadic(torch.tensor(multiplier), torch.tensor(shift)), 16, -1)
    attention = M.Attention(scores, sm, M.MatMul(True, M.Requant.between(2.0**-15 * 0.05, 0.04, (-128, 127))))
    with torch.no_grad():
        s = scores(q, kt)
        assert ((s == -32768).any(-1) & (s == 32767).any(-1)).any()  # a row spans the whole int16 range
        fused = attention(q, kt, v)
        with kernels.reference():
            reference = attention(q, kt, v)
    assert torch.equal(fused, reference)


def test_fused_attention_probabilities_of_two_to_the_15_among_many_keys(gemm_path):
    """Probabilities of 2**15 in rows of 40 keys (an exponential table spanning 2**30: where one score tops the others
    by far, every other key's probability rounds to 0) and ordinary rows, where the kernel's vectorised loops take them (16 and 32 at a time): the AVX2 GEMM's
    int16 operand saturates 2**15 and adds v's row once more. The integers of the steps one after the other."""
    if gemm_path == "int32":
        pytest.skip("the int32 path runs the modules, not the attention kernel")
    g = torch.Generator().manual_seed(40)
    q = torch.randint(-8, 8, (2, 9, 16), generator=g, dtype=torch.int8)  # ordinary rows: scores within ~300
    kt = torch.randint(-128, 128, (2, 16, 40), generator=g, dtype=torch.int8)
    v = torch.randint(-3, 3, (2, 40, 16), generator=g, dtype=torch.int8)
    q[:, :4], kt[..., 20] = 127, 127  # rows whose score at key 20 (in the second vector of 16) tops the others by far
    low = -4000
    values = (2**30 >> (-torch.arange(low, 1) // 64).clamp(max=30)).clamp(min=1)  # e(d) halves every 64 below 0
    scores_out = M.Requant(intops.dyadic_from_ratio(torch.tensor(0.05)), (-32768, 32767))
    context_out = M.Requant(intops.dyadic_from_ratio(torch.tensor(0.25)), (-32768, 32767))  # p @ v to the unit
    s = intops.requantize(q.long() @ kt.long(), scores_out.dyadic(), scores_out.bounds)
    e = values[(s - s.amax(-1, keepdim=True)).clamp(min=low) - low]
    p = (e * ((1 << 62) // e.sum(-1, keepdim=True)) + (1 << 46)) >> 47
    assert (p[:, :4].amax(-1) == 2**15).all() and (p[:, 4:] < 2**15).all()
    reference = intops.requantize(p @ v.long(), context_out.dyadic(), context_out.bounds).to(torch.int16)
    fused = kernels.attention(q, kt, v, scores_out, types.SimpleNamespace(values=values, low=low), context_out,
                              torch.int16, 15, gemm_path)
    assert torch.equal(fused, reference)


def test_bit_exp_outside_the_kernels_int32_range_reads_its_table():
    """The attention computes bit-exp element by element only for an exponent dyadic in its int32 range; a shift of
    63 or more (a tiny score scale) takes the table, which holds the same integers."""
    inside = M.BitExpSoftmax(intops.bit_exp_params(2e-5), 16, -1).kernel_exp(65535)
    assert isinstance(inside, BitExpForm)
    outside = M.BitExpSoftmax(intops.Dyadic(torch.tensor(2**30), torch.tensor(63)), 16, -1).kernel_exp(65535)
    assert not isinstance(outside, BitExpForm) and outside.values is not None


@pytest.mark.parametrize("gelu,softmax", [("poly", "bit-exp"), ("lambda-shift", "shift")])
def test_converted_model_same_integers_with_and_without_kernels(monkeypatch, gelu, softmax, gemm_path):
    torch.manual_seed(0)
    model = HandViT().eval()
    prepared, x = calibrated(model, (4, 3, 32, 32), gelu=gelu, softmax=softmax)
    int_model = fxp.convert(prepared, (x,))
    inputs = fxp.quantize_inputs(int_model, x)
    calls = []
    real = torch.ops.iseg_kernels.requantize
    monkeypatch.setattr(kernels, "requantize", lambda *a: calls.append(1) or real(*a[:4], int(a[4][0]), int(a[4][1]), a[5]))
    with torch.no_grad():
        fast = int_model(*inputs)
        assert calls  # the kernels ran
        with kernels.reference():
            reference = int_model(*inputs)
    assert fast.dtype == reference.dtype and torch.equal(fast, reference)


@pytest.mark.parametrize("per_channel", [True, False])
def test_pixels_to_int8_equals_intops(per_channel):
    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (2, 3, 17, 70001 // 17 + 3), generator=g, dtype=torch.uint8)  # > one 2**16 piece
    pixels[0, :, 0, :4] = torch.tensor([0, 255, 128, 1], dtype=torch.uint8)
    for mean, std, scale in (([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], 0.02), ([0.0, 255.0, 127.5],
                             [1.0, 0.5, 3.0], 1e-3), ([128.0] * 3, [64.0] * 3, 10.0)):
        mean_fixed, dyadic = intops.pixel_params(mean, std, scale if per_channel else torch.tensor(scale))
        if not per_channel:
            dyadic = intops.Dyadic(dyadic.multiplier[0], dyadic.shift[0])
        ref = intops.pixels_to_int8(pixels, mean_fixed, dyadic).to(torch.int8)
        out = kernels.pixels_to_int8(pixels, mean_fixed, dyadic)
        assert out.dtype == torch.int8 and torch.equal(out, ref)
        if scale == 1e-3:  # both clamps reached
            assert (ref == 127).any() and (ref == -128).any()
