"""Benchmark of the evaluation code on random Market-sized features; prints one JSON object.

Measured in one run: torchreid's Python ``evaluate_rank`` versus ours on the same distance matrix
(numbers compared), the full explanation-aware evaluation (all pairs, all metrics) versus its lower
bound, the M plain (Q x D) @ (D x G) products it cannot avoid, and the peak resident memory of the
explanation part (measured before the torchreid comparison allocates its own (Q, G) arrays).

    python tools/benchmark_evaluator.py               # 3,368 x 15,913, D = 512, M = 26
    python tools/benchmark_evaluator.py --torch-path  # also the torch path (no C compiler), same data
    python tools/benchmark_evaluator.py --quick       # a few hundred images, for tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from torchreid_attrimeter.cli.benchmarks import benchmark_parser, parse_benchmark_args, peak_resident_mb


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--skip-torchreid", action="store_true", help="do not time torchreid's evaluate_rank")
    parser.add_argument("--torch-path", action="store_true",
                        help="also time the evaluator's torch path (what runs without a C compiler) on the same data")
    return parse_benchmark_args(parser, argv)


def random_split(generator: torch.Generator, size: int, args, batch_size: int = 256):
    """Identities, cameras, labels (size,) and a function yielding random decomposition batches, made
    on the fly as an extraction loop would, so the benchmark holds no copy of its own."""
    from torchreid_attrimeter.decomposition import Decomposition

    pids = torch.randint(0, args.num_identities, (size,), generator=generator)
    split = {
        "pids": pids,
        "camids": torch.randint(0, 6, (size,), generator=generator),
        "attributes": (torch.rand(args.num_identities, args.num_attributes, generator=generator) > 0.5).float()[pids],
        "known": torch.rand(size, args.num_attributes, generator=generator) > 0.05,
    }
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))

    def batches():
        batch_generator = torch.Generator().manual_seed(seed)
        for first in range(0, size, batch_size):
            count = min(batch_size, size - first)
            yield slice(first, first + count), Decomposition(
                torch.randn(count, args.dim, generator=batch_generator),
                torch.randn(count, args.num_attributes, args.dim, generator=batch_generator))

    split["batches"] = batches
    return split


def matmul_lower_bound(num_query: int, num_gallery: int, dim: int, num_attributes: int) -> float:
    """Seconds for the M plain (Q x D) @ (D x G) products, into one reused (Q, G) buffer."""
    query = torch.randn(num_query, dim)
    gallery = torch.randn(num_gallery, dim)
    output = torch.empty(num_query, num_gallery)
    start = time.perf_counter()
    for _ in range(num_attributes):
        torch.mm(query, gallery.t(), out=output)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    from torchreid_attrimeter import compat
    from torchreid_attrimeter.decomposition import pairwise_distance
    from torchreid_attrimeter.evaluation import ExplanationEvaluator, evaluate_rank, native_metrics

    generator = torch.Generator().manual_seed(args.seed)
    query, gallery = random_split(generator, args.num_query, args), random_split(generator, args.num_gallery, args)
    report = {"num_query": args.num_query, "num_gallery": args.num_gallery, "dim": args.dim,
              "num_attributes": args.num_attributes, "torch_threads": torch.get_num_threads()}

    # The lower bound is timed before and after the evaluation; the faster of the two is used, so that
    # a slow moment of a shared machine cannot flatter the ratio.
    bound_before = matmul_lower_bound(args.num_query, args.num_gallery, args.dim, args.num_attributes)
    evaluator = ExplanationEvaluator([f"attribute_{index}" for index in range(args.num_attributes)],
                                     memory_budget_mb=args.memory_budget_mb, progress=False)
    embeddings = {}
    elapsed = 0.0  # evaluator time only, not the making of the random batches
    for split, data in (("query", query), ("gallery", gallery)):
        parts = []
        for rows, decomposition in data["batches"]():
            start = time.perf_counter()
            evaluator.process(decomposition, data["pids"][rows], data["camids"][rows], data["attributes"][rows],
                              data["known"][rows], split=split)
            elapsed += time.perf_counter() - start
            parts.append(decomposition.embedding)
        embeddings[split] = torch.cat(parts)  # (N, D) only, for the plain distance matrix below
    start = time.perf_counter()
    results = evaluator.evaluate()
    report["explanation_evaluation_s"] = elapsed + time.perf_counter() - start
    report["explanation_peak_rss_mb"] = peak_resident_mb()
    bound_after = matmul_lower_bound(args.num_query, args.num_gallery, args.dim, args.num_attributes)
    report["matmul_lower_bound_runs_s"] = [bound_before, bound_after]
    report["matmul_lower_bound_s"] = min(bound_before, bound_after)
    report["explanation_over_lower_bound"] = report["explanation_evaluation_s"] / report["matmul_lower_bound_s"]
    report["results"] = {key: value for key, value in results.items() if key != "per_attribute"}
    report["fused_kernel"] = evaluator.native is not False and native_metrics.usable(torch.device("cpu"),
                                                                                     args.num_attributes)
    if args.torch_path:
        evaluator.native = False  # evaluate() again on the stored embeddings, block by block in torch
        start = time.perf_counter()
        torch_results = evaluator.evaluate()
        report["torch_path_evaluation_s"] = elapsed + time.perf_counter() - start
        report["torch_path_over_lower_bound"] = report["torch_path_evaluation_s"] / report["matmul_lower_bound_s"]
        report["torch_path_max_difference"] = max(
            abs(value - torch_results[key]) for key, value in results.items()
            if isinstance(value, float) and isinstance(torch_results[key], float))
    evaluator.reset()

    distmat = pairwise_distance(embeddings["query"], embeddings["gallery"]).numpy()
    ids = [data[key].numpy() for key in ("pids",) for data in (query, gallery)]
    ids += [data["camids"].numpy() for data in (query, gallery)]
    start = time.perf_counter()
    cmc, mAP, mINP = evaluate_rank(distmat, *ids, max_rank=50, return_mINP=True)
    report["evaluate_rank_s"] = time.perf_counter() - start
    report["evaluate_rank"] = {"rank1": float(cmc[0]), "mAP": mAP, "mINP": mINP}
    if not args.skip_torchreid:
        start = time.perf_counter()
        reference_cmc, reference_mAP = compat.torchreid_evaluate_rank(distmat, *ids, max_rank=50, use_cython=False)
        report["torchreid_evaluate_rank_s"] = time.perf_counter() - start
        report["evaluate_rank_speedup"] = report["torchreid_evaluate_rank_s"] / report["evaluate_rank_s"]
        report["evaluate_rank_max_cmc_difference"] = float(np.abs(reference_cmc - cmc).max())
        report["evaluate_rank_mAP_difference"] = abs(float(reference_mAP) - mAP)
    report["peak_rss_mb"] = peak_resident_mb()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    # imported here, as main() imports the package: loading this file (tests do) stays light
    from torchreid_attrimeter.cli.errors import run_tool

    sys.exit(run_tool(main))
