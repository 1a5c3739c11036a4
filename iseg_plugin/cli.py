"""The ``iseg`` command: ``demo``, ``ptq``, ``deploy``, ``eval``, ``export``."""
from __future__ import annotations

import argparse
from collections import Counter
import json
import sys
import warnings
from pathlib import Path

from .ops import REGISTRY


def _write_json(path: str, report: dict, force: bool) -> None:
    from .files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)), replace=force)


def _demo(args: argparse.Namespace) -> int:
    from .demo import CHECKPOINT, CONFIG, format_report, outputs, run_demo
    from .files import OutputError, check_output

    if args.json:
        if Path(args.json).resolve() in {path.resolve() for path in outputs(args.out_dir)}:
            raise OutputError(f"--json {args.json} is a file the demo writes itself: choose another path")
        check_output(args.json, [CONFIG, CHECKPOINT], args.force, "--json")

    print("iseg demo: one-shot PTQ (1 calibration image) of the CamVid Segmenter (DINOv2 ViT-S/14 encoder), "
          "then FP32 vs the deployed integer-only model")
    report = run_demo(args.out_dir, args.data_root)
    print()
    print(format_report(report))
    if args.json:
        _write_json(args.json, report, args.force)
    return 0


def _ptq(args: argparse.Namespace) -> int:
    from .ptq import run_ptq

    from .select import format_table

    report = run_ptq(args.config, args.checkpoint, args.calib_samples, args.out, args.gelu, args.softmax,
                     args.decoder, args.data_root, fold_norms=args.fold_norms, force=args.force,
                     weight_bits=args.weight_bits, select=args.select, size_ratio=args.size_ratio,
                     weight_rounding=args.weight_rounding, int8_weights=args.int8_weights, strict=args.strict)
    mb = 2**20
    if report["selection"]:
        print(f"\nper-layer choices (unified metric, scored on the first calibration images in "
              f"{report['select_seconds']:.0f} s):\n{format_table(report['selection'])}")
    if report["kept_init_count"]:
        print(f"\nthe checkpoint set every tensor of the model but {report['kept_init_count']}, which keep their "
              f"initialisation (under {', '.join(report['kept_init'])})")
    print(f"\ndeployed integer model: {report['out']} ({report['deployed_bytes'] / mb:.1f} MB); "
          f"FP32 weights: {report['fp32_bytes'] / mb:.1f} MB ({report['fp32_bytes'] / report['deployed_bytes']:.2f}x); "
          f"calibration on {report['num_samples']} images: {report['calib_seconds']:.1f} s")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from .ptq import deploy_checkpoint

    report = deploy_checkpoint(args.config, args.checkpoint, args.out, args.data_root, args.force)
    mb = 2**20
    print(f"deployed integer model: {report['out']} ({report['deployed_bytes'] / mb:.1f} MB, for "
          f"{report['input_size'][0]}x{report['input_size'][1]} images); FP32 weights: {report['fp32_bytes'] / mb:.1f} MB "
          f"({report['fp32_bytes'] / report['deployed_bytes']:.2f}x)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import kernels
    from .evaluate import PLOTS, evaluate
    from .files import check_output

    inputs = [args.config, args.model]  # (and their calibration records: check_output)
    for plot in PLOTS:  # checked before the evaluation, as --json
        check_output(Path(args.out_dir) / plot, inputs, args.force, "--out-dir")
    if args.json:
        check_output(args.json, inputs, args.force, "--json")
    forms = ("fp32", "fake-quant", "deployed") if args.fake_quant else ("fp32", "deployed")
    report = evaluate(args.config, args.model, args.data_root, args.limit, args.out_dir, forms)
    print()
    classes = report["classes"]
    print("| form | mIoU | aAcc | s/image | " + " | ".join(classes) + " |")
    print("|---" * (4 + len(classes)) + "|")
    for form, r in report["forms"].items():
        print(f"| {form} | {r['mIoU']:.2f} | {r['aAcc']:.2f} | {r['seconds_per_image']:.2f} | "
              + " | ".join(f"{v:.1f}" for v in r["per_class"]) + " |")
    for key, value in report["pixel_agreement"].items():
        print(f"pixel agreement, {key}: {value:.3f} %")
    print(f"deployed model ran on: {kernels.describe()}")
    if report["selection"]:
        chosen = [r for r in report["selection"] if r["chosen"]]
        variants = Counter(r["candidate"] for r in chosen if r["kind"] != "weights")
        int4 = sum(r["kind"] == "weights" for r in chosen)
        gemms = sum(r["kind"] == "weights" for r in report["selection"])
        print("per-layer choices in the model: " + ", ".join(f"{name} x{n}" for name, n in variants.items())
              + (f"; INT4 weights in {int4} of {gemms} GEMMs" if gemms else ""))
    if args.json:
        _write_json(args.json, report, args.force)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .deploy.io import load_deployed
    from .export import export_onnx_int, export_qonnx, qonnx_inference_cost
    from .export.onnx_int import U8S8_NEEDS, gemm_form
    from .files import check_output

    suffix = ".int.onnx" if args.format == "onnx-int" else ".qonnx.onnx"
    out = check_output(args.out or Path(args.model).with_suffix(suffix), [args.model], args.force)
    model = load_deployed(args.model)
    if args.format == "onnx-int":
        proto = export_onnx_int(model, out, args.gemm, replace=args.force)
    else:
        proto = export_qonnx(model, out, replace=args.force)
    ops = sorted({(f"{node.domain}::" if node.domain else "") + node.op_type for node in proto.graph.node})
    what = "QONNX graph"
    if args.format == "onnx-int":
        gemm = gemm_form({p.key: p.value for p in proto.metadata_props})
        what = f"integer-only ONNX graph (every tensor integer-typed; GEMMs {gemm})"
    print(f"{what}: {out} ({out.stat().st_size / 2**20:.1f} MB, {len(proto.graph.node)} nodes); ops: {', '.join(ops)}")
    if args.format == "onnx-int" and gemm == "u8s8":
        print(f"note: this file needs {U8S8_NEEDS}")
    if args.format == "qonnx":
        cost = qonnx_inference_cost(out)
        macs = ", ".join(f"{k[len('op_mac_'):].replace('_', ' x ')}: {v / 1e9:.3g} G" for k, v in cost.items()
                         if k.startswith("op_mac_"))
        print(f"qonnx inference cost: {cost['total_macs'] / 1e9:.3g} GMACs ({macs}), {cost['total_bops'] / 1e9:.3g} "
              f"GBOPs, weights {cost['total_mem_w_bits'] / 8 / 2**20:.2f} MB, GEMM outputs "
              f"{cost['total_mem_o_bits'] / 8 / 2**20:.2f} MB; no cost rule in qonnx for: {cost['unsupported']}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _weight_bits(text: str) -> int | str:
    if text not in ("4", "8", "mixed"):
        raise argparse.ArgumentTypeError(f"must be 4, 8 or mixed, got {text!r}")
    return text if text == "mixed" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iseg", description="Integer-only Segmenter tools")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on its embedded default")
    demo.add_argument("--out-dir", default="work_dirs/demo", help="where the deployed model and the overlays go")
    demo.add_argument("--data-root", help="CamVid (train/, val/ with labels); default: the config's, if present")
    demo.add_argument("--json", help="also write the report as JSON")
    demo.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    demo.set_defaults(func=_demo)

    ptq = sub.add_parser("ptq", help="calibrate a Segmenter and write the deployed integer-only model")
    ptq.add_argument("config")
    ptq.add_argument("checkpoint", help="FP32 checkpoint (plugin or stock mmseg keys)")
    ptq.add_argument("--calib-samples", type=_positive_int, default=1, help="calibration images (1 = one-shot PTQ)")
    ptq.add_argument("--gelu", choices=tuple(REGISTRY["gelu"].variants))
    ptq.add_argument("--softmax", choices=tuple(REGISTRY["softmax"].variants))
    ptq.add_argument("--decoder", choices=("paper", "bilinear-l2"))
    ptq.add_argument("--weight-bits", type=_weight_bits, help="GEMM weights: 8 (W8A8, default), 4 (W4A8, "
                     "per-channel INT4 packed two a byte) or mixed (INT4 where the unified metric allows, "
                     "down to --size-ratio)")
    ptq.add_argument("--select", choices=("global", "unified"),
                     help="GELU / softmax: one variant everywhere (--gelu / --softmax; default) or each layer's "
                          "best candidate by the unified metric")
    ptq.add_argument("--size-ratio", type=_positive_float, help="with --weight-bits mixed: FP32 / GEMM weight size to "
                     "reach (default 6)")
    ptq.add_argument("--weight-rounding", choices=("gptq", "nearest"),
                     help="INT4 weights: GPTQ on the calibration images (default) or round to nearest")
    ptq.add_argument("--int8-weights", action="append", metavar="MODULE",
                     help="with --weight-bits 4 / mixed: the Linears / Conv2ds under this module path keep INT8 "
                          "weights (repeatable; e.g. --int8-weights decode_head)")
    ptq.add_argument("--data-root")
    ptq.add_argument("--no-fold-norms", dest="fold_norms", action="store_false",
                     help="keep LayerNorm affines (default: fold them into the next Linear, exact)")
    ptq.add_argument("--out", required=True, help="the deployed model (and OUT.calib.pth beside it)")
    ptq.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ptq.add_argument("--strict", action="store_true", help="refuse a degenerate calibration (near-constant images, "
                     "collapsed ranges) instead of warning")
    ptq.set_defaults(func=_ptq)

    deploy = sub.add_parser("deploy", help="write the deployed integer-only model of a QAT checkpoint (mim train)")
    deploy.add_argument("config", help="the config it was trained with (ISegmenter with quant=...)")
    deploy.add_argument("checkpoint", help="a checkpoint of `mim train` (trained weights and activation ranges)")
    deploy.add_argument("--data-root", help="the dataset (the deployed model takes its validation images' size)")
    deploy.add_argument("--out", required=True, help="the deployed model (and OUT.calib.pth beside it)")
    deploy.add_argument("--force", action="store_true", help="overwrite an existing --out")
    deploy.set_defaults(func=_deploy)

    ev = sub.add_parser("eval", help="mIoU of the FP32 and deployed (and fake-quant) forms on the validation set")
    ev.add_argument("config")
    ev.add_argument("model", help="deployed model written by `iseg ptq`")
    ev.add_argument("--data-root")
    ev.add_argument("--limit", type=_positive_int, help="evaluate only the first N images")
    ev.add_argument("--out-dir", default="work_dirs/eval", help="confusion matrix and overlay PNGs")
    ev.add_argument("--json", help="also write the report as JSON")
    ev.add_argument("--force", action="store_true", help="overwrite an existing --json file and the plots in --out-dir")
    ev.add_argument("--fake-quant", action="store_true",
                    help="also the fake-quant form (the same graph on float64: ~10x slower than the deployed one) "
                         "and its pixel agreement with the deployed model")
    ev.set_defaults(func=_eval)

    export = sub.add_parser("export", help="export a deployed model to integer-only ONNX or QONNX")
    export.add_argument("model", help="deployed model written by `iseg ptq`")
    export.add_argument("--format", choices=("onnx-int", "qonnx"), default="onnx-int",
                        help="onnx-int: MatMulInteger and integer element-wise ops only (onnxruntime); "
                             "qonnx: the integer operators as qonnx custom ops (qonnx executes it)")
    export.add_argument("--gemm", choices=("auto", "u8u8", "u8s8"), default="auto",
                        help="onnx-int's MatMulInteger operands: u8s8 is onnxruntime's faster kernel, exact only on "
                             "CPUs with AVX-512 VNNI; u8u8 is exact everywhere; auto: u8s8 on such a CPU (default)")
    export.add_argument("--out", help="output file (default: MODEL with .int.onnx / .qonnx.onnx)")
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=_export)
    return parser


# Third-party notices that every command would print and no user can act on (mmengine's import of
# pkg_resources; mmseg's deprecated loss builder and loss default, which the plugin's configs do not use).
_NOISE = ("pkg_resources is deprecated", "``build_loss`` would be deprecated", "Default ``avg_non_ignore`` is False")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    plain = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"iseg {args.command}: warning: {message}\n"  # one line
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"iseg {args.command}: interrupted (no output file was left half-written)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in a short message, unless --debug
        if args.debug:
            raise
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"iseg {args.command}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:2]:
            print(f"  {line}", file=sys.stderr)
        print("  (iseg --debug ... shows the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = plain


if __name__ == "__main__":
    sys.exit(main())
