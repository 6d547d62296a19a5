"""Cache what a frozen target computes on the training images, so that an interpreter training step
costs only the interpreter (engine option ``attrimeter.cache_target_features``).

While the target is frozen, its stem output and its last feature map F of an image never change; with
augmentation off or limited to horizontal flips, every training input is one of two fixed images
(the image and its mirror). Both are computed once, stored in float16, and training batches are drawn
from the store with the same identity sampler the image loader would use:

- 'head' variant: the decomposition head reads the cached F directly;
- 'trunk' variant: the interpreter's trunk reads the cached stem output, the target's part of the
  decomposition (F, embedding) is the cached F.

The embedding and the attribute embeddings are both computed from the stored F by the target's own
tail, so the distance being split and its components stay consistent with each other.
Memory: (C_stem h w [trunk only] + C h w) x 2 bytes x (1 or 2 views) per training image; osnet_x0_25
at 256x128 needs 57 KB per image and view (1.6 GB for DukeMTMC-reID's 14,084 images with flips).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from torchreid_attrimeter.data.datasets import read_image_checked
from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.errors import AttriMeterError

# Augmentations whose outputs are finitely many fixed images: only the horizontal flip (two views).
CACHEABLE_TRANSFORMS = ("random_flip",)
CACHE_KEY = "cached_target"


class FeatureCacheError(AttriMeterError, ValueError):
    """A configuration or target the feature cache cannot serve."""


def check_cacheable_transforms(transforms: Sequence[str], k_tfm: int = 1) -> None:
    """Only flips (or nothing) can be cached; anything else changes F at every epoch."""
    other = [name for name in transforms if name not in CACHEABLE_TRANSFORMS]
    if other or k_tfm != 1:
        raise FeatureCacheError(
            f"attrimeter.cache_target_features needs data.transforms limited to {list(CACHEABLE_TRANSFORMS)} "
            f"and data.k_tfm 1 (got transforms {list(transforms)}, k_tfm {k_tfm}): the augmentations "
            f"{other} give a new target feature map at every epoch. Remove them or turn the cache off."
        )


class _ImageList(Dataset):
    """Un-augmented images (test transform) of a list of torchreid items (path, pid, camid, ...)."""

    def __init__(self, items: Sequence[tuple], transform):
        self.paths = [item[0] for item in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_image_checked(self.paths[index]))


def _stem_and_feature_map(model: torch.nn.Module, split,
                          images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's stem output and feature map of a batch, refusing targets whose stem output is not
    one tensor or whose embedding needs context besides the feature map: the cache stores neither."""
    state = split.stem(images)
    if not torch.is_tensor(state):
        raise FeatureCacheError(
            f"the target '{model.target_spec.get('name')}' passes a {type(state).__name__} "
            f"between its stem and trunk; attrimeter.cache_target_features supports targets "
            f"whose stem output is one tensor (OSNet, ResNet, ...). Turn the cache off."
        )
    feature_map, context = split.trunk(state)
    if context is not None:
        raise FeatureCacheError(
            f"the target '{model.target_spec.get('name')}' adds context outside its feature map "
            f"to the embedding; attrimeter.cache_target_features does not store it. Turn the "
            f"cache off."
        )
    return state, feature_map


def _run_target(model: torch.nn.Module, split, loader: DataLoader, total: int, views: int, *, keep_stem: bool,
                device: torch.device, start: float,
                progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(feature maps (N, V, C, h, w), stem outputs (N, V, C_s, h_s, w_s) or None) of the loader's
    ``total`` images in float16 on CPU, view 1 mirrored. Stores are allocated at the first batch, when
    the shapes are known; progress is printed every 10 s and at the end."""
    feature_maps = stem_states = None
    done, last_print = 0, 0.0
    for images in loader:
        images = images.to(device)
        rows = slice(done, done + images.shape[0])
        for view in range(views):
            batch = torch.flip(images, dims=[3]) if view else images
            state, feature_map = _stem_and_feature_map(model, split, batch)
            if feature_maps is None:
                feature_maps = torch.empty((total, views, *feature_map.shape[1:]), dtype=torch.float16)
                if keep_stem:
                    stem_states = torch.empty((total, views, *state.shape[1:]), dtype=torch.float16)
            feature_maps[rows, view] = feature_map.to("cpu", torch.float16)
            if keep_stem:
                stem_states[rows, view] = state.to("cpu", torch.float16)
        done += images.shape[0]
        elapsed = time.time() - start
        if progress and (elapsed - last_print > 10 or done == total):
            last_print = elapsed
            eta = elapsed / done * (total - done)
            print(f"caching target features: {done}/{total} images x {views} view(s), "
                  f"{elapsed:.0f} s elapsed, eta {eta:.0f} s", flush=True)
    return feature_maps, stem_states


def _training_labels(items: Sequence[tuple], labels_of) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pids (N,) int64, attributes (N, M) float32, attributes_known (N, M) bool) of the items."""
    labels = [labels_of(item[0]) for item in items]
    pids = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
    attributes = torch.as_tensor(torch.stack([torch.as_tensor(values) for values, _ in labels]),
                                 dtype=torch.float32)
    attributes_known = torch.stack([torch.as_tensor(known) for _, known in labels]).bool()
    return pids, attributes, attributes_known


class TargetFeatureCache:
    """The frozen target's stem output (trunk variant) and feature map of every training image, for
    each view (0 = as is, 1 = mirrored).

    stem_states: (N, V, C_s, h_s, w_s) float16 or None (head variant); feature_maps: (N, V, C, h, w)
    float16; pids (N,) int64; attributes (N, M) float32; attributes_known (N, M) bool.
    """

    def __init__(self, feature_maps: torch.Tensor, stem_states: torch.Tensor | None, pids: torch.Tensor,
                 attributes: torch.Tensor, attributes_known: torch.Tensor):
        self.feature_maps = feature_maps
        self.stem_states = stem_states
        self.pids = pids
        self.attributes = attributes
        self.attributes_known = attributes_known

    def __len__(self) -> int:
        return self.feature_maps.shape[0]

    @property
    def num_views(self) -> int:
        return self.feature_maps.shape[1]

    @property
    def nbytes(self) -> int:
        stem = 0 if self.stem_states is None else self.stem_states.numel() * self.stem_states.element_size()
        return stem + self.feature_maps.numel() * self.feature_maps.element_size()

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, items: Sequence[tuple], labels_of, transform, *, flips: bool = True,
              batch_size: int = 64, workers: int = 0, device: torch.device | str = "cpu",
              progress: bool = True) -> TargetFeatureCache:
        """Run the frozen target once over ``items`` (torchreid's (path, pid, camid, ...) tuples).

        labels_of: path -> (attributes (M,), known (M,)); transform: the un-augmented test transform
        (PIL image -> (3, H, W) tensor); flips: also cache the mirrored image.
        """
        if len(items) == 0:
            raise FeatureCacheError("the training split is empty: nothing to cache")
        split = model.target_split
        keep_stem = model.interpreter_trunk is not None
        device = torch.device(device)
        loader = DataLoader(_ImageList(items, transform), batch_size=batch_size, shuffle=False,
                            num_workers=workers)
        views = 2 if flips else 1
        start = time.time()
        feature_maps, stem_states = _run_target(model, split, loader, len(items), views, keep_stem=keep_stem,
                                                device=device, start=start, progress=progress)
        cache = cls(feature_maps, stem_states, *_training_labels(items, labels_of))
        if progress:
            print(f"cached target features of {len(items)} images x {views} view(s): "
                  f"{cache.nbytes / 2**20:.0f} MB in {time.time() - start:.0f} s", flush=True)
        return cache

    def batch(self, indices: torch.Tensor, views: torch.Tensor) -> dict:
        """A training batch dict: torchreid's label keys plus ``CACHE_KEY`` = {'feature_map', 'stem_state'}."""
        cached = {"feature_map": self.feature_maps[indices, views].float(),
                  "stem_state": None if self.stem_states is None else self.stem_states[indices, views].float()}
        return {CACHE_KEY: cached, "pid": self.pids[indices], "attributes": self.attributes[indices],
                "attributes_known": self.attributes_known[indices]}


def decompose_cached(model: torch.nn.Module, cached: dict, device: torch.device | str = "cpu") -> Decomposition:
    """``model.decompose`` from cached target features (a batch's ``CACHE_KEY`` entry): the model's
    own computation after the frozen stem and trunk (``AttriMeter.decompose_target_features``)."""
    if model.interpreter_trunk is not None and cached["stem_state"] is None:
        raise FeatureCacheError("the cache holds no stem output: it was built for the 'head' variant, "
                                "the model is a 'trunk' AttriMeter")
    stem_state = None if cached["stem_state"] is None else cached["stem_state"].to(device)
    # The cache stores no context: TargetFeatureCache.build refuses targets that have one.
    return model.decompose_target_features(cached["feature_map"].to(device), None, stem_state)


class CachedTrainLoader:
    """Iterates training batches from a :class:`TargetFeatureCache` in the order an index sampler
    (torchreid's RandomIdentitySampler, ...) gives, dropping the last incomplete batch as torchreid's
    train loader does; each image is mirrored with probability 1/2 when the cache holds both views."""

    def __init__(self, cache: TargetFeatureCache, sampler, batch_size: int, random_flip: bool, seed: int = 0):
        if random_flip and cache.num_views < 2:
            raise FeatureCacheError("random_flip needs a cache built with flips=True")
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size
        self.random_flip = random_flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        indices = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        for number in range(len(indices) // self.batch_size):
            batch = indices[number * self.batch_size:(number + 1) * self.batch_size]
            if self.random_flip:
                views = torch.randint(0, 2, (len(batch),), generator=self.generator)
            else:
                views = torch.zeros(len(batch), dtype=torch.long)
            yield self.cache.batch(batch, views)


def build_cached_train_loader(model: torch.nn.Module, datamanager, transforms: Sequence[str], k_tfm: int,
                              batch_size: int, workers: int = 0, seed: int = 0) -> CachedTrainLoader:
    """Cache the target's features of the data manager's training images and return a loader over
    them that replaces ``datamanager.train_loader`` (same sampler, same batch size)."""
    check_cacheable_transforms(transforms, k_tfm)
    train_loader = datamanager.train_loader
    dataset = train_loader.dataset
    if not hasattr(dataset, "labels_of"):
        raise FeatureCacheError(f"the training dataset {type(dataset).__name__} carries no attribute labels")
    random_flip = "random_flip" in transforms
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        cache = TargetFeatureCache.build(model, dataset.data, dataset.labels_of, datamanager.transform_te,
                                         flips=random_flip, batch_size=batch_size, workers=workers,
                                         device=device)
    finally:
        model.train(was_training)
    return CachedTrainLoader(cache, train_loader.sampler, batch_size, random_flip, seed=seed)
