"""What the benchmark tools on random Market-sized features share (tools/benchmark_evaluator.py,
tools/benchmark_audit.py): their common options and the peak resident memory they report."""

from __future__ import annotations

import argparse
import resource
import sys

# --quick: a few hundred images, for a smoke test.
QUICK_SIZES = {"num_query": 300, "num_gallery": 1200, "num_identities": 100, "dim": 64}


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the common options: Market's sizes (3,368 x 15,913 images of 751 identities,
    D = 512, M = 26) by default, the evaluator's memory budget, the seed and --quick."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--num-identities", type=int, default=751)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--num-attributes", type=int, default=26)
    parser.add_argument("--memory-budget-mb", type=float, default=512.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes (300 x 1,200, D = 64) for a smoke test")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; --quick replaces the sizes by QUICK_SIZES."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK_SIZES.items():
            setattr(args, name, value)
    return args


def peak_resident_mb() -> float:
    """The process's peak resident memory so far, in MB."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2 ** 20  # ru_maxrss: KB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
