"""ONNX exports: integer-only ONNX (every tensor integer-typed, onnxruntime and TVM bit-exact) and QONNX (qonnx bit-exact)."""
import functools
import io
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from iseg_plugin.cli import main
from iseg_plugin.deploy.io import save_deployed
from iseg_plugin.export import (NotIntegerOnlyError, TvmMissingError, TvmModel, check_integer_only, execute_qonnx,
                                export_integer_module, export_onnx_int, export_qonnx, onnx_session,
                                qonnx_inference_cost)
from iseg_plugin.export import onnx_int
from iseg_plugin.export.onnx_int import expand_shifts, integer_symbolics
from iseg_plugin.ops import gemm
from iseg_plugin.ops import modules as M

from test_deploy import deployed_pair, pixels
from test_quant_model import build

ort.set_default_logger_severity(3)


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def adversarial_images():
    yield pixels(1, 5).flip(1).contiguous()
    yield torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    yield torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    board = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    board[..., ::2, ::2] = 255
    board[..., 1::2, 1::2] = 255
    yield board


EXPORT_VARIANTS = [
    (("lambda-shift", "shift"), {}),  # nearest, no L2
    (("poly", "bit-exp"), {"l2_norm": True, "upsample": "bilinear"}),
    (("shift", "bit-exp"), {}),
]


# the ONNX GEMM forms onnxruntime computes exactly: u8s8 only with AVX-512 VNNI (its AVX2 kernel saturates)
EXACT_GEMMS = ["u8u8", pytest.param("u8s8", marks=pytest.mark.skipif(
    gemm.onnx_gemm_for_this_cpu() != "u8s8", reason="the CPU lacks avx512_vnni: onnxruntime's uint8 x int8 GEMM "
                                                    "saturates without it"))]


def right_operand_types(proto: onnx.ModelProto) -> set[int]:
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input]}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return {types[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulInteger"}


@functools.cache
def deployed_variant(index: int):
    """The deployed model of EXPORT_VARIANTS[index], built once (exports do not change it)."""
    return deployed_pair(*EXPORT_VARIANTS[index])[1]


@functools.cache
def exported_variant(index: int, form: str) -> onnx.ModelProto:
    """Its integer-only export in the GEMM form ``form``: one per model, whatever the GEMM path (see
    test_the_export_is_the_same_graph_on_every_gemm_path)."""
    return export_onnx_int(deployed_variant(index), gemm=form)


@pytest.mark.parametrize("form", EXACT_GEMMS)
@pytest.mark.parametrize("index", range(len(EXPORT_VARIANTS)))
def test_onnxruntime_is_bit_exact_with_the_deployed_model(index, form, gemm_path):
    deployed, proto = deployed_variant(index), exported_variant(index, form)
    assert right_operand_types(proto) == {TensorProto.INT8 if form == "u8s8" else TensorProto.UINT8}
    sess = onnx_session(proto)
    for image in adversarial_images():
        logits, classes = sess.run(None, {"pixels": image.numpy()})
        ref_logits, ref_classes = deployed(image)
        assert logits.dtype == np.int16
        assert np.array_equal(logits, ref_logits.numpy())
        assert np.array_equal(classes, ref_classes.numpy())


def graph_parts(proto: onnx.ModelProto) -> dict[str, list[bytes]]:
    return {"nodes": [n.SerializeToString() for n in proto.graph.node],
            "initializers": [t.SerializeToString() for t in proto.graph.initializer]}


def test_the_export_is_the_same_graph_on_every_gemm_path(tmp_path):
    """The exported graphs depend on the deployed model and the ONNX GEMM form only, never on the GEMM path (or
    kernels) of the exporting CPU: each form exported under each path this machine runs, forced, node for node."""
    deployed = deployed_variant(1)
    exports = {"u8u8": functools.partial(export_onnx_int, deployed, gemm="u8u8"),
               "qonnx": functools.partial(export_qonnx, deployed)}
    for name, export in exports.items():
        graphs = {}
        for path in gemm.runnable_gemm_paths():
            with gemm.forced(path):
                graphs[path] = graph_parts(export(tmp_path / f"{name}-{path}.onnx"))
        first, *others = graphs
        assert len(graphs[first]["nodes"]) > 100, name
        for path in others:
            assert graphs[path] == graphs[first], f"{name}: the graph exported on {path} differs from {first}'s"


@pytest.mark.parametrize("variants,head_extra", EXPORT_VARIANTS[:2])
def test_tvm_is_bit_exact_with_the_deployed_model(variants, head_extra):
    pytest.importorskip("tvm", reason="apache-tvm is not installed (the optional extra: pip install -e '.[tvm]')")
    _, deployed = deployed_pair(variants, head_extra)
    model = TvmModel(export_onnx_int(deployed, gemm="u8u8"))  # (verified on uint8 x uint8 GEMMs)
    matmuls = [f.script() for var, f in model.module.functions_items() if "matmul" in var.name_hint]
    assert matmuls and all("T.parallel" in m for m in matmuls)  # the schedule rules applied
    assert any("T.vectorized" in m for m in matmuls)
    for image in adversarial_images():
        logits, classes = model(image.numpy())
        ref_logits, ref_classes = deployed(image)
        assert logits.dtype == np.int16
        assert np.array_equal(logits, ref_logits.numpy())
        assert np.array_equal(classes, ref_classes.numpy())
    with pytest.raises(ValueError, match="uint8 pixels of shape"):
        model(image.numpy().astype(np.float32))


def test_tvm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm now raises ImportError
    with pytest.raises(TvmMissingError, match=r"pip install -e '.\[tvm\]'"):
        TvmModel(float_graph())


class Products(nn.Module):
    def forward(self, a, b, p):
        return gemm.int8_matmul(a, b), gemm.uint16_matmul(p, b)


@pytest.mark.parametrize("form", EXACT_GEMMS)
def test_onnx_gemms_are_exact_at_the_extremes(form):
    """The products that saturate a pairwise int16 kernel: every operand pair at +-128 * 127 or -128 * -128."""
    k = 96
    a = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2), [127, -128] * (k // 2)], dtype=torch.int8)
    b = a.t().contiguous()
    p = torch.tensor([[2**15] * k, [0] * k, [255, 2**15 - 1] * (k // 2), [256] * k])  # softmax probabilities
    proto = export_integer_module(Products(), (a, b, p), ["a", "b", "p"], ["ab", "pb"], gemm=form)
    ab, pb = onnx_session(proto).run(None, {"a": a.numpy(), "b": b.numpy(), "p": p.numpy()})
    assert np.array_equal(ab, (a.long() @ b.long()).numpy())
    assert np.array_equal(pb, (p @ b.long()).numpy())


def test_onnx_session_refuses_uint8_by_int8_gemms_without_vnni(monkeypatch):
    proto = export_integer_module(Products(), (torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 2, dtype=torch.int8),
                                               torch.ones(2, 3, dtype=torch.int64)), ["a", "b", "p"], ["ab", "pb"],
                                  gemm="u8s8")
    monkeypatch.setattr(onnx_int, "onnx_gemm_for_this_cpu", lambda: "u8u8")
    monkeypatch.setattr(onnx_int, "cpu_isa", lambda: "avx2")
    with pytest.raises(ValueError, match=r"exact in onnxruntime only with AVX-512 VNNI, and this CPU has avx2.*--gemm u8u8"):
        onnx_session(proto)
    with pytest.raises(ValueError, match="unknown ONNX GEMM form 'u4u4'"):
        export_integer_module(Products(), (), [], [], gemm="u4u4")


def test_a_u8s8_file_says_it_needs_vnni_and_is_refused_elsewhere_without_its_metadata(tmp_path, monkeypatch, capsys):
    import iseg_plugin.export

    operands = (torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 2, dtype=torch.int8), torch.ones(2, 3, dtype=torch.int64))

    def export_products(model, path, form, replace=True):  # (the CLI's export, on a small integer module)
        proto = export_integer_module(Products(), operands, ["a", "b", "p"], ["ab", "pb"], gemm=form)
        onnx.save(proto, str(path))
        return proto

    _, deployed = deployed_pair()
    save_deployed(deployed, tmp_path / "m.iseg")
    monkeypatch.setattr(iseg_plugin.export, "export_onnx_int", export_products)
    assert main(["export", str(tmp_path / "m.iseg"), "--gemm", "u8s8", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "note: this file needs a CPU with AVX-512 VNNI: onnxruntime's uint8 x int8 MatMulInteger gives wrong " \
           "results elsewhere (export with --gemm u8u8 for any CPU)" in capsys.readouterr().out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}[onnx_int.REQUIRES_KEY] == onnx_int.U8S8_NEEDS
    del proto.metadata_props[:]  # stripped by a tool: the graph's own types still say uint8 x int8
    monkeypatch.setattr(onnx_int, "onnx_gemm_for_this_cpu", lambda: "u8u8")
    with pytest.raises(ValueError, match="exact in onnxruntime only with AVX-512 VNNI"):
        onnx_session(proto)
    u8u8 = export_products(None, tmp_path / "u8u8.onnx", "u8u8")
    assert not onnx_int.has_u8s8_gemms(u8u8) and onnx_int.REQUIRES_KEY not in {p.key for p in u8u8.metadata_props}
    assert main(["export", str(tmp_path / "m.iseg"), "--gemm", "u8u8", "--out", str(tmp_path / "m2.onnx")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_an_export_does_not_replace_a_file_another_run_wrote_meanwhile(tmp_path, monkeypatch, capsys):
    _, deployed = deployed_pair()
    save_deployed(deployed, tmp_path / "m.iseg")
    out = tmp_path / "m.onnx"

    def other_run_writes_first(*args, **kwargs):  # this run passed the early check; the other one finishes first
        out.write_bytes(b"the other run's export")
        return export_integer_module(Products(), (torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 2, dtype=torch.int8),
                                                  torch.ones(2, 3, dtype=torch.int64)), ["a", "b", "p"], ["ab", "pb"])

    monkeypatch.setattr(onnx_int, "export_integer_module", other_run_writes_first)
    assert main(["export", str(tmp_path / "m.iseg"), "--gemm", "u8u8", "--out", str(out)]) == 1
    assert "m.onnx appeared while this run was working (another run wrote it): it is kept" in capsys.readouterr().err
    assert out.read_bytes() == b"the other run's export"
    assert main(["export", str(tmp_path / "m.iseg"), "--gemm", "u8u8", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"the other run's export"


class Shifts(nn.Module):
    def forward(self, x, shift, x32, small):
        return x >> shift, x >> 7, small << shift, small << 3, torch.clamp(x32, -128, 127), torch.sign(x)


def test_shift_clamp_and_sign_lowerings_are_exact_at_the_extremes():
    x = torch.tensor([-2**63, -2**62 - 1, -2**40 + 3, -129, -1, 0, 1, 127, 2**40 + 5, 2**62, 2**63 - 1] * 6)
    shift = torch.arange(x.numel()) % 63  # 0 .. 62, every one once
    x32 = torch.tensor([-2**31, -2**31 + 1, -129, -128, 0, 127, 128, 2**31 - 1], dtype=torch.int32)
    small = (x % 7) - 3  # shifted left by up to 62: wraps modulo 2**64 in both runtimes
    inputs = (x, shift, x32, small)
    buffer = io.BytesIO()
    with integer_symbolics():
        torch.onnx.export(Shifts(), inputs, buffer, dynamo=False, opset_version=18)
    proto = expand_shifts(onnx.load_from_string(buffer.getvalue()))
    ops = {n.op_type for n in proto.graph.node}
    assert "BitShift" in ops and "Clip" in ops and not ops & {"Where", "Div", "Mod"}
    out = session(proto).run(None, {i.name: t.numpy() for i, t in zip(proto.graph.input, inputs)})
    for got, want in zip(out, Shifts()(*inputs), strict=True):
        assert np.array_equal(got, want.numpy())


def float_graph() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="/decoder/mask_norm/Cast"),
         helper.make_node("Sqrt", ["xf"], ["/decoder/mask_norm/Sqrt_output_0"]),
         helper.make_node("Cast", ["/decoder/mask_norm/Sqrt_output_0"], ["y"], to=TensorProto.INT32)],
        "g", [helper.make_tensor_value_info("x", TensorProto.INT32, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_checker_names_the_float_tensors():
    with pytest.raises(NotIntegerOnlyError, match=r"/decoder/mask_norm/Sqrt_output_0 \(FLOAT\)"):
        check_integer_only(float_graph())


def test_a_module_without_integer_lowering_is_named():
    _, deployed = deployed_pair()

    class FloatNorm(nn.Module):  # a true division: no integer lowering exists
        def forward(self, x):
            return x / 3

    name = [n for n, m in deployed.graph.named_children() if isinstance(m, M.LayerNorm)][-1]
    setattr(deployed.graph, name, FloatNorm())
    with pytest.raises(NotIntegerOnlyError, match=f"{name}.*no integer lowering"):
        export_onnx_int(deployed)


def test_exporting_a_model_that_is_not_deployed_is_refused():
    with pytest.raises(TypeError, match="DeployedSegmenter"):
        export_onnx_int(build(None))


def test_cli_export(tmp_path, capsys, gemm_path):
    deployed = deployed_variant(1)
    save_deployed(deployed, tmp_path / "m.iseg")
    assert main(["export", str(tmp_path / "m.iseg"), "--format", "onnx-int", "--gemm", "u8u8",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert "every tensor integer-typed; GEMMs u8u8" in capsys.readouterr().out
    image = pixels(1, 3).flip(1).contiguous()
    logits, _ = session(onnx.load(str(tmp_path / "m.onnx"))).run(None, {"pixels": image.numpy()})
    assert np.array_equal(logits, deployed(image)[0].numpy())


def test_qonnx_executes_bit_exact_with_qonnx(tmp_path):
    deployed = deployed_variant(1)
    proto = export_qonnx(deployed, tmp_path / "m.qonnx.onnx")
    custom = {n.op_type for n in proto.graph.node if n.domain == "iseg_plugin.export.qonnx_ops"}
    assert custom == {"DyadicRequant", "ResidualAdd", "ILayerNorm", "PolyGELU", "BitExpSoftmax", "IntL2Norm", "IntResize"}
    for node in proto.graph.node:  # integer attributes only, no tensor inputs but the data
        if node.domain == "iseg_plugin.export.qonnx_ops":
            assert {a.type for a in node.attribute} <= {onnx.AttributeProto.INT, onnx.AttributeProto.INTS}
            assert len(node.input) == (2 if node.op_type == "ResidualAdd" else 1)
    image = pixels(1, 5).flip(1).contiguous()
    out = execute_qonnx(tmp_path / "m.qonnx.onnx", image.numpy())
    logits, classes = deployed(image)
    assert np.array_equal(out["logits"], logits.numpy())
    assert np.array_equal(out["classes"], classes.numpy())


def test_qonnx_export_refuses_a_non_deployed_model(tmp_path):
    with pytest.raises(TypeError, match="DeployedSegmenter"):
        export_qonnx(build(None), tmp_path / "m.onnx")


@pytest.mark.parametrize("index", range(len(EXPORT_VARIANTS)))
def test_qonnx_tools_read_the_export_as_it_is(tmp_path, index):
    """qonnx's own first steps on the file, with no patch: cleanup, shape and datatype inference, inference
    cost, execution (bit-exact after cleanup)."""
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    deployed = deployed_variant(index)
    export_qonnx(deployed, tmp_path / "m.qonnx.onnx")
    model = cleanup_model(ModelWrapper(str(tmp_path / "m.qonnx.onnx")))
    model = model.transform(InferShapes()).transform(InferDataTypes())
    types = {n.op_type: model.get_tensor_datatype(n.output[0]) for n in model.graph.node
             if n.domain == "iseg_plugin.export.qonnx_ops"}
    assert types["ILayerNorm"] in (DataType["INT8"], DataType["INT16"])
    assert {types[op] for op in types if op in ("Shiftmax", "BitExpSoftmax")} == {DataType["UINT16"]}
    image = pixels(1, 7).flip(1).contiguous()
    out = execute_onnx(model, {model.graph.input[0].name: image.numpy()})  # (cleanup renames the tensors)
    logits, classes = deployed(image)
    assert np.array_equal(out[model.graph.output[0].name], logits.numpy())
    assert np.array_equal(out[model.graph.output[1].name], classes.numpy())
    cost = qonnx_inference_cost(tmp_path / "m.qonnx.onnx")
    assert cost["total_macs"] > 0
    # every GEMM counted with its integer operand types (INT8 weights and activations, UINT16 probabilities)
    assert {k for k in cost if k.startswith("op_mac_")} == {"op_mac_INT8_INT8", "op_mac_UINT16_INT8"}
    assert "MatMul" not in cost["unsupported"] and "ILayerNorm" in cost["unsupported"]  # (qonnx costs MACs only)


def test_cli_export_qonnx_prints_the_inference_cost(tmp_path, capsys):
    _, deployed = deployed_pair()
    save_deployed(deployed, tmp_path / "m.iseg")
    assert main(["export", str(tmp_path / "m.iseg"), "--format", "qonnx"]) == 0
    out = capsys.readouterr().out
    assert "qonnx inference cost:" in out and "INT8 x INT8" in out and "GBOPs" in out
    assert (tmp_path / "m.qonnx.onnx").is_file()
