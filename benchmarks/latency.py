"""Batch-1 latency, model sizes and GEMM memory traffic of FP32 vs integer-only Segmenters at 512x512.

    .venv/bin/python benchmarks/latency.py [--models vit-t,vit-s,vit-b] [--runs 5] [--skip-torch-int] [--tvm-models vit-t,vit-s,vit-b]
    .venv/bin/python benchmarks/latency.py --report-only   # rewrite the report from the saved models (docs/latency.json)
    .venv/bin/python benchmarks/latency.py --graph-only    # recompute only GEMM traffic and op profiles (no timing)
    .venv/bin/python benchmarks/latency.py --qonnx-only    # only the QONNX export's qonnx inference cost

For each size (mmseg's Segmenter ViT-T/S/B ADE20K configs, 150 classes, the plugin's decoder) it
builds the float model with random weights (latency does not depend on their values), quantizes it
op by op (calibration on one random image), deploys and exports it, then times,
in one process on this CPU: FP32 PyTorch, FP32 onnxruntime (TorchScript export of the float
model), onnxruntime's own static INT8 QDQ quantization of it (not integer-only), OpenVINO on it in FP32, at its
default precision and quantized to INT8 by NNCF (where the extra ``.[bench]`` is installed), the integer-only ONNX graph in onnxruntime and in TVM (Relax with the plugin's CPU schedules,
no tuning; where apache-tvm is installed: the extra ``.[tvm]``) and the deployed integer model in PyTorch. Each time is
the median of ``--runs`` runs (below). It profiles the
integer onnxruntime graph by op type, computes the memory traffic of its Linear / Conv / MatMul
nodes in bits (I-Segmenter's Table 7) from the graph, and writes docs/performance.md and .png.

The rows take turns round by round, each timing its second run of the turn, so a drift of the machine's speed (a
shared VM's) moves them alike and their ratios hold.

    # the integer model built for AVX2 on a wider CPU (docs/avx2_level/)
    ISEG_KERNELS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/latency.py --models vit-s,vit-b
        --docs docs/avx2_level --results docs/avx2_level/latency.json   # (one command line)

The peers still use the whole CPU, so the model's ratios to them are lower bounds of an AVX2-only CPU's. (Not with
``ONEDNN_MAX_CPU_ISA=AVX2``: NNCF's quantization crashes under it, a segmentation fault in OpenVINO.)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from onnx import TensorProto

import iseg_plugin.mmseg  # noqa: F401  (registers the plugin's models)
from fx_patterns import SegmentorLogits
from iseg_plugin.deploy import calibrate_prepared, convert, prepare_segmenter
from iseg_plugin.deploy.io import save_deployed
from iseg_plugin.export import TvmMissingError, TvmModel, export_onnx_int, export_qonnx, onnx_session, qonnx_inference_cost
from iseg_plugin import kernels
from iseg_plugin.ops.gemm import cpu_isa, gemm_path, onnx_gemm_for_this_cpu
from iseg_plugin.ptq import float_model_config

REPO = Path(__file__).resolve().parent.parent
SIZE = (512, 512)
BITS = {TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.INT32: 32,
        TensorProto.INT64: 64, TensorProto.INT16: 16}
GEMMS = ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger")
FORMS = {"u8u8": "uint8 x uint8", "u8s8": "uint8 x int8"}
PYTORCH_GEMMS = {"vnni": "the kernels' own AVX-512 VNNI GEMM (weights packed once, epilogues in registers)",
                 "int_mm": "torch._int_mm (oneDNN, VNNI)",
                 "avx2": "the kernels' AVX2 int8 GEMM (no VNNI; int16 pairs by vpmaddwd, exact)",
                 "int32": "int32 matmul (no VNNI: _int_mm is ~50x slower)"}
# what limits the deployed model, per GEMM path (the profile paragraph of the report)
_INT8_ATTENTION = [
    "The probabilities' low bytes enter an int8 GEMM, their high bytes (non-zero for at most ~128 keys of a row) a",
    "sparse product. Attention runs by (head, 64-row block) tasks on both threads, each GEMM of a task on one",
    "thread; its softmax rows are three vectorised passes, bit-exp's exponential computed element by element",
    "(docs/architecture.md). OpenVINO INT8 keeps softmax, LayerNorm and GELU in float (its own kernels) between",
    "INT8 GEMMs: not integer-only."]
PROFILE_NOTES = {
    "vnni": ["The Linears and the attention's GEMMs run on the kernels' AVX-512 VNNI GEMM (weights packed once; keys",
             "and values once per head, read where the qkv Linear left them); a Linear's bias, requantization and",
             "following element-wise GELU (its 256 int8 values, read by word permutes) are applied to each tile in",
             "registers. The last upsampling and the class map are one pass, outside the graph's modules: it is",
             "in \"(between modules)\", with the Python between them.", *_INT8_ATTENTION],
    "int_mm": ["The attention's GEMMs are at::_int_mm calls, one per block of query rows; Linears run by blocks of",
               "rows on at::_int_mm, each block requantized (and its GELU read from its 256 int8 values) in cache.",
               *_INT8_ATTENTION],
    "avx2": ["The probabilities enter the AVX2 GEMM whole (int16): two GEMMs per head, as FP32. Without VNNI the GEMMs",
             "are the limit: the exact AVX2 kernel (int16 pairs, 16 products per vpmaddwd) runs about as fast as torch's",
             "FP32 matmul (ratio above), so the integer model is about as fast as FP32 PyTorch, without VNNI's margin."],
    "int32": ["The GEMMs run as int32 matmuls (the kernels did not build), several times slower than FP32's."],
}


def build(name: str):
    cfg = Config.fromfile(str(REPO / "mmseg_configs" / f"isegmenter_{name}_ade20k.py"))
    init_default_scope("mmseg")
    model = MODELS.build(float_model_config(cfg))
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SETTLE_SECONDS = 0.1  # the pause before each interleaved run


def interleaved_medians(rows: dict, runs: int) -> dict[str, float]:
    """Median seconds per row of ``{row: fn}``, the rows taken in turn within each of ``runs`` rounds: a machine whose
    speed drifts moves every row alike, so their ratios hold (this shared VM's speed moves by 5-10 % over minutes,
    which row-after-row medians turned into a ratio moving by as much). In its turn a row runs twice and the second
    run is timed: its weights are back in cache after the other rows' runs, as in a stream of images through one
    runtime. The pause before each turn lets the previous runtime's worker threads stop spinning."""
    times = defaultdict(list)
    for round_ in range(runs):
        print(f"   round {round_ + 1}/{runs} of {len(rows)} rows", flush=True)
        for row, fn in rows.items():
            time.sleep(SETTLE_SECONDS)
            fn()
            start = time.perf_counter()
            fn()
            times[row].append(time.perf_counter() - start)
    return {row: statistics.median(t) for row, t in times.items()}


def ort_session(path: Path, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_by_op(sess: ort.InferenceSession, feed: dict) -> dict[str, float]:
    """Share of the run time per op type, from onnxruntime's profiler: the run after one warm-up (the
    first run of a session also times its memory arena growing: FP32 ViT-B's Resize took 25 %, not 2 %)."""
    sess.run(None, feed)
    sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    last_run = max(event["ts"] for event in trace if event["name"] == "model_run")
    per_op = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= last_run:
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: 100 * t / total for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}


def profile_deployed(deployed, image: torch.Tensor) -> dict[str, float]:
    """Share of the deployed PyTorch model's time per module type of its graph (the registry's modules:
    Attention = both of its GEMMs and the softmax between them), from forward hooks on one run after a warm-up."""
    per_type, started = defaultdict(float), {}
    hooks = []
    for module in deployed.graph.children():
        hooks.append(module.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o: per_type.__setitem__(type(m).__name__, per_type[type(m).__name__]
                                                 + time.perf_counter() - started[id(m)])))
    try:
        with torch.no_grad():
            deployed(image)
            per_type.clear()
            start = time.perf_counter()
            deployed(image)
            total = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    per_type["(between modules)"] = total - sum(per_type.values())
    return {op: 100 * t / total for op, t in sorted(per_type.items(), key=lambda kv: -kv[1])}


def gemm_share(profile: dict[str, float]) -> float:
    """The GEMM nodes' share of a profile (onnxruntime fuses some FP32 MatMuls into FusedMatMul)."""
    return sum(profile.get(op, 0.0) for op in (*GEMMS, "FusedMatMul")) / 100


def gemm_kernel_speedup(runs: int, m: int = 1024, k: int = 768, n: int = 3072) -> dict:
    """onnxruntime's exact integer GEMM on this CPU (MatMulInteger in the form the integer graph uses)
    against its FP32 MatMul on one ViT-B MLP-sized product: the most any integer graph can gain here."""
    from onnx import helper

    rng = np.random.default_rng(0)
    times, form = {}, onnx_gemm_for_this_cpu()
    right = (TensorProto.INT8, np.int8) if form == "u8s8" else (TensorProto.UINT8, np.uint8)
    for name, (elem, dtype), (right_elem, right_dtype) in (
            ("fp32", (TensorProto.FLOAT, np.float32), (TensorProto.FLOAT, np.float32)),
            (form, (TensorProto.UINT8, np.uint8), right)):
        nodes = [helper.make_node("MatMul" if name == "fp32" else "MatMulInteger", ["a", "b"], ["y"])]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("a", elem, [m, k]),
                                                helper.make_tensor_value_info("b", right_elem, [k, n])],
                                  [helper.make_empty_tensor_value_info("y")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 10
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(model, f"{tmp}/gemm.onnx")
            sess = ort_session(Path(f"{tmp}/gemm.onnx"))
        feed = {"a": rng.integers(0, 256, (m, k)).astype(dtype), "b": rng.integers(-128, 128, (k, n)).astype(right_dtype)}
        times[name] = median_seconds(lambda: sess.run(None, feed), max(runs, 10))
    return dict(shape=[m, k, n], seconds=times, form=form, speedup=times["fp32"] / times[form])


def torch_gemm_note(result: dict) -> str:
    """The measured speed of PyTorch's integer GEMM against FP32 (absent from runs before it was measured)."""
    if "torch_gemm" not in result:
        return ""
    t = result["torch_gemm"]
    return (f", {t['speedup']:.2f}x the speed of torch's FP32 matmul on one {'x'.join(map(str, t['shape'][:2]))} @ "
            f"{t['shape'][1]}x{t['shape'][2]} product")


def torch_gemm_speedup(runs: int, m: int = 1024, k: int = 768, n: int = 3072) -> dict:
    """The deployed modules' exact int8 GEMM (``gemm.int8_matmul`` on this CPU's path) against torch's FP32
    matmul on the same product as :func:`gemm_kernel_speedup`'s, timed in turns."""
    from iseg_plugin.ops.gemm import int8_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    af, bf = a.float(), b.float()
    times = {"fp32": [], "int8": []}
    for _ in range(max(runs, 10)):
        for name, product in (("fp32", lambda: af @ bf), ("int8", lambda: int8_matmul(a, b))):
            start = time.perf_counter()
            product()
            times[name].append(time.perf_counter() - start)
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    return dict(shape=[m, k, n], seconds=seconds, path=gemm_path(), speedup=seconds["fp32"] / seconds["int8"])


def ort_int8_qdq(fp32_path: Path, out: Path, feed: dict) -> Path:
    """What a user would pick instead of an integer-only model: onnxruntime's own static INT8 quantization of
    the FP32 graph (QDQ, per-channel weights, calibrated on the same image). Softmax, GELU, LayerNorm, resize
    stay float between DequantizeLinear / QuantizeLinear pairs: not integer-only."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class OneImage(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([feed])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(fp32_path), str(out), OneImage(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def gemm_traffic_bits(path: Path, feed: dict) -> int:
    """Bits read and written by the graph's Linear / Conv / MatMul nodes: every data operand and
    result of each such node, at its element width (I-Segmenter's Table 7 measure). Shapes come from
    one onnxruntime run with those tensors as extra outputs (shape inference alone loses them)."""
    model = onnx.load(str(path))
    weights = {t.name: int(np.prod(t.dims)) * BITS.get(t.data_type, 32) for t in model.graph.initializer}
    names = list(dict.fromkeys(name for node in model.graph.node if node.op_type in GEMMS
                               for name in [*node.input[:2], *node.output] if name and name not in weights))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/traffic.onnx")
        values = dict(zip(names, ort_session(Path(f"{tmp}/traffic.onnx")).run(names, feed)))
    total = 0
    for node in model.graph.node:
        if node.op_type in GEMMS:  # zero points (inputs 3-4) are scalars
            for name in [*node.input[:2], *node.output]:
                total += weights[name] if name in weights else values[name].size * values[name].itemsize * 8
    return total


def deployed_model(name: str):
    """The float model, a random calibration image, its preprocessed form and the deployed integer model
    (one-shot PTQ on that image)."""
    float_model = build(name)
    image = torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8)
    batch = dict(inputs=[image[0].flip(0)], data_samples=[SegDataSample()])
    x = float_model.data_preprocessor(batch, False)["inputs"]
    prepared = prepare_segmenter(float_model, x)
    calibrate_prepared(prepared, float_model.data_preprocessor, [batch], 1, show_progress=False)
    preproc = float_model.data_preprocessor
    deployed = convert(prepared, x, preproc.mean.flatten().tolist(), preproc.std.flatten().tolist())
    return float_model, image, x, deployed


def qonnx_cost(name: str, work: Path) -> dict:
    """qonnx's inference cost of the model's QONNX export (I-Segmenter's Table 7 measure, by qonnx's rules)."""
    print(f"== {name}: QONNX export and qonnx inference cost", flush=True)
    _, _, _, deployed = deployed_model(name)
    export_qonnx(deployed, work / f"{name}.qonnx.onnx")
    cost = qonnx_inference_cost(work / f"{name}.qonnx.onnx")
    return {k: v for k, v in cost.items() if k != "unsupported"}


def openvino_runs(fp32_path: Path, feed: dict) -> dict:
    """The peer a user on an x86 server picks for INT8 inference: OpenVINO on the same FP32 graph, in FP32 (the f32
    precision hint), at its default precision (bf16 where the CPU has AMX or AVX-512 BF16) and after NNCF's
    post-training INT8 quantization on the same calibration image (float softmax / GELU / LayerNorm between
    its INT8 GEMMs: not integer-only). ``{row: run}``; empty, with a message, where openvino / nncf are absent
    (the extra ``.[bench]``)."""
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        print(f"   OpenVINO rows skipped ({err.name} is not installed: pip install -e '.[bench]')", flush=True)
        return {}
    core = ov.Core()
    model = core.read_model(str(fp32_path))
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    int8 = nncf.quantize(model, nncf.Dataset([feed]), subset_size=1, model_type=nncf.ModelType.TRANSFORMER)
    compiled = {"OpenVINO FP32": core.compile_model(model, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"}),
                "OpenVINO default precision": core.compile_model(model, "CPU", config),
                "OpenVINO INT8 (NNCF)": core.compile_model(int8, "CPU", config)}
    return {row: (lambda c=c: c(feed)) for row, c in compiled.items()}


def run(name: str, runs: int, work: Path, torch_int: bool = True, tvm: bool = True, timing: bool = True) -> dict:
    print(f"== {name} (ISA {cpu_isa()}, GEMM path {gemm_path()}, {kernels.describe()})", flush=True)
    float_model, image, x, deployed = deployed_model(name)

    paths = {"fp32_ckpt": work / f"{name}_fp32.pth", "deployed": work / f"{name}.iseg",
             "fp32_onnx": work / f"{name}_fp32.onnx", "int_onnx": work / f"{name}_int.onnx"}
    torch.save(float_model.state_dict(), paths["fp32_ckpt"])
    save_deployed(deployed, paths["deployed"])
    with torch.no_grad():
        torch.onnx.export(SegmentorLogits(float_model), (x,), str(paths["fp32_onnx"]), dynamo=False, opset_version=18,
                          input_names=["image"], output_names=["logits"])
    proto = onnx.load(str(paths["fp32_onnx"]))
    proto.ir_version = 10
    onnx.save(proto, str(paths["fp32_onnx"]))
    start = time.perf_counter()
    export_onnx_int(deployed, paths["int_onnx"])
    export_seconds = time.perf_counter() - start

    fp32_feed, int_feed = {"image": x.numpy()}, {"pixels": image.numpy()}
    result = dict(model=name, runs=runs, export_seconds=export_seconds,
                  sizes_mb={k: p.stat().st_size / 2**20 for k, p in paths.items()})
    result["traffic_bits"] = {"fp32": gemm_traffic_bits(paths["fp32_onnx"], fp32_feed),
                              "int": gemm_traffic_bits(paths["int_onnx"], int_feed)}
    result["profile_int"] = profile_by_op(ort_session(paths["int_onnx"], str(work / f"{name}_int")), int_feed)
    result["profile_fp32"] = profile_by_op(ort_session(paths["fp32_onnx"], str(work / f"{name}_fp32")), fp32_feed)
    result["profile_torch"] = profile_deployed(deployed, image)
    if not timing:
        return result
    fp32_sess, int_sess = ort_session(paths["fp32_onnx"]), onnx_session(paths["int_onnx"], torch.get_num_threads())
    qdq_sess = ort_session(ort_int8_qdq(paths["fp32_onnx"], work / f"{name}_qdq.onnx", fp32_feed))
    # every row's runs interleaved, round by round (interleaved_medians): FP32 PyTorch and onnxruntime (FP32, its INT8
    # QDQ: quantize_static, not integer-only), OpenVINO's rows, the integer graph in onnxruntime and TVM, the deployed
    # model's forward and its class map alone (predict)
    rows = {"FP32 PyTorch": lambda: float_model._forward(x), "FP32 onnxruntime": lambda: fp32_sess.run(None, fp32_feed),
            "onnxruntime INT8 QDQ": lambda: qdq_sess.run(None, fp32_feed)}
    rows.update(openvino_runs(paths["fp32_onnx"], fp32_feed))
    rows["integer onnxruntime"] = lambda: int_sess.run(None, int_feed)
    if tvm:
        try:
            start = time.perf_counter()
            tvm_model = TvmModel(paths["int_onnx"])
            result["tvm_compile_seconds"] = time.perf_counter() - start
            rows["integer TVM"] = lambda: tvm_model(int_feed["pixels"])
        except TvmMissingError as err:
            print(f"   integer TVM: skipped ({err})", flush=True)
    if torch_int:
        rows["integer PyTorch"] = lambda: deployed(image)
        rows["integer PyTorch, class map"] = lambda: deployed.predict(image)
    with torch.no_grad():
        print(f"   timing, interleaved: {', '.join(rows)} (integer PyTorch: {kernels.describe()})", flush=True)
        seconds = interleaved_medians(rows, runs)
        if torch_int and kernels.enabled():  # the same model on the intops reference path (fewer runs: it is slow)
            print("   integer PyTorch (intops reference)", flush=True)
            with kernels.reference():
                seconds["integer PyTorch, intops"] = median_seconds(lambda: deployed(image), max(1, runs // 2))
    result["seconds"] = seconds
    result["kernels"], result["isa"], result["gemm"] = kernels.describe(), cpu_isa(), gemm_path()
    result["gemm_kernel"] = gemm_kernel_speedup(runs)
    result["torch_gemm"] = torch_gemm_speedup(runs)
    print(f"   {seconds}", flush=True)
    return result


def write_report(results: list[dict], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "avx512_vnni",
                                                                                   "avx_vnni", "amx_int8")})
    forms = list(dict.fromkeys(f for r in results for f in r["seconds"]))
    lines = [
        "# Latency, size and memory traffic: FP32 vs integer-only Segmenter (512x512, batch 1)",
        "",
        f"Generated by `benchmarks/latency.py` (do not edit by hand): median of {results[0]['runs']} runs, the rows taken in turn",
        "round by round (a drift of the machine's speed moves every row alike), each timed run right after an untimed one, one",
        f"process, {torch.get_num_threads()} threads, on `{platform.processor() or platform.machine()}` with "
        f"{', '.join(flags)}; onnxruntime {ort.__version__}, torch {torch.__version__}. Random weights (time does not",
        "depend on their values); mmseg's Segmenter ADE20K configs (150 classes) with the plugin's decoder.",
        f"PyTorch's integer GEMM here: {PYTORCH_GEMMS[results[0].get('gemm', 'int32')]}{torch_gemm_note(results[0])};",
        f"onnxruntime's: MatMulInteger {FORMS[results[0]['gemm_kernel'].get('form', 'u8u8')]} (`iseg export --gemm auto`; "
        "its uint8 x int8 kernel, exact with AVX-512 VNNI, saturates without).",
        f"Integer PyTorch: the deployed model with {results[0].get('kernels', 'the intops reference')} (ISA path "
        f"{results[0].get('isa', cpu_isa())}), its forward returning the full-size integer logits and the class map;",
        "\"class map\": its `predict`, the class map alone (the last upsampling and the argmax in one pass, the",
        "full-size logits never written; the FP32 and OpenVINO graphs output the full-size logits, without an argmax);",
        "\"intops\": the same model on the intops reference path (same integers, same GEMMs).",
        "onnxruntime INT8 QDQ: onnxruntime's `quantize_static` of the FP32 graph (QDQ, per-channel INT8 weights, the",
        "same calibration image): INT8 GEMMs with float softmax / GELU / LayerNorm between them, not integer-only.",
        "OpenVINO (the extra `.[bench]`; rows absent without it): the same FP32 graph, in FP32 (f32 precision hint), at",
        "its default precision (bf16 where the CPU has AMX or AVX-512 BF16) and after NNCF's post-training INT8",
        "(`nncf.quantize`, transformer preset, the same calibration image; float softmax / GELU / LayerNorm between",
        "INT8 GEMMs, not integer-only); latency hint, as many inference threads as PyTorch's.",
        *sorted({f"{r['model']}: {r['note']}" for r in results if r.get("note")}),
        "A missing time: that form was not timed for that model (`--skip-torch-int`; TVM: not in `--tvm-models`,",
        "or apache-tvm absent). TVM: Relax with the plugin's CPU schedules (tiled, vectorised, parallel int32",
        "matmuls; other kernels' outer loops in parallel), no tuning; it has no uint8 GEMM kernel like onnxruntime's.",
        *[f"TVM compile time ({r['model']}): {r['tvm_compile_seconds']:.0f} s." for r in results if "tvm_compile_seconds" in r],
        "",
        "| model | " + " | ".join(f"{f} (s)" for f in forms)
        + " | speed-up vs FP32 onnxruntime: integer onnxruntime | integer PyTorch | integer PyTorch vs OpenVINO INT8 "
        "| integer PyTorch, class map vs OpenVINO INT8 |",
        "|---" * (len(forms) + 5) + "|",
    ]

    def speedup(s: dict, form: str, peer: str = "FP32 onnxruntime") -> str:
        return f"{s[peer] / s[form]:.2f}x" if form in s and peer in s else "-"

    for r in results:
        s = r["seconds"]
        lines.append(f"| {r['model']} | " + " | ".join(f"{s[f]:.3f}" if f in s else "-" for f in forms)
                     + f" | {speedup(s, 'integer onnxruntime')} | {speedup(s, 'integer PyTorch')} | "
                     f"{speedup(s, 'integer PyTorch', 'OpenVINO INT8 (NNCF)')} | "
                     f"{speedup(s, 'integer PyTorch, class map', 'OpenVINO INT8 (NNCF)')} |")
    lines += ["", "| model | FP32 checkpoint (MB) | deployed integer file (MB) | size ratio | FP32 ONNX (MB) | "
              "integer ONNX (MB) | GEMM traffic FP32 (Gbit) | GEMM traffic integer (Gbit) | traffic ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        z, t = r["sizes_mb"], r["traffic_bits"]
        lines.append(f"| {r['model']} | {z['fp32_ckpt']:.1f} | {z['deployed']:.1f} | {z['fp32_ckpt'] / z['deployed']:.2f}x | "
                     f"{z['fp32_onnx']:.1f} | {z['int_onnx']:.1f} | {t['fp32'] / 1e9:.2f} | {t['int'] / 1e9:.2f} | "
                     f"{t['fp32'] / t['int']:.2f}x |")
    with_cost = [r for r in results if "qonnx_cost" in r]
    if with_cost:
        lines += ["", "qonnx's inference cost of the QONNX export (`iseg export --format qonnx`; cleanup, datatype inference,",
                  "`qonnx.util.inference_cost`): MACs by operand datatypes, bit operations (MACs x bit widths), INT8",
                  "weight memory, GEMM output memory (INT32 accumulators). It counts GEMMs only.", "",
                  "| model | INT8 x INT8 GMACs | UINT16 x INT8 GMACs (probabilities @ v) | GBOPs | weights (MB) | GEMM outputs (MB) |",
                  "|---|---|---|---|---|---|"]
        for r in with_cost:
            c = r["qonnx_cost"]
            lines.append(f"| {r['model']} | {c.get('op_mac_INT8_INT8', 0) / 1e9:.2f} | {c.get('op_mac_UINT16_INT8', 0) / 1e9:.2f} | "
                         f"{c['total_bops'] / 1e9:.0f} | {c['total_mem_w_bits'] / 8 / 2**20:.1f} | "
                         f"{c['total_mem_o_bits'] / 8 / 2**20:.1f} |")
    lines += ["", "GEMM traffic: every data operand and result of each Linear / Conv / MatMul node, with shapes from one",
              "onnxruntime run: integer operands are 8-bit, but results are int32 accumulators, as wide as FP32's.",
              "(Before 2026-11-29 shape inference had lost the activations, so only weights were counted: 4.00x.)"]
    lines += ["", "Where the integer onnxruntime graph spends its time (share of kernel time by op type, one profiled run after a warm-up):", ""]
    for r in results:
        top = list(r["profile_int"].items())[:8]
        lines.append(f"* {r['model']}: " + ", ".join(f"{op} {pct:.1f} %" for op, pct in top))
    lines += ["", "The FP32 onnxruntime graph, for comparison:", ""]
    for r in results:
        top = list(r["profile_fp32"].items())[:5]
        lines.append(f"* {r['model']}: " + ", ".join(f"{op} {pct:.1f} %" for op, pct in top))
    lines += ["", "The most an integer graph can gain in onnxruntime on this CPU: even if every non-GEMM op cost",
              "nothing, its GEMMs run on the exact integer kernel, at most `r` times faster than FP32 (measured",
              "on one 1024x768 @ 768x3072 product), so the speed-up is at most `r / g`, `g` the GEMMs' share of the",
              "FP32 graph's time:", ""]
    for r in results:
        share = gemm_share(r["profile_fp32"])
        kernel = r["gemm_kernel"]
        form = kernel.get("form", "u8u8")
        lines.append(f"* {r['model']}: r = {kernel['speedup']:.2f} ({1e3 * kernel['seconds']['fp32']:.0f} ms FP32 vs "
                     f"{1e3 * kernel['seconds'][form]:.0f} ms {FORMS[form]}), g = {100 * share:.1f} %: "
                     f"at most **{kernel['speedup'] / share:.2f}x**")
    lines += ["", "What keeps the integer graph from that bound: its non-GEMM ops (requantization, softmax, GELU,",
              "LayerNorm, upsampling: each integer step one onnxruntime pass over memory, where FP32 has fused",
              "kernels) against the whole FP32 graph:", ""]
    for r in results:
        gemm = gemm_share(r["profile_int"])
        rest = r["seconds"]["integer onnxruntime"] * (1 - gemm)
        lines.append(f"* {r['model']}: {rest:.2f} s of non-GEMM integer ops ({100 * (1 - gemm):.0f} %) vs "
                     f"{r['seconds']['FP32 onnxruntime']:.2f} s for all of FP32: "
                     f"{rest / r['seconds']['FP32 onnxruntime']:.1f}x")
    lines += ["", "Where the deployed integer PyTorch model (fused kernels) spends its time (share per module type of",
              "its graph, one run after a warm-up; Linear = int8 GEMM + requantization epilogue; Attention = q @ k^T and",
              "the 16-bit probabilities @ v, with the table softmax between them).",
              *PROFILE_NOTES[results[0].get("gemm", "int32")],
              "Times vary by up to ~30 % between runs on this shared machine.", ""]
    for r in results:
        if "profile_torch" in r:
            lines.append(f"* {r['model']}: " + ", ".join(f"{op} {pct:.1f} %" for op, pct in list(r["profile_torch"].items())[:8]))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(forms)
    for i, form in enumerate(forms):
        ax.bar(np.arange(len(results)) + i * width, [r["seconds"].get(form, 0) for r in results], width, label=form)
    ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, [r["model"] for r in results])
    ax.set_ylabel("seconds per 512x512 image")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "performance.png", dpi=110)
    plt.close(fig)
    lines += ["", "![latency per form](performance.png)", ""]
    (docs / "performance.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-t,vit-s,vit-b")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-torch-int", action="store_true", help="do not time the deployed PyTorch model")
    parser.add_argument("--tvm-models", default="vit-t,vit-s,vit-b", help="models to compile and time with TVM")
    parser.add_argument("--docs", default=str(REPO / "docs"))
    parser.add_argument("--note", default="", help="a sentence for the report about the run's conditions")
    parser.add_argument("--results", default=str(REPO / "docs" / "latency.json"),
                        help="the saved measurements the report is written from (kept in the repository); "
                             "models accumulate across invocations")
    parser.add_argument("--report-only", action="store_true", help="no run: rewrite the report from --results")
    parser.add_argument("--qonnx-only", action="store_true",
                        help="only the QONNX export's qonnx inference cost of --models (minutes per model)")
    parser.add_argument("--graph-only", action="store_true",
                        help="recompute only the GEMM traffic and the profiles of --models (no end-to-end timing)")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    for folder in (Path(args.docs), Path(args.results).parent):  # (before the long work, not after it)
        folder.mkdir(parents=True, exist_ok=True)
    saved = Path(args.results)
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in [] if args.report_only else args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if args.qonnx_only:
                results[name]["qonnx_cost"] = qonnx_cost(name, Path(tmp))
            elif args.graph_only:
                graph = run(name, args.runs, Path(tmp), timing=False)
                results[name].update({key: graph[key] for key in ("traffic_bits", "profile_int", "profile_fp32",
                                                                   "profile_torch")})
            else:
                results[name] = run(name, args.runs, Path(tmp), not args.skip_torch_int, name in args.tvm_models.split(","))
                results[name]["note"] = args.note
        saved.write_text(json.dumps(results, indent=1))
    if not results:
        sys.exit(f"no saved runs in {saved}: nothing to report (run some first)")
    write_report([results[k] for k in sorted(results)], Path(args.docs))


if __name__ == "__main__":
    main()
