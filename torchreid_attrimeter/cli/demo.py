"""The whole AttriMeter path on CPU: generate the synthetic attribute-person dataset, take a small
target (osnet_x0_25) trained on it, graft AttriMeter onto it, train the interpreter, evaluate it and
write an HTML report of explained ranked lists.

    attrimeter-demo            (or: make demo, python tools/demo.py)
    attrimeter-demo --train-target                            # train the target too (+10 min on 2 cores)
    attrimeter-demo --output demo_256 --image-size 256 128    # finer 16x8 feature maps, ~4x slower

The target is not the product, and training it took 60 % of the demo, so the package ships it:
``data/synthetic_demo_target.pth`` holds the weights this demo's own target step writes (torchreid's
ImageSoftmaxEngine, configs/synthetic_demo_target.yaml, seed 1, 15 epochs), which are the same bytes
on every machine tried. Its sha256 is checked before use. ``--train-target`` runs that step instead,
and says whether the weights it trained equal the shipped ones. Another ``--image-size`` always trains.

Everything is written under ./demo_output/ (``--output``). A re-run reuses what exists: the dataset,
the finished target checkpoint and the interpreter's checkpoints (an interrupted run continues).
The demo reads its two configs from the checkout's configs/ folder, so it runs from a source
checkout installed with ``pip install -e .`` (what ``make`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import list_checkpoints
from torchreid_attrimeter.cli import train as train_tool
from torchreid_attrimeter.cli import visualize as report_tool
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.config import (
    engine_run_kwargs,
    imagedata_kwargs,
    load_config,
    lr_scheduler_kwargs,
    optimizer_kwargs,
)
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset
from torchreid_attrimeter.models.attrimeter import file_sha256

# The checkout holding this package (torchreid_attrimeter/cli/demo.py): its configs/ are not package
# data, so an install that is not editable finds none and load_config names the missing file.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET_CONFIG = os.path.join(REPO, "configs", "synthetic_demo_target.yaml")
ATTRIMETER_CONFIG = os.path.join(REPO, "configs", "attrimeter_synthetic_demo.yaml")
# The target the demo's own target step trains at the default settings (see the module docstring).
SHIPPED_TARGET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                              "synthetic_demo_target.pth")
SHIPPED_TARGET_SHA256 = "4be6df0c53b9aa9ad64234bac971f32188a18c4d1c06997c57eeaed24d6de0f9"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="folder for data, checkpoints and results")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="input size of the target and the interpreter (default: the configs' 128 64)")
    parser.add_argument("--train-target", action="store_true",
                        help="train the target with torchreid's engine instead of using the shipped one")
    return parser.parse_args(argv)


SETTINGS_FILE = "demo_settings.json"


def default_image_size() -> list[int]:
    data = load_config(TARGET_CONFIG).data
    return [data.height, data.width]


def check_settings(output: str, settings: dict) -> None:
    """Record the settings an output folder is made with, and refuse to continue one made with others
    (its interpreter explains another target, or its target checkpoint has another input size). A
    folder from before this file existed was made with the configs' defaults; one from before the
    shipped target, with a trained target."""
    path = os.path.join(output, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    elif os.path.isdir(os.path.join(output, "target")):
        saved = {"image_size": default_image_size()}
    else:
        saved = None
    if saved is not None and "target" in settings:
        saved.setdefault("target", "trained")
    if saved is not None and saved != settings:
        raise SystemExit(f"{output} was made with {saved} and this run asks for {settings}: its checkpoints "
                         "do not fit. Use another --output (nothing was changed).")
    os.makedirs(output, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)


def finished_target(save_dir: str, max_epoch: int) -> str | None:
    """The target checkpoint of a completed training run (torchreid saves it after the final test)."""
    for epoch, path in list_checkpoints(save_dir):
        if epoch == max_epoch:
            return path
    return None


def shipped_target() -> str:
    """The shipped target's path, after checking that its bytes are the published ones."""
    if not os.path.isfile(SHIPPED_TARGET):
        raise FileNotFoundError(f"the demo's shipped target '{SHIPPED_TARGET}' is missing: restore it "
                                f"(git checkout -- torchreid_attrimeter/data) or run with --train-target")
    digest = file_sha256(SHIPPED_TARGET)
    if digest != SHIPPED_TARGET_SHA256:
        raise compat.CheckpointError(
            f"the demo's shipped target '{SHIPPED_TARGET}' has sha256 {digest[:12]}, not {SHIPPED_TARGET_SHA256[:12]}: "
            f"it was damaged or replaced. Restore it (git checkout -- torchreid_attrimeter/data) or run with "
            f"--train-target")
    print(f"=> Using the shipped target {SHIPPED_TARGET} (sha256 {digest[:12]}; --train-target trains it)")
    return SHIPPED_TARGET


def compare_with_shipped(trained: str) -> None:
    """Say whether a target trained at the default settings equals the shipped one, weight for weight."""
    trained_state = compat.extract_state_dict(compat.load_checkpoint(trained), source=f"'{trained}'")
    shipped_state = compat.load_checkpoint(SHIPPED_TARGET)
    differing = [key for key, value in shipped_state.items()
                 if key not in trained_state or not torch.equal(trained_state[key].cpu(), value)]
    if not differing and len(trained_state) == len(shipped_state):
        print(f"=> The trained target equals the shipped one ({len(shipped_state)} tensors, bit for bit)")
    else:
        print(f"=> The trained target differs from the shipped one in {len(differing)} of "
              f"{len(shipped_state)} tensors (another torch version or CPU can round differently)")


def train_target(cfg) -> str:
    """torchreid's scripts/main.py flow for an image model, with its own softmax or triplet engine."""
    existing = finished_target(cfg.data.save_dir, cfg.train.max_epoch)
    if existing:
        print(f"=> Reusing the trained target {existing}")
        return existing
    compat.set_random_seed(cfg.train.seed)
    datamanager = compat.ImageDataManager(**imagedata_kwargs(cfg))
    model = compat.build_model(cfg.model.name, num_classes=datamanager.num_train_pids, loss=cfg.loss.name,
                               pretrained=cfg.model.pretrained, use_gpu=cfg.use_gpu)
    optimizer = compat.build_optimizer(model, **optimizer_kwargs(cfg))
    scheduler = compat.build_lr_scheduler(optimizer, **lr_scheduler_kwargs(cfg))
    if cfg.loss.name == "softmax":
        engine = compat.ImageSoftmaxEngine(datamanager, model, optimizer=optimizer, scheduler=scheduler,
                                           use_gpu=cfg.use_gpu, label_smooth=cfg.loss.softmax.label_smooth)
    else:
        engine = compat.ImageTripletEngine(
            datamanager, model, optimizer=optimizer, margin=cfg.loss.triplet.margin,
            weight_t=cfg.loss.triplet.weight_t, weight_x=cfg.loss.triplet.weight_x, scheduler=scheduler,
            use_gpu=cfg.use_gpu, label_smooth=cfg.loss.softmax.label_smooth,
        )
    engine.run(**engine_run_kwargs(cfg))
    path = finished_target(cfg.data.save_dir, cfg.train.max_epoch)
    if path is None:
        raise RuntimeError(
            f"torchreid's engine finished but wrote no checkpoint in '{cfg.data.save_dir}/model'"
        )
    return path


def write_report(config_file: str, opts: list[str], report_dir: str) -> str:
    """A few explained ranked lists of the demo's test queries (the visualize tool, cli/visualize.py).
    Its errors propagate, so the demo reports them in one line with the tool's exit status."""
    index = os.path.join(report_dir, "index.html")
    if os.path.exists(index):
        print(f"=> Reusing the report {index}")
        return index
    report_tool.run(report_tool.parse_args(["--config-file", config_file, "--num-queries", "6", "--seed", "0",
                                            "--topk", "5", "--output", report_dir, *opts]))
    return index


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (data-loading workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _step(title: str, timings: dict, function, *args):
    print(f"\n=== {title} ===", flush=True)
    start, cpu_start = time.time(), _cpu_seconds()
    result = function(*args)
    timings[title] = (time.time() - start, _cpu_seconds() - cpu_start)
    print(f"=== {title}: {timings[title][0]:.0f} s (CPU {timings[title][1]:.0f} s) ===", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output = os.path.abspath(args.output)
    data_root = os.path.join(output, "data")
    use_gpu = torch.cuda.is_available()
    timings: dict[str, tuple[float, float]] = {}
    start, cpu_start = time.time(), _cpu_seconds()

    size = list(args.image_size or default_image_size())
    default_size = size == default_image_size()
    if not default_size and not args.train_target:
        print(f"=> The shipped target takes {default_image_size()} images, this run {size}: the target is trained")
    use_shipped = default_size and not args.train_target
    check_settings(output, {"image_size": size, "target": "shipped" if use_shipped else "trained"})
    _step("1/4 synthetic dataset", timings, generate_synthetic_dataset, data_root)

    target_cfg = load_config(TARGET_CONFIG, [
        "data.root", data_root, "data.save_dir", os.path.join(output, "target"),
        "data.workers", str(args.workers), "use_gpu", str(use_gpu),
        "data.height", str(size[0]), "data.width", str(size[1]),
    ])
    if use_shipped:
        target_weights = _step("2/4 target (shipped)", timings, shipped_target)
    else:
        target_weights = _step(f"2/4 target (torchreid engine, {target_cfg.loss.name} loss)", timings,
                               train_target, target_cfg)
        if default_size:
            compare_with_shipped(target_weights)

    attrimeter_cfg = load_config(ATTRIMETER_CONFIG, [
        "data.root", data_root, "data.save_dir", os.path.join(output, "attrimeter"),
        "data.workers", str(args.workers), "use_gpu", str(use_gpu),
        "model.name", target_cfg.model.name, "model.load_weights", target_weights,
        "data.height", str(target_cfg.data.height), "data.width", str(target_cfg.data.width),
    ])
    record = _step("3/4 AttriMeter (tools/train.py)", timings, train_tool.run, attrimeter_cfg)

    report_opts = ["data.root", data_root, "data.save_dir", os.path.join(output, "attrimeter"),
                   "model.name", target_cfg.model.name, "model.load_weights", target_weights,
                   "data.height", str(target_cfg.data.height), "data.width", str(target_cfg.data.width),
                   "use_gpu", str(use_gpu)]
    report = _step("4/4 explanations (tools/visualize_decomposition.py)", timings, write_report,
                   ATTRIMETER_CONFIG, report_opts, os.path.join(output, "report"))

    total = time.time() - start
    _print_summary(record["datasets"]["synthetic_attr"], timings, total, _cpu_seconds() - cpu_start, output,
                   report)
    record["timings_seconds"] = {**{title: wall for title, (wall, _) in timings.items()}, "total": total}
    return record


def _print_summary(results: dict, timings: dict[str, tuple[float, float]], total: float, total_cpu: float,
                   output: str, report: str) -> None:
    """The demo's closing lines: each step's wall and CPU time, the target's and the interpreter's
    retrieval and ADRE, and where to look next."""
    print("\n=== Demo finished ===")
    for title, (seconds, cpu_seconds) in timings.items():
        print(f"{title:<45s} {seconds:7.0f} s   (CPU {cpu_seconds:6.0f} s)")
    print(f"{'total':<45s} {total:7.0f} s   (CPU {total_cpu:6.0f} s)")
    print(f"target      R1 {results['target_rank1']:.2f}  mAP {results['target_mAP']:.2f}")
    print(f"interpreter R1 {results['interpreter_rank1']:.2f}  mAP {results['interpreter_mAP']:.2f}  "
          f"ADRE {results['ADRE']:.2f} %")
    print(f"Results, logs and checkpoints: {os.path.join(output, 'attrimeter')}")
    print(f"Explanations (open in a browser): {report}")


def cli(argv: list[str] | None = None) -> int:
    """``main`` with the exit status and one ``error:`` line (cli/errors.py)."""
    return run_tool(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
