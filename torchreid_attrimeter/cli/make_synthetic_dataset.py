"""Generate the synthetic attribute-person dataset under ROOT/synthetic_attr/ (Market-1501 layout
with market_attribute.mat). Re-runs with the same parameters reuse it; other parameters are an error.

    attrimeter-make-synthetic-dataset --root DIR [--num-ids N] [--seed S] [--num-cameras C] ...

(``python tools/make_synthetic_dataset.py`` and ``python -m torchreid_attrimeter.cli.make_synthetic_dataset``
are the same tool.) Parameters it cannot honour, or a folder made with other parameters, end with one
'error: ...' line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.data.synthetic import MANIFEST, default_parameters, generate_synthetic_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = default_parameters()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="torchreid data root; the dataset goes to ROOT/synthetic_attr")
    parser.add_argument("--num-ids", type=int, default=None,
                        help="train + test identities, split 4:1 (default: "
                             f"{defaults['num_train_identities']} + {defaults['num_test_identities']})")
    parser.add_argument("--num-train-ids", type=int, default=None)
    parser.add_argument("--num-test-ids", type=int, default=None)
    parser.add_argument("--num-cameras", type=int, default=defaults["num_cameras"])
    parser.add_argument("--min-images", type=int, default=defaults["min_images_per_identity"])
    parser.add_argument("--max-images", type=int, default=defaults["max_images_per_identity"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Generate (or reuse) the dataset; parameters it cannot honour raise a SyntheticParameterError and
    a folder made with other parameters a SyntheticDatasetError (reported by ``main``)."""
    parameters = {"num_cameras": args.num_cameras, "min_images_per_identity": args.min_images,
                  "max_images_per_identity": args.max_images}
    if args.num_train_ids is not None:
        parameters["num_train_identities"] = args.num_train_ids
    if args.num_test_ids is not None:
        parameters["num_test_identities"] = args.num_test_ids
    start = time.time()
    path = generate_synthetic_dataset(args.root, num_identities=args.num_ids, seed=args.seed, **parameters)
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
        manifest = json.load(handle)
    counts = manifest["image_counts"]
    print(f"{path} ready in {time.time() - start:.1f}s: {manifest['num_train_identities']} train / "
          f"{manifest['num_test_identities']} test identities; images: "
          + ", ".join(f"{folder} {count}" for folder, count in sorted(counts.items())))
    print(f"use it with torchreid root='{os.path.dirname(path)}' and source 'synthetic_attr'")


def main(argv: list[str] | None = None) -> int:
    """The tool: its exit status, and one ``error:`` line when it fails (cli/errors.py)."""
    return run_tool(lambda arguments: run(parse_args(arguments)), argv)


if __name__ == "__main__":
    sys.exit(main())
