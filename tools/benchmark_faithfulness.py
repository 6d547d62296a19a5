"""Faithfulness benchmark of a trained AttriMeter interpreter: counterfactual attribution on the
synthetic dataset (against uniform, frequency and random-map references, and a region oracle whose
maps are where each attribute is drawn), the feature-level deletion test (with the region oracle's
maps too on synthetic images) and the share AUC over pairs of different synthetic people (interpreter
and region oracle). Prints a table and writes a JSON file (an existing one is never replaced unless
--overwrite is given).

    python tools/benchmark_faithfulness.py                       (the demo's models in ./demo_output)
    python tools/benchmark_faithfulness.py --checkpoint RUN/model/model.pth.tar-6 --root DATA_ROOT
    python tools/benchmark_faithfulness.py --checkpoint CKPT --no-counterfactual --deletion-images market/query
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from torchreid_attrimeter.attributes import get_schema
from torchreid_attrimeter.checkpoints import latest_checkpoint
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.data.synthetic import DATASET_DIR, load_synthetic_plan, render_person
from torchreid_attrimeter.explain import Explainer
from torchreid_attrimeter.faithfulness import (
    TEST_FOLDERS,
    attribute_frequencies,
    build_counterfactual_pairs,
    counterfactual_benchmark,
    deletion_test,
    drawn_regions,
    format_faithfulness_table,
    identity_labels,
    share_auc_test,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_PID = re.compile(r"^(-?\d+)_")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-output", default="demo_output",
                        help="the demo's folder: default checkpoint and root are taken from it")
    parser.add_argument("--checkpoint", help="interpreter checkpoint (default: latest in <demo-output>/attrimeter)")
    parser.add_argument("--target-weights", help="the target weights file, if it moved since training")
    parser.add_argument("--root", help="dataset root holding synthetic_attr/ (default: <demo-output>/data)")
    parser.add_argument("--output", help="results JSON (default: faithfulness.json next to the checkpoint's run)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    parser.add_argument("--max-images", type=int, default=100,
                        help="test images to redraw (each gives one pair per attribute); 0 = all")
    parser.add_argument("--topk", type=int, default=3, help="k of the top-k attribution accuracy")
    parser.add_argument("--no-counterfactual", action="store_true",
                        help="skip the synthetic tests (counterfactual pairs and the share AUC)")
    parser.add_argument("--auc-images", type=int, default=150,
                        help="synthetic test images whose pairs of different people give the share AUC of the "
                             "interpreter and of the region oracle; 0 = skip it")
    parser.add_argument("--deletion-images", help="folder of images for the deletion test (default: the "
                        "synthetic query and gallery images)")
    parser.add_argument("--deletion-pairs", type=int, default=300,
                        help="random pairs of different identities for the deletion test; 0 = skip it")
    parser.add_argument("--area", type=float, default=0.2, help="fraction of the feature map removed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trusted", action="store_true", help="allow full unpickling of the checkpoint")
    return parser.parse_args(argv)


def resolve_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    """(checkpoint, dataset root, output JSON) from the arguments, with clear errors."""
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = latest_checkpoint(os.path.join(args.demo_output, "attrimeter"))
        if checkpoint is None:
            raise SystemExit(f"no interpreter checkpoint in '{args.demo_output}/attrimeter/model': run "
                             f"python tools/demo.py first, or pass --checkpoint PATH")
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"--checkpoint '{checkpoint}' does not exist")
    root = args.root or os.path.join(args.demo_output, "data")
    output = args.output or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))),
                                         "faithfulness.json")
    if os.path.exists(output) and not args.overwrite:
        raise SystemExit(f"the results file '{output}' exists: pass --overwrite to replace it or --output "
                         f"for another file")
    return checkpoint, root, output


def image_files(folders: list[str]) -> list[str]:
    files = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise SystemExit(f"image folder '{folder}' does not exist")
        files += sorted(os.path.join(folder, name) for name in os.listdir(folder)
                        if name.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
        raise SystemExit(f"the deletion test needs at least 2 images in {folders}, found {len(files)}")
    return files


def deletion_pairs(files: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """Random pairs of images; when file names start with a person id (Market / Duke style), of two
    different labelled identities (junk -1 and distractors 0 left out)."""
    pids = [_PID.match(os.path.basename(path)) for path in files]
    if all(pids):
        labelled = [(path, int(match.group(1))) for path, match in zip(files, pids) if int(match.group(1)) > 0]
    else:
        labelled = [(path, index) for index, path in enumerate(files)]
    if len({pid for _, pid in labelled}) < 2:
        raise SystemExit("the deletion test needs images of at least 2 identities")
    rng = np.random.default_rng(seed)
    first, second = [], []
    while len(first) < count:
        i, j = rng.integers(len(labelled), size=2)
        if labelled[i][1] != labelled[j][1]:
            first.append(labelled[i][0])
            second.append(labelled[j][0])
    return first, second


def synthetic_auc_images(plan, schema, count: int, seed: int) -> tuple[list, np.ndarray, list[int], list[np.ndarray]]:
    """``count`` labelled synthetic test images (a seeded choice), drawn from the plan, with their
    labels (N, M), pids and drawn regions."""
    images = [planned for planned in plan.images if planned.folder in TEST_FOLDERS and planned.identity is not None
              and planned.identity.pid > 0]
    chosen = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    images = [images[i] for i in sorted(chosen)]
    size = (int(plan.parameters["image_height"]), int(plan.parameters["image_width"]))
    pictures = [render_person(planned.identity, planned.camera, planned.view, size) for planned in images]
    labels = np.stack([identity_labels(schema, planned.identity) for planned in images])
    regions = [drawn_regions(plan, schema, planned.name, seed) for planned in images]
    return pictures, labels, [planned.identity.pid for planned in images], regions


def run_deletion(args: argparse.Namespace, explainer: Explainer, root: str, plan, schema) -> dict:
    """The deletion test on the synthetic test images (with the region oracle) or on --deletion-images."""
    folders = ([args.deletion_images] if args.deletion_images else
               [os.path.join(root, DATASET_DIR, folder) for folder in TEST_FOLDERS])
    first, second = deletion_pairs(image_files(folders), args.deletion_pairs, args.seed)
    regions = {}
    if plan is not None and not args.deletion_images:  # the plan knows where each attribute is drawn
        for path in set(first + second):
            regions[path] = drawn_regions(plan, schema, os.path.basename(path), args.seed)
    results = deletion_test(explainer, first, second, area=args.area, seed=args.seed, batch_size=args.batch_size,
                            regions_a=[regions[path] for path in first] if regions else None,
                            regions_b=[regions[path] for path in second] if regions else None)
    results["images"] = [os.path.abspath(folder) for folder in folders]
    return results


def run(args: argparse.Namespace) -> dict:
    checkpoint, root, output = resolve_paths(args)
    explainer = Explainer.from_checkpoint(checkpoint, target_weights=args.target_weights, trusted=args.trusted,
                                          device="cpu", batch_size=args.batch_size)
    record = explainer.checkpoint_record
    results: dict = {"checkpoint": os.path.abspath(checkpoint), "target": record["target"],
                     "metric": explainer.metric, "seed": args.seed}
    start = time.time()
    schema = get_schema(record["schema"])
    plan = None if args.no_counterfactual else load_synthetic_plan(root)
    if plan is not None:
        pairs = build_counterfactual_pairs(plan, schema, max_images=args.max_images or None, seed=args.seed)
        print(f"=> {len(pairs)} counterfactual pairs rendered ({time.time() - start:.0f} s)", flush=True)
        results["dataset_root"] = os.path.abspath(root)
        results["counterfactual"] = counterfactual_benchmark(
            explainer, pairs, schema, attribute_frequencies(plan, schema), ks=(1, args.topk), seed=args.seed,
            batch_size=args.batch_size)
        print(f"=> counterfactual benchmark done ({time.time() - start:.0f} s)", flush=True)
    if args.deletion_pairs > 0:
        results["deletion"] = run_deletion(args, explainer, root, plan, schema)
        print(f"=> deletion test done ({time.time() - start:.0f} s)", flush=True)
    if plan is not None and args.auc_images > 0:
        pictures, labels, pids, regions = synthetic_auc_images(plan, schema, args.auc_images, args.seed)
        results["share_auc"] = share_auc_test(explainer, pictures, labels, pids, regions=regions,
                                              batch_size=args.batch_size)
    results["seconds"] = time.time() - start
    print(format_faithfulness_table(results))
    mode = "w" if args.overwrite else "x"  # 'x' fails instead of replacing a file made meanwhile
    with open(output, mode, encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
    print(f"=> Results written to {output}")
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
