"""Faithfulness benchmark on cases whose answer is known by construction: a hand-built target whose
embedding depends only on two image regions, and an interpreter whose maps are set by hand."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from torchreid_attrimeter.attributes import AttributeSchema, get_schema
from torchreid_attrimeter.data.synthetic import BINARY_ATTRIBUTES, plan_synthetic_dataset, render_person
from torchreid_attrimeter.explain import Explainer
from torchreid_attrimeter.faithfulness import (
    CounterfactualPair,
    FaithfulnessError,
    attribute_frequencies,
    build_counterfactual_pairs,
    counterfactual_benchmark,
    decompose_with_maps,
    deletion_test,
    drawn_regions,
    format_faithfulness_table,
    identity_labels,
    pair_shares,
    region_maps,
    score_attribution,
    share_auc_test,
    topk_hit_rate,
)


def _load_tool():
    """tools/benchmark_faithfulness.py, a developer script outside the package, loaded from its file."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "benchmark_faithfulness.py")
    spec = importlib.util.spec_from_file_location("benchmark_faithfulness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()

HEIGHT, WIDTH, CELL = 16, 8, 4  # images 16x8, feature map 4x2 (one cell = a 4x4 pixel block)
REGION_A = (slice(0, 2), slice(0, 1))  # feature cells (rows 0-1, column 0) = pixels rows 0-7, columns 0-3
REGION_B = (slice(2, 4), slice(1, 2))  # feature cells (rows 2-3, column 1) = pixels rows 8-15, columns 4-7
FLOOR = 1e-3  # every hand-set map is this small (positive) outside its region


class TwoRegionTarget(nn.Module):
    """Embedding = fc(mean over the 4x2 grid of block-averaged pixels, kept only in regions A and B):
    nothing outside A and B can move it."""

    def __init__(self):
        super().__init__()
        keep = torch.zeros(1, 1, HEIGHT // CELL, WIDTH // CELL)
        keep[(0, 0, *REGION_A)] = 1.0
        keep[(0, 0, *REGION_B)] = 1.0
        self.register_buffer("keep", keep)
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3))
            self.fc.bias.zero_()

    def featuremaps(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, CELL) * self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_avgpool(self.featuremaps(x)).flatten(1))


class HandSetMaps(nn.Module):
    """The interpreter's head replaced by fixed maps: attribute 'a' = region A, 'b' = region B,
    'c' = everything else."""

    def __init__(self):
        super().__init__()
        maps = torch.full((3, HEIGHT // CELL, WIDTH // CELL), FLOOR)
        maps[(0, *REGION_A)] = 1.0
        maps[(1, *REGION_B)] = 1.0
        maps[2] = 1.0
        maps[(2, *REGION_A)] = FLOOR
        maps[(2, *REGION_B)] = FLOOR
        self.register_buffer("maps", maps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.maps.expand(features.shape[0], -1, -1, -1)


TOY_SCHEMA = AttributeSchema(
    name="toy", attributes=("a", "b", "c"), groups={"first": ("a",), "others": ("b", "c")},
    sources={name: (name, 2, (1, 2)) for name in ("a", "b", "c")},
)


@pytest.fixture(scope="module")
def explainer():
    from torchreid_attrimeter.models import build_attrimeter

    target = TwoRegionTarget().eval()
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    model = build_attrimeter(target, 3, variant="head", image_size=(HEIGHT, WIDTH))
    model.head = HandSetMaps()
    return Explainer(model, TOY_SCHEMA.attributes, "euclidean", (HEIGHT, WIDTH), device="cpu", batch_size=4)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _changed(pixels: np.ndarray, rows: slice, columns: slice, seed: int) -> Image.Image:
    out = pixels.copy()
    block = out[rows, columns]
    out[rows, columns] = np.random.default_rng(seed).integers(0, 256, block.shape, dtype=np.uint8)
    return Image.fromarray(out)


def _pairs(count: int) -> list[CounterfactualPair]:
    """Half the pairs change pixels of region A only (attribute 'a'), half region B only ('b')."""
    pairs = []
    for index in range(count):
        pixels = _image(index)
        if index % 2 == 0:
            kind, changed, image = "a", (0,), _changed(pixels, slice(0, 8), slice(0, 4), 100 + index)
        else:
            kind, changed, image = "b", (1,), _changed(pixels, slice(8, 16), slice(4, 8), 100 + index)
        pairs.append(CounterfactualPair(f"image{index}", kind, kind, changed, Image.fromarray(pixels), image,
                                        _REGIONS))
    return pairs


# Where the toy attributes are drawn: 'a' in the pixels of region A, 'b' in those of B, 'c' nowhere.
_REGIONS = np.zeros((3, HEIGHT, WIDTH), dtype=bool)
_REGIONS[0, 0:8, 0:4] = True
_REGIONS[1, 8:16, 4:8] = True


# --- scoring ---------------------------------------------------------------------------------------


def test_topk_hit_rate_breaks_ties_at_random():
    relevant = torch.tensor([[True, False, False], [True, False, False], [False, True, True]])
    scores = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    assert topk_hit_rate(scores, relevant, 1).tolist() == pytest.approx([0.5, 0.0, 2 / 3])
    assert topk_hit_rate(scores, relevant, 2).tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert topk_hit_rate(scores, relevant, 3).tolist() == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(FaithfulnessError, match="at least one relevant"):
        topk_hit_rate(scores, torch.zeros(3, 3, dtype=torch.bool), 1)


def test_uniform_shares_score_the_chance_rate():
    changed = torch.zeros(6, 26, dtype=torch.bool)
    changed[:, 3] = True
    changed[:3, 20] = True  # half the pairs change two attributes (a colour change)
    scores = score_attribution(torch.full((6, 26), 1 / 26), changed, ks=(1, 3))
    assert scores["top1"] == pytest.approx(100 * (0.5 * 1 / 26 + 0.5 * 2 / 26))
    assert scores["changed_share"] == pytest.approx(100 * 1.5 / 26)
    assert scores["top3"] == pytest.approx(100 * (0.5 * 3 / 26 + 0.5 * (1 - (24 * 23 * 22) / (26 * 25 * 24))))


# --- the hand-built case -----------------------------------------------------------------------------


def test_given_maps_reproduce_the_target_and_its_components(explainer):
    inputs, _ = explainer.prepare([_image(1), _image(2)])
    ones = decompose_with_maps(explainer.model, inputs, torch.ones(2, 3, 4, 2))
    assert torch.allclose(ones.embedding, explainer.model.eval()(inputs), atol=1e-6)
    assert torch.allclose(ones.attribute_embeddings, ones.embedding.unsqueeze(1).expand(-1, 3, -1), atol=1e-6)
    hand = decompose_with_maps(explainer.model, inputs, HandSetMaps().maps.expand(2, -1, -1, -1))
    interpreter = explainer.model.decompose(inputs)
    assert torch.allclose(hand.attribute_embeddings, interpreter.attribute_embeddings, atol=1e-6)


def test_counterfactual_attribution_is_perfect_for_hand_set_maps(explainer):
    pairs = _pairs(8)
    frequencies = torch.tensor([0.1, 0.2, 0.7])  # the frequency reference always ranks 'c' first
    results = counterfactual_benchmark(explainer, pairs, TOY_SCHEMA, frequencies, ks=(1, 2), seed=0)
    interpreter = results["methods"]["interpreter"]
    assert interpreter["top1"] == pytest.approx(100.0)
    assert interpreter["top1_macro"] == pytest.approx(100.0)
    # outside its region a map is FLOOR, so the changed attribute takes ~1 / (1 + 2 * FLOOR) of the distance
    assert interpreter["changed_share"] > 99.0
    assert results["methods"]["uniform"]["top1"] == pytest.approx(100 / 3)
    assert results["methods"]["frequency"]["top1"] == pytest.approx(0.0)
    assert results["methods"]["frequency"]["top2"] == pytest.approx(50.0)  # 'b' is second
    random = results["methods"]["random_maps"]
    assert 0.0 <= random["top1"] <= 100.0 and random["changed_share"] < interpreter["changed_share"]
    assert list(results["per_change"]) == ["a", "b"]
    for scores in results["per_change"].values():
        assert scores["pairs"] == 4 and scores["mean_target_distance"] > 0
        assert scores["top1"] == pytest.approx(100.0) and scores["changed_share"] == pytest.approx(100.0, abs=1.0)
    assert results["zero_distance_pairs"] == 0 and results["pairs"] == 8
    # the region oracle's maps are the regions themselves: as right as the hand-set maps
    assert results["methods"]["region_oracle"]["top1"] == pytest.approx(100.0)
    assert all(scores["region_oracle_top1"] == pytest.approx(100.0) for scores in results["per_change"].values())
    table = format_faithfulness_table({"counterfactual": results})
    assert "interpreter" in table and "random_maps" in table and "region oracle" in table


def test_random_maps_are_shared_within_a_pair(explainer):
    images = [_image(seed) for seed in range(4)]
    distance, shares = pair_shares(explainer, images, images, random_maps_seed=3)
    assert torch.allclose(distance, torch.zeros(4), atol=1e-4)  # identical images, identical maps
    _, shares = pair_shares(explainer, images, images[::-1], random_maps_seed=3)
    assert torch.allclose(shares.sum(dim=1), torch.ones(4), atol=1e-5)
    _, again = pair_shares(explainer, images, images[::-1], random_maps_seed=3)
    assert torch.equal(shares, again)


def test_region_maps_pool_the_regions_to_the_feature_grid():
    maps = region_maps(_REGIONS[None], (4, 2), floor=0.0)
    assert maps.shape == (1, 3, 4, 2)
    assert maps[0, 0].tolist() == [[4.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # mean 1, all in A
    assert torch.equal(maps[0, 2], torch.ones(4, 2))  # drawn nowhere: the target's own pooling
    floored = region_maps(_REGIONS[None], (4, 2))
    assert bool((floored > 0).all()) and floored.mean(dim=(2, 3))[0].tolist() == pytest.approx([1.0] * 3)


def test_deletion_of_the_top_map_removes_the_whole_distance(explainer):
    pairs = _pairs(6)
    first = [pair.original for pair in pairs]
    second = [pair.counterfactual for pair in pairs]
    results = deletion_test(explainer, first, second, area=0.25, random_draws=4, seed=0)
    assert results["positions_removed"] == 2  # 25 % of the 4x2 map: exactly the changed region
    assert results["top_map_drop"] == pytest.approx(100.0, abs=1e-3)
    assert results["random_drop"] < 60.0
    assert results["top_beats_random"] > 80.0
    with pytest.raises(FaithfulnessError, match="area"):
        deletion_test(explainer, first, second, area=1.5)


def test_deletion_references_find_the_changed_region(explainer):
    pairs = _pairs(6)
    first = [pair.original for pair in pairs]
    second = [pair.counterfactual for pair in pairs]
    regions = [pair.regions for pair in pairs]
    results = deletion_test(explainer, first, second, area=0.25, random_draws=4, seed=0, regions_a=regions,
                            regions_b=regions)
    # the oracle's top attribute is the changed one and its region is exactly the changed cells
    assert results["region_oracle_top_map_drop"] == pytest.approx(100.0, abs=1e-3)
    assert results["region_oracle_best_map_drop"] == pytest.approx(100.0, abs=1e-3)
    assert results["best_map_drop"] == pytest.approx(100.0, abs=1e-3)
    assert results["random_drop"] <= results["best_random_drop"] <= 100.0 + 1e-3
    # the top map is 1 on the changed region and FLOOR elsewhere, F is non-zero there: the same region
    assert results["top_contribution_drop"] == pytest.approx(100.0, abs=1e-3)
    before = deletion_test(explainer, first, second, area=0.25, random_draws=4, seed=0)
    assert before["top_map_drop"] == results["top_map_drop"] and before["random_drop"] == results["random_drop"]
    assert "region_oracle_top_map_drop" not in before
    # F is zero outside regions A and B: its 4 largest positions are A and B, which hold the whole distance
    half = deletion_test(explainer, first, second, area=0.5, random_draws=2, seed=0)
    assert half["feature_norm_drop"] == pytest.approx(100.0, abs=1e-3)
    table = format_faithfulness_table({"deletion": results})
    assert "region oracle, best region chosen per pair" in table and "x random" in table
    with pytest.raises(FaithfulnessError, match="regions_a and regions_b"):
        deletion_test(explainer, first, second, regions_a=regions)


def _labelled_images(count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Images of different people: region A bright when attribute 'a' is present, dark otherwise (a
    little noise); region B random whatever 'b' says; 'c' is never present."""
    rng = np.random.default_rng(7)
    labels = np.zeros((count, 3), dtype=np.int64)
    labels[:, 0] = np.arange(count) % 2
    labels[:, 1] = rng.integers(0, 2, count)
    images = []
    for index in range(count):
        pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8)
        pixels[0:8, 0:4] = (200 if labels[index, 0] else 40) + rng.integers(0, 4, (8, 4, 3))
        images.append(pixels)
    return images, labels


def test_share_auc_separates_the_attribute_its_region_shows(explainer):
    images, labels = _labelled_images(12)
    results = share_auc_test(explainer, images, labels, list(range(12)), regions=[_REGIONS] * 12)
    assert results["pairs"] == 66 and results["images"] == 12
    for method in ("interpreter", "region_oracle"):
        per_attribute = results[method]["per_attribute"]
        # a pair that differs in 'a' differs in region A by ~160 grey levels, one that shares it by ~4
        assert per_attribute["a"] == pytest.approx(1.0)
        assert per_attribute["c"] is None  # nobody has 'c': no pair differs in it
        assert results[method]["macro"] == pytest.approx((per_attribute["a"] + per_attribute["b"]) / 2)
    same_person = share_auc_test(explainer, images, labels, [0] * 6 + [1] * 6)
    assert same_person["pairs"] == 36 and "region_oracle" not in same_person
    table = format_faithfulness_table({"share_auc": results})
    assert "region oracle" in table and "n/a" in table
    with pytest.raises(FaithfulnessError, match="at least two identities"):
        share_auc_test(explainer, images, labels, [5] * 12)
    with pytest.raises(FaithfulnessError, match="labels"):
        share_auc_test(explainer, images, labels[:, :2], list(range(12)))


def test_schema_mismatch_is_refused(explainer):
    with pytest.raises(FaithfulnessError, match="schema 'market1501'"):
        counterfactual_benchmark(explainer, _pairs(2), get_schema("market1501"), torch.ones(26))


# --- synthetic counterfactual pairs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_synthetic_dataset(num_train_identities=3, num_test_identities=2, min_images_per_identity=2,
                                  max_images_per_identity=2, num_distractor_images=0, num_junk_images=0,
                                  image_height=64, image_width=32)


def test_counterfactual_pairs_change_exactly_the_named_attribute(tiny_plan):
    schema = get_schema("market1501")
    pairs = build_counterfactual_pairs(tiny_plan, schema, max_images=1, seed=0)
    assert len(pairs) == schema.num_attributes  # one pair per attribute of the one chosen image
    planned = tiny_plan.image(pairs[0].image_name)
    assert planned.folder in ("query", "bounding_box_test")
    original = np.asarray(render_person(planned.identity, planned.camera, planned.view, (64, 32)))
    colour_groups = (set(schema.groups["upper colour"]), set(schema.groups["lower colour"]))
    for m, (name, pair) in enumerate(zip(schema.attributes, pairs)):
        assert np.array_equal(np.asarray(pair.original), original)
        assert pair.original.size == pair.counterfactual.size == (32, 64)
        if name in colour_groups[0] | colour_groups[1]:
            assert len(pair.changed) == 2 and m in pair.changed
            assert any({schema.attributes[i] for i in pair.changed} <= group for group in colour_groups)
        else:
            assert pair.changed == (m,) and pair.kind == name
        assert not np.array_equal(np.asarray(pair.counterfactual), original), name
        # the region of the changed attribute is exactly where the counterfactual differs
        assert pair.regions is pairs[0].regions and pair.regions.shape == (schema.num_attributes, 64, 32)
        assert np.array_equal(pair.regions[m], (np.asarray(pair.counterfactual) != original).any(axis=-1))
    only_hat = build_counterfactual_pairs(tiny_plan, schema, max_images=1, seed=0, attributes=["hat"])
    assert len(only_hat) == 1 and only_hat[0].regions.any(axis=(1, 2)).all()  # every region all the same
    assert np.array_equal(only_hat[0].regions[schema.index("hat")], pairs[schema.index("hat")].regions[
        schema.index("hat")])


def test_drawn_regions_are_the_counterfactual_pairs_regions(tiny_plan):
    schema = get_schema("market1501")
    pairs = build_counterfactual_pairs(tiny_plan, schema, max_images=1, seed=0)
    regions = drawn_regions(tiny_plan, schema, pairs[0].image_name)
    for m, name in enumerate(schema.attributes):
        if name in BINARY_ATTRIBUTES:
            assert np.array_equal(regions[m], pairs[0].regions[m]), name
        else:  # a colour turned off becomes a random other one: the garment, up to anti-aliased edges
            overlap = (regions[m] & pairs[0].regions[m]).sum() / (regions[m] | pairs[0].regions[m]).sum()
            assert overlap > 0.9, name
    pictures, labels, pids, chosen = tool.synthetic_auc_images(tiny_plan, schema, 3, seed=0)
    assert len(pictures) == len(chosen) == len(pids) == 3 and labels.shape == (3, schema.num_attributes)
    assert all(picture.size == (32, 64) for picture in pictures)
    assert all(region.shape == (schema.num_attributes, 64, 32) and region.any() for region in chosen)
    for pid, row in zip(pids, labels):
        assert pid in tiny_plan.test_pids and np.array_equal(row, identity_labels(schema, tiny_plan.identities[pid]))


def test_frequencies_and_labels_follow_the_schema(tiny_plan):
    schema = get_schema("market1501")
    identity = tiny_plan.identities[tiny_plan.train_pids[0]]
    labels = identity_labels(schema, identity)
    assert labels[schema.index("hat")] == (identity.labels["hat"] == 2)
    assert labels[schema.index(identity.upper_colour)] == 1
    assert sum(labels[schema.index(name)] for name in schema.groups["upper colour"]) == 1
    expected = np.mean([identity_labels(schema, tiny_plan.identities[pid]) for pid in tiny_plan.train_pids], axis=0)
    assert torch.allclose(attribute_frequencies(tiny_plan, schema), torch.as_tensor(expected, dtype=torch.float32))
    with pytest.raises(FaithfulnessError, match="not in schema"):
        build_counterfactual_pairs(tiny_plan, schema, attributes=["umbrella"])


# --- the tool ------------------------------------------------------------------------------------------


def test_tool_never_overwrites_results_silently(tmp_path):
    checkpoint = tmp_path / "run" / "model" / "model.pth.tar-1"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    existing = tmp_path / "run" / "faithfulness.json"
    existing.write_text("{}")
    args = tool.parse_args(["--checkpoint", str(checkpoint)])
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        tool.resolve_paths(args)
    args = tool.parse_args(["--checkpoint", str(checkpoint), "--overwrite"])
    assert tool.resolve_paths(args)[2] == str(existing)
    with pytest.raises(SystemExit, match="no interpreter checkpoint"):
        tool.resolve_paths(tool.parse_args(["--demo-output", str(tmp_path / "nothing")]))


def test_tool_pairs_different_identities(tmp_path):
    names = ["0001_c1s1_000001_01.jpg", "0001_c2s1_000002_01.jpg", "0002_c1s1_000003_01.jpg",
             "-1_c1s1_000004_01.jpg", "0000_c3s1_000005_01.jpg"]
    for name in names:
        Image.new("RGB", (8, 16)).save(tmp_path / name)
    first, second = tool.deletion_pairs(tool.image_files([str(tmp_path)]), 20, seed=0)
    assert len(first) == len(second) == 20
    for a, b in zip(first, second):
        pids = {os.path.basename(a)[:4], os.path.basename(b)[:4]}
        assert pids == {"0001", "0002"}
