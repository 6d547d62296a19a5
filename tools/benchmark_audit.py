"""Benchmark of the model audit against the evaluator's own time, side by side in one run, on random
Market-sized features; prints one JSON object.

The same stored embeddings are evaluated alternately by the plain evaluator (``per_query=False``)
and by the audit (the evaluator with its per-query sums, then every audit table: reliance, blind
spots, worst queries, to_dict), ``--repeats`` times each; the ratio of the fastest runs is reported,
with the peak resident memory of the process and the time of a two-interpreter bootstrap comparison.

    python tools/benchmark_audit.py            # 3,368 x 15,913, D = 512, M = 26
    python tools/benchmark_audit.py --quick    # a few hundred images, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from torchreid_attrimeter.cli.benchmarks import benchmark_parser, parse_benchmark_args, peak_resident_mb


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-path", action="store_true", help="time the evaluator's torch path (no C kernel)")
    return parse_benchmark_args(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from torchreid_attrimeter.attributes import get_schema
    from torchreid_attrimeter.audit import AuditAccumulator, compare_audits
    from torchreid_attrimeter.decomposition import Decomposition

    names = (get_schema("market1501").attributes if args.num_attributes == 26
             else tuple(f"attribute_{index}" for index in range(args.num_attributes)))
    generator = torch.Generator().manual_seed(args.seed)
    identity_labels = (torch.rand(args.num_identities, args.num_attributes, generator=generator) > 0.5).float()
    accumulator = AuditAccumulator(names, memory_budget_mb=args.memory_budget_mb, progress=False,
                                   native=False if args.torch_path else None)
    for split, size in (("query", args.num_query), ("gallery", args.num_gallery)):
        pids = torch.randint(0, args.num_identities, (size,), generator=generator)
        camids = torch.randint(0, 6, (size,), generator=generator)
        known = torch.rand(size, args.num_attributes, generator=generator) > 0.05
        for first in range(0, size, 256):  # made batch by batch, as an extraction loop would
            rows = slice(first, min(first + 256, size))
            count = rows.stop - rows.start
            decomposition = Decomposition(torch.randn(count, args.dim, generator=generator),
                                          torch.randn(count, args.num_attributes, args.dim, generator=generator))
            accumulator.process(decomposition, pids[rows], camids[rows], identity_labels[pids[rows]], known[rows],
                                split=split)
    evaluator = accumulator.evaluator
    report = {"num_query": args.num_query, "num_gallery": args.num_gallery, "dim": args.dim,
              "num_attributes": args.num_attributes, "torch_threads": torch.get_num_threads(),
              "evaluator_s": [], "audit_s": []}
    audit = None
    for _ in range(args.repeats):
        evaluator.per_query = False
        start = time.perf_counter()
        plain = evaluator.evaluate()
        report["evaluator_s"].append(time.perf_counter() - start)
        evaluator.per_query = True
        start = time.perf_counter()
        audit = accumulator.finish("random")
        record = audit.to_dict()
        report["audit_s"].append(time.perf_counter() - start)
        changed = [key for key, value in plain.items() if key != "per_attribute" and record["evaluation"][key] != value]
        if changed or plain["per_attribute"] != audit.evaluation["per_attribute"]:
            raise AssertionError(f"the audit changed the evaluator's numbers: {changed or 'per_attribute'}")
    report["evaluator_best_s"] = min(report["evaluator_s"])
    report["audit_best_s"] = min(report["audit_s"])
    report["audit_over_evaluator"] = report["audit_best_s"] / report["evaluator_best_s"]
    report["evaluator_numbers_identical"] = True
    other = dataclasses.replace(audit, name="random-again")  # the comparison's cost, not a second evaluation
    start = time.perf_counter()
    compare_audits([audit, other], resamples=1000)
    report["comparison_s"] = time.perf_counter() - start
    report["peak_rss_mb"] = peak_resident_mb()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
