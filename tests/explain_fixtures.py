"""Shared, built-once fixtures of the explanation tests (test_explain, test_visualize,
test_report_browser): a tiny synthetic dataset, an untrained osnet_x0_25 target at 64x32, its
AttriMeter engine (with the attribute branch) and an interpreter checkpoint written by that engine.
Built in pytest's temporary folder, CPU only, pretrained=False, nothing downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.config import get_default_config
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset
from torchreid_attrimeter.engine import build_engine

TINY_DATASET = {"num_train_identities": 8, "num_test_identities": 6, "num_cameras": 2,
                "min_images_per_identity": 4, "max_images_per_identity": 4, "num_distractor_images": 0,
                "num_junk_images": 0, "image_height": 64, "image_width": 32}
IMAGE_SIZE = (64, 32)


@dataclass
class TinySetup:
    root: str  # data root holding synthetic_attr/
    target_weights: str
    checkpoint: str  # interpreter checkpoint written by AttriMeterEngine.save_model
    engine: object  # the AttriMeterEngine (its model, datamanager and test loaders)
    folder: str


_CACHE: dict[str, TinySetup] = {}


def tiny_setup(tmp_path_factory) -> TinySetup:
    """Built on first use, then shared by every test module of the session."""
    if "setup" in _CACHE:
        return _CACHE["setup"]
    # One intra-op thread: on a small shared CPU, OpenMP threads spinning against other processes made
    # these tiny forward passes ~300x slower (10 s instead of 30 ms for 12 images at 64x32).
    torch.set_num_threads(1)
    folder = str(tmp_path_factory.mktemp("explain"))
    root = os.path.join(folder, "data")
    generate_synthetic_dataset(root, seed=3, **TINY_DATASET)

    torch.manual_seed(0)
    target = compat.build_model("osnet_x0_25", num_classes=8, loss="softmax", pretrained=False, use_gpu=False)
    weights = os.path.join(folder, "osnet_x0_25.pth")
    torch.save(target.state_dict(), weights)

    cfg = get_default_config()
    cfg.use_gpu = False
    cfg.model.name = "osnet_x0_25"
    cfg.model.pretrained = False
    cfg.model.load_weights = weights
    cfg.data.root = root
    cfg.data.sources = ["synthetic_attr"]
    cfg.data.targets = ["synthetic_attr"]
    cfg.data.height, cfg.data.width = IMAGE_SIZE
    cfg.data.workers = 0
    cfg.data.save_dir = os.path.join(folder, "log")
    cfg.sampler.train_sampler = "RandomIdentitySampler"
    cfg.sampler.num_instances = 2
    cfg.train.batch_size = 8
    cfg.test.batch_size = 16
    cfg.attrimeter.hidden_channels = 16
    cfg.attrimeter.attribute_branch = True
    cfg.attrimeter.eval.amp = False
    engine = build_engine(cfg)
    # The freshly initialised head gives near-uniform maps; larger weights make the maps and shares
    # differ between attributes, as a trained interpreter's do, so ordering and drawing are tested.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in engine.model.head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    checkpoint = engine.save_model(0, None, cfg.data.save_dir)
    _CACHE["setup"] = TinySetup(root, weights, checkpoint, engine, folder)
    return _CACHE["setup"]
