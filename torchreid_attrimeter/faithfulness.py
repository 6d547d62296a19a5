"""Faithfulness of an AttriMeter interpreter, measured where the right answer is known.

Three tests:

- **Counterfactual attribution** (synthetic dataset only): each test image is redrawn with the same
  identity, camera and pose but exactly one attribute (or one colour) changed
  (``data.synthetic.render_counterfactual``). The target's distance between the two images is caused
  by that change alone, so a faithful interpreter gives the changed attribute(s) the largest share.
  Measured: top-1 / top-k attribution accuracy and the share given to the changed attribute(s), for the
  interpreter and for three references that know nothing about attributes: uniform shares, shares
  proportional to the attributes' frequency in the training labels, and a random-map interpreter
  (the same target and tail, random positive maps). A fourth reference knows everything the renderer
  knows: the region oracle's map of each attribute is where that attribute is drawn in the image
  (the pixels that change when it is flipped), pooled to the feature grid. It is what spatial maps
  can do on this target at this resolution, an upper reference for any interpreter.
- **Feature-level deletion** (any images): for a pair, the region where the top attribute's map is
  largest is removed from the target's feature map F of both images (F ⊙ (1 − mask) through the
  target's own tail), and the drop of the target distance is compared with removing a random region
  of the same area. A map that points at what drives the distance removes more of it. References of
  the same area: the best of the interpreter's maps chosen per pair (against the best of as many random
  regions), F's own largest positions, and on synthetic images the region oracle's regions.
- **Share AUC over pairs of different people** (any labelled images): the evaluator's share AUC for the
  interpreter and, on synthetic images, for the region oracle: how well maps that are exactly where each
  attribute is drawn tell, over such pairs, the pairs that differ in an attribute from those that share it.

Every distance and share comes from ``decomposition.pairwise_components``; images are preprocessed by
the ``Explainer`` (torchreid's test transform).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from torchreid_attrimeter.attributes import AttributeSchema
from torchreid_attrimeter.data.synthetic import (
    BINARY_ATTRIBUTES,
    LOWER_COLOURS,
    UPPER_COLOURS,
    IdentitySpec,
    PlannedImage,
    SyntheticPlan,
    render_counterfactual,
    render_person,
)
from torchreid_attrimeter.decomposition import Decomposition, pairwise_components, pairwise_distance
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.evaluation.explanation_metrics import share_auc, share_histogram
from torchreid_attrimeter.models.head import positive_map

__all__ = [
    "CounterfactualPair",
    "FaithfulnessError",
    "attribute_frequencies",
    "build_counterfactual_pairs",
    "changed_attributes",
    "counterfactual_benchmark",
    "decompose_with_maps",
    "deletion_test",
    "drawn_regions",
    "format_faithfulness_table",
    "identity_labels",
    "pair_shares",
    "random_positive_maps",
    "region_maps",
    "score_attribution",
    "share_auc_test",
    "topk_hit_rate",
]

TEST_FOLDERS = ("query", "bounding_box_test")


class FaithfulnessError(AttriMeterError, ValueError):
    """An input the faithfulness benchmark cannot use, named in the message."""


# --- counterfactual pairs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterfactualPair:
    """One image of the dataset and its redrawing with one change.

    changed: schema indices whose label differs between the two (1 for a binary attribute, 2 for a
        colour change: the old colour goes off, the new one on).
    regions: (M, H, W) bool, where each schema attribute is drawn in the original image (the pixels
        that change when it alone is flipped), shared by the pairs of one image; None if unknown.
    """

    image_name: str
    kind: str  # what was changed: a binary attribute ('hat') or 'upper colour' / 'lower colour'
    change: str  # e.g. 'hat' or 'upper colour upred -> upblue'
    changed: tuple[int, ...]
    original: Image.Image
    counterfactual: Image.Image
    regions: np.ndarray | None = field(default=None, compare=False, repr=False)


def identity_labels(schema: AttributeSchema, identity: IdentitySpec) -> np.ndarray:
    """(M,) 0/1 labels of a synthetic identity in the schema's order (read through the schema's
    file-field mapping, as the dataset's attribute file would be)."""
    labels = identity.market_labels()
    missing = sorted({schema.sources[name][0] for name in schema.attributes} - set(labels))
    if missing:
        raise FaithfulnessError(
            f"schema '{schema.name}' reads fields {missing} that the synthetic dataset does not draw: "
            f"use the 'market1501' schema for synthetic_attr"
        )
    return np.array([labels[schema.sources[name][0]] == schema.sources[name][1] for name in schema.attributes],
                    dtype=np.int64)


def changed_attributes(schema: AttributeSchema, before: IdentitySpec, after: IdentitySpec) -> tuple[int, ...]:
    """Schema indices whose label differs between two identities."""
    return tuple(int(m) for m in np.flatnonzero(identity_labels(schema, before) != identity_labels(schema, after)))


def _change_for(attribute: str, identity: IdentitySpec, rng: np.random.Generator) -> tuple[str, str | None] | None:
    """The generator change that flips schema attribute ``attribute`` for ``identity``, or None when
    the generator cannot change it alone (e.g. one age class)."""
    if attribute in BINARY_ATTRIBUTES:
        return attribute, None
    for key, palette in (("upper_colour", UPPER_COLOURS), ("lower_colour", LOWER_COLOURS)):
        if attribute in palette:
            if getattr(identity, key) != attribute:
                return key, attribute  # this colour goes on (the current one off)
            others = [colour for colour in palette if colour != attribute]
            return key, str(rng.choice(others))  # this colour goes off (a random other one on)
    return None


def _changed_pixels(image: Image.Image, pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: where a redrawing differs from the original pixels."""
    return (np.asarray(image) != pixels).any(axis=-1)


def _fill_regions(regions: np.ndarray, planned: PlannedImage, schema: AttributeSchema, indices: Sequence[int],
                  rng: np.random.Generator, size: tuple[int, int], pixels: np.ndarray) -> None:
    """Set ``regions[m]`` for each schema index m in ``indices``: the pixels that change when attribute m
    alone is flipped (left empty when the generator cannot flip it alone)."""
    for m in indices:
        change = _change_for(schema.attributes[m], planned.identity, rng)
        if change is not None:
            image, _ = render_counterfactual(planned.identity, planned.camera, planned.view, change[0], change[1],
                                             size)
            regions[m] = _changed_pixels(image, pixels)


def drawn_regions(plan: SyntheticPlan, schema: AttributeSchema, name: str, seed: int = 0) -> np.ndarray:
    """(M, H, W) bool: where each attribute is drawn in the plan's image ``name`` (the region oracle's
    regions, as ``build_counterfactual_pairs`` finds them), at the plan's image size."""
    planned = plan.image(name)
    if planned.identity is None:
        raise FaithfulnessError(f"image '{name}' is a junk image: it has no person and no attribute regions")
    size = (int(plan.parameters["image_height"]), int(plan.parameters["image_width"]))
    pixels = np.asarray(render_person(planned.identity, planned.camera, planned.view, size))
    regions = np.zeros((schema.num_attributes, *pixels.shape[:2]), dtype=bool)
    _fill_regions(regions, planned, schema, range(schema.num_attributes), np.random.default_rng(seed), size, pixels)
    return regions


def build_counterfactual_pairs(plan: SyntheticPlan, schema: AttributeSchema, *,
                               folders: Sequence[str] = TEST_FOLDERS, max_images: int | None = None,
                               attributes: Sequence[str] | None = None, seed: int = 0) -> list[CounterfactualPair]:
    """For each chosen image of ``plan`` (its folders, test identities by default; ``max_images``
    picked evenly by a seeded shuffle) and each schema attribute (or ``attributes``), the image and
    its redrawing with that attribute flipped; image size as in the plan."""
    names = list(schema.attributes if attributes is None else attributes)
    unknown = [name for name in names if name not in schema.attributes]
    if unknown:
        raise FaithfulnessError(f"attributes {unknown} are not in schema '{schema.name}' ({schema.attributes})")
    images = [planned for planned in plan.images if planned.folder in folders and planned.identity is not None
              and planned.identity.pid > 0]
    if not images:
        raise FaithfulnessError(f"the synthetic plan has no labelled images in folders {list(folders)}")
    rng = np.random.default_rng(seed)
    if max_images is not None and max_images < len(images):
        images = [images[i] for i in sorted(rng.choice(len(images), size=max_images, replace=False))]
    size = (int(plan.parameters["image_height"]), int(plan.parameters["image_width"]))
    # Regions of attributes not in ``names`` need renders of their own, drawn with a separate
    # generator so that the pairs do not depend on whether regions were needed.
    region_rng = np.random.default_rng(seed + 1)
    pairs = []
    for planned in images:
        original = render_person(planned.identity, planned.camera, planned.view, size)
        pixels = np.asarray(original)
        regions = np.zeros((schema.num_attributes, *pixels.shape[:2]), dtype=bool)
        image_pairs = []
        for name in names:
            change = _change_for(name, planned.identity, rng)
            if change is None:
                continue
            image, changed_identity = render_counterfactual(planned.identity, planned.camera, planned.view,
                                                            change[0], change[1], size)
            regions[schema.attributes.index(name)] = _changed_pixels(image, pixels)
            kind = change[0].replace("_", " ")
            label = kind if change[1] is None else f"{kind} {getattr(planned.identity, change[0])} -> {change[1]}"
            image_pairs.append((kind, label, changed_attributes(schema, planned.identity, changed_identity), image))
        _fill_regions(regions, planned, schema, [m for m, name in enumerate(schema.attributes) if name not in names],
                      region_rng, size, pixels)
        pairs.extend(CounterfactualPair(planned.name, kind, label, changed, original, image, regions)
                     for kind, label, changed, image in image_pairs)
    if not pairs:
        raise FaithfulnessError(f"none of the attributes {names} can be changed by the synthetic generator")
    return pairs


def attribute_frequencies(plan: SyntheticPlan, schema: AttributeSchema) -> torch.Tensor:
    """(M,) positive ratio of each attribute over the plan's training identities."""
    if not plan.train_pids:
        raise FaithfulnessError("the synthetic plan has no training identities to count attribute frequencies")
    labels = np.stack([identity_labels(schema, plan.identities[pid]) for pid in plan.train_pids])
    return torch.as_tensor(labels.mean(axis=0), dtype=torch.float32)


# --- shares of aligned pairs ---------------------------------------------------------------------------


def _split_of(model: torch.nn.Module):
    # The AttriMeter's stem/trunk/tail split of its frozen target: the deletion test and the random-map
    # reference must run the target's own path from F to the embedding, which the model keeps there.
    split = getattr(model, "target_split", None)
    if split is None:
        raise FaithfulnessError(f"{type(model).__name__} is not an AttriMeter model (build_attrimeter)")
    return split


@torch.no_grad()
def target_features(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The target's last feature map F (B, C, h, w) and its context for model inputs (B, 3, H, W)."""
    split = _split_of(model)
    return split.trunk(split.stem(inputs))


@torch.no_grad()
def decompose_with_maps(model: torch.nn.Module, inputs: torch.Tensor, maps: torch.Tensor) -> Decomposition:
    """A Decomposition of the model's target with given maps (B, M, h, w) instead of the interpreter's."""
    return _decompose_features_with_maps(model, *target_features(model, inputs), maps)


@torch.no_grad()
def _decompose_features_with_maps(model: torch.nn.Module, feature_map: torch.Tensor, context: Any,
                                  maps: torch.Tensor) -> Decomposition:
    """``decompose_with_maps`` from the target's feature map F (B, C, h, w) and context, already computed."""
    split = _split_of(model)
    if maps.shape[0] != feature_map.shape[0] or maps.shape[2:] != feature_map.shape[2:]:
        raise FaithfulnessError(f"maps {tuple(maps.shape)} do not fit the feature map {tuple(feature_map.shape)}")
    return Decomposition(split.tail(feature_map, context), split.tail_of_products(feature_map, maps, context),
                         maps)


def random_positive_maps(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Random positive maps: the interpreter head's own positive activation of standard normal logits."""
    return positive_map(torch.randn(*shape, generator=generator))


# Every region map also sees a little of the whole image, as the interpreter's positive maps do.
REGION_MAP_FLOOR = 0.05


def region_maps(regions: np.ndarray, size: Sequence[int], floor: float = REGION_MAP_FLOOR) -> torch.Tensor:
    """Region-oracle maps (B, M, h, w) from drawn regions (B, M, H, W) bool: the fraction of each
    feature cell's pixels inside the region, plus ``floor``, scaled to mean 1 (the target's own
    average pooling is the map of ones, which an attribute drawn nowhere gets)."""
    cells = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(np.asarray(regions), dtype=torch.float32),
                                                    tuple(size))
    maps = cells + floor
    mean = maps.mean(dim=(2, 3), keepdim=True)
    return torch.where(mean > 0, maps / mean.clamp_min(1e-12), torch.ones_like(maps))  # drawn nowhere: ones


def _diagonal_shares(first: Decomposition, second: Decomposition, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned pairs (i with i): target distance (B,) and shares (B, M)."""
    distances = pairwise_components(first, second, metric)
    index = torch.arange(len(first))
    return distances.target_distance[index, index], distances.shares[index, index]


def pair_shares(explainer, images_a: Sequence, images_b: Sequence, *, random_maps_seed: int | None = None,
                regions: Sequence[np.ndarray] | None = None, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Target distance (N,) and shares (N, M) of aligned pairs (images_a[i], images_b[i]).

    With ``random_maps_seed`` the interpreter's maps are replaced by random positive maps, with
    ``regions`` (one (M, H, W) bool array per pair) by their ``region_maps``: either way the same maps
    for both images of a pair (so the reference sees the image change, not map noise).
    """
    if len(images_a) != len(images_b):
        raise FaithfulnessError(f"{len(images_a)} first images for {len(images_b)} second images")
    if regions is not None and len(regions) != len(images_a):
        raise FaithfulnessError(f"{len(regions)} region arrays for {len(images_a)} pairs")
    generator = torch.Generator().manual_seed(int(random_maps_seed or 0))
    distances, shares = [], []
    for start in range(0, len(images_a), batch_size):
        inputs_a, _ = explainer.prepare(images_a[start:start + batch_size])
        inputs_b, _ = explainer.prepare(images_b[start:start + batch_size])
        inputs_a, inputs_b = inputs_a.to(explainer.device), inputs_b.to(explainer.device)
        if random_maps_seed is None and regions is None:
            with torch.no_grad():
                first = explainer.model.decompose(inputs_a).detach()
                second = explainer.model.decompose(inputs_b).detach()
        else:
            size = target_features(explainer.model, inputs_a[:1])[0].shape[2:]
            if regions is None:
                maps = random_positive_maps((len(inputs_a), len(explainer.attribute_names), *size), generator)
            else:
                maps = region_maps(np.stack(regions[start:start + batch_size]), size)
            maps = maps.to(explainer.device)
            first = decompose_with_maps(explainer.model, inputs_a, maps)
            second = decompose_with_maps(explainer.model, inputs_b, maps)
        distance, share = _diagonal_shares(first.to("cpu"), second.to("cpu"), explainer.metric)
        distances.append(distance)
        shares.append(share)
    return torch.cat(distances), torch.cat(shares)


# --- scoring ---------------------------------------------------------------------------------------------


def topk_hit_rate(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) probability that a relevant item is among the k highest ``scores`` (N, M), ties broken
    uniformly at random (so uniform scores give the chance rate, not an artefact of sort order)."""
    scores, relevant = scores.double(), relevant.bool()
    if not bool(relevant.any(dim=1).all()):
        raise FaithfulnessError("every pair needs at least one relevant (changed) attribute")
    best = scores.masked_fill(~relevant, -math.inf).max(dim=1, keepdim=True).values
    ahead = (scores > best).sum(dim=1).double()
    tied = (scores == best).sum(dim=1).double()
    tied_relevant = ((scores == best) & relevant).sum(dim=1).double()
    slots = (k - ahead).clamp_min(0)
    # P(no relevant among `slots` random picks of the tied items) = prod_i (tied - r - i) / (tied - i)
    none_picked = torch.ones_like(tied)
    for i in range(k):
        factor = ((tied - tied_relevant - i) / (tied - i).clamp_min(1)).clamp(0, 1)
        none_picked = torch.where(slots > i, none_picked * factor, none_picked)
    return torch.where(slots > 0, 1.0 - none_picked, torch.zeros_like(none_picked))


def score_attribution(shares: torch.Tensor, changed: torch.Tensor, ks: Sequence[int] = (1, 3),
                      group_relevant: torch.Tensor | None = None) -> dict[str, float]:
    """Attribution scores of shares (N, M) against the changed attributes (N, M) bool, in %:
    ``top{k}`` accuracies, ``changed_share`` (mean share given to the changed attributes) and, with
    ``group_relevant`` (N, M), ``top1_group`` (the top attribute is in the changed attribute's group)."""
    changed = changed.bool()
    result = {f"top{k}": 100.0 * float(topk_hit_rate(shares, changed, k).mean()) for k in ks}
    result["changed_share"] = 100.0 * float((shares * changed).sum(dim=1).mean())
    if group_relevant is not None:
        result["top1_group"] = 100.0 * float(topk_hit_rate(shares, group_relevant, 1).mean())
    return result


def _group_mask(schema: AttributeSchema, changed: torch.Tensor) -> torch.Tensor:
    group_index = torch.tensor([list(schema.groups).index(schema.group_of(name)) for name in schema.attributes])
    changed_groups = torch.zeros(len(changed), len(schema.groups), dtype=torch.bool)
    rows, columns = changed.nonzero(as_tuple=True)
    changed_groups[rows, group_index[columns]] = True
    return changed_groups[:, group_index]


def _checked_frequencies(explainer, pairs: Sequence[CounterfactualPair], schema: AttributeSchema,
                         frequencies: torch.Tensor) -> torch.Tensor:
    """``frequencies`` as an (M,) float tensor, after checking that the interpreter explains the
    schema's attributes and that there are pairs to measure."""
    if tuple(explainer.attribute_names) != tuple(schema.attributes):
        raise FaithfulnessError(
            f"the interpreter explains {len(explainer.attribute_names)} attributes "
            f"({', '.join(explainer.attribute_names[:4])}, ...) but the schema '{schema.name}' has "
            f"{schema.num_attributes}: use the schema the interpreter was trained with"
        )
    if not pairs:
        raise FaithfulnessError("no counterfactual pairs to measure")
    num_attributes = schema.num_attributes
    frequencies = torch.as_tensor(frequencies, dtype=torch.float32)
    if frequencies.shape != (num_attributes,) or bool((frequencies < 0).any()):
        raise FaithfulnessError(f"frequencies must be ({num_attributes},) non-negative, got {tuple(frequencies.shape)}")
    return frequencies


def _benchmark_shares(explainer, pairs: Sequence[CounterfactualPair], frequencies: torch.Tensor, seed: int,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(target distances (N,), the interpreter's shares (N, M), the references' shares by name): the
    uniform, frequency and random-map references, and the region oracle when every pair has regions."""
    num_attributes = len(frequencies)
    originals = [pair.original for pair in pairs]
    counterfactuals = [pair.counterfactual for pair in pairs]
    distance, interpreter_shares = pair_shares(explainer, originals, counterfactuals, batch_size=batch_size)
    _, random_shares = pair_shares(explainer, originals, counterfactuals, random_maps_seed=seed + 1,
                                   batch_size=batch_size)
    references = {
        "uniform": torch.full((len(pairs), num_attributes), 1.0 / num_attributes),
        "frequency": (frequencies / frequencies.sum().clamp_min(1e-12)).expand(len(pairs), -1),
        "random_maps": random_shares,
    }
    if all(pair.regions is not None for pair in pairs):
        _, references["region_oracle"] = pair_shares(explainer, originals, counterfactuals,
                                                     regions=[pair.regions for pair in pairs], batch_size=batch_size)
    return distance, interpreter_shares, references


def _method_scores(shares_by_method: dict[str, torch.Tensor], changed: torch.Tensor, ks: Sequence[int],
                   groups: torch.Tensor, kind_rows: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``score_attribution`` of each method's shares, plus ``top1_macro``."""
    methods = {}
    for name, shares in shares_by_method.items():
        methods[name] = score_attribution(shares, changed, ks, groups)
        # every kind of change weighs the same (an image gives 17 colour pairs but one pair per binary)
        top1 = topk_hit_rate(shares, changed, 1)
        methods[name]["top1_macro"] = 100.0 * float(torch.stack([top1[rows].mean() for rows in kind_rows.values()]
                                                                ).mean())
    return methods


def _per_change_scores(distance: torch.Tensor, interpreter_shares: torch.Tensor, changed: torch.Tensor,
                       kind_rows: dict[str, torch.Tensor], oracle_shares: torch.Tensor | None
                       ) -> dict[str, dict[str, float]]:
    """Per kind of change: pair count, mean target distance, the interpreter's top-1 and changed
    share, and the region oracle's top-1 when it was measured."""
    top1 = topk_hit_rate(interpreter_shares, changed, 1)
    per_change = {
        kind: {
            "pairs": int(rows.sum()),
            "mean_target_distance": float(distance[rows].mean()),
            "top1": 100.0 * float(top1[rows].mean()),
            "changed_share": 100.0 * float((interpreter_shares[rows] * changed[rows]).sum(dim=1).mean()),
        }
        for kind, rows in kind_rows.items()
    }
    if oracle_shares is not None:
        oracle_top1 = topk_hit_rate(oracle_shares, changed, 1)
        for kind, rows in kind_rows.items():
            per_change[kind]["region_oracle_top1"] = 100.0 * float(oracle_top1[rows].mean())
    return per_change


def counterfactual_benchmark(explainer, pairs: Sequence[CounterfactualPair], schema: AttributeSchema,
                             frequencies: torch.Tensor, *, ks: Sequence[int] = (1, 3), seed: int = 0,
                             batch_size: int = 64) -> dict[str, Any]:
    """Attribution accuracy of the explainer's interpreter on counterfactual pairs, and of the
    uniform, frequency and random-map references. Returns a JSON-safe dict: ``methods`` (name ->
    scores, see ``score_attribution``, plus ``top1_macro``: top-1 averaged over the kinds of change),
    ``per_change`` (interpreter top-1 and changed share per changed
    attribute / colour group), ``chance_top1`` (mean |changed| / M) and pair counts."""
    frequencies = _checked_frequencies(explainer, pairs, schema, frequencies)
    num_attributes = schema.num_attributes
    changed = torch.zeros(len(pairs), num_attributes, dtype=torch.bool)
    for row, pair in enumerate(pairs):
        changed[row, list(pair.changed)] = True
    distance, interpreter_shares, references = _benchmark_shares(explainer, pairs, frequencies, seed,
                                                                 batch_size)
    groups = _group_mask(schema, changed)
    kinds = [pair.kind for pair in pairs]
    kind_rows = {kind: torch.tensor([k == kind for k in kinds]) for kind in dict.fromkeys(kinds)}
    methods = _method_scores({"interpreter": interpreter_shares, **references}, changed, ks, groups,
                             kind_rows)
    per_change = _per_change_scores(distance, interpreter_shares, changed, kind_rows,
                                    references.get("region_oracle"))
    return {
        "pairs": len(pairs),
        "images": len({pair.image_name for pair in pairs}),
        "zero_distance_pairs": int((distance <= 1e-6).sum()),
        "mean_target_distance": float(distance.mean()),
        "chance_top1": 100.0 * float(changed.sum(dim=1).float().mean() / num_attributes),
        "methods": methods,
        "per_change": per_change,
    }


# --- deletion --------------------------------------------------------------------------------------------


def _top_region(maps: torch.Tensor, count: int) -> torch.Tensor:
    """(B, h, w) maps -> (B, h, w) masks of their ``count`` largest positions."""
    flat = maps.flatten(1)
    mask = torch.zeros_like(flat)
    mask.scatter_(1, flat.topk(count, dim=1).indices, 1.0)
    return mask.reshape(maps.shape)


def _random_region(shape: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
    batch, height, width = shape
    order = torch.rand(batch, height * width, generator=generator).argsort(dim=1)[:, :count]
    mask = torch.zeros(batch, height * width)
    mask.scatter_(1, order, 1.0)
    return mask.reshape(batch, height, width)


@torch.no_grad()
def _distance_without(explainer, features: tuple, mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """(B,) target distances of aligned pairs after removing masks (B, h, w) from their feature maps."""
    split = _split_of(explainer.model)
    feature_a, context_a, feature_b, context_b = features
    embedding_a = split.tail(feature_a * (1.0 - mask_a).unsqueeze(1).to(feature_a), context_a).cpu()
    embedding_b = split.tail(feature_b * (1.0 - mask_b).unsqueeze(1).to(feature_b), context_b).cpu()
    return pairwise_distance(embedding_a.unsqueeze(1), embedding_b.unsqueeze(1), explainer.metric)[:, 0, 0]


def _drops_of_all_maps(explainer, features: tuple, maps_a: torch.Tensor, maps_b: torch.Tensor, count: int,
                       distance: torch.Tensor) -> torch.Tensor:
    """(B, M) relative drop of each pair's distance when each attribute's top region is removed."""
    return torch.stack([
        _relative_drop(distance, _distance_without(explainer, features, _top_region(maps_a[:, m], count),
                                                   _top_region(maps_b[:, m], count)))
        for m in range(maps_a.shape[1])
    ], dim=1)


def _relative_drop(distance: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    return (distance - reduced) / distance.clamp_min(1e-12)


@torch.no_grad()
def _deletion_batch(explainer, inputs_a: torch.Tensor, inputs_b: torch.Tensor, area: float, random_draws: int,
                    generators: tuple[torch.Generator, torch.Generator],
                    regions: tuple[np.ndarray, np.ndarray] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(target distances (B,), relative drops (B,) by method, positions removed) of one batch of pairs."""
    first = explainer.model.decompose(inputs_a).to("cpu")
    second = explainer.model.decompose(inputs_b).to("cpu")
    distance, shares = _diagonal_shares(first, second, explainer.metric)
    rows = torch.arange(len(distance))
    feature_a, context_a = target_features(explainer.model, inputs_a)
    feature_b, context_b = target_features(explainer.model, inputs_b)
    height, width = feature_a.shape[2:]
    count = max(1, round(area * height * width))
    features = (feature_a, context_a, feature_b, context_b)
    all_maps = _drops_of_all_maps(explainer, features, first.maps, second.maps, count, distance)

    def random_drops(draws: int, generator: torch.Generator) -> torch.Tensor:  # (draws, B)
        shape = (len(rows), height, width)
        return torch.stack([_relative_drop(distance, _distance_without(
            explainer, features, _random_region(shape, count, generator), _random_region(shape, count, generator)))
            for _ in range(draws)])

    top = shares.argmax(dim=1)
    norm_a, norm_b = feature_a.norm(dim=1).cpu(), feature_b.norm(dim=1).cpu()
    drops = {
        "top_map": all_maps[rows, top],
        "random": random_drops(random_draws, generators[0]).mean(dim=0),
        # the best of M maps per pair beats the mean region by selection alone: compare it with the best of
        # M random regions
        "best_map": all_maps.max(dim=1).values,
        "best_random": random_drops(all_maps.shape[1], generators[1]).max(dim=0).values,
        "feature_norm": _relative_drop(distance, _distance_without(
            explainer, features, _top_region(norm_a, count), _top_region(norm_b, count))),
        # how much each position feeds attribute m's pooled features: A^m(s) * |F(s)|
        "top_contribution": _relative_drop(distance, _distance_without(
            explainer, features, _top_region(first.maps[rows, top] * norm_a, count),
            _top_region(second.maps[rows, top] * norm_b, count))),
    }
    if regions is not None:
        maps_a = region_maps(regions[0], (height, width)).to(feature_a.device)
        maps_b = region_maps(regions[1], (height, width)).to(feature_b.device)
        _, oracle_shares = _diagonal_shares(
            _decompose_features_with_maps(explainer.model, feature_a, context_a, maps_a).to("cpu"),
            _decompose_features_with_maps(explainer.model, feature_b, context_b, maps_b).to("cpu"),
            explainer.metric)
        oracle = _drops_of_all_maps(explainer, features, maps_a.cpu(), maps_b.cpu(), count, distance)
        drops["region_oracle_top_map"] = oracle[rows, oracle_shares.argmax(dim=1)]
        drops["region_oracle_best_map"] = oracle.max(dim=1).values
    return distance, drops, count


@torch.no_grad()
def deletion_test(explainer, images_a: Sequence, images_b: Sequence, *, area: float = 0.2,
                  random_draws: int = 5, seed: int = 0, batch_size: int = 64,
                  regions_a: Sequence[np.ndarray] | None = None, regions_b: Sequence[np.ndarray] | None = None
                  ) -> dict[str, Any]:
    """Remove, from the target feature map F of both images of each aligned pair, the ``area``
    fraction of positions where the top attribute's map (largest share of the pair) is largest, and
    compare the relative drop of the target distance with removing random regions of equal area.

    Also measured, as references: ``best_map_drop``, per pair the attribute map that removes the most
    (what a better choice of the top attribute could reach with these maps), against
    ``best_random_drop``, the best of M random regions per pair (choosing the best of M gains by
    selection alone); ``feature_norm_drop``, the positions where F itself is largest (a saliency that
    names no attribute); ``top_contribution_drop``, the top attribute's positions ranked by what they
    feed its attribute embedding, A^m times the norm of F there. With ``regions_a`` / ``regions_b`` (one
    (M, H, W) bool array of drawn regions per image, see ``drawn_regions``) also the region oracle's
    maps: ``region_oracle_top_map_drop`` (the attribute with the oracle's largest share) and
    ``region_oracle_best_map_drop``.

    Returns (JSON-safe): the mean relative drops above plus ``top_map_drop`` and ``random_drop`` (%),
    ``top_beats_random`` (% of pairs where the top map removes more than the mean random region),
    ``positions_removed`` and pair counts. Pairs at distance zero are skipped (nothing to remove).
    """
    if len(images_a) != len(images_b):
        raise FaithfulnessError(f"{len(images_a)} first images for {len(images_b)} second images")
    if not 0.0 < area < 1.0:
        raise FaithfulnessError(f"area must be a fraction in (0, 1), got {area}")
    if random_draws < 1:
        raise FaithfulnessError(f"random_draws must be at least 1, got {random_draws}")
    if (regions_a is None) != (regions_b is None) or (
            regions_a is not None and not len(regions_a) == len(regions_b) == len(images_a)):
        raise FaithfulnessError("regions_a and regions_b must both be given, one region array per image")
    # the test's random regions come first from their own generator, so they stay those of earlier versions
    generators = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))
    drops: dict[str, list[torch.Tensor]] = {}
    skipped, count = 0, 0
    for start in range(0, len(images_a), batch_size):
        part = slice(start, start + batch_size)
        inputs_a, _ = explainer.prepare(images_a[part])
        inputs_b, _ = explainer.prepare(images_b[part])
        regions = None if regions_a is None else (np.stack(regions_a[part]), np.stack(regions_b[part]))
        distance, batch_drops, count = _deletion_batch(explainer, inputs_a.to(explainer.device),
                                                       inputs_b.to(explainer.device), area, random_draws,
                                                       generators, regions)
        valid = distance > 1e-6
        skipped += int((~valid).sum())
        for name, drop in batch_drops.items():
            drops.setdefault(name, []).append(drop[valid])
    drops = {name: torch.cat(parts) for name, parts in drops.items()}
    if len(drops["top_map"]) == 0:
        raise FaithfulnessError("every pair is at target distance zero: nothing to delete")
    return {
        "pairs": len(drops["top_map"]),
        "skipped_zero_distance": skipped,
        "area": float(area),
        "positions_removed": int(count),
        "random_draws": int(random_draws),
        **{f"{name}_drop": 100.0 * float(drop.mean()) for name, drop in drops.items()},
        "top_beats_random": 100.0 * float((drops["top_map"] > drops["random"]).double().mean()),
    }


# --- share AUC over pairs of different people -------------------------------------------------------------


def _decompose_images(explainer, images: Sequence, regions: Sequence[np.ndarray] | None, batch_size: int
                      ) -> Decomposition:
    """Decompositions of images, with the interpreter's maps or (``regions``) the region oracle's."""
    parts = []
    for start in range(0, len(images), batch_size):
        inputs, _ = explainer.prepare(images[start:start + batch_size])
        inputs = inputs.to(explainer.device)
        with torch.no_grad():
            if regions is None:
                parts.append(explainer.model.decompose(inputs).detach().to("cpu"))
            else:
                feature_map, context = target_features(explainer.model, inputs)
                maps = region_maps(np.stack(regions[start:start + batch_size]), feature_map.shape[2:])
                parts.append(_decompose_features_with_maps(explainer.model, feature_map, context,
                                                           maps.to(feature_map.device)).to("cpu"))
    return Decomposition.cat(parts)


def share_auc_test(explainer, images: Sequence, labels: np.ndarray, pids: Sequence[int], *,
                   regions: Sequence[np.ndarray] | None = None, batch_size: int = 64) -> dict[str, Any]:
    """The share AUC (``explanation_metrics.share_auc``, as the evaluator reports it) over every pair of
    ``images`` of different identities: per attribute, how well the share of m tells the pairs that
    differ in m from the pairs that share it. ``labels`` (N, M) 0/1 of the images' identities. With
    ``regions`` (one (M, H, W) bool array per image) also for the region oracle's maps, each image with
    its own drawn regions: what maps that are exactly where each attribute is give on such pairs.

    Returns (JSON-safe): ``pairs``, and per method (``interpreter``, ``region_oracle``) ``per_attribute``
    (name -> AUC, None where no pair differs or none shares) and ``macro``.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int32)
    pids = torch.as_tensor(list(pids))
    if labels.shape != (len(images), len(explainer.attribute_names)) or len(pids) != len(images):
        raise FaithfulnessError(f"{len(images)} images need labels ({len(images)}, "
                                f"{len(explainer.attribute_names)}) and {len(images)} pids, got "
                                f"{tuple(labels.shape)} and {len(pids)}")
    first, second = torch.triu_indices(len(images), len(images), 1)
    different = pids[first] != pids[second]
    first, second = first[different], second[different]
    if len(first) == 0:
        raise FaithfulnessError("the share AUC needs images of at least two identities")
    differ = (labels[first] != labels[second]).T.contiguous()
    methods = {"interpreter": None} if regions is None else {"interpreter": None, "region_oracle": regions}
    results: dict[str, Any] = {"pairs": len(first), "images": len(images)}
    for name, method_regions in methods.items():
        decomposition = _decompose_images(explainer, images, method_regions, batch_size)
        components = pairwise_components(decomposition, decomposition, explainer.metric).attribute_components
        components = components[first, second].T.contiguous()
        auc = share_auc(share_histogram(components, components.sum(dim=0), differ, None))
        per_attribute = {attribute: (None if math.isnan(value) else value)
                         for attribute, value in zip(explainer.attribute_names, auc.tolist())}
        known = [value for value in per_attribute.values() if value is not None]
        results[name] = {"per_attribute": per_attribute, "macro": float(np.mean(known)) if known else None}
    return results


# --- report ------------------------------------------------------------------------------------------------


def format_faithfulness_table(results: dict[str, Any]) -> str:
    """A plain-text table of ``counterfactual_benchmark``, ``deletion`` and ``share_auc`` results."""
    lines = []
    counterfactual = results.get("counterfactual")
    if counterfactual:
        methods = counterfactual["methods"]
        columns = list(next(iter(methods.values())))
        lines.append(f"Counterfactual attribution: {counterfactual['pairs']} pairs from "
                     f"{counterfactual['images']} images (chance top-1 {counterfactual['chance_top1']:.1f} %)")
        lines.append(f"{'method':<14s}" + "".join(f"{column:>15s}" for column in columns))
        for name, scores in methods.items():
            lines.append(f"{name:<14s}" + "".join(f"{scores[column]:>15.2f}" for column in columns))
        lines.append("")
        with_oracle = all("region_oracle_top1" in scores for scores in counterfactual["per_change"].values())
        lines.append(f"{'changed':<18s}{'pairs':>7s}{'distance':>10s}{'top1':>9s}{'share':>9s}   (interpreter)"
                     + ("   region oracle top1" if with_oracle else ""))
        for kind, scores in counterfactual["per_change"].items():
            lines.append(f"{kind:<18s}{scores['pairs']:>7d}{scores['mean_target_distance']:>10.3f}"
                         f"{scores['top1']:>9.2f}{scores['changed_share']:>9.2f}"
                         + (f"{scores['region_oracle_top1']:>24.2f}" if with_oracle else ""))
    deletion = results.get("deletion")
    if deletion:
        if lines:
            lines.append("")
        lines.append(f"Deletion ({deletion['pairs']} pairs, {deletion['positions_removed']} positions = "
                     f"{100 * deletion['area']:.0f} % of F removed):")
        lines.extend(_deletion_lines(deletion))
    auc = results.get("share_auc")
    if auc:
        if lines:
            lines.append("")
        lines.extend(_share_auc_lines(auc))
    return "\n".join(lines)


def _deletion_lines(deletion: dict[str, Any]) -> list[str]:
    random = deletion["random_drop"]

    def line(label: str, key: str) -> str:
        return f"  {label:<46s}{deletion[key]:6.2f} %  ({deletion[key] / max(random, 1e-12):.2f}x random)"

    lines = [line("top attribute's map: distance drop", "top_map_drop"),
             f"  {'random region (mean of ' + str(deletion['random_draws']) + ')':<46s}{random:6.2f} %"]
    if "best_map_drop" in deletion:  # results of earlier versions have only the two lines above
        lines += [line("top attribute's contribution, map x |F|", "top_contribution_drop"),
                  line("best attribute's map, chosen per pair", "best_map_drop"),
                  line("best of as many random regions, per pair", "best_random_drop"),
                  line("largest positions of F (no attribute)", "feature_norm_drop")]
    if "region_oracle_top_map_drop" in deletion:
        lines += [line("region oracle, top attribute's region", "region_oracle_top_map_drop"),
                  line("region oracle, best region chosen per pair", "region_oracle_best_map_drop")]
    lines.append(f"  top map removes more than random in {deletion['top_beats_random']:.1f} % of pairs")
    return lines


def _share_auc_lines(auc: dict[str, Any]) -> list[str]:
    methods = [name for name in ("interpreter", "region_oracle") if name in auc]
    title = (f"Share AUC over {auc['pairs']} pairs of different people ({auc['images']} images; 0.5 = the share "
             f"says nothing)")
    lines = [title,
             f"{'attribute':<14s}" + "".join(f"{name.replace('_', ' '):>15s}" for name in methods)]

    def cell(value: float | None) -> str:
        return f"{'n/a' if value is None else f'{value:.2f}':>15s}"

    for attribute in auc[methods[0]]["per_attribute"]:
        lines.append(f"{attribute:<14s}" + "".join(cell(auc[name]["per_attribute"][attribute]) for name in methods))
    lines.append(f"{'macro':<14s}" + "".join(cell(auc[name]["macro"]) for name in methods))
    return lines
