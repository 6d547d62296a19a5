"""The tiny training setup several test files share (a tests/ helper, not a test): a synthetic dataset
small enough for a CPU epoch in about a second, untrained target weights, and a config training on
them. The fixtures built from it are in conftest.py."""

from __future__ import annotations

import os

import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.config import get_default_config
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset

# 8 training identities x 4 images: with P=4, K=2 (tiny_config) two batches per epoch.
TINY_DATASET = {
    "num_train_identities": 8, "num_test_identities": 6, "num_cameras": 2, "min_images_per_identity": 4,
    "max_images_per_identity": 4, "num_distractor_images": 0, "num_junk_images": 0, "image_height": 64,
    "image_width": 32,
}


def make_synthetic_root(folder: str | os.PathLike, seed: int = 3, **parameters) -> str:
    """A data root holding synthetic_attr/ (TINY_DATASET, or ``parameters`` in its place)."""
    generate_synthetic_dataset(str(folder), seed=seed, **(parameters or TINY_DATASET))
    return str(folder)


def save_untrained_target(folder: str | os.PathLike, name: str = "resnet18", num_classes: int = 8) -> str:
    """Weights of an untrained torchreid model (seed 0): what the tests check is the plumbing, not what
    the target learned."""
    torch.manual_seed(0)
    model = compat.build_model(name, num_classes=num_classes, loss="softmax", pretrained=False, use_gpu=False)
    path = os.path.join(str(folder), f"{name}.pth")
    torch.save(model.state_dict(), path)
    return path


def tiny_config(data_root, weights, save_dir, name="resnet18", **overrides):
    cfg = get_default_config()
    cfg.use_gpu = False
    cfg.model.name = name
    cfg.model.pretrained = False
    cfg.model.load_weights = weights
    cfg.data.root = data_root
    cfg.data.sources = ["synthetic_attr"]
    cfg.data.targets = ["synthetic_attr"]
    cfg.data.height, cfg.data.width = 64, 32
    cfg.data.workers = 0
    cfg.data.save_dir = str(save_dir)
    cfg.sampler.train_sampler = "RandomIdentitySampler"
    cfg.sampler.num_instances = 2
    cfg.train.batch_size = 8
    cfg.train.max_epoch = 1
    cfg.train.print_freq = 1
    cfg.train.lr = 1e-3
    cfg.test.batch_size = 16
    cfg.test.ranks = [1, 5]
    cfg.attrimeter.hidden_channels = 16
    cfg.attrimeter.eval.amp = False
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    return cfg
