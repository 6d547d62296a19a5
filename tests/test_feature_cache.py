"""Feature cache (attrimeter.cache_target_features) without real data: a random osnet_x0_25 target."""

from __future__ import annotations

import pytest
import torch

from torchreid_attrimeter.config import ConfigError, check_attrimeter_config, get_default_config
from torchreid_attrimeter.feature_cache import (
    CachedTrainLoader,
    FeatureCacheError,
    TargetFeatureCache,
    check_cacheable_transforms,
    decompose_cached,
)
from torchreid_attrimeter.models import build_attrimeter


def test_only_flips_can_be_cached():
    check_cacheable_transforms(["random_flip"])
    check_cacheable_transforms([])
    with pytest.raises(FeatureCacheError, match="random_crop"):
        check_cacheable_transforms(["random_flip", "random_crop"])
    cfg = get_default_config()
    cfg.model.load_weights = "target.pth"
    cfg.attrimeter.cache_target_features = True
    cfg.data.transforms = ["random_flip", "random_erase"]
    with pytest.raises(ConfigError, match="cache_target_features"):
        check_attrimeter_config(cfg)


@pytest.mark.parametrize("variant", ["trunk", "head"])
def test_cached_batches_decompose_like_images(variant):
    torch.manual_seed(0)
    model = build_attrimeter("osnet_x0_25", 5, variant=variant, image_size=(64, 32)).eval()
    images = torch.randn(6, 3, 64, 32)
    split = model.target_split
    with torch.no_grad():
        states = torch.stack([split.stem(images), split.stem(images.flip(3))], 1)
        maps = torch.stack([split.trunk(states[:, 0])[0], split.trunk(states[:, 1])[0]], 1)
    cache = TargetFeatureCache(maps.half(), states.half() if variant == "trunk" else None,
                               torch.arange(6) // 2, torch.zeros(6, 5), torch.ones(6, 5, dtype=torch.bool))
    loader = CachedTrainLoader(cache, list(range(6)), batch_size=4, random_flip=True)
    assert len(loader) == 1 and len(list(loader)) == 1
    batch = cache.batch(torch.arange(6), torch.ones(6, dtype=torch.long))
    with torch.no_grad():
        cached = decompose_cached(model, batch["cached_target"])
        direct = model.decompose(images.flip(3))
    torch.testing.assert_close(cached.embedding, direct.embedding, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cached.attribute_embeddings, direct.attribute_embeddings, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("variant", ["trunk", "head"])
def test_the_cached_path_is_the_models_own_computation(variant):
    # Stored in float32 (no float16 rounding), cached features decompose exactly as images do,
    # gradients included: the cache runs AttriMeter.decompose_target_features, not a copy of it.
    torch.manual_seed(0)
    model = build_attrimeter("osnet_x0_25", 5, variant=variant, attribute_branch=True, image_size=(64, 32))
    images = torch.randn(4, 3, 64, 32)
    split = model.target_split
    with torch.no_grad():
        states = split.stem(images)
        maps = split.trunk(states)[0]
    cache = TargetFeatureCache(maps[:, None], states[:, None] if variant == "trunk" else None,
                               torch.arange(4), torch.zeros(4, 5), torch.ones(4, 5, dtype=torch.bool))
    results = []
    for decompose in (lambda: decompose_cached(model, cache.batch(torch.arange(4), torch.zeros(4, dtype=torch.long))
                                               ["cached_target"]),
                      lambda: model.decompose(images)):
        model.zero_grad()
        decomposition = decompose()
        (decomposition.attribute_embeddings.sum() + decomposition.attribute_logits.sum()).backward()
        results.append((decomposition.detach(), [parameter.grad.clone() for parameter in model.interpreter_parameters()]))
    (cached, cached_grads), (direct, direct_grads) = results
    for name in ("embedding", "attribute_embeddings", "maps", "attribute_logits"):
        assert torch.equal(getattr(cached, name), getattr(direct, name)), name
    assert all(torch.equal(a, b) for a, b in zip(cached_grads, direct_grads))
