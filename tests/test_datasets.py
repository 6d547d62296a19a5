"""The attribute datasets on small Market- and Duke-layout trees made here: same content as torchreid's
readers, per-image labels, torchreid's distractor / junk rules, bad input, and attributes arriving in
ImageDataManager batches (one and two sources, RandomIdentitySampler)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import torchreid_attrimeter  # noqa: F401 - registers the datasets
from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import AttributeFileError, get_schema
from torchreid_attrimeter.data import (
    CorruptImageError,
    DukeMTMCreIDAttributes,
    Market1501Attributes,
    MissingAttributeLabelsWarning,
    attribute_positive_ratios,
    attribute_schema_of,
    set_attribute_file,
)
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MARKET = get_schema("market1501")
DUKE = get_schema("dukemtmc")
MARKET_TRAIN = [2, 7, 11, 15, 20, 23]
MARKET_TEST = [3, 9, 30]


def write_mat(path, variable: str, splits: dict) -> None:
    """Attribute file in the real layout; ``splits``: split -> {pid: {field: file value}}."""
    content = {}
    for split, labels in splits.items():
        pids = sorted(labels)
        fields = list(next(iter(labels.values())))
        record = {f: np.array([[labels[p][f] for p in pids]], dtype=np.uint8) for f in reversed(fields)}
        index = np.empty((1, len(pids)), dtype=object)
        for column, pid in enumerate(pids):
            index[0, column] = f"{pid:04d}"
        record["image_index"] = index
        content[split] = record
    scipy.io.savemat(str(path), {variable: content})


def identity_labels(pid: int, schema) -> dict:
    """Distinct, recognisable file values per identity: binaries from the pid's bits, one colour each."""
    labels = {}
    binaries = [a for a in schema.attributes if not a.startswith(("up", "down")) or a in ("up", "down")]
    for bit, name in enumerate(binaries):
        labels[name] = 2 if (pid >> (bit % 5)) & 1 else 1
    for group in ("upper colour", "lower colour"):
        names = schema.groups[group]
        for k, name in enumerate(names):
            labels[name] = 2 if k == pid % len(names) else 1
    if schema is MARKET:
        labels["age"] = 1 + pid % 4
    return labels


def expected_vector(pid: int, schema) -> list[float]:
    labels = identity_labels(pid, schema)
    return [float(labels[a] == 2) for a in schema.attributes]


def write_image(path, pid: int) -> None:
    colour = ((pid * 37) % 256, (pid * 91) % 256, (pid * 53) % 256)
    Image.new("RGB", (16, 32), colour).save(path)


def make_tree(data_dir, train_pids, test_pids, name_fn, cameras=(1, 2), per_camera=2, extra_gallery=()):
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        os.makedirs(data_dir / folder, exist_ok=True)
    frame = 0
    for pid in train_pids:
        for camera in cameras:
            for _ in range(per_camera):
                frame += 1
                write_image(data_dir / "bounding_box_train" / name_fn(pid, camera, frame), pid)
    for pid in test_pids:
        for k, camera in enumerate(cameras):
            frame += 1
            write_image(data_dir / "query" / name_fn(pid, camera, frame), pid)
            for _ in range(per_camera):
                frame += 1
                write_image(data_dir / "bounding_box_test" / name_fn(pid, cameras[-1 - k], frame), pid)
    for pid in extra_gallery:
        frame += 1
        write_image(data_dir / "bounding_box_test" / name_fn(pid, cameras[0], frame), max(pid, 0))


def market_name(pid, camera, frame):
    return f"{pid:04d}_c{camera}s1_{frame:06d}_01.jpg" if pid >= 0 else f"-1_c{camera}s1_{frame:06d}_01.jpg"


def duke_name(pid, camera, frame):
    return f"{pid:04d}_c{camera}_f{frame:07d}.jpg"


@pytest.fixture
def market_root(tmp_path):
    root = tmp_path / "data"
    dataset_dir = root / "market1501"
    make_tree(dataset_dir / "Market-1501-v15.09.15", MARKET_TRAIN, MARKET_TEST, market_name,
              extra_gallery=(0, 0, -1))
    write_mat(dataset_dir / "market_attribute.mat", "market_attribute", {
        "test": {pid: identity_labels(pid, MARKET) for pid in MARKET_TEST},
        "train": {pid: identity_labels(pid, MARKET) for pid in MARKET_TRAIN},
    })
    return root


@pytest.fixture
def duke_root(tmp_path):
    """Like the dev split: the validation (query / gallery) identities are labelled in 'train'."""
    root = tmp_path / "data"
    data_dir = root / "dukemtmc-reid" / "DukeMTMC-reID"
    train, validation = [1, 4, 8, 12], [5, 14]
    make_tree(data_dir, train, validation, duke_name, cameras=(1, 3))
    write_mat(data_dir / "duke_attribute.mat", "duke_attribute", {
        "train": {pid: identity_labels(pid, DUKE) for pid in train + validation},
        "test": {pid: identity_labels(pid, DUKE) for pid in (100, 200)},
    })
    return root


@pytest.fixture
def synthetic_root(tmp_path):
    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_train_identities=6, num_test_identities=3, num_cameras=2,
                               min_images_per_identity=4, max_images_per_identity=4,
                               num_distractor_images=2, num_junk_images=1)
    return root


def pid_of(path: str) -> int:
    return int(os.path.basename(path).split("_")[0])


def test_importing_the_package_registers_the_three_datasets():
    registry = vars(compat.torchreid_submodule("data.datasets"))["__image_datasets"]
    assert {"market1501_attr", "dukemtmcreid_attr", "synthetic_attr"} <= set(registry)


def test_market_dataset_has_torchreid_images_identities_cameras_and_splits(market_root):
    ours = Market1501Attributes(root=str(market_root), verbose=False)
    theirs = compat.TorchreidMarket1501(root=str(market_root), verbose=False)
    for split in ("train", "query", "gallery"):
        assert sorted(getattr(ours, split)) == sorted(getattr(theirs, split))
    assert ours.num_train_pids == len(MARKET_TRAIN)


def test_every_image_carries_its_identity_attributes(market_root):
    dataset = Market1501Attributes(root=str(market_root), verbose=False, mode="query")
    for index in range(len(dataset)):
        item = dataset[index]
        pid = pid_of(item["impath"])
        assert item["attributes"].tolist() == expected_vector(pid, MARKET)
        assert item["attributes_known"].all()
        assert item["attributes"].dtype == torch.float32 and item["attributes_known"].dtype == torch.bool
        assert item["pid"] == pid and isinstance(item["img"], Image.Image)


def test_distractors_are_all_unknown_and_junk_is_skipped(market_root):
    dataset = Market1501Attributes(root=str(market_root), verbose=False, mode="gallery")
    distractors = [item for item in dataset.gallery if item[1] == 0]
    assert len(distractors) == 2
    assert all(item[1] != -1 for item in dataset.gallery)
    values, known = dataset.labels_of(distractors[0][0])
    assert not known.any() and not values.any()


def test_duke_identities_are_looked_up_in_whichever_split_holds_them(duke_root):
    dataset = DukeMTMCreIDAttributes(root=str(duke_root), verbose=False, mode="gallery")
    assert dataset.attribute_schema is DUKE
    for path, pid, *_ in dataset.gallery:
        values, known = dataset.labels_of(path)
        assert known.all() and values.tolist() == expected_vector(pid, DUKE)


def test_missing_dataset_folder_names_the_expected_paths_and_downloads_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="market1501.*Market-1501-v15.09.15"):
        Market1501Attributes(root=str(tmp_path), verbose=False)
    assert not (tmp_path / "market1501").exists()


def test_missing_attribute_file_lists_where_it_was_looked_for(market_root):
    os.remove(market_root / "market1501" / "market_attribute.mat")
    with pytest.raises(FileNotFoundError, match="ATTRIMETER_MARKET1501_ATTRIBUTES") as error:
        Market1501Attributes(root=str(market_root), verbose=False)
    assert "Market-1501-v15.09.15/market_attribute.mat" in str(error.value)


def test_attribute_file_can_be_given_by_argument_setter_or_environment(market_root, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere.mat"
    os.replace(market_root / "market1501" / "market_attribute.mat", moved)
    assert Market1501Attributes(root=str(market_root), attribute_file=str(moved), verbose=False).attribute_file \
        == str(moved)
    monkeypatch.setenv("ATTRIMETER_MARKET1501_ATTRIBUTES", str(moved))
    assert Market1501Attributes(root=str(market_root), verbose=False).attribute_file == str(moved)
    monkeypatch.delenv("ATTRIMETER_MARKET1501_ATTRIBUTES")
    set_attribute_file("market1501_attr", moved)
    try:
        assert Market1501Attributes(root=str(market_root), verbose=False).attribute_file == str(moved)
    finally:
        set_attribute_file("market1501_attr", None)
    with pytest.raises(FileNotFoundError, match="given by the attribute_file argument"):
        Market1501Attributes(root=str(market_root), attribute_file=str(tmp_path / "no.mat"), verbose=False)


def test_train_identities_without_labels_are_an_error_naming_them(market_root):
    path = market_root / "market1501" / "market_attribute.mat"
    write_mat(path, "market_attribute", {
        "test": {pid: identity_labels(pid, MARKET) for pid in MARKET_TEST},
        "train": {pid: identity_labels(pid, MARKET) for pid in MARKET_TRAIN[:-2]},
    })
    with pytest.raises(AttributeFileError, match="2 training identities have no labels.*0020, 0023"):
        Market1501Attributes(root=str(market_root), verbose=False)


def test_test_identities_without_labels_warn_and_are_unknown(market_root):
    path = market_root / "market1501" / "market_attribute.mat"
    write_mat(path, "market_attribute", {
        "test": {pid: identity_labels(pid, MARKET) for pid in MARKET_TEST[:-1]},
        "train": {pid: identity_labels(pid, MARKET) for pid in MARKET_TRAIN},
    })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = Market1501Attributes(root=str(market_root), verbose=False, mode="query")
    messages = [str(w.message) for w in caught if issubclass(w.category, MissingAttributeLabelsWarning)]
    assert any("query identities have no labels" in m and "0030" in m for m in messages)
    unlabelled = [path for path, pid, *_ in dataset.query if pid == 30]
    assert not dataset.labels_of(unlabelled[0])[1].any()


def test_attribute_file_of_the_wrong_dataset_is_refused(market_root, duke_root):
    duke_file = duke_root / "dukemtmc-reid" / "DukeMTMC-reID" / "duke_attribute.mat"
    with pytest.raises(AttributeFileError, match="no variable 'market_attribute'"):
        Market1501Attributes(root=str(market_root), attribute_file=str(duke_file), verbose=False)


def test_corrupt_image_raises_an_error_naming_the_file(market_root):
    dataset = Market1501Attributes(root=str(market_root), verbose=False, mode="query")
    broken = dataset.query[0][0]
    with open(broken, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(CorruptImageError, match=os.path.basename(broken)):
        dataset[0]


def datamanager(root, sources, **kwargs):
    options = {"root": str(root), "sources": sources, "targets": sources[0], "height": 32, "width": 16,
               "workers": 0, "batch_size_train": 8, "batch_size_test": 8, "use_gpu": False, "transforms": None,
               "train_sampler": "RandomIdentitySampler", "num_instances": 2, **kwargs}
    return compat.ImageDataManager(**options)


def check_batch_labels(batch, label_of_path):
    assert batch["attributes"].shape == (len(batch["impath"]), MARKET.num_attributes)
    assert batch["attributes"].dtype == torch.float32 and batch["attributes_known"].dtype == torch.bool
    for row, path in enumerate(batch["impath"]):
        assert batch["attributes"][row].tolist() == label_of_path(path)
        assert batch["attributes_known"][row].all()


def test_batches_carry_attributes_with_one_source_and_identity_sampler(market_root):
    manager = datamanager(market_root, ["market1501_attr"])
    assert type(manager.train_loader.sampler).__name__ == "RandomIdentitySampler"
    batches = list(manager.train_loader)
    assert batches
    for batch in batches:
        check_batch_labels(batch, lambda path: expected_vector(pid_of(path), MARKET))
        assert set(batch["pid"].tolist()) <= set(range(len(MARKET_TRAIN)))  # torchreid's relabelling
    query = next(iter(manager.test_loader["market1501_attr"]["query"]))
    check_batch_labels(query, lambda path: expected_vector(pid_of(path), MARKET))
    assert attribute_schema_of(manager) is MARKET


def test_batches_carry_attributes_with_two_sources(market_root, synthetic_root):
    assert synthetic_root == market_root  # both fixtures fill the same torchreid root
    manager = datamanager(market_root, ["market1501_attr", "synthetic_attr"])
    trainset = manager.train_loader.dataset
    assert type(trainset).__name__ == "AttributeImageDataset"  # torchreid's merge would drop attributes
    assert manager.num_train_pids == len(MARKET_TRAIN) + 6
    synthetic = {path: trainset.labels_of(path)[0].tolist()
                 for path, *_ in trainset.train if "synthetic_attr" in path}
    assert len(synthetic) == 24 and all(sum(v[-17:]) == 2 for v in synthetic.values())  # one colour each
    seen_sources = set()
    for batch in manager.train_loader:
        check_batch_labels(batch, lambda path: synthetic.get(path) or expected_vector(pid_of(path), MARKET))
        seen_sources.update(batch["dsetid"].tolist())
    assert seen_sources == {0, 1}


def test_sources_with_different_schemas_cannot_be_combined(market_root, duke_root):
    with pytest.raises(ValueError, match="different attribute schemas"):
        datamanager(market_root, ["market1501_attr", "dukemtmcreid_attr"])


def test_positive_ratios_are_image_level_fractions_of_training_labels(market_root):
    manager = datamanager(market_root, ["market1501_attr"], train_sampler="RandomSampler")
    ratios = attribute_positive_ratios(manager)
    # every training identity has the same number of images, so image ratio == identity ratio
    expected = np.mean([expected_vector(pid, MARKET) for pid in MARKET_TRAIN], axis=0)
    assert ratios.shape == (MARKET.num_attributes,)
    assert np.allclose(ratios.numpy(), expected)


def test_combineall_keeps_labels_for_query_and_gallery_identities(market_root):
    dataset = Market1501Attributes(root=str(market_root), verbose=False, combineall=True)
    assert dataset.num_train_pids == len(MARKET_TRAIN) + len(MARKET_TEST)
    for path, *_ in dataset.train:
        assert dataset.labels_of(path)[0].tolist() == expected_vector(pid_of(path), MARKET)
