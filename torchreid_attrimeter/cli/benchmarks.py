"""What the benchmark tools on random Market-sized features share (tools/benchmark_evaluator.py,
tools/benchmark_audit.py): their common options and the peak resident memory they report."""

from __future__ import annotations

import argparse
import resource
import sys

# The sizes, by default Market's; --quick takes a few hundred images instead, for a smoke test. A size
# given on the command line wins over both.
MARKET_SIZES = {"num_query": 3368, "num_gallery": 15913, "num_identities": 751, "dim": 512}
QUICK_SIZES = {"num_query": 300, "num_gallery": 1200, "num_identities": 100, "dim": 64}


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the common options: Market's sizes (3,368 x 15,913 images of 751 identities,
    D = 512, M = 26) by default, the evaluator's memory budget, the seed and --quick."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    # default None: parse_benchmark_args fills what was not given, from --quick's sizes or Market's.
    for name, market_size in MARKET_SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {market_size} ({QUICK_SIZES[name]} with --quick)")
    parser.add_argument("--num-attributes", type=int, default=26)
    parser.add_argument("--memory-budget-mb", type=float, default=512.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="small default sizes (300 x 1,200, D = 64) for a smoke test; explicit sizes still win")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with every size not given filled in: from QUICK_SIZES with --quick,
    else from MARKET_SIZES. ``--quick --num-query 60`` therefore runs 60 queries."""
    args = parser.parse_args(argv)
    defaults = QUICK_SIZES if args.quick else MARKET_SIZES
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        elif getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of images (or dimensions), "
                         f"got {getattr(args, name)}")
    return args


def peak_resident_mb() -> float:
    """The process's peak resident memory so far, in MB."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2 ** 20  # ru_maxrss: KB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
