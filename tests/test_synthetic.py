"""The synthetic attribute-person dataset: determinism, idempotent generation, the real .mat layout,
loading through torchreid's own market1501 reader and ours, and counterfactual rendering."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
import scipy.io

from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import get_schema, read_attribute_file
from torchreid_attrimeter.data import SyntheticAttributes
from torchreid_attrimeter.data.synthetic import (
    BINARY_ATTRIBUTES,
    LOWER_COLOURS,
    UPPER_COLOURS,
    SyntheticDatasetError,
    counterfactual_identity,
    generate_synthetic_dataset,
    load_synthetic_plan,
    plan_synthetic_dataset,
    render_counterfactual,
    render_person,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = {"num_train_identities": 8, "num_test_identities": 4, "num_cameras": 3, "min_images_per_identity": 3,
         "max_images_per_identity": 5, "num_distractor_images": 3, "num_junk_images": 2}


def tree_digest(folder) -> dict[str, str]:
    digests = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(root, seed=5, **SMALL)
    return root


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(small_root, tmp_path):
    again = generate_synthetic_dataset(tmp_path / "again", seed=5, **SMALL)
    assert tree_digest(again) == tree_digest(small_root / "synthetic_attr")
    other = generate_synthetic_dataset(tmp_path / "other", seed=6, **SMALL)
    assert tree_digest(other) != tree_digest(small_root / "synthetic_attr")


def test_rerun_with_the_same_parameters_reuses_the_dataset(small_root):
    manifest = small_root / "synthetic_attr" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert generate_synthetic_dataset(small_root, seed=5, **SMALL) == str(small_root / "synthetic_attr")
    assert manifest.stat().st_mtime_ns == before


def test_rerun_with_other_parameters_is_an_error_and_overwrites_nothing(small_root):
    before = tree_digest(small_root / "synthetic_attr")
    with pytest.raises(SyntheticDatasetError, match="num_cameras: existing 3 vs requested 4"):
        generate_synthetic_dataset(small_root, seed=5, **{**SMALL, "num_cameras": 4})
    assert tree_digest(small_root / "synthetic_attr") == before


def test_a_foreign_folder_in_the_way_is_an_error(tmp_path):
    (tmp_path / "synthetic_attr").mkdir()
    with pytest.raises(SyntheticDatasetError, match="no manifest.json"):
        generate_synthetic_dataset(tmp_path, **SMALL)


def test_files_follow_the_market_layout_and_names(small_root):
    folder = small_root / "synthetic_attr"
    plan = load_synthetic_plan(small_root)
    for planned in plan.images:
        assert (folder / planned.folder / planned.name).is_file()
    names = os.listdir(folder / "bounding_box_test")
    assert any(n.startswith("0000_") for n in names) and any(n.startswith("-1_") for n in names)
    assert all(len(n.split("_")) == 4 and n.endswith(".jpg") for n in os.listdir(folder / "query"))


def test_attribute_file_has_the_real_market_layout(small_root):
    mat = scipy.io.loadmat(small_root / "synthetic_attr" / "market_attribute.mat")
    top = mat["market_attribute"]
    assert top.shape == (1, 1) and set(top.dtype.names) == {"train", "test"}
    train, test = top[0, 0]["train"][0, 0], top[0, 0]["test"][0, 0]
    assert len(train.dtype.names) == 28 and "age" in train.dtype.names
    assert train.dtype.names != test.dtype.names  # field order differs per split, as in the real file
    assert train["gender"].shape == (1, 8) and train["gender"].dtype == np.uint8
    identities = [s[0] for s in train["image_index"][0]]
    assert identities == sorted(identities) and all(len(s) == 4 for s in identities)


def test_labels_in_the_file_match_the_rendered_identities(small_root):
    plan = load_synthetic_plan(small_root)
    table = read_attribute_file(small_root / "synthetic_attr" / "market_attribute.mat", "market1501")
    schema = table.schema
    for pid, identity in plan.identities.items():
        labels = identity.market_labels()
        values, known = table.lookup(pid)
        assert known.all()
        assert values.tolist() == [float(labels[a] == 2) for a in schema.attributes]
    assert sorted(table.splits["train"].identities.tolist()) == sorted(plan.train_pids)


def test_loads_through_torchreids_market1501_reader_and_synthetic_attr(small_root, tmp_path):
    os.symlink(small_root / "synthetic_attr", tmp_path / "market1501")
    theirs = compat.TorchreidMarket1501(root=str(tmp_path), verbose=False)
    ours = SyntheticAttributes(root=str(small_root), verbose=False)
    assert ours.num_train_pids == theirs.num_train_pids == 8
    strip = lambda items: sorted((os.path.basename(p), pid, cam) for p, pid, cam, _ in items)
    for split in ("train", "query", "gallery"):
        assert strip(getattr(ours, split)) == strip(getattr(theirs, split))
    assert ours[0]["attributes"].shape == (26,)


def test_missing_synthetic_dataset_says_how_to_generate_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_synthetic_dataset.py"):
        SyntheticAttributes(root=str(tmp_path), verbose=False)


def changed_fields(before: dict, after: dict) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize("attribute", BINARY_ATTRIBUTES)
def test_counterfactual_changes_exactly_one_binary_attribute_and_the_image(attribute):
    plan = plan_synthetic_dataset(seed=1, **SMALL)
    planned = next(p for p in plan.images if p.identity is not None and p.identity.pid != 0
                   and p.view.occluder is None)
    original = np.asarray(render_person(planned.identity, planned.camera, planned.view))
    image, changed = render_counterfactual(planned.identity, planned.camera, planned.view, attribute)
    assert changed_fields(planned.identity.market_labels(), changed.market_labels()) == {attribute}
    assert changed.pid == planned.identity.pid and changed.skin == planned.identity.skin
    assert (np.asarray(image) != original).any()


@pytest.mark.parametrize("colour", ["upgreen", "downpink"])
def test_counterfactual_colour_change_swaps_one_colour_and_keeps_the_group_one_hot(colour):
    plan = plan_synthetic_dataset(seed=2, **SMALL)
    identity = next(i for i in plan.identities.values() if colour not in (i.upper_colour, i.lower_colour))
    before = identity.market_labels()
    after = counterfactual_identity(identity, colour).market_labels()
    group = UPPER_COLOURS if colour in UPPER_COLOURS else LOWER_COLOURS
    old = identity.upper_colour if group is UPPER_COLOURS else identity.lower_colour
    assert changed_fields(before, after) == {old, colour}
    assert sum(after[name] == 2 for name in group) == 1


def test_rendering_is_a_pure_function_of_identity_camera_and_view():
    plan = plan_synthetic_dataset(seed=3, **SMALL)
    planned = plan.images[0]
    first = np.asarray(render_person(planned.identity, planned.camera, planned.view))
    second = np.asarray(render_person(planned.identity, planned.camera, planned.view))
    assert first.shape == (128, 64, 3) and np.array_equal(first, second)


def test_counterfactual_refuses_unknown_attributes_and_no_op_changes():
    identity = plan_synthetic_dataset(seed=1, **SMALL).identities[next(iter(plan_synthetic_dataset(
        seed=1, **SMALL).identities))]
    with pytest.raises(ValueError, match="cannot change 'age'"):
        counterfactual_identity(identity, "age")
    with pytest.raises(ValueError, match="already has"):
        counterfactual_identity(identity, identity.upper_colour)


def test_default_size_is_small_but_not_trivial_and_labels_every_attribute():
    plan = plan_synthetic_dataset()
    assert len(plan.train_pids) == 400 and len(plan.test_pids) == 100
    per_identity = {}
    for planned in plan.images:
        if planned.identity is not None and planned.identity.pid > 0:
            per_identity[planned.identity.pid] = per_identity.get(planned.identity.pid, 0) + 1
    assert min(per_identity.values()) >= 8 and max(per_identity.values()) <= 12
    train_labels = np.array([[plan.identities[p].market_labels()[a] == 2 for a in get_schema("market1501").attributes]
                             for p in plan.train_pids])
    assert train_labels.any(axis=0).all() and not train_labels.all(axis=0).any()


@pytest.mark.slow
def test_default_generation_takes_well_under_a_minute(tmp_path):
    start = time.time()
    generate_synthetic_dataset(tmp_path)
    assert time.time() - start < 60
    assert len(os.listdir(tmp_path / "synthetic_attr" / "bounding_box_train")) > 1200
