"""Train or evaluate an AttriMeter interpreter from a torchreid YAML config.

torchreid's ``scripts/main.py`` flow (config file, then ``KEY VALUE`` overrides, a log file in
``data.save_dir``, ``engine.run``) with the AttriMeter engine:

    attrimeter-train --config-file configs/attrimeter_synthetic_demo.yaml [KEY VALUE ...]
    attrimeter-train --config-file CFG --resume auto          # continue an interrupted run
    attrimeter-train --config-file CFG --evaluate             # evaluate the latest checkpoint
    torchrun --nproc_per_node 2 tools/train.py --config-file CFG   # DistributedDataParallel

(``python tools/train.py`` and ``python -m torchreid_attrimeter.cli.train`` are the same tool.)

Under torchrun every process runs the same flow with its share of each (global) train.batch_size;
rank 0 alone evaluates and writes the log, checkpoints and results (torchreid_attrimeter/distributed.py).

One data.save_dir holds one run: a new run refuses a folder with another run's checkpoints, so
``--evaluate`` and ``--resume auto`` (the folder's latest checkpoint) always find this run's. The
final metrics are printed as a table and written to ``<save_dir>/results-<time>.json``, which names
the checkpoint they were computed with.

Exit status (cli/errors.py): 0 done, 2 bad input (config, data, checkpoint or weights file: one
``error:`` line), 1 when the system fails the run (e.g. a full disk, also one ``error:`` line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import latest_checkpoint, write_file_safely
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.config import (
    ConfigError,
    check_attrimeter_config,
    engine_run_kwargs,
    load_config,
)
from torchreid_attrimeter.distributed import (
    init_distributed,
    make_engine_distributed,
    on_main_process,
    run_on_every_rank,
)
from torchreid_attrimeter.engine import build_engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config-file", type=str, default="", help="path to a torchreid/AttriMeter YAML")
    parser.add_argument("-s", "--sources", type=str, nargs="+", help="source datasets (data.sources)")
    parser.add_argument("-t", "--targets", type=str, nargs="+", help="target datasets (data.targets)")
    parser.add_argument("--transforms", type=str, nargs="+", help="data augmentation (data.transforms)")
    parser.add_argument("--root", type=str, default="", help="path to the data root (data.root)")
    parser.add_argument("--resume", type=str, default="",
                        help="interpreter checkpoint to resume from, or 'auto' for the latest one in "
                             "data.save_dir (model.resume)")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate only (test.evaluate); loads model.resume, by default the latest "
                             "checkpoint in data.save_dir")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="KEY VALUE pairs overriding the config, e.g. train.max_epoch 10")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    cfg = load_config(args.config_file or None, args.opts or [])
    if args.root:
        cfg.data.root = args.root
    if args.sources:
        cfg.data.sources = args.sources
    if args.targets:
        cfg.data.targets = args.targets
    if args.transforms:
        cfg.data.transforms = args.transforms
    if args.resume:
        cfg.model.resume = args.resume
    if args.evaluate:
        cfg.test.evaluate = True
    return cfg


def resolve_resume(cfg) -> str | None:
    """The checkpoint to start from: model.resume, 'auto' = the latest in data.save_dir (none: a
    fresh run); evaluation without model.resume also takes the latest."""
    resume = cfg.model.resume
    if resume and resume != "auto":
        if not os.path.isfile(resume):
            raise ConfigError(f"model.resume / --resume: checkpoint file not found: '{resume}'")
        return resume
    if resume == "auto" or cfg.test.evaluate:
        found = latest_checkpoint(cfg.data.save_dir)
        if found is None and cfg.test.evaluate:
            raise ConfigError(
                f"nothing to evaluate: no interpreter checkpoint in '{cfg.data.save_dir}/model' "
                f"(data.save_dir). Train first, or give one with --resume PATH (model.resume)"
            )
        if found is None:
            print(f"=> No checkpoint in '{cfg.data.save_dir}/model' to resume from: starting a new run")
        return found
    return None


def save_results(results: dict, save_dir: str) -> str:
    """Write ``results-<time>.json`` in save_dir; never replaces an existing file, and a failed write
    (full disk) leaves no partial file: OSError naming the file."""
    os.makedirs(save_dir, exist_ok=True)
    stem = os.path.join(save_dir, time.strftime("results-%Y%m%d-%H%M%S"))
    content = json.dumps(results, indent=2, sort_keys=True).encode("utf-8")
    for attempt in range(1000):
        path = f"{stem}.json" if attempt == 0 else f"{stem}-{attempt}.json"
        try:
            write_file_safely(path, lambda stream: stream.write(content), overwrite=False)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise OSError(error.errno, f"could not write the results file '{path}' ({error.strerror or error}); "
                          f"the files already in '{save_dir}' are untouched and the metrics are in the "
                          f"log above. Free disk space and run --evaluate to write them again") from error
    raise FileExistsError(f"could not find a free results file name next to '{stem}.json'")


def new_log_path(save_dir: str, prefix: str) -> str:
    """torchreid's log name (``train.log-<time>``), numbered when that name is taken: torchreid's
    Logger opens its file with 'w'."""
    stem = os.path.join(save_dir, prefix + time.strftime("-%Y-%m-%d-%H-%M-%S"))
    path, number = stem, 0
    while os.path.exists(path):
        number += 1
        path = f"{stem}-{number}"
    return path


class _LogFile:
    """torchreid's Logger (console output copied to a file in save_dir) for the duration of a run.

    torchreid's Logger closes the console stream it wraps when it is closed or garbage collected;
    the real stdout is put back and shielded from that when the run ends.
    """

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.stdout = sys.stdout
        self.logger = compat.Logger(self.path)
        sys.stdout = self.logger
        return self

    def __exit__(self, *exc_info):
        sys.stdout = self.stdout
        self.logger.file.close()
        self.logger.file = None
        self.logger.console = open(os.devnull, "w")  # noqa: SIM115 - closed by the Logger itself


def run(cfg) -> dict:
    """Build everything from ``cfg``, train and/or evaluate; returns the results record.

    Started by torchrun, every process runs this: training with DistributedDataParallel, and
    rank 0 alone evaluating and writing the log, checkpoints and results.
    """
    check_attrimeter_config(cfg)
    context = init_distributed(cfg)  # None without torchrun
    try:
        return _run(cfg, context)
    finally:
        if context is not None:
            context.shutdown()


def _run(cfg, context) -> dict:
    from torchreid_attrimeter.evaluation import format_table

    main = context is None or context.is_main
    compat.set_random_seed(cfg.train.seed)
    with contextlib.ExitStack() as stack:
        if main:
            stack.enter_context(_LogFile(new_log_path(
                cfg.data.save_dir, "test.log" if cfg.test.evaluate else "train.log")))
        else:  # rank 0 reports for everyone; errors still reach stderr
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        print(f"Show configuration\n{cfg}\n")
        print(f"torchreid: {compat.TORCHREID_FLAVOUR}, torch {torch.__version__}")
        if context is not None:
            print(f"torchrun: {context.world_size} processes ({context.backend}), train.batch_size "
                  f"{cfg.train.batch_size} = {cfg.train.batch_size // context.world_size} per process")
        engine = run_on_every_rank(context, build_engine, cfg, what="building the engine")
        resume = on_main_process(context, resolve_resume, cfg, what="finding the checkpoint to resume")
        start_epoch = (run_on_every_rank(context, engine.resume, resume, what=f"resuming from '{resume}'")
                       if resume else cfg.train.start_epoch)
        if context is not None:
            compat.set_random_seed(cfg.train.seed + context.rank)  # own data augmentation per rank
            make_engine_distributed(engine, cfg, context)
        run_kwargs = engine_run_kwargs(cfg)
        run_kwargs["start_epoch"] = start_epoch
        engine.run(**run_kwargs)

        record = {
            "config": cfg.dump(),
            # The checkpoint this run wrote last, or loaded when it trained nothing: never another
            # run's (the engine refuses a data.save_dir holding one).
            "checkpoint": engine.last_checkpoint,
            "epoch": engine.last_checkpoint_epoch,
            "target": {key: (list(value) if isinstance(value, tuple) else value)
                       for key, value in engine.model.target_spec.items()},
            "metric": engine.metric,
            "datasets": engine.test_results,
        }
        if main:
            print("=> Final results")
            for name, results in engine.test_results.items():
                print(f"##### {name} #####\n{format_table(results)}")
            path = save_results(record, cfg.data.save_dir)
            print(f'Results saved to "{path}"')
    return record


def main(argv: list[str] | None = None) -> dict:
    return run(config_from_args(parse_args(argv)))


def cli(argv: list[str] | None = None) -> int:
    """``main`` with the exit status and one ``error:`` line (cli/errors.py)."""
    return run_tool(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
