"""Fidelity of every integer operator against its float operator: writes docs/op_fidelity.md + PNGs.

    .venv/bin/python benchmarks/op_fidelity.py [--out-dir docs]
"""
import argparse
import time
from pathlib import Path

from iseg_plugin.fidelity import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = parser.parse_args()
    start = time.perf_counter()
    table, ratio = write_report(Path(args.out_dir))
    print(table)
    print(f"\nlambda-ShiftGELU / ShiftGELU RMSE ratio on long-tailed rows: {ratio:.1f}x")
    print(f"written to {args.out_dir}/op_fidelity.md in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
