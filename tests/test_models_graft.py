"""Every torchreid model grafts (or is refused with a TargetSplitError naming it), decomposes a batch,
and passes the equivalence check; weights in model-zoo and Engine-checkpoint form graft faithfully."""

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from real_material import SHARED  # tests/ helper, not a package

from torchreid_attrimeter import compat
from torchreid_attrimeter.compat import CheckpointError
from torchreid_attrimeter.models import TargetSplitError, build_attrimeter

# Architectures torchreid's model zoo publishes weights for: these must graft.
MODEL_ZOO = ("resnet50", "resnet50_fc512", "mlfn", "hacnn", "mobilenetv2_x1_0", "mobilenetv2_x1_4", "osnet_x1_0",
             "osnet_x0_75", "osnet_x0_5", "osnet_x0_25", "osnet_ibn_x1_0", "osnet_ain_x1_0")
# Smallest image size each model runs on (default 64x32): hacnn and mudeep need exactly their size.
IMAGE_SIZES = {"hacnn": (160, 64), "mudeep": (256, 128), "inceptionv4": (160, 80), "inceptionresnetv2": (160, 80)}
# Over ~1.5 s each on 2 CPU cores (mostly building and initialising the model).
SLOW = {"resnet101", "resnet152", "resnext101_32x8d", "resnext50_32x4d", "se_resnet101", "se_resnext101_32x4d",
        "se_resnext50_32x4d", "densenet161", "inceptionv4", "inceptionresnetv2", "mudeep", "xception",
        "resnet50mid", "pcb_p4", "pcb_p6", "mlfn", "nasnsetmobile"}
# Models refused with a TargetSplitError (none at present: every torchreid family has an adapter).
REFUSED: set = set()
WEIGHTS = str(SHARED / "weights" / "osnet_x0_25_market1501.pth")  # ../shared or ATTRIMETER_SHARED


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-of-2 forwards gain nothing from threads; on a shared 2-core machine spinning threads
    only cost time. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_names():
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
            for name in compat.available_model_names()]


def test_model_zoo_architectures_are_all_available():
    assert set(MODEL_ZOO) <= set(compat.available_model_names())
    assert not set(MODEL_ZOO) & REFUSED


@pytest.mark.parametrize("name", model_names())
def test_every_torchreid_model_grafts_and_decomposes(name):
    size = IMAGE_SIZES.get(name, (64, 32))
    torch.manual_seed(0)
    if name in REFUSED:
        with pytest.raises(TargetSplitError, match=name):
            build_attrimeter(name, 3, image_size=size)
        return
    meter = build_attrimeter(name, 3, image_size=size)  # runs the equivalence check
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        meter.eval()
        embedding = meter(images)
        assert torch.equal(embedding, meter.target(images))
        decomposition = meter.decompose(images)
    assert decomposition.attribute_embeddings.shape == (2, 3, embedding.shape[1])
    # >= 0, not > 0: randomly initialised deep models (densenet) reach logits where exp underflows
    assert decomposition.maps.shape[:2] == (2, 3) and (decomposition.maps >= 0).all()
    assert torch.isfinite(decomposition.attribute_embeddings).all()
    scale = max(1.0, float(embedding.abs().max()))
    assert torch.allclose(decomposition.embedding, embedding, atol=1e-4 * scale)


def reference_model(num_classes: int = 751) -> torch.nn.Module:
    """osnet_x0_25 with a 751-way classifier and non-trivial BN statistics, as after training."""
    torch.manual_seed(3)
    model = compat.build_model("osnet_x0_25", num_classes=num_classes, pretrained=False, use_gpu=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def assert_target_embedding_matches(meter, model):
    images = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(meter.eval()(images), model(images))


def test_graft_from_a_model_zoo_state_dict_with_module_prefix_and_751_classes(tmp_path):
    model = reference_model()
    path = tmp_path / "osnet_x0_25_market.pth"
    torch.save(OrderedDict(("module." + key, value) for key, value in model.state_dict().items()), path)
    meter = build_attrimeter("osnet_x0_25", 4, path, image_size=(128, 64))
    assert meter.target.classifier.out_features == 751
    assert meter.target_spec["weights"] == os.fspath(path) and len(meter.target_spec["weights_sha256"]) == 64
    assert_target_embedding_matches(meter, model)


def test_graft_from_a_torchreid_engine_checkpoint(tmp_path):
    model = reference_model(num_classes=12)
    compat.save_checkpoint({"state_dict": model.state_dict(), "epoch": 5, "rank1": np.float64(0.5),
                            "optimizer": torch.optim.Adam(model.parameters()).state_dict()}, str(tmp_path))
    meter = build_attrimeter("osnet_x0_25", 4, tmp_path / "model.pth.tar-5", image_size=(128, 64))
    assert_target_embedding_matches(meter, model)


def test_interpreter_trunk_starts_from_the_loaded_weights(tmp_path):
    model = reference_model()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    meter = build_attrimeter("osnet_x0_25", 4, path, image_size=(128, 64))
    for (_, copied), (_, original) in zip(meter.interpreter_trunk.state_dict().items(),
                                          torch.nn.Sequential(model.conv4, model.conv5).state_dict().items()):
        assert torch.equal(copied, original)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(compat.build_model("resnet18", 751, pretrained=False, use_gpu=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        build_attrimeter("osnet_x0_25", 4, path, image_size=(128, 64))


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f"model-zoo weights not found at {WEIGHTS}")
def test_graft_on_the_real_osnet_x0_25_market_weights():
    meter = build_attrimeter("osnet_x0_25", 26, WEIGHTS, image_size=(256, 128))
    plain = compat.build_model("osnet_x0_25", num_classes=751, pretrained=False, use_gpu=False)
    report = compat.load_matching_weights(plain, compat.load_state_dict_file(WEIGHTS))
    assert not report["missing"]
    plain.eval()
    images = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(meter.eval()(images), plain(images))
        decomposition = meter.decompose(images)
    assert torch.allclose(decomposition.embedding, plain(images), atol=1e-5)
    assert decomposition.attribute_embeddings.shape == (2, 26, 512)
