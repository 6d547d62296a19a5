"""Audit what one or more trained interpreters' models rely on over a whole dataset, and compare them.

    attrimeter-audit --config-file configs/attrimeter_synthetic_demo.yaml --output audit/
    attrimeter-audit --checkpoint run_a/model/model.pth.tar-10 run_b/model/model.pth.tar-10 \\
        --dataset dukemtmcreid_attr --root DATA --output audit/

(``python tools/audit_model.py`` and ``python -m torchreid_attrimeter.cli.audit`` are the same tool.)

Every query x gallery pair of the dataset is streamed once per interpreter through the explanation
evaluator (bounded memory). Written to --output (which must not exist or be empty; --new-folder takes
the next free <output>-N): audit.json (schema in docs/audit.md), summary.txt (also printed), PNG charts
and a self-contained index.html. With two or more checkpoints the first is the reference of the
comparison (bootstrap intervals over queries). Bad input (a missing or changed file, interpreters of
different attribute schemas, an output folder that exists) ends with one 'error: ...' line and exit
code 2; a failure of the system (a full disk) with one 'error: ...' line and exit code 1 (cli/errors.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from torchreid_attrimeter.audit import audit_checkpoints
from torchreid_attrimeter.audit_output import format_audit, prepare_audit_folder, write_audit
from torchreid_attrimeter.checkpoints import latest_checkpoint
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config-file", default="", help="the YAML an interpreter was trained with")
    parser.add_argument("--checkpoint", nargs="+", default=[],
                        help="interpreter checkpoints (default with a config: the latest in data.save_dir); "
                             "the first is the comparison's reference")
    parser.add_argument("--name", nargs="+", default=None, help="a name per checkpoint (default: its run folder)")
    parser.add_argument("--target-weights", nargs="+", default=None,
                        help="the targets' weights files if they moved (one for all, or one per checkpoint)")
    parser.add_argument("--trusted", action="store_true",
                        help="allow full unpickling of checkpoints and weights (only files you trust)")
    parser.add_argument("--dataset", default="", help="torchreid dataset name (default: data.targets[0])")
    parser.add_argument("--root", default="", help="data root (default: data.root)")
    parser.add_argument("--output", required=True, help="audit folder (must not exist or be empty)")
    parser.add_argument("--new-folder", action="store_true", help="if --output exists, write to <output>-N")
    parser.add_argument("--batch-size", type=int, default=64, help="images per extraction batch")
    parser.add_argument("--average-maps-images", type=int, default=200,
                        help="gallery images averaged for the mean attention maps (0: none)")
    parser.add_argument("--worst-queries", type=int, default=10, help="worst queries listed per interpreter")
    parser.add_argument("--examples", type=int, default=3, help="example pairs per blind spot")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the queries")
    parser.add_argument("--confidence", type=float, default=0.95, help="bootstrap interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the map sample")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0, help="the evaluator's working memory")
    parser.add_argument("--device", default="", help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace):
    """(checkpoints, dataset name, root, explainer options) from the arguments and the config."""
    cfg = load_config(args.config_file, args.opts or []) if args.config_file else None
    if cfg is None and args.opts:
        raise ConfigError(f"KEY VALUE options {args.opts} need --config-file")
    checkpoints = list(args.checkpoint)
    if not checkpoints:
        if cfg is None:
            raise ConfigError("give --checkpoint (one or more), or --config-file to take the latest of its run")
        latest = latest_checkpoint(cfg.data.save_dir)
        if latest is None:
            raise ConfigError(f"no interpreter checkpoint in '{cfg.data.save_dir}/model' (data.save_dir): train "
                              "first (tools/train.py --config-file ...) or pass --checkpoint")
        checkpoints = [latest]
    for path in checkpoints:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"interpreter checkpoint not found: '{path}'")
    dataset = args.dataset or (cfg.data.targets[0] if cfg is not None else "")
    root = args.root or (cfg.data.root if cfg is not None else "")
    if not dataset or not root:
        raise ConfigError("name the dataset and its root: --dataset NAME --root DIR (or --config-file)")
    options = {}
    if cfg is not None:
        options.update(norm_mean=list(cfg.data.norm_mean), norm_std=list(cfg.data.norm_std))
    trusted = args.trusted or bool(cfg is not None and cfg.attrimeter.trust_checkpoints)
    if args.batch_size < 1 or args.worst_queries < 0 or args.examples < 0:
        raise ConfigError("--batch-size must be at least 1, --worst-queries and --examples at least 0")
    return checkpoints, dataset, root, trusted, options


def run(args: argparse.Namespace) -> None:
    """Audit what ``args`` asks for and write it; a bad input raises (reported by ``main``)."""
    started = time.perf_counter()
    checkpoints, dataset, root, trusted, options = resolve(args)
    folder = prepare_audit_folder(args.output, new_folder=args.new_folder)
    target_weights = args.target_weights
    if target_weights is not None and len(target_weights) == 1:
        target_weights = target_weights[0]
    audit_run = audit_checkpoints(
        checkpoints, dataset, root, names=args.name, target_weights=target_weights, trusted=trusted,
        device=args.device or None, batch_size=args.batch_size, average_maps_images=args.average_maps_images,
        seed=args.seed, progress=not args.no_progress, memory_budget_mb=args.memory_budget_mb,
        worst_queries=args.worst_queries, examples=args.examples, resamples=args.resamples,
        confidence=args.confidence, **options)
    audit_run.timings["total"] = time.perf_counter() - started
    files = write_audit(audit_run, folder)
    print(format_audit(audit_run))
    print(f"\nAudit written to {files.folder} (audit.json, {len(files.pngs)} PNG, index.html) in "
          f"{time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """The tool: its exit status, and one ``error:`` line when it fails (cli/errors.py)."""
    return run_tool(lambda arguments: run(parse_args(arguments)), argv)


if __name__ == "__main__":
    sys.exit(main())
