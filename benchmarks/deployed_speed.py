"""End-to-end latency of the deployed integer Segmenter only (no exports, no peers): for A/B runs of kernel changes.

    # once: the deployed ViT-S 512x512 model of benchmarks/latency.py (random weights, one-shot PTQ), saved
    .venv/bin/python benchmarks/deployed_speed.py --save /tmp/vit-s.pth --model vit-s
    # time it (median of --runs after a warm-up); --profile: torch profiler's top ops of one run
    .venv/bin/python benchmarks/deployed_speed.py --load /tmp/vit-s.pth --runs 7
    # A/B, interleaved: one process per sample, alternating between source trees (PYTHONPATH), medians per tree
    .venv/bin/python benchmarks/deployed_speed.py --load /tmp/vit-s.pth --ab /tmp/base,/work/wt40 --rounds 6

Each timed process prints its runs; ``--ab`` alternates trees round by round so that load from other work on
the machine falls on both alike, and reports the median and range per tree, and the process CPU time per run
(with ``--threads 1``, the work done, which other processes on the machine disturb less than the wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _time(path: str, runs: int, profile: bool, check: bool) -> dict:
    import torch

    from iseg_plugin import kernels
    from iseg_plugin.deploy.io import load_deployed
    from iseg_plugin.ops.gemm import gemm_path

    model = load_deployed(path)
    torch.manual_seed(1)
    image = torch.randint(0, 256, (1, 3, *model.input_size), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(image)
        times, cpu = [], []
        for _ in range(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(image)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if check:  # the same integers as the intops reference
            with kernels.reference():
                ref = model(image)
            for a, b in zip(out, ref):
                assert torch.equal(a, b), "fused kernels differ from the intops reference"
        if profile:
            from torch.profiler import ProfilerActivity, profile as prof

            with prof(activities=[ProfilerActivity.CPU]) as p:
                model(image)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return {"times": times, "median": statistics.median(times), "cpu": statistics.median(cpu), "kernels": kernels.describe(), "gemm": gemm_path(),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-s")
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--check", action="store_true", help="compare with the intops reference path")
    parser.add_argument("--ab", help="comma-separated source trees to alternate (PYTHONPATH of each process)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gemm", help="force a GEMM path (iseg_plugin.ops.gemm.GEMM_PATHS; default: this CPU's fastest)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from latency import deployed_model
        from iseg_plugin.deploy.io import save_deployed

        save_deployed(deployed_model(args.model)[3], args.save)
        print(f"saved {args.save}")
        return
    if args.ab:
        trees = args.ab.split(",")
        results: dict[str, list[float]] = {t: [] for t in trees}
        cpus: dict[str, list[float]] = {t: [] for t in trees}
        for rnd in range(args.rounds):
            for tree in (trees if rnd % 2 == 0 else trees[::-1]):
                env = {**os.environ, "PYTHONPATH": tree}
                proc = subprocess.run([sys.executable, str(Path(tree) / "benchmarks" / "deployed_speed.py")
                                       if (Path(tree) / "benchmarks" / "deployed_speed.py").exists() else __file__,
                                       "--load", args.load, "--runs", str(args.runs), "--json",
                                       *(["--threads", str(args.threads)] if args.threads else []),
                                       *(["--gemm", args.gemm] if args.gemm else [])],
                                      env=env, capture_output=True, text=True, check=True)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results[tree].append(res["median"])
                cpus[tree].append(res["cpu"])
                print(f"round {rnd} {tree}: median {res['median']:.3f} s (CPU {res['cpu']:.3f} s)  runs "
                      + " ".join(f"{t:.3f}" for t in res["times"]), flush=True)
        for tree, meds in results.items():
            print(f"{tree}: median of medians {statistics.median(meds):.3f} s  (min {min(meds):.3f}, max {max(meds):.3f}); "
                  f"process CPU time per run, median {statistics.median(cpus[tree]):.3f} s")
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.gemm:
        from iseg_plugin.ops import gemm

        gemm.GEMM = args.gemm
    res = _time(args.load, args.runs, args.profile, args.check)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['kernels']}, GEMM {res['gemm']}, {res['threads']} threads: median {res['median']:.3f} s; runs "
              + " ".join(f"{t:.3f}" for t in res["times"]))


if __name__ == "__main__":
    main()
