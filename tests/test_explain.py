"""The explain API: an Explanation of two images equals the evaluator's numbers for that pair, any
image input gives the same result, checkpoints rebuild their target, and bad inputs are errors
naming the file. Tiny synthetic data, untrained osnet_x0_25 at 64x32, CPU."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from explain_fixtures import IMAGE_SIZE, tiny_setup
from PIL import Image

import torchreid_attrimeter
from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import get_schema
from torchreid_attrimeter.checkpoints import load_attrimeter_checkpoint
from torchreid_attrimeter.data import CorruptImageError
from torchreid_attrimeter.decomposition import pairwise_components
from torchreid_attrimeter.evaluation import extract_decompositions
from torchreid_attrimeter.explain import (
    Explainer,
    ExplainError,
    Explanation,
    to_pil_image,
)

SCHEMA = get_schema("market1501")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def explainer(setup):
    return Explainer.from_checkpoint(setup.checkpoint, device="cpu")


@pytest.fixture(scope="module")
def test_loaders(setup):
    loaders = setup.engine.datamanager.test_loader["synthetic_attr"]
    return loaders["query"], loaders["gallery"]


@pytest.fixture(scope="module")
def evaluator_decompositions(setup, test_loaders):
    """What the evaluator computes for the query and gallery sets (torchreid's loaders)."""
    query_loader, gallery_loader = test_loaders
    query = extract_decompositions(setup.engine.model, query_loader, device=torch.device("cpu"), amp=False)
    gallery = extract_decompositions(setup.engine.model, gallery_loader, device=torch.device("cpu"), amp=False)
    return query[0], gallery[0]


def _image_paths(loader):
    return [item[0] for item in loader.dataset.data]


def test_package_exports_explainer_and_explanation():
    assert torchreid_attrimeter.Explainer is Explainer
    assert torchreid_attrimeter.Explanation is Explanation


def test_explanation_equals_the_evaluators_numbers_for_the_same_pair(explainer, test_loaders,
                                                                     evaluator_decompositions):
    # Equal up to float32 rounding: the evaluator runs batches of 16 images, explain() batches of two,
    # and the distance expansion ||a||^2 + ||b||^2 - 2ab amplifies the last-bit differences.
    query_paths, gallery_paths = (_image_paths(loader) for loader in test_loaders)
    evaluated = pairwise_components(*evaluator_decompositions, metric="euclidean")
    for query_index, gallery_index in ((0, 0), (1, 5), (len(query_paths) - 1, len(gallery_paths) - 1)):
        explanation = explainer.explain(query_paths[query_index], gallery_paths[gallery_index])
        assert explanation.target_distance == pytest.approx(
            float(evaluated.target_distance[query_index, gallery_index]), rel=TOLERANCE, abs=1e-6)
        assert explanation.reconstructed_distance == pytest.approx(
            float(evaluated.reconstructed_distance[query_index, gallery_index]), rel=TOLERANCE, abs=1e-6)
        torch.testing.assert_close(explanation.attribute_components,
                                   evaluated.attribute_components[query_index, gallery_index],
                                   rtol=TOLERANCE, atol=1e-6)
        torch.testing.assert_close(explanation.shares, evaluated.shares[query_index, gallery_index],
                                   rtol=TOLERANCE, atol=1e-6)


def test_preprocessing_is_torchreids_test_transform(explainer, test_loaders):
    query_loader, _ = test_loaders
    batch = next(iter(query_loader))
    inputs, pictures = explainer.prepare(list(batch["impath"][:3]))
    torch.testing.assert_close(inputs, batch["img"][:3])
    assert pictures[0].shape == (*IMAGE_SIZE, 3) and pictures[0].dtype == np.uint8


def test_paths_pil_images_arrays_and_tensors_give_the_same_explanation(explainer, tmp_path):
    generator = np.random.default_rng(0)
    pixels_a = generator.integers(0, 256, (96, 40, 3), dtype=np.uint8)
    pixels_b = generator.integers(0, 256, (70, 30, 3), dtype=np.uint8)
    path_a, path_b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    Image.fromarray(pixels_a).save(path_a)
    Image.fromarray(pixels_b).save(path_b)
    reference = explainer.explain(path_a, path_b)
    variants = [
        (Image.fromarray(pixels_a), Image.fromarray(pixels_b)),
        (pixels_a, pixels_b),
        (pixels_a.astype(np.float32) / 255.0, pixels_b.astype(np.float64) / 255.0),
        (torch.from_numpy(pixels_a).permute(2, 0, 1), torch.from_numpy(pixels_b).permute(2, 0, 1)),
        (torch.from_numpy(pixels_a).permute(2, 0, 1).float() / 255.0,
         torch.from_numpy(pixels_b).permute(2, 0, 1)[None].float() / 255.0),
    ]
    for image_a, image_b in variants:
        explanation = explainer.explain(image_a, image_b)
        assert explanation.target_distance == pytest.approx(reference.target_distance, rel=1e-5)
        torch.testing.assert_close(explanation.attribute_components, reference.attribute_components)
        torch.testing.assert_close(explanation.maps_a, reference.maps_a)


def test_explanation_lists_every_attribute_in_schema_order_with_consistent_numbers(explainer, setup):
    query_path = _image_paths(setup.engine.datamanager.test_loader["synthetic_attr"]["query"])[0]
    gallery_path = _image_paths(setup.engine.datamanager.test_loader["synthetic_attr"]["gallery"])[3]
    explanation = explainer.explain(query_path, gallery_path)
    parts = explanation.attributes()
    assert [part.name for part in parts] == list(SCHEMA.attributes)
    assert [part.group for part in parts] == [SCHEMA.group_of(name) for name in SCHEMA.attributes]
    assert float(explanation.shares.sum()) == pytest.approx(1.0, rel=1e-5)
    assert sum(part.contribution for part in parts) == pytest.approx(explanation.reconstructed_distance, rel=1e-5)
    assert explanation.maps_a.shape == explanation.maps_b.shape
    assert explanation.maps_a.shape[0] == SCHEMA.num_attributes and bool((explanation.maps_a > 0).all())
    assert explanation.image_a.shape == (*IMAGE_SIZE, 3)
    assert explanation.source_a == query_path


def test_top_k_is_sorted_by_share_and_to_dict_is_json_safe(explainer):
    generator = np.random.default_rng(1)
    explanation = explainer.explain(generator.random((64, 32, 3)), generator.random((64, 32, 3)))
    top = explanation.top(4)
    assert len(top) == 4
    assert [part.share for part in top] == sorted((part.share for part in explanation.attributes()),
                                                  reverse=True)[:4]
    record = json.loads(json.dumps(explanation.to_dict(include_maps=True), allow_nan=False))
    assert [entry["name"] for entry in record["attributes"]] == list(SCHEMA.attributes)
    assert record["target_distance"] == pytest.approx(explanation.target_distance)
    assert record["top"] == [part.name for part in explanation.top(3)]
    assert np.asarray(record["maps_a"]).shape == tuple(explanation.maps_a.shape)


def test_predicted_differences_come_from_the_attribute_branch(explainer, setup):
    generator = np.random.default_rng(2)
    image_a, image_b = generator.random((64, 32, 3)), generator.random((64, 32, 3))
    explanation = explainer.explain(image_a, image_b)
    assert explanation.probabilities_a is not None
    expected = (explanation.probabilities_a > 0.5) != (explanation.probabilities_b > 0.5)
    assert torch.equal(explanation.predicted_difference, expected)
    assert all(isinstance(part.differs, bool) for part in explanation.attributes())

    without_branch = torchreid_attrimeter.build_attrimeter(
        "osnet_x0_25", SCHEMA.num_attributes, setup.target_weights, variant="head", hidden_channels=8,
        image_size=IMAGE_SIZE)
    plain = Explainer(without_branch, SCHEMA.attributes, "euclidean", device="cpu").explain(image_a, image_b)
    assert plain.predicted_difference is None
    assert all(part.differs is None for part in plain.attributes())
    assert plain.attribute_groups == dict(SCHEMA.groups)


def test_explainer_from_a_built_model_equals_the_one_from_its_checkpoint(explainer, setup):
    direct = Explainer(setup.engine.model, SCHEMA.attributes, "euclidean", IMAGE_SIZE, device="cpu")
    generator = np.random.default_rng(3)
    image_a, image_b = generator.random((64, 32, 3)), generator.random((64, 32, 3))
    first, second = direct.explain(image_a, image_b), explainer.explain(image_a, image_b)
    assert first.target_distance == pytest.approx(second.target_distance, rel=1e-6)
    torch.testing.assert_close(first.attribute_components, second.attribute_components)
    assert explainer.checkpoint_record["target"]["name"] == "osnet_x0_25"
    assert explainer.image_size == IMAGE_SIZE


def test_explain_ranking_orders_by_target_distance_and_marks_matches(explainer, test_loaders):
    query_loader, gallery_loader = test_loaders
    query_path, query_pid, query_camid = query_loader.dataset.data[0][:3]
    gallery = gallery_loader.dataset.data
    paths = [item[0] for item in gallery]
    pids, camids = [item[1] for item in gallery], [item[2] for item in gallery]
    ranking = explainer.explain_ranking(query_path, paths, topk=5, query_pid=query_pid, gallery_pids=pids,
                                        query_camid=query_camid, gallery_camids=camids)
    assert len(ranking) == 5
    distances = [explanation.target_distance for explanation in ranking.explanations]
    assert distances == sorted(distances)
    left_out = {index for index in range(len(paths)) if pids[index] == query_pid and camids[index] == query_camid}
    assert not left_out & set(ranking.gallery_indices)
    all_distances = [explainer.explain(query_path, paths[index]).target_distance
                     for index in range(len(paths)) if index not in left_out]
    assert distances[0] == pytest.approx(min(all_distances), rel=1e-5)
    assert ranking.matches == [pids[index] == query_pid for index in ranking.gallery_indices]
    json.dumps(ranking.to_dict(), allow_nan=False)


def test_a_query_identity_absent_from_the_gallery_is_noted(explainer, test_loaders):
    _, gallery_loader = test_loaders
    paths = [item[0] for item in gallery_loader.dataset.data]
    pids = [item[1] for item in gallery_loader.dataset.data]
    ranking = explainer.explain_ranking(paths[0], paths[1:], topk=3, query_pid=99999, gallery_pids=pids[1:])
    assert ranking.matches == [False, False, False]
    assert any("99999" in note and "absent" in note for note in ranking.notes)


def test_missing_and_unreadable_image_files_are_errors_naming_the_file(explainer, tmp_path):
    missing = str(tmp_path / "nowhere.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    good = np.zeros((64, 32, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        explainer.explain(missing, good)
    with pytest.raises(CorruptImageError, match="corrupt.jpg"):
        explainer.explain(good, str(corrupt))
    with pytest.raises(ExplainError, match=r"\[0, 1\]"):
        explainer.explain(np.full((64, 32, 3), 2.5), good)
    with pytest.raises(ExplainError, match="channels first"):
        explainer.explain(torch.zeros(2, 3, 64, 32), good)


@pytest.mark.parametrize("empty", [np.zeros((0, 0, 3), np.uint8), np.zeros((64, 0), np.float32),
                                   torch.zeros(3, 0, 32), Image.new("RGB", (0, 0))],
                         ids=["array 0x0", "array 64x0", "tensor 3x0x32", "PIL 0x0"])
def test_an_image_without_pixels_is_an_error_naming_the_input_and_its_shape(explainer, empty):
    shape = f"{empty.width}x{empty.height}" if isinstance(empty, Image.Image) else str(tuple(empty.shape))
    with pytest.raises(ExplainError, match="empty") as caught:
        explainer.explain(empty, np.zeros((64, 32, 3), np.uint8))
    assert "empty" in str(caught.value) and shape in str(caught.value)


def test_16_bit_images_are_scaled_to_8_bit_not_clipped(explainer, tmp_path):
    """value / 257 maps 0-65535 onto 0-255: a 16-bit image gives the explanation of its 8-bit version."""
    pixels = np.random.default_rng(1).integers(0, 256, (64, 32), dtype=np.uint8)
    wide = pixels.astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode in ("I;16", "I")
    reference = explainer.explain(pixels, pixels[::-1])
    sixteen_bit = [
        wide,
        np.repeat(wide[..., None], 3, axis=-1),
        torch.from_numpy(wide)[None],
        Image.fromarray(wide),
        Image.frombytes("I;16B", (32, 64), wide.astype(">u2").tobytes()),
        Image.fromarray(wide.astype(np.int32)),  # mode I
        str(tmp_path / "wide.png"),
    ]
    for image in sixteen_bit:
        np.testing.assert_array_equal(np.asarray(to_pil_image(image)), np.asarray(Image.fromarray(pixels).convert("RGB")))
        explanation = explainer.explain(image, pixels[::-1])
        torch.testing.assert_close(explanation.attribute_components, reference.attribute_components)


def test_pixel_values_outside_their_dtypes_convention_are_refused_with_the_rule(explainer):
    good = np.zeros((64, 32, 3), np.uint8)
    with pytest.raises(ExplainError, match=r"\[0, 1\].*divide 0-255 pixels by 255"):
        explainer.explain(np.full((64, 32, 3), 200.0), good)
    with pytest.raises(ExplainError, match=r"\[0, 1\]"):
        explainer.explain(torch.full((3, 64, 32), -0.5), good)
    with pytest.raises(ExplainError, match="NaN"):
        explainer.explain(np.full((64, 32), np.nan, np.float32), good)
    with pytest.raises(ExplainError, match="dtype int64"):
        explainer.explain(np.zeros((64, 32, 3), np.int64), good)
    with pytest.raises(ExplainError, match="32-bit integer pixels from -5"):
        explainer.explain(Image.fromarray(np.full((64, 32), -5, np.int32)), good)
    # the edges of the float convention are accepted
    explainer.explain(np.linspace(0.0, 1.0, 64 * 32 * 3).reshape(64, 32, 3), good)


def test_checkpoint_whose_target_weights_are_gone_is_an_error_and_can_be_pointed_at_them(setup, tmp_path):
    moved = str(tmp_path / "moved.pth")
    shutil.copy(setup.target_weights, moved)
    checkpoint = compat.load_checkpoint(setup.checkpoint)
    checkpoint["attrimeter"]["target"]["weights"] = str(tmp_path / "gone" / "osnet_x0_25.pth")
    orphan = str(tmp_path / "orphan.pth.tar")
    torch.save(checkpoint, orphan)
    with pytest.raises(FileNotFoundError, match="gone.*target_weights"):
        Explainer.from_checkpoint(orphan)
    explainer = Explainer.from_checkpoint(orphan, target_weights=moved, device="cpu")
    assert explainer.model.target_spec["weights"] == moved


def test_checkpoint_with_changed_target_weights_is_refused(setup, tmp_path):
    changed = str(tmp_path / "changed.pth")
    state = torch.load(setup.target_weights)
    state[next(iter(state))] += 1.0
    torch.save(state, changed)
    with pytest.raises(ExplainError, match="sha256"):
        load_attrimeter_checkpoint(setup.checkpoint, target_weights=changed)


def test_a_file_that_is_not_an_interpreter_checkpoint_is_refused(setup):
    with pytest.raises(ExplainError, match="not an AttriMeter interpreter checkpoint"):
        Explainer.from_checkpoint(setup.target_weights)


def test_average_maps_split_images_by_their_labels(explainer, test_loaders):
    _, gallery_loader = test_loaders
    dataset = gallery_loader.dataset
    paths = [item[0] for item in dataset.data[:8]]
    labels = torch.as_tensor(np.stack([dataset.labels_of(path)[0] for path in paths]))
    known = torch.as_tensor(np.stack([dataset.labels_of(path)[1] for path in paths]))
    average = explainer.average_maps(paths, labels, known)
    maps = explainer.decompose(paths).maps
    m = int(torch.argmax((labels * known).sum(0)))
    positives = (labels[:, m] == 1) & known[:, m]
    torch.testing.assert_close(average.with_attribute[m], maps[positives, m].mean(0))
    assert int(average.with_count[m]) == int(positives.sum())
    assert os.path.basename(paths[0]) and average.to_dict()["attributes"][m]["images_with"] == int(positives.sum())


def test_ground_truth_labels_are_carried_and_say_which_attributes_differ(explainer):
    generator = np.random.default_rng(3)
    image_a, image_b = generator.random((64, 32, 3)), generator.random((64, 32, 3))
    labels_a = np.zeros(SCHEMA.num_attributes, np.float32)
    labels_b = labels_a.copy()
    labels_b[[0, 5, 12]] = 1.0  # gender, hat, upred differ
    known_b = np.ones(SCHEMA.num_attributes, bool)
    known_b[[12, 20]] = False  # upred and downpurple unknown in image b
    explanation = explainer.explain(image_a, image_b, labels_a=labels_a, labels_b=(labels_b, known_b))

    expected_known = torch.tensor(known_b)
    assert torch.equal(explanation.labels_known, expected_known)
    differing = [SCHEMA.attributes[m] for m in np.flatnonzero(explanation.labelled_difference.numpy())]
    assert differing == [SCHEMA.attributes[0], SCHEMA.attributes[5]]
    parts = {part.name: part for part in explanation.attributes()}
    assert parts[SCHEMA.attributes[0]].labelled_differs is True
    assert parts[SCHEMA.attributes[1]].labelled_differs is False
    assert parts[SCHEMA.attributes[12]].labelled_differs is None  # differs, but b's label is unknown
    for part in parts.values():
        assert part.times_even == pytest.approx(part.share * SCHEMA.num_attributes, rel=1e-6)

    record = json.loads(json.dumps(explanation.to_dict(), allow_nan=False))
    assert record["even_share"] == pytest.approx(1 / SCHEMA.num_attributes)
    entries = {entry["name"]: entry for entry in record["attributes"]}
    assert [name for name, entry in entries.items() if entry["labelled_difference"]] == differing
    assert entries[SCHEMA.attributes[12]]["labelled_difference"] is None
    assert entries[SCHEMA.attributes[5]]["label_a"] == 0 and entries[SCHEMA.attributes[5]]["label_b"] == 1
    assert entries[SCHEMA.attributes[20]]["label_b"] is None


def test_without_labels_the_explanation_is_as_before(explainer):
    explanation = explainer.explain(np.zeros((64, 32, 3), np.uint8), np.ones((64, 32, 3), np.uint8))
    assert explanation.labels_a is None and explanation.labelled_difference is None
    assert explanation.labels_known is None
    assert all(part.labelled_differs is None for part in explanation.attributes())
    entry = explanation.to_dict()["attributes"][0]
    assert entry["labelled_difference"] is None and "label_a" not in entry and "label_b" not in entry


@pytest.mark.parametrize("labels, message", [
    ({"labels_a": np.zeros(26)}, "labels_a and labels_b together"),
    ({"labels_a": np.zeros(26), "labels_b": np.zeros(25)}, r"labels_b values: shape \(25,\), expected \(26,\)"),
    ({"labels_a": (np.zeros(26), np.ones(3, bool)), "labels_b": np.zeros(26)}, "labels_a known mask: shape"),
    ({"labels_a": np.full(26, 2.0), "labels_b": np.zeros(26)}, "labels_a holds 2.0 at .*must be 0 or 1"),
])
def test_bad_labels_are_errors_naming_the_argument(explainer, labels, message):
    with pytest.raises(ExplainError, match=message):
        explainer.explain(np.zeros((64, 32, 3), np.uint8), np.ones((64, 32, 3), np.uint8), **labels)


def test_explain_ranking_gives_each_pair_the_labels_of_its_two_images(explainer, test_loaders):
    query_loader, gallery_loader = test_loaders
    dataset = gallery_loader.dataset
    query_path = query_loader.dataset.data[0][0]
    paths = [item[0] for item in dataset.data]
    values = np.stack([dataset.labels_of(path)[0] for path in paths])
    known = np.stack([dataset.labels_of(path)[1] for path in paths])
    ranking = explainer.explain_ranking(query_path, paths, topk=3,
                                        query_labels=query_loader.dataset.labels_of(query_path),
                                        gallery_labels=(values, known))
    for index, explanation in zip(ranking.gallery_indices, ranking.explanations):
        assert torch.equal(explanation.labels_b, torch.as_tensor(values[index]))
        assert torch.equal(explanation.labels_a, torch.as_tensor(query_loader.dataset.labels_of(query_path)[0]))
    ranked = ranking.to_dict()["ranked"]
    assert all(isinstance(entry["labelled_difference"], bool) for entry in ranked[0]["attributes"])
    with pytest.raises(ExplainError, match="query_labels and gallery_labels together"):
        explainer.explain_ranking(query_path, paths, topk=1, gallery_labels=(values, known))
