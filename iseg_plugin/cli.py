"""The ``iseg`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .fidelity import write_report

    print("iseg demo: integer operator fidelity against the float operators (Gaussian and long-tailed inputs)")
    table, ratio = write_report(Path(args.out_dir))
    print(table)
    print(f"\nlambda-ShiftGELU vs ShiftGELU on long-tailed rows: RMSE {ratio:.0f}x lower")
    print(f"report and plots written to {args.out_dir}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iseg", description="Integer-only Segmenter tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on its embedded default")
    demo.add_argument("--out-dir", default="work_dirs/demo", help="where the report and plots go")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
