"""Real-data smoke test: AttriMeter on torchreid's model-zoo osnet_x0_25 checkpoints (Market-1501 and
MSMT17) and the DukeMTMC-reID development split, both read from ``../shared`` beside the repository.

Marked ``real_data`` and skipped when ``../shared`` is absent (the project works without it). Small on
purpose (< 90 s on 2 CPU cores): 128x64 images, a few identities, a few training steps, a few queries.
Nothing read here is copied into the repository.
"""

from __future__ import annotations

import os

import pytest
import torch
from real_material import BESIDE_REPO, DUKE_DEV_ROOT, REPO, SHARED  # tests/ helper, not a package

from torchreid_attrimeter import compat
from torchreid_attrimeter.config import load_config
from torchreid_attrimeter.data.datasets import DukeMTMCreIDAttributes, read_image_checked
from torchreid_attrimeter.decomposition import pairwise_components
from torchreid_attrimeter.evaluation import ExplanationEvaluator
from torchreid_attrimeter.feature_cache import CachedTrainLoader, TargetFeatureCache, decompose_cached
from torchreid_attrimeter.losses import AttributePriorLoss, DistanceDistillationLoss
from torchreid_attrimeter.models import build_attrimeter

DATA_ROOT = DUKE_DEV_ROOT
WEIGHTS = {"market1501": (SHARED / "weights" / "osnet_x0_25_market1501.pth", 751),
           "msmt17": (SHARED / "weights" / "osnet_x0_25_msmt17.pth", 1041)}
CONFIGS = {name: REPO / "configs" / f"attrimeter_dukemtmcreid_dev_osnet_x0_25_{name}.yaml" for name in WEIGHTS}
IMAGE_SIZE = (128, 64)

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (DATA_ROOT.is_dir() and all(path.is_file() for path, _ in WEIGHTS.values())),
                       reason=f"real data / weights not found under {SHARED} (../shared beside the repository, or set "
                              "ATTRIMETER_SHARED)"),
]


@pytest.fixture(scope="module")
def duke():
    return DukeMTMCreIDAttributes(root=str(DATA_ROOT))


@pytest.fixture(scope="module")
def transform():
    _, transform_test = compat.build_transforms(*IMAGE_SIZE, transforms=None)
    return transform_test


def _images(items, transform) -> torch.Tensor:
    return torch.stack([transform(read_image_checked(item[0])) for item in items])


def test_dataset_reads_the_dev_split_with_labels_for_every_identity(duke):
    assert (len(duke.train), len(duke.query), len(duke.gallery)) == (14084, 319, 2119)
    assert duke.num_train_pids == 602 and len(duke.attribute_names) == 23
    # validation identities are labelled too (looked up in whichever split of the .mat holds them)
    for item in duke.query[:20] + duke.gallery[:20]:
        assert duke.labels_of(item[0])[1].all()


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_configs_point_at_the_shared_checkpoints(name):
    cfg = load_config(CONFIGS[name])
    weights, _ = WEIGHTS[name]
    assert (REPO / cfg.model.load_weights).resolve() == (BESIDE_REPO / weights.relative_to(SHARED)).resolve()
    assert (REPO / cfg.data.root).resolve() == (BESIDE_REPO / DATA_ROOT.relative_to(SHARED)).resolve()
    assert cfg.data.sources == ["dukemtmcreid_attr"] and cfg.attrimeter.cache_target_features


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_grafted_model_embeds_real_images_like_torchreid(name, duke, transform):
    weights, classes = WEIGHTS[name]
    reference = compat.build_model("osnet_x0_25", num_classes=classes, pretrained=False, use_gpu=False)
    reference.load_state_dict(compat.load_state_dict_file(str(weights)))  # strict: every key fits
    reference.eval()
    model = build_attrimeter("osnet_x0_25", 23, weights, variant="trunk", image_size=IMAGE_SIZE).eval()
    images = _images(duke.query[:4], transform)
    with torch.no_grad():
        expected = reference(images)
        assert torch.equal(model(images), expected)
        decomposition = model.decompose(images)
    torch.testing.assert_close(decomposition.embedding, expected, rtol=1e-5, atol=1e-5)
    assert decomposition.attribute_embeddings.shape == (4, 23, expected.shape[1])


def test_train_on_cached_features_then_evaluate_a_few_queries(duke, transform):
    torch.manual_seed(0)
    weights, _ = WEIGHTS["msmt17"]
    model = build_attrimeter("osnet_x0_25", 23, weights, variant="trunk", image_size=IMAGE_SIZE)
    train_pids = sorted({item[1] for item in duke.train})[:4]
    items = [item for pid in train_pids for item in [i for i in duke.train if i[1] == pid][:4]]
    cache = TargetFeatureCache.build(model.eval(), items, duke.labels_of, transform, flips=True, batch_size=16,
                                     progress=False)
    assert cache.feature_maps.shape[:2] == (16, 2) and cache.stem_states is not None
    # the cached path computes what the image path computes (up to float16 storage)
    with torch.no_grad():
        direct = model.decompose(_images(items[:2], transform))
        cached = decompose_cached(model, cache.batch(torch.arange(2), torch.zeros(2, dtype=torch.long))
                                  ["cached_target"])
    torch.testing.assert_close(cached.embedding, direct.embedding, rtol=1e-2, atol=1e-2)

    loader = CachedTrainLoader(cache, list(range(16)), batch_size=16, random_flip=True)
    optimizer = torch.optim.Adam(model.interpreter_parameters(), lr=1e-3)
    before = {key: value.clone() for key, value in model.interpreter_state_dict().items()}
    model.train()
    dd, ap = DistanceDistillationLoss(), AttributePriorLoss()
    for _ in range(3):
        for batch in loader:
            distances = pairwise_components(*(2 * [decompose_cached(model, batch["cached_target"])]), "euclidean")
            loss = dd(distances) + 10 * ap(distances, batch["attributes"], batch["attributes_known"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
    assert any(not torch.equal(before[key], value) for key, value in model.interpreter_state_dict().items()
               if value.is_floating_point())

    # a few validation queries against their identities' gallery images plus some distractors
    model.eval()
    query = duke.query[:6]
    query_pids = {item[1] for item in query}
    gallery = [item for item in duke.gallery if item[1] in query_pids][:24] + duke.gallery[-8:]
    evaluator = ExplanationEvaluator(duke.attribute_names, metric="euclidean", progress=False)
    for split, split_items in (("query", query), ("gallery", gallery)):
        with torch.no_grad():
            decomposition = model.decompose(_images(split_items, transform))
        labels = [duke.labels_of(item[0]) for item in split_items]
        evaluator.process(decomposition, torch.tensor([item[1] for item in split_items]),
                          torch.tensor([item[2] for item in split_items]),
                          torch.stack([torch.as_tensor(values) for values, _ in labels]),
                          torch.stack([torch.as_tensor(known) for _, known in labels]), split=split)
    results = evaluator.evaluate()
    for key in ("target_rank1", "target_mAP", "interpreter_rank1", "interpreter_mAP", "X-mAP_c"):
        assert results[key] is not None and 0 <= results[key] <= 100, (key, results[key])
    assert results["ADRE"] is not None and 0 <= results["ADRE"] < 100
    assert os.path.isdir(DATA_ROOT)  # read only: nothing was written under the shared folder
