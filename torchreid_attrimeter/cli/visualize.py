"""Draw AttriMeter explanations of ranked lists: PNG figures, a JSON per query and one self-contained
index.html (offline, every image embedded).

    attrimeter-visualize --config-file configs/attrimeter_synthetic_demo.yaml \\
        --output log/report --num-queries 8
    attrimeter-visualize --checkpoint demo_output/attrimeter/model/model.pth.tar-20 \\
        --dataset synthetic_attr --root reid-data --queries 0 5 0001_c1s1_000101_00.jpg --output report

(``python tools/visualize_decomposition.py`` and ``python -m torchreid_attrimeter.cli.visualize`` are
the same tool.)

With a config, the checkpoint is the latest in data.save_dir (or --checkpoint), the dataset is
data.targets[0] under data.root. Queries are indices into the dataset's query list or image file
names; without --queries, --num-queries are drawn at random (--seed). An existing report folder is
never overwritten silently: --overwrite replaces it, --new-folder writes to the next free <output>-N.
When the dataset has attribute labels of the interpreter's schema, every figure and the HTML mark the
attributes whose labels differ between the two images (a bold name with '≠' and a dark bar edge), and
each share is shown against the even share 1/M.
The report is built in a temporary folder next to --output and moved there only when complete, so a
failed run (bad checkpoint, unreadable gallery image, full disk, no query explainable) leaves --output
as it was. Bad input ends with one 'error: ...' line and exit code 2; a failure of the system (a
full disk, a failed rename) with one 'error: ...' line and exit code 1 (cli/errors.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys

import numpy as np
import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import latest_checkpoint
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.config import ConfigError, load_config
from torchreid_attrimeter.explain import Explainer
from torchreid_attrimeter.report import ImageRecord, prepare_output_dir, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config-file", default="", help="the YAML the interpreter was trained with")
    parser.add_argument("--checkpoint", default="",
                        help="interpreter checkpoint (default with a config: the latest in data.save_dir)")
    parser.add_argument("--target-weights", default="",
                        help="the target's weights file, if it moved since the checkpoint was written")
    parser.add_argument("--trusted", action="store_true",
                        help="allow full unpickling of the checkpoint and weights (only files you trust)")
    parser.add_argument("--dataset", default="", help="torchreid dataset name (default: data.targets[0])")
    parser.add_argument("--root", default="", help="data root (default: data.root)")
    parser.add_argument("--queries", nargs="+", default=[],
                        help="query indices or image file names/paths of the dataset's query set")
    parser.add_argument("--num-queries", type=int, default=5, help="random queries when --queries is not given")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing random queries")
    parser.add_argument("--topk", type=int, default=10, help="gallery items per ranked list")
    parser.add_argument("--top-attributes", type=int, default=3, help="attributes whose maps are drawn per pair")
    parser.add_argument("--average-maps-images", type=int, default=200,
                        help="gallery images averaged for the per-attribute average maps (0: none)")
    parser.add_argument("--output", required=True, help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --output")
    parser.add_argument("--new-folder", action="store_true",
                        help="if --output holds a report, write to the next free <output>-N instead")
    parser.add_argument("--device", default="", help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    return parser.parse_args(argv)


def build_explainer(args: argparse.Namespace, cfg) -> tuple[Explainer, str]:
    checkpoint = args.checkpoint
    if not checkpoint:
        if cfg is None:
            raise ConfigError("give --checkpoint, or --config-file to take the latest checkpoint of its run")
        checkpoint = latest_checkpoint(cfg.data.save_dir)
        if checkpoint is None:
            raise ConfigError(
                f"no interpreter checkpoint in '{cfg.data.save_dir}/model' (data.save_dir): train first "
                f"(attrimeter-train --config-file ...) or pass --checkpoint"
            )
    kwargs = {}
    if cfg is not None:
        kwargs.update(norm_mean=list(cfg.data.norm_mean), norm_std=list(cfg.data.norm_std))
    explainer = Explainer.from_checkpoint(
        checkpoint, target_weights=args.target_weights or None, trusted=args.trusted or bool(
            cfg is not None and cfg.attrimeter.trust_checkpoints),
        device=args.device or None, **kwargs,
    )
    return explainer, checkpoint


def load_dataset(name: str, root: str):
    """The torchreid dataset (attribute datasets are registered by importing torchreid_attrimeter)."""
    datasets = compat.torchreid_submodule("data.datasets")
    # torchreid answers an unknown name with a plain ValueError; the name is the user's input
    known = vars(datasets).get("__image_datasets", {})
    if known and name not in known:
        raise ConfigError(f"unknown dataset '{name}' (--dataset or data.targets): use one of {sorted(known)}")
    with contextlib.redirect_stdout(io.StringIO()):  # torchreid prints its statistics table
        return datasets.init_image_dataset(name, root=root, mode="gallery")


def choose_queries(query_set: list, wanted: list[str], count: int, seed: int) -> list[int]:
    """Indices into the dataset's query list: the named ones, else ``count`` drawn with ``seed``."""
    if not wanted:
        if count < 1:
            raise ConfigError(f"--num-queries is {count}: choose at least one query")
        return sorted(random.Random(seed).sample(range(len(query_set)), min(count, len(query_set))))
    by_name = {os.path.basename(item[0]): index for index, item in enumerate(query_set)}
    by_path = {os.path.abspath(item[0]): index for index, item in enumerate(query_set)}
    chosen = []
    for value in wanted:
        if value.isdigit():
            if int(value) >= len(query_set):
                raise ConfigError(f"query index {value} is out of range: the query set has {len(query_set)} images")
            chosen.append(int(value))
        elif os.path.abspath(value) in by_path:
            chosen.append(by_path[os.path.abspath(value)])
        elif os.path.basename(value) in by_name:
            chosen.append(by_name[os.path.basename(value)])
        else:
            raise ConfigError(f"query '{value}' is neither an index nor an image of the query set")
    return chosen


def has_labels_for(dataset, attribute_names: tuple[str, ...]) -> bool:
    """The dataset is an attribute dataset of the interpreter's schema (same names, same order)."""
    return tuple(getattr(dataset, "attribute_names", ())) == tuple(attribute_names)


def attribute_labels(dataset, records: list[ImageRecord], attribute_names: tuple[str, ...]):
    """((N, M) values, (N, M) known) from an attribute dataset, or None (no labels / other schema)."""
    if not has_labels_for(dataset, attribute_names):
        return None
    values, known = zip(*(dataset.labels_of(record.path) for record in records))
    return torch.as_tensor(np.stack(values), dtype=torch.float32), torch.as_tensor(np.stack(known), dtype=torch.bool)


def labelled_records(dataset, items, attribute_names: tuple[str, ...]) -> list[ImageRecord]:
    """ImageRecords of torchreid's (path, pid, camid, ...) items, with each image's ground-truth
    attributes when the dataset has labels of the interpreter's schema (the report marks the
    attributes whose labels differ)."""
    labelled = has_labels_for(dataset, attribute_names)
    return [ImageRecord(item[0], int(item[1]), int(item[2]), dataset.labels_of(item[0]) if labelled else None)
            for item in items]


def run(args: argparse.Namespace) -> None:
    """Write the report asked for by ``args``; a bad input raises (reported by ``main``)."""
    cfg = load_config(args.config_file, args.opts or []) if args.config_file else None
    if cfg is None and args.opts:
        raise ConfigError(f"KEY VALUE options {args.opts} need --config-file")
    dataset_name = args.dataset or (cfg.data.targets[0] if cfg is not None else "")
    root = args.root or (cfg.data.root if cfg is not None else "")
    if not dataset_name or not root:
        raise ConfigError("name the dataset and its root: --dataset NAME --root DIR (or --config-file)")
    if args.topk < 1 or args.top_attributes < 1:
        raise ConfigError("--topk and --top-attributes must be at least 1")
    if args.average_maps_images < 0:
        raise ConfigError(f"--average-maps-images is {args.average_maps_images}: give 0 (no average maps) or more")
    folder = prepare_output_dir(args.output, overwrite=args.overwrite, new_folder=args.new_folder)
    explainer, checkpoint = build_explainer(args, cfg)
    dataset = load_dataset(dataset_name, root)
    query_set = labelled_records(dataset, dataset.query, explainer.attribute_names)
    gallery = labelled_records(dataset, dataset.gallery, explainer.attribute_names)
    queries = [query_set[index] for index in choose_queries(dataset.query, args.queries, args.num_queries,
                                                            args.seed)]
    averaged = random.Random(args.seed).sample(gallery, min(args.average_maps_images, len(gallery)))
    labels = attribute_labels(dataset, averaged, explainer.attribute_names) if averaged else None
    record = explainer.checkpoint_record
    info = {
        "checkpoint": os.path.abspath(checkpoint),
        "target": f"{record['target']['name']} ({record['target'].get('weights')})",
        "attributes": f"{len(explainer.attribute_names)} ({record.get('schema')})",
        "metric": explainer.metric,
        "dataset": f"{dataset_name}: {len(query_set)} queries, {len(gallery)} gallery images",
        "queries shown": len(queries),
    }
    files = write_report(explainer, queries, gallery, folder, topk=args.topk,
                         top_attributes=args.top_attributes, info=info,
                         average_maps_images=averaged if labels is not None else (),
                         average_maps_labels=labels, overwrite=args.overwrite)
    print(f"Report written to {files.index} ({len(files.pngs)} PNG, {len(files.jsons)} JSON)")
    for path in files.failed_queries:
        print(f"warning: query '{path}' could not be explained; see its entry in the report", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The tool: its exit status, and one ``error:`` line when it fails (cli/errors.py)."""
    return run_tool(lambda arguments: run(parse_args(arguments)), argv)


if __name__ == "__main__":
    sys.exit(main())
