"""Per-layer choices (IPTQ-ViT's unified metric) and INT4 weights (W4A8): the metric, the packing, the exact
4-bit GEMM, and mixed models that stay integer-only and bit-exact with their fake-quant form."""
import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_fx

import fx_patterns as fxp
from iseg_plugin import intops, kernels, select
from iseg_plugin.deploy import OpAudit, calibrate_prepared, convert, prepare_segmenter
from iseg_plugin.deploy.io import load_deployed, save_deployed
from iseg_plugin.gptq import gptq, gptq_quantize
from iseg_plugin.ops import REGISTRY, Variant
from iseg_plugin.ops.entries import gelu_build
from iseg_plugin.ops import modules as M

from test_deploy import batch, pixels
from test_fx_per_op import HandViT, calibrated
from test_quant_model import build, trained_like


class MLP(nn.Module):
    """The toy layer: Linear -> GELU -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _wrong_scale_gelu(scale, out, samples=None):
    """A deliberately bad GELU: ShiftGELU built for an input scale 8x too large."""
    return M.ShiftGELU(intops.exp_i0(scale * 8), out)


def test_the_metric_ranks_a_deliberately_bad_candidate_last(monkeypatch):
    monkeypatch.setitem(REGISTRY["gelu"].variants, "bad", Variant("bad", None, "wrong scale", gelu_build(_wrong_scale_gelu)))
    torch.manual_seed(0)
    prepared, x = calibrated(MLP().eval(), (4, 8, 16))
    rows = select.score_variants(prepared, [(x,)], entries=("gelu",))
    assert [r["candidate"] for r in rows] == list(REGISTRY["gelu"].variants)  # one site, every candidate
    bad = next(r for r in rows if r["candidate"] == "bad")
    good = [r for r in rows if r is not bad]
    assert bad["score"] < min(r["score"] for r in good) and not bad["chosen"]
    assert bad["sensitivity"] > 10 * max(r["sensitivity"] for r in good)
    assert bad["perturbation"] > 10 * max(r["perturbation"] for r in good)
    assert sum(r["chosen"] for r in rows) == 1
    assert all(r["cost"] > 1 for r in rows)  # integer ops per element, counted on the intops path


def test_the_score_weighs_the_normalised_terms():
    rows = [dict(sensitivity=2.0, perturbation=1.0, cost=10.0), dict(sensitivity=1.0, perturbation=4.0, cost=20.0)]
    weights = select.MetricWeights(sensitivity=1.0, perturbation=0.5, cost=0.1)
    select._ranked(rows, weights)
    assert rows[0]["score"] == pytest.approx(-(1.0 + 0.5 * 0.25 + 0.1 * 0.5))
    assert rows[1]["score"] == pytest.approx(-(0.5 + 0.5 * 1.0 + 0.1 * 1.0))
    assert [r["chosen"] for r in rows] == [False, True]  # -1.1 > -1.175


def test_mixed_weight_widths_meet_the_size_budget():
    def rows():
        return [dict(layer="a", numel=100, sensitivity=1.0, perturbation=1.0),
                dict(layer="b", numel=100, sensitivity=0.1, perturbation=0.1),
                dict(layer="c", numel=50, sensitivity=0.05, perturbation=0.05)]

    # 250 weights: 1000 B in FP32. Ratio 5 -> 200 B: INT4 for b alone (least metric per byte), 250 - 50 = 200 B
    assert [r["chosen"] for r in select.assign_weight_bits(rows(), 5.0)] == [False, True, False]
    # ratio 6 -> 166.7 B: b (200 B), then c (175 B), then a (125 B)
    assert all(r["chosen"] for r in select.assign_weight_bits(rows(), 6.0))
    assert all(r["chosen"] for r in select.assign_weight_bits(rows(), None))  # W4 everywhere
    assert not any(r["chosen"] for r in select.assign_weight_bits(rows(), 4.0))  # INT8 already meets 4x
    with pytest.raises(ValueError, match="size_ratio"):
        select.assign_weight_bits(rows(), 0.0)
    # b pinned to INT8: its 100 B count, the others go INT4 (c: 225 B, a: 175 B) and the budget is not reached
    assert [r["chosen"] for r in select.assign_weight_bits(rows(), 6.0, pinned=("b",))] == [True, False, True]


def test_int4_packing_round_trips_two_a_byte():
    every = torch.arange(-8, 8, dtype=torch.int8)
    packed = intops.pack_int4(every)
    assert packed.dtype == torch.uint8 and packed.numel() == 8
    assert packed[0] == (0x8 | 0x9 << 4)  # -8 (low nibble 0b1000), -7 (0b1001) in the high one
    assert torch.equal(intops.unpack_int4(packed, 16), every)
    odd = torch.randint(-8, 8, (7, 3), dtype=torch.int8)
    assert torch.equal(intops.unpack_int4(intops.pack_int4(odd), 21).reshape(7, 3), odd)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        intops.pack_int4(torch.tensor([8]))


def test_int4_scales_clip_to_the_least_squared_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 96, generator=g, dtype=torch.float64)
    w[:, 0] *= 10  # an outlier per channel: clipping it pays at 4 bits
    full = intops.symmetric_scale(*intops.channel_minmax(w, 0), 4)
    chosen = intops.weight_scale(w, 4)

    def error(scale):
        return ((intops.quantize(w, scale, 4, channel_dim=0) * scale[:, None] - w) ** 2).sum(1)

    assert torch.all(error(chosen) <= error(full)) and torch.any(chosen < full)
    assert torch.equal(intops.weight_scale(w, 8), intops.symmetric_scale(*intops.channel_minmax(w, 0), 8))


def test_the_4bit_gemm_is_exact_on_every_path(gemm_path):
    """INT4 weights in the deployed Linear: each GEMM path this CPU runs (forced: ``_int_mm``, AVX2, int32 matmul),
    the fused requantization and the intops reference all give the float64 products' integers."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-8, 8, (48, 384), generator=g, dtype=torch.int8)
    bias = torch.randint(-(2**20), 2**20, (48,), generator=g, dtype=torch.int32)
    out = M.Requant(intops.dyadic_from_ratio(torch.tensor(3e-4, dtype=torch.float64)), (-128, 127))
    linear = M.Linear(weight, bias, out, weight_bits=4)
    x = torch.randint(-128, 128, (2, 50, 384), generator=g, dtype=torch.int8)
    fast = linear(x)
    with kernels.reference():
        reference = linear(x)
    float_path = linear(x.double())
    exact = intops.requantize(x.long() @ weight.long().t() + bias.long(), out.dyadic(), out.bounds)
    assert torch.equal(fast.long(), exact) and torch.equal(reference.long(), exact)
    assert torch.equal(float_path.long(), exact)


def _mixed_segmenter(tmp_path, quant):
    """A Segmenter calibrated on 4 images, its per-layer choices made, deployed, saved and loaded."""
    model = trained_like(build(None)).eval()
    calib = pixels(4, 1)
    example = model.data_preprocessor(batch(calib[:1]), False)["inputs"]
    options = select.check_quant(quant)
    prepared = prepare_segmenter(model, example, **select.prepare_options(options))
    calibrate_prepared(prepared, model.data_preprocessor, [batch(calib)], 4, show_progress=False)
    scoring = model.data_preprocessor(batch(calib[:2]), False)["inputs"]
    rows = select.choose(prepared, [(image[None],) for image in scoring], options)
    preproc = model.data_preprocessor
    deployed = convert(prepared, example, preproc.mean.flatten().tolist(), preproc.std.flatten().tolist(), rows)
    path = tmp_path / "model.iseg"
    size = save_deployed(deployed, path)
    return prepared, deployed, load_deployed(path), size, rows


def test_a_mixed_model_is_integer_only_packed_and_bit_exact_with_its_fake_quant_form(tmp_path):
    prepared, deployed, loaded, size, rows = _mixed_segmenter(
        tmp_path, dict(select="unified", weight_bits="mixed", size_ratio=6.0))
    linears = {name: m for name, m in loaded.graph.named_modules() if isinstance(m, M.Linear)}
    int4 = [name for name, m in linears.items() if m.weight_bits == 4]
    assert int4 and len(int4) < len(linears)  # mixed: some layers in INT4, not all
    for name, m in linears.items():
        lo, hi = (-8, 7) if m.weight_bits == 4 else (-127, 127)
        assert lo <= int(m.weight_t.min()) and int(m.weight_t.max()) <= hi
    blob = torch.load(tmp_path / "model.iseg", weights_only=True)
    stored = [k for k, v in blob["state_dict"].items() if v.dtype == torch.uint8 and k.endswith("weight_t")]
    assert len(stored) == len(int4)  # two weights a byte in the file
    chosen = {r["layer"]: r["candidate"] for r in rows if r["chosen"] and r["kind"] != "weights"}
    assert chosen and loaded.selection == rows  # the table travels with the file
    images = pixels(2, 7).flip(1).contiguous()
    with torch.no_grad():
        with OpAudit() as audit:
            logits, classes = loaded(images)
        reference, _ = deployed(images)
        fake_logits, fake_classes = loaded.fake_quant(images)
    assert audit.float_ops() == [] and len(audit.records) > 100
    assert torch.equal(logits, reference)  # the file round trip (packing) changes no integer
    assert torch.equal(logits.long(), fake_logits.long()) and torch.equal(classes, fake_classes)


def test_w4a8_takes_every_gemm_to_int4_and_halves_their_bytes(tmp_path):
    (tmp_path / "w8").mkdir(), (tmp_path / "w4").mkdir()
    _, _, w8, size8, _ = _mixed_segmenter(tmp_path / "w8", {})
    _, _, w4, size4, rows = _mixed_segmenter(tmp_path / "w4", dict(weight_bits=4))
    assert rows is None  # nothing chosen per layer
    linears = [m for m in w4.graph.modules() if isinstance(m, M.Linear)]
    assert linears and all(m.weight_bits == 4 for m in linears)
    gemm_bytes = sum(m.weight_t.numel() for m in linears)
    assert size8 - size4 >= 0.45 * gemm_bytes  # half of every GEMM weight byte saved (pickle overhead aside)
    images = pixels(2, 7).flip(1).contiguous()
    with torch.no_grad():
        a, b = w8(images)[0].double() * w8.logit_scale, w4(images)[0].double() * w4.logit_scale
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.9


def test_choices_travel_with_the_state_dict():
    torch.manual_seed(0)
    prepared, x = calibrated(HandViT().eval(), (2, 3, 32, 32))
    rows = select.choose(prepared, [(x,)], select.check_quant(dict(select="unified", weight_bits="mixed")))
    fresh, _ = calibrated(HandViT().eval(), (2, 3, 32, 32))
    fresh.load_state_dict(prepared.state_dict())
    for site_a, site_b in zip(select.sites(prepared), select.sites(fresh)):
        assert (site_a.observer.variant, site_a.observer.weight_bits) == (site_b.observer.variant,
                                                                          site_b.observer.weight_bits)
    assert any(s.observer.weight_bits == 4 for s in select.sites(fresh))
    assert any(r["kind"] == "weights" and r["chosen"] for r in rows)
    old = {k: v for k, v in prepared.state_dict().items() if not k.endswith(("variant_name", "gemm_weight_bits"))}
    fresh, _ = calibrated(HandViT().eval(), (2, 3, 32, 32))
    fresh.load_state_dict(old)  # a record from before the choices were saved: the qconfig's choices stay
    assert all(s.observer.weight_bits == 8 for s in select.sites(fresh))


def test_qconfig_pt2e_and_per_module_weight_widths():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    def widths(prepared):
        with torch.no_grad():
            prepared(x)
        model = fxp.convert(prepared, (x,))
        return {name: m.weight_bits for name, m in model.graph_module.named_modules() if isinstance(m, M.Linear)}

    model = HandViT().eval()
    assert set(widths(fxp.prepare(model, (x,), weight_bits=4)).values()) == {4}
    assert set(widths(fxp.prepare_pt2e(model, (x,), weight_bits=4)).values()) == {4}
    mapping = fxp.get_iseg_qconfig_mapping().set_module_name("head", fxp.iseg_qconfig(weight_bits=4))
    per_module = widths(prepare_fx(model, mapping, (x,), backend_config=fxp.get_iseg_backend_config()))
    assert per_module.pop("head") == 4 and set(per_module.values()) == {8}
    with pytest.raises(ValueError, match="weight_bits"):
        fxp.get_iseg_qconfig_mapping(weight_bits=3)


@pytest.mark.parametrize("prepare", [fxp.prepare, fxp.prepare_pt2e], ids=["fx", "pt2e"])
def test_int8_weights_pin_the_gemms_under_a_module(prepare):
    """W4A8 with one block kept at INT8 weights, found by module path on FX (called modules) and PT2E (function
    calls, their ``nn_module_stack``) graphs alike; a path with no GEMM under it is refused by name."""
    torch.manual_seed(0)
    model = HandViT().eval()
    prepared, x = calibrated(model, (2, 3, 32, 32), prepare=prepare, weight_bits=4)
    pinned = select.keep_int8(prepared, ["blocks.1"])
    in_block = sum(isinstance(m, nn.Linear) for m in model.blocks[1].modules())
    assert len(pinned) == in_block == 4  # qkv, proj, fc1, fc2
    widths = [m.weight_bits for m in fxp.convert(prepared, (x,)).graph_module.modules() if isinstance(m, M.Linear)]
    assert sorted(widths) == [4] * (len(widths) - in_block) + [8] * in_block
    with pytest.raises(ValueError, match=r"no Linear / Conv2d under 'blocks.2'.*\['blocks', 'head', 'patch'\]"):
        select.keep_int8(prepared, ["blocks.2"])


@pytest.mark.parametrize("quant,error", [(dict(weight_bits=2), "weight_bits"), (dict(select="best"), "select"),
                                         (dict(size_ratio=-1), "size_ratio"), (dict(bits=4), "unknown key"),
                                         (dict(int8_weights="decode_head"), "list of module paths")])
def test_bad_quant_options_are_refused(quant, error):
    with pytest.raises(ValueError, match=error):
        select.check_quant(quant)


def test_the_mmseg_model_makes_the_choices_when_calibrated():
    from iseg_plugin.mmseg import calibrate
    from test_quant_model import images, loader

    model = build(dict(select="unified", weight_bits="mixed"))
    model.load_state_dict(trained_like(build(None)).state_dict(), strict=False)
    calibrate(model, loader(images(4, seed=1)), num_samples=4, show_progress=False)
    bits = [o.weight_bits for o in model.observers.values()]
    assert 4 in bits and 8 in bits
    state = model.state_dict()
    assert any(k.endswith("gemm_weight_bits") and int(v) == 4 for k, v in state.items())  # checkpoints keep it
    deployed = model.eval().deploy((64, 64))
    assert any(isinstance(m, M.Linear) and m.weight_bits == 4 for m in deployed.graph.modules())


def test_the_mmseg_model_keeps_its_decoder_weights_int8_at_w4():
    from iseg_plugin.mmseg import calibrate
    from test_quant_model import images, loader

    model = build(dict(weight_bits=4, int8_weights=["decode_head"]))
    model.load_state_dict(trained_like(build(None)).state_dict(), strict=False)
    calibrate(model, loader(images(2, seed=1)), num_samples=2, show_progress=False)
    deployed = model.eval().deploy((64, 64))
    widths = {name: m.weight_bits for name, m in deployed.graph.named_modules() if isinstance(m, M.Linear)}
    assert {w for n, w in widths.items() if n.startswith("decode_head")} == {8}
    assert {w for n, w in widths.items() if n.startswith("backbone")} == {4}


def test_gptq_rounds_with_less_output_error_than_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    q, scale = gptq_quantize(w, x.T @ x, 4)
    assert torch.equal(q, q.round()) and -8 <= int(q.min()) and int(q.max()) <= 7
    nearest = intops.quantize(w, scale, 4, channel_dim=0)

    def output_error(ints):
        return float(((x @ (ints * scale[:, None]).T - x @ w.T) ** 2).sum())

    assert output_error(q) < 0.7 * output_error(nearest)


def test_gptq_weights_lower_the_model_error_and_travel_with_the_state_dict():
    torch.manual_seed(0)
    model = HandViT().eval()
    x = torch.randn(4, 3, 32, 32)
    prepared = fxp.prepare(model, (x,), weight_bits=4)
    with torch.no_grad():
        prepared(x)
        reference = model(x)

    def error(prepared):
        int_model = fxp.convert(prepared, (x,))
        out = int_model(*fxp.quantize_inputs(int_model, x)).double() * int_model.output_scales[0]
        return float(((out - reference) ** 2).sum() / (reference**2).sum()), int_model

    nearest, _ = error(prepared)
    assert gptq(prepared, [(x,)]) == 10  # the patch Conv2d, 8 block Linears, the head
    rounded, int_model = error(prepared)
    assert rounded < 0.5 * nearest
    fresh = fxp.prepare(HandViT().eval(), (x,), weight_bits=4)
    fresh.load_state_dict(prepared.state_dict())
    _, again = error(fresh)
    for a, b in zip(int_model.graph_module.buffers(), again.graph_module.buffers()):
        assert torch.equal(a, b)
    with pytest.raises(fxp.LoweringError, match="GPTQ"):
        fxp.trainable(prepared, (x,))


def test_gptq_rounds_convolutions_of_any_geometry_on_their_own_columns():
    """A padded, strided conv, a depthwise one (one GPTQ per group) and F.conv2d at W4: GPTQ rounds each on its
    im2col columns, and the W4A8 model's error falls below nearest rounding's."""
    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.dw = nn.Conv2d(3, 16, 5, 2, 2), nn.Conv2d(16, 16, 3, 1, 1, groups=16)
            self.w = nn.Parameter(torch.randn(8, 16, 3, 3) * 0.1)

        def forward(self, x):
            return torch.nn.functional.conv2d(self.dw(self.a(x)), self.w, None, 1, "same")

    torch.manual_seed(0)
    model, x = Convs().eval(), torch.randn(4, 3, 24, 24)
    prepared = fxp.prepare(model, (x,), weight_bits=4)
    with torch.no_grad():
        prepared(x)
        reference = model(x)

    def error():
        int_model = fxp.convert(prepared, (x,))
        out = int_model(*fxp.quantize_inputs(int_model, x)).double() * int_model.output_scales[0]
        return float(((out - reference) ** 2).sum() / (reference**2).sum())

    nearest = error()
    assert gptq(prepared, [(x,)]) == 3
    assert error() < nearest


def test_qat_starts_from_the_gptq_model_and_trains_on_its_scales():
    """QAT of a model with a frozen prefix at W4A8: GPTQ rounds every GEMM at the calibration, the frozen ones
    keep its integers, the trained head is set to its integers times its scales. The starting integer model
    is the PTQ (GPTQ) model to the bit; the trainable form gives the converted model's integers; an SGD step
    moves the head's integers on the scales GPTQ chose."""
    import copy

    torch.manual_seed(0)
    prepared, x = calibrated(HandViT(), (4, 3, 32, 32), weight_bits=4)
    ptq = copy.deepcopy(prepared)
    assert gptq(ptq, [(x,)]) == 10
    ptq_model = fxp.convert(ptq, (x,))
    for name, p in prepared.named_parameters():
        p.requires_grad_(name.startswith("head"))
    assert gptq(prepared, [(x,)], for_training=True) == 10  # the patch Conv2d, 8 block Linears, the head
    observers = {s.node.name: s.observer for s in select.sites(prepared, select.GEMMS)}
    rounded = {name for name, o in observers.items() if o.weight_int.numel()}
    assert len(rounded) == 9 and not any(name.startswith("head") for name in rounded)
    (head,) = [o for name, o in observers.items() if name.startswith("head")]
    scales = head.weight_scale.clone()
    assert scales.numel() == prepared.head.weight.shape[0]

    int_model = fxp.convert(prepared, (x,))
    (inputs,) = fxp.quantize_inputs(int_model, x)
    assert torch.equal(int_model(inputs), ptq_model(inputs))
    qat = fxp.trainable(prepared, (x,))
    out = qat(inputs.double())
    assert torch.equal(out.detach(), int_model(inputs).double())

    start = intops.quantize(prepared.head.weight.detach().double(), scales, 4, channel_dim=0)
    out.square().mean().backward()
    assert prepared.head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        prepared.head.weight -= 0.5 * scales[:, None].float() * prepared.head.weight.grad.sign()
    moved = intops.quantize(prepared.head.weight.detach().double(), scales, 4, channel_dim=0)
    assert torch.equal(head.weight_scale, scales) and not torch.equal(moved, start)
    int_model = fxp.convert(prepared, (x,))
    trained = fxp.trainable(prepared, (x,))(inputs.double())
    with torch.no_grad(), OpAudit() as audit:  # the head's integers on GPTQ's scales: still integer-only
        out = int_model(inputs)
    assert audit.float_ops() == [] and not out.dtype.is_floating_point
    assert torch.equal(trained.detach(), out.double())
    assert not torch.equal(out, ptq_model(inputs))
