"""QAT on CamVid through `mim train mmseg` (FP32 / PTQ S=1 / QAT, deployed integer-only): the QAT section of
docs/results_camvid.md + docs/qat_camvid.png (training curves from mmengine's logs).

    .venv/bin/python benchmarks/qat_camvid.py [--runs paper_w8,best_w8,paper_w4,best_w4]
    .venv/bin/python benchmarks/qat_camvid.py --report-only   # rewrite the section from the saved runs (docs/qat_camvid.json)

Each run trains with `mim train mmseg CONFIG` as a user would (the config's schedule; `--cfg-options` only
for the weight width), deploys its last checkpoint with `iseg deploy` and evaluates the deployed model on
all CamVid val images (the first run also its fake-quant form on the first images, for the pixel agreement). The FP32 and
PTQ S=1 rows are `iseg ptq`'s, from benchmarks/ptq_camvid.py's saved runs (same FP32 checkpoints).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_camvid import QAT_MARKER, RESULTS as PTQ_RESULTS, RUNS as PTQ_RUNS, fp32_miou, repo_path, saved_report  # noqa: E402

CONFIGS = REPO / "mmseg_configs"
# every run's measurements, from which the section is written (in the repository, as ptq_camvid.py's)
RESULTS = REPO / "docs" / "qat_camvid.json"
# name: (config, weight bits, the ptq_camvid run that is its PTQ S=1 row)
RUNS = {
    "paper_w8": ("isegmenter_vit-s_camvid_paper.py", 8, "paper"),
    "best_w8": ("isegmenter_vit-s_camvid.py", 8, "main"),
    "paper_w4": ("isegmenter_vit-s_camvid_paper.py", 4, "paper_w4"),
    "best_w4": ("isegmenter_vit-s_camvid_w4.py", 4, "w4"),
}
OPERATORS = {"isegmenter_vit-s_camvid_paper.py": "paper: lambda-ShiftGELU, Shiftmax, nearest, no L2",
             "isegmenter_vit-s_camvid.py": "best: Poly-GELU, bit-exp softmax, bilinear + L2",
             "isegmenter_vit-s_camvid_w4.py": "best: Poly-GELU, bit-exp softmax, bilinear + L2"}


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def train(name: str, work: Path) -> dict:
    """`mim train` of one run (subprocess: wall time, peak memory); returns where its outputs are."""
    config, bits, _ = RUNS[name]
    cmd = [tool("mim"), "train", "mmseg", str(CONFIGS / config), "--work-dir", str(work),
           "--cfg-options", f"model.quant.weight_bits={bits}"]
    start = time.perf_counter()
    with open(work / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"mim train failed for {name}: see {work / 'train.log'}")
    checkpoint = Path((work / "last_checkpoint").read_text().strip())
    return dict(command="mim " + " ".join(cmd[1:]).replace(str(REPO) + "/", ""), **schedule(work / config),
                train_seconds=time.perf_counter() - start,
                peak_rss_mb=usage.ru_maxrss / 1024, checkpoint=repo_path(checkpoint), config=repo_path(work / config),
                curves=curves(work))


def adopt(name: str, work: Path) -> dict:
    """A `mim train` of the run's config that was run before, outside this benchmark (``--trained``): refused
    unless its work dir's config is the run's (model, data, schedule, hooks); recorded as :func:`train` records
    its own, with the wall time from mmengine's log (first to last line) and no peak memory (not measured)."""
    from mmengine.config import Config

    from iseg_plugin.select import check_quant

    config, bits, _ = RUNS[name]
    logs = sorted(work.glob("*/*.log"))
    if not logs or not (work / "last_checkpoint").is_file():
        sys.exit(f"--trained {work}: not a finished mim train work dir (no mmengine log or last_checkpoint)")
    dumped = logs[-1].parent / "vis_data" / "config.py"  # mmengine's dump of the config the run trained with
    ran, expected = Config.fromfile(str(dumped)), Config.fromfile(str(CONFIGS / config))
    expected.merge_from_dict({"model.quant.weight_bits": bits})
    for cfg in (ran, expected):
        cfg.model.quant = check_quant(cfg.model.quant)
    keys = ("model", "load_from", "train_dataloader", "optim_wrapper", "param_scheduler", "train_cfg", "custom_hooks")
    differ = [key for key in keys if ran.get(key) != expected.get(key)]
    if differ:
        sys.exit(f"--trained {work}: its config differs from {config} at W{bits} in {differ}; train it with the benchmark")
    stamps = [time.mktime(time.strptime(line[:19], "%Y/%m/%d %H:%M:%S"))
              for line in logs[-1].read_text().splitlines() if re.match(r"\d{4}/\d\d/\d\d \d\d:", line)]
    checkpoint = Path((work / "last_checkpoint").read_text().strip())
    return dict(command=f"mim train mmseg mmseg_configs/{config} (run before, in {repo_path(work)})",
                **schedule(dumped), train_seconds=stamps[-1] - stamps[0], peak_rss_mb=None,
                checkpoint=repo_path(checkpoint), config=repo_path(dumped), curves=curves(work))


def schedule(config: Path) -> dict:
    """A run's QAT schedule as its config says (read once): where its activation ranges come from (``ranges``:
    the CalibrationHook / QATHook, built, so that their own defaults fill what the config leaves out), what it
    minimises with which optimizer (``objective``) and what trains for how many iterations (``trains``)."""
    from mmengine.config import Config

    from iseg_plugin.mmseg import CalibrationHook, QATHook

    cfg = Config.fromfile(str(config))
    kinds = {"CalibrationHook": CalibrationHook, "QATHook": QATHook}
    hooks = {h["type"]: kinds[h["type"]](**{k: v for k, v in h.items() if k != "type"})
             for h in cfg.custom_hooks if h["type"] in kinds}
    calib, qat = hooks["CalibrationHook"], hooks["QATHook"]
    source = "whole image" if calib.pipeline == "test" else "training crop"
    kept = "kept" if qat.freeze_iter == 0 else f"EMA {qat.momentum} for {qat.freeze_iter} it"
    labels = cfg.model.decode_head.loss_decode.get("loss_weight", 1.0) > 0
    distill = cfg.model.get("distill")
    kd = "class-weighted distillation" if distill and distill.get("class_weight") else "distillation"
    loss = (f"{kd} + labels" if labels else kd) if distill else "labels"
    optimizer = cfg.optim_wrapper.optimizer
    clip = cfg.optim_wrapper.get("clip_grad") or {}
    clipped = f", grad norm clipped at {clip['max_norm']:g}" if "max_norm" in clip else ""
    trained = cfg.model.backbone.get("frozen_exclude", ["all"])  # mmseg's rule: "all" trains the whole encoder
    custom = cfg.optim_wrapper.get("paramwise_cfg", {}).get("custom_keys", {})
    encoder_lr = custom.get("backbone", {}).get("lr_mult", 1)
    which = "all" if "all" in trained else ", ".join(name.strip(".") for name in trained)
    encoder = f" + encoder {which} (lr x{encoder_lr:g})" if trained else ""
    return dict(ranges=f"{calib.num_samples} {source}{'s' if calib.num_samples > 1 else ''}, {kept}",
                objective=f"{loss}, {optimizer['type']} {optimizer['lr']:g}{clipped}",
                trains=f"decoder{encoder}, {cfg.train_cfg.max_iters} it")


def curves(work: Path) -> dict:
    """Loss and gradient norm (before clipping; logged where the config clips) per logged iteration, and
    validation mIoU, from mmengine's scalars.json (the newest run)."""
    scalars = sorted(work.glob("*/vis_data/scalars.json"))[-1]
    found = dict(loss=[], grad_norm=[], mIoU=[])
    for line in scalars.read_text().splitlines():
        record = json.loads(line)
        for key, points in found.items():
            if key in record:
                points.append((record["step"], record[key]))
    return found


def deploy_and_evaluate(run: dict, work: Path, check_images: int) -> dict:
    """`iseg deploy` of the run's last checkpoint; the deployed model on all val images, and the fake-quant
    form (float64, ~5x slower) against it on the first ``check_images``."""
    from iseg_plugin.evaluate import evaluate

    model = work / "qat.iseg"
    config = str(REPO / run["config"])
    cmd = [tool("iseg"), "deploy", config, str(REPO / run["checkpoint"]), "--out", str(model), "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"iseg deploy failed: {done.stderr[-2000:]}")
    report = saved_report(evaluate(config, str(model), forms=("deployed",), out_dir=str(work / "eval"),
                                   dataset_panels=False))
    if check_images:
        check = evaluate(config, str(model), limit=check_images, forms=("fake-quant", "deployed"))
        report["fake_quant_check"] = dict(images=check["images"], **check["pixel_agreement"],
                                          **{form: r["mIoU"] for form, r in check["forms"].items()})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--work-dir", default=str(REPO / "work_dirs" / "qat_camvid"))
    parser.add_argument("--results", default=str(RESULTS),
                        help="the saved runs the section is written from; runs accumulate across invocations")
    parser.add_argument("--ptq-results", default=str(PTQ_RESULTS), help="benchmarks/ptq_camvid.py's saved runs")
    parser.add_argument("--docs", default=str(REPO / "docs"))
    parser.add_argument("--report-only", action="store_true", help="no run: rewrite the section from --results")
    parser.add_argument("--trained", help="a finished `mim train` work dir of the one run in --runs, trained "
                        "outside the benchmark: deploy and evaluate it instead of training again")
    parser.add_argument("--fake-quant-images", type=int, default=10,
                        help="the first run's fake-quant form vs its deployed model on the first N val images")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from iseg_plugin import kernels

    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    saved = Path(args.results)
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    ptq = json.loads(Path(args.ptq_results).read_text()) if Path(args.ptq_results).is_file() else {}
    names = [] if args.report_only else args.runs.split(",")
    if args.trained and len(names) != 1:
        sys.exit("--trained takes one run: name it with --runs")
    for i, name in enumerate(names):
        if args.trained:
            work = Path(args.trained)
            run = adopt(name, work)
        else:
            work = root / name
            work.mkdir(exist_ok=True)
            print(f"== {name}: mim train (log: {work / 'train.log'})", flush=True)
            run = train(name, work)
        print(f"   {run['train_seconds'] / 60:.0f} min; == {name}: iseg deploy + eval", flush=True)
        run["eval"] = deploy_and_evaluate(run, work, args.fake_quant_images if i == 0 else 0)
        run["isa"] = kernels.describe()
        run["baseline"] = baseline(name, ptq, results.get(name, {}).get("baseline"))
        results[name] = run
        saved.write_text(json.dumps(results, indent=1))
    if not results:
        sys.exit(f"no saved runs in {saved}: nothing to report (run some first)")
    write_section(results, Path(args.docs))


def baseline(name: str, ptq: dict, earlier: dict | None) -> dict:
    """A run's FP32 and PTQ S=1 mIoU from benchmarks/ptq_camvid.py's saved runs, else from this run's earlier
    result (the same checkpoints), else None; kept with the run, so that its row does not depend on the PTQ
    results still being there."""
    _, _, ptq_name = RUNS[name]
    earlier = earlier or {}
    fp32 = fp32_miou(ptq, PTQ_RUNS[ptq_name][4])
    before = ptq.get(ptq_name, {}).get("eval", {}).get("forms", {}).get("deployed", {}).get("mIoU")
    return dict(fp32=earlier.get("fp32") if fp32 is None else fp32,
                ptq=earlier.get("ptq") if before is None else before)


def write_section(results: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in RUNS if n in results]
    rows = []
    for name in names:
        config, bits, _ = RUNS[name]
        run = results[name]
        fp32, before = run["baseline"]["fp32"], run["baseline"]["ptq"]
        after = run["eval"]["forms"]["deployed"]["mIoU"]
        closed = (f"{100 * (after - before) / (fp32 - before):.0f} % of {fp32 - before:.2f}"
                  if None not in (fp32, before) and fp32 > before else "n/a (no gap)")
        last_val = run["curves"]["mIoU"][-1][1] if run["curves"]["mIoU"] else float("nan")
        show = (lambda v: "-" if v is None else f"{v:.2f}")
        rows.append(f"| {OPERATORS[config]} | W{bits}A8 | {run['trains']} | {run['ranges']} | {run['objective']} | "
                    f"{show(fp32)} | {show(before)} | {after:.2f} | {closed} | {last_val:.2f} | {run['train_seconds'] / 60:.0f} | "
                    f"{'-' if run['peak_rss_mb'] is None else format(run['peak_rss_mb'], '.0f')} |")
    lines = [
        "",
        "## QAT through `mim train mmseg` (issue 18)",
        "",
        "Generated by `benchmarks/qat_camvid.py`. Each QAT row: `mim train mmseg <config> --cfg-options "
        "model.quant.weight_bits=<bits>`",
        "with the config's own schedule (one-shot PTQ calibration on 1 image, then batches of 4 training crops;",
        "\"trains\": the decoder, and which encoder blocks at which fraction of its learning rate (the rest of the",
        "encoder is frozen), for how many iterations; \"QAT loss\": what it minimises (distillation: KL from the FP32",
        "model's class distributions), with which optimizer and learning rate; \"ranges\": the calibration image and",
        "whether the ranges then follow an EMA of the training crops before they freeze,",
        "[qat_diagnostics.md](qat_diagnostics.md); at W4A8, GPTQ rounds the INT4 weights at the calibration, the",
        "frozen ones keep its integers and the trained ones start from them, rounded to nearest on its scales),",
        "then `iseg deploy`",
        "of the last checkpoint, evaluated deployed integer-only on all 101 CamVid val images. PTQ S=1: `iseg ptq`",
        "of the same FP32 checkpoint (benchmarks/ptq_camvid.py; GPTQ for INT4). \"mmseg val\": the last validation",
        "of `mim train` (mmseg's `IoUMetric` on the same integer model). Gap closed: (QAT - PTQ) / (FP32 - PTQ)",
        "\"of\" the gap FP32 - PTQ in mIoU points.",
        "",
        "| operators | weights | trains | ranges | QAT loss | FP32 | PTQ S=1 | QAT | gap closed | mmseg val | train (min) | "
        "peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for name in names:
        check = results[name]["eval"].get("fake_quant_check")
        if check is not None:
            lines.append(f"* {name}: deployed vs fake-quant pixel agreement **{check['deployed vs fake-quant']:.3f} %** "
                         f"on the first {check['images']} val images (mIoU there: fake-quant {check['fake-quant']:.2f}, "
                         f"deployed {check['deployed']:.2f}).")
        if "note" in results[name]:  # what the saved run's own fields cannot tell, e.g. code that changed since
            lines.append(f"* {name}: {results[name]['note']}")
    if names:
        kernels = {}  # runs saved on different machines name their own ISA
        for name in names:
            kernels.setdefault(results[name].get("isa", "?"), []).append(name)
        lines += ["* Kernels: " + "; ".join(f"{isa} ({', '.join(runs)})" for isa, runs in kernels.items()) +
                  f". Command of the first run: `{results[names[0]]['command']}`.", "",
                  "![QAT training curves](qat_camvid.png)", ""]
        fig, (ax_loss, ax_grad, ax_miou) = plt.subplots(1, 3, figsize=(16, 4))
        for i, name in enumerate(names):  # one colour per run in every panel, also where a run has no curve
            for ax, key, style in ((ax_loss, "loss", {}), (ax_grad, "grad_norm", {}), (ax_miou, "mIoU", {"marker": "o"})):
                points = results[name]["curves"].get(key)
                if points:
                    ax.plot(*zip(*points), label=name, color=f"C{i}", **style)
        ax_loss.set(xlabel="iteration", ylabel="training loss (integer model; the table's QAT loss)", yscale="log")
        ax_grad.set(xlabel="iteration", ylabel="gradient norm before clipping (log mean)", yscale="log")
        ax_miou.set(xlabel="iteration", ylabel="val mIoU (%), integer model")
        for ax in (ax_loss, ax_grad, ax_miou):
            if ax.get_legend_handles_labels()[0]:  # a reconstructed run has no loss curve
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "qat_camvid.png", dpi=110)
        plt.close(fig)
    report = docs / "results_camvid.md"
    head = report.read_text().partition(QAT_MARKER)[0] if report.is_file() else ""
    report.write_text(head.rstrip("\n") + "\n\n" + QAT_MARKER + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
