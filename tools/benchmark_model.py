"""Cost of AttriMeter against its target, printed as JSON.

For each target: (1) one interpreter training step (decompose + both losses + backward) against one
plain training step of the target (forward in train mode + cross-entropy + backward) on the same
batch; (2) ``decompose`` in eval mode against the target's own eval forward. Times are medians over
repeats after warm-up, measured side by side in one run.

    python tools/benchmark_model.py --targets osnet_x1_0 resnet50 --batch-size 24 --height 256 --width 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.decomposition import pairwise_components
from torchreid_attrimeter.losses import AttributePriorLoss, DistanceDistillationLoss
from torchreid_attrimeter.models import build_attrimeter
from torchreid_attrimeter.models.attrimeter import VARIANTS


def interleaved_medians(steps: dict, repeats: int, warmup: int) -> dict:
    """Median seconds of each step, the steps run in turn within every repeat so that load from
    other processes on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark_target(name: str, batch_size: int, image_size: tuple[int, int], num_attributes: int,
                     variant: str, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, *image_size)
    pids = torch.arange(batch_size) % max(1, batch_size // 4)
    attributes = torch.randint(0, 2, (batch_size, num_attributes)).float()
    known = torch.ones(batch_size, num_attributes, dtype=torch.bool)

    plain = compat.build_model(name, num_classes=751, loss="softmax", pretrained=False, use_gpu=False)
    plain.train()
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-6)
    cross_entropy = torch.nn.CrossEntropyLoss()

    def plain_step():
        plain_optimizer.zero_grad(set_to_none=True)
        cross_entropy(plain(images), pids).backward()
        plain_optimizer.step()

    plain_eval = compat.build_model(name, num_classes=751, loss="softmax", pretrained=False, use_gpu=False).eval()

    def plain_eval_forward():
        with torch.no_grad():
            plain_eval(images)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_attrimeter(compat.build_model(name, num_classes=751, pretrained=False, use_gpu=False),
                                 num_attributes, variant=variant, image_size=image_size)
    optimizer = torch.optim.Adam(model.interpreter_parameters(), lr=1e-6)
    distillation, prior = DistanceDistillationLoss(), AttributePriorLoss()

    def interpreter_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        distances = pairwise_components(*(2 * [model(images)]))
        (distillation(distances) + 10.0 * prior(distances, attributes, known)).backward()
        optimizer.step()

    def decompose_eval():
        model.eval()
        with torch.no_grad():
            model.decompose(images)

    medians = interleaved_medians({"plain_train": plain_step, "interpreter_train": interpreter_step,
                                   "target_eval": plain_eval_forward, "decompose_eval": decompose_eval},
                                  repeats, warmup)
    plain_train, interpreter_train = medians["plain_train"], medians["interpreter_train"]
    target_eval, decomposition_eval = medians["target_eval"], medians["decompose_eval"]
    return {
        "target": name,
        "variant": variant,
        "plain_train_step_s": round(plain_train, 4),
        "interpreter_train_step_s": round(interpreter_train, 4),
        "train_ratio": round(interpreter_train / plain_train, 3),
        "target_eval_forward_s": round(target_eval, 4),
        "decompose_eval_s": round(decomposition_eval, 4),
        "eval_ratio": round(decomposition_eval / target_eval, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["osnet_x1_0", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--num-attributes", type=int, default=26)
    parser.add_argument("--variant", choices=VARIANTS, default="trunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "batch_size": args.batch_size,
        "image_size": [args.height, args.width],
        "num_attributes": args.num_attributes,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "limits": {"train_ratio": 2.5, "eval_ratio": 2.0},
        "results": [
            benchmark_target(name, args.batch_size, (args.height, args.width), args.num_attributes,
                             args.variant, args.repeats, args.warmup)
            for name in args.targets
        ],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(run_tool(main))
