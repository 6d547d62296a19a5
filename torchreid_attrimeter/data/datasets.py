"""torchreid image datasets whose items also carry identity-level attribute labels.

Same images, identities, cameras and splits as torchreid's own readers (their ``process_dir`` is
reused), plus, per image, ``attributes`` (M,) float32 in {0, 1} and ``attributes_known`` (M,) bool.
Labels are looked up by image path, so they survive torchreid's relabelling, ``combineall`` and the
multi-source merge (``__add__``, overridden here to keep the attributes).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import (
    AttributeFileError,
    AttributeSchema,
    AttributeTable,
    get_schema,
    read_attribute_file,
)
from torchreid_attrimeter.errors import AttriMeterError

__all__ = [
    "AttributeImageDataset",
    "CorruptImageError",
    "DukeMTMCreIDAttributes",
    "Market1501Attributes",
    "MissingAttributeLabelsWarning",
    "SyntheticAttributes",
    "read_image_checked",
    "set_attribute_file",
]

# (values (M,) float32, known (M,) bool); one pair per identity, shared by all its images.
AttributeLabels = tuple[np.ndarray, np.ndarray]

_FILE_NAME_PATTERN = re.compile(r"([-\d]+)_c(\d)")
_EXPLICIT_ATTRIBUTE_FILES: dict[str, str] = {}


class CorruptImageError(AttriMeterError, RuntimeError):
    """An image file of the dataset that cannot be decoded."""


class MissingAttributeLabelsWarning(UserWarning):
    """Test identities that the attribute file does not label (their attributes are unknown)."""


def set_attribute_file(dataset_name: str, path: str | os.PathLike | None) -> None:
    """Use ``path`` as the attribute file of dataset ``dataset_name`` (e.g. ``'market1501_attr'``) in
    this process, whatever the default locations hold; ``None`` forgets it. This is how configs pass
    ``attribute_file`` through ``ImageDataManager``, which forwards no extra arguments."""
    if path is None:
        _EXPLICIT_ATTRIBUTE_FILES.pop(dataset_name, None)
    else:
        _EXPLICIT_ATTRIBUTE_FILES[dataset_name] = os.path.abspath(os.fspath(path))


def read_image_checked(path: str) -> Image.Image:
    """Open an image as RGB, raising an error naming the file (torchreid's ``read_image`` retries
    forever on IOError, which hangs a training run on one corrupt file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: '{path}'")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"cannot decode image '{path}' (corrupt or truncated?): {error}") from None


def _identity_of(image_path: str) -> int:
    match = _FILE_NAME_PATTERN.search(os.path.basename(image_path))
    if match is None:
        raise ValueError(f"image name '{image_path}' does not follow the '<pid>_c<camera>...' pattern")
    return int(match.group(1))


def _format_pids(pids: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(f"{pid:04d}" for pid in list(pids)[:limit])
    return shown + (f" and {len(pids) - limit} more" if len(pids) > limit else "")


class AttributeImageDataset(compat.ImageDataset):
    """A torchreid ``ImageDataset`` whose ``__getitem__`` adds ``'attributes'`` (M,) float32 and
    ``'attributes_known'`` (M,) bool to torchreid's item dict.

    ``image_attributes`` maps every image path of train / query / gallery to its labels.
    """

    def __init__(self, train: list, query: list, gallery: list, attribute_schema: AttributeSchema,
                 image_attributes: Mapping[str, AttributeLabels], **kwargs: Any) -> None:
        self.attribute_schema = attribute_schema
        self.image_attributes = dict(image_attributes)
        self._unknown = (np.zeros(attribute_schema.num_attributes, np.float32),
                         np.zeros(attribute_schema.num_attributes, bool))
        super().__init__(train, query, gallery, **kwargs)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return self.attribute_schema.attributes

    def labels_of(self, image_path: str) -> AttributeLabels:
        """(values (M,), known (M,)) of one image; all-unknown for images without labels."""
        return self.image_attributes.get(image_path, self._unknown)

    def __getitem__(self, index: int) -> dict:
        image_path, pid, camid, dsetid = self.data[index]
        image = read_image_checked(image_path)
        if self.transform is not None:
            image = self._transform_image(self.transform, self.k_tfm, image)
        values, known = self.labels_of(image_path)
        return {
            "img": image,
            "pid": pid,
            "camid": camid,
            "impath": image_path,
            "dsetid": dsetid,
            "attributes": torch.tensor(values, dtype=torch.float32),
            "attributes_known": torch.tensor(known, dtype=torch.bool),
        }

    def __add__(self, other: Any) -> AttributeImageDataset:
        """Multi-source merge that keeps the attributes (torchreid's returns a plain ImageDataset)."""
        if not isinstance(other, AttributeImageDataset):
            raise TypeError(
                f"cannot combine the attribute dataset {type(self).__name__} with {type(other).__name__}, "
                f"which has no attribute labels: use attribute datasets (e.g. 'market1501_attr', "
                f"'dukemtmcreid_attr', 'synthetic_attr') for every source"
            )
        if other.attribute_schema != self.attribute_schema:
            raise ValueError(
                f"cannot combine sources with different attribute schemas ('{self.attribute_schema.name}' "
                f"with {self.attribute_schema.num_attributes} attributes and '{other.attribute_schema.name}' "
                f"with {other.attribute_schema.num_attributes}): train on sources that share one schema"
            )
        merged = super().__add__(other)  # torchreid's pid / camid / dsetid offsets, kept as they are
        return AttributeImageDataset(
            merged.train, merged.query, merged.gallery, self.attribute_schema,
            {**self.image_attributes, **other.image_attributes},
            transform=self.transform, k_tfm=self.k_tfm, mode=self.mode, combineall=False, verbose=False,
        )

    def __radd__(self, other: Any) -> AttributeImageDataset:
        if isinstance(other, int) and other == 0:  # sum([...]) starts from 0
            return self
        if isinstance(other, AttributeImageDataset):
            return other.__add__(self)
        raise TypeError(
            f"cannot combine {type(other).__name__} (no attribute labels) with the attribute dataset "
            f"{type(self).__name__}: use attribute datasets for every source"
        )


class _LayoutAttributeDataset(AttributeImageDataset):
    """A dataset in the folder layout of one torchreid reader, labelled from one attribute file."""

    dataset_dir: str = ""
    registered_name: str = ""
    schema_name: str = "market1501"
    env_var: str = ""
    torchreid_reader: Any = None
    # Folders under the dataset folder that may hold the split folders, first existing wins.
    image_folders: tuple[str, ...] = ("",)
    # Places (relative to the dataset folder) where the attribute file may sit.
    attribute_file_candidates: tuple[str, ...] = ()
    missing_hint: str = ""

    def __init__(self, root: str = "", attribute_file: str | os.PathLike | None = None,
                 market1501_500k: bool = False, **kwargs: Any) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.dataset_dir = os.path.join(self.root, type(self).dataset_dir)
        self.data_dir = self._find_image_folder()
        split_dirs = {
            split: os.path.join(self.data_dir, folder)
            for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                                  ("gallery", "bounding_box_test"))
        }
        if market1501_500k:
            split_dirs["extra_gallery"] = os.path.join(self.data_dir, "images")
        missing = [path for path in split_dirs.values() if not os.path.isdir(path)]
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: the split folder(s) {missing} do not exist. Expected "
                f"bounding_box_train/, query/ and bounding_box_test/ under '{self.data_dir}'.{self.missing_hint}"
            )
        attribute_schema = get_schema(self.schema_name)
        self.attribute_file = self._find_attribute_file(attribute_file)
        table = read_attribute_file(self.attribute_file, attribute_schema)

        # torchreid's own parsing, so images, pids, cameras and relabelling are exactly its own.
        reader = self.torchreid_reader.__new__(self.torchreid_reader)
        train = reader.process_dir(split_dirs["train"], relabel=True)
        query = reader.process_dir(split_dirs["query"], relabel=False)
        gallery = reader.process_dir(split_dirs["gallery"], relabel=False)
        if market1501_500k:
            gallery += reader.process_dir(split_dirs["extra_gallery"], relabel=False)
        if not train or not query or not gallery:
            empty = [name for name, items in (("train", train), ("query", query), ("gallery", gallery))
                     if not items]
            raise FileNotFoundError(
                f"{type(self).__name__}: no .jpg images in the {empty} folder(s) under '{self.data_dir}'"
            )
        self._junk_pids = list(getattr(self.torchreid_reader, "_junk_pids", []))
        image_attributes = self._label_images(table, train, query, gallery)
        super().__init__(train, query, gallery, attribute_schema, image_attributes, **kwargs)

    def _find_image_folder(self) -> str:
        if not os.path.isdir(self.dataset_dir):
            # torchreid's readers would start a download here; this one never downloads.
            raise FileNotFoundError(
                f"{type(self).__name__}: dataset folder '{self.dataset_dir}' does not exist (root='{self.root}'). "
                f"Expected the split folders under one of: "
                f"{[os.path.join(self.dataset_dir, f) if f else self.dataset_dir for f in self.image_folders]}."
                f"{self.missing_hint}"
            )
        for folder in self.image_folders:
            candidate = os.path.join(self.dataset_dir, folder) if folder else self.dataset_dir
            if os.path.isdir(os.path.join(candidate, "bounding_box_train")):
                return candidate
        first = self.image_folders[0]
        return os.path.join(self.dataset_dir, first) if first else self.dataset_dir

    def _find_attribute_file(self, explicit: str | os.PathLike | None) -> str:
        sources = (
            ("the attribute_file argument", explicit),
            (f"set_attribute_file('{self.registered_name}', ...)",
             _EXPLICIT_ATTRIBUTE_FILES.get(self.registered_name)),
            (f"the environment variable {self.env_var}", os.environ.get(self.env_var) or None),
        )
        for origin, path in sources:
            if path is not None:
                path = os.path.abspath(os.path.expanduser(os.fspath(path)))
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"attribute file '{path}' (given by {origin}) does not exist")
                return path
        candidates = [os.path.join(self.dataset_dir, name) for name in self.attribute_file_candidates]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"{type(self).__name__}: no attribute file found. Looked for {candidates}. Put the file in one "
            f"of these places, or give its path with the attribute_file argument, the environment variable "
            f"{self.env_var}, or torchreid_attrimeter.data.set_attribute_file('{self.registered_name}', PATH)."
            f"{self.missing_hint}"
        )

    def _label_images(self, table: AttributeTable, train: list, query: list, gallery: list
                      ) -> dict[str, AttributeLabels]:
        size = table.schema.num_attributes
        unknown = (np.zeros(size, np.float32), np.zeros(size, bool))
        image_attributes: dict[str, AttributeLabels] = {}
        unlabelled: dict[str, set[int]] = {"train": set(), "query": set(), "gallery": set()}
        for split, items in (("train", train), ("query", query), ("gallery", gallery)):
            for item in items:
                image_path = item[0]
                pid = _identity_of(image_path)
                if pid in self._junk_pids or pid <= 0:
                    # torchreid's distractors (0) and junk (-1) have no labels: all unknown.
                    image_attributes[image_path] = unknown
                elif pid in table:
                    image_attributes[image_path] = table.lookup(pid)
                else:
                    unlabelled[split].add(pid)
                    image_attributes[image_path] = unknown
        if unlabelled["train"]:
            raise AttributeFileError(
                f"{type(self).__name__}: {len(unlabelled['train'])} training identities have no labels in "
                f"'{self.attribute_file}': {_format_pids(sorted(unlabelled['train']))}. Training needs "
                f"labels for every identity: is this the attribute file of this dataset?"
            )
        for split in ("query", "gallery"):
            if unlabelled[split]:
                warnings.warn(
                    f"{type(self).__name__}: {len(unlabelled[split])} {split} identities have no labels in "
                    f"'{self.attribute_file}': {_format_pids(sorted(unlabelled[split]))}; their attributes "
                    f"are unknown (masked out of the metrics)",
                    MissingAttributeLabelsWarning, stacklevel=3,
                )
        return image_attributes


class Market1501Attributes(_LayoutAttributeDataset):
    """Market-1501 with Market-1501_Attribute labels (26 binary attributes), torchreid name
    ``market1501_attr``. Folder: ``<root>/market1501/[Market-1501-v15.09.15/]``; attribute file
    ``market_attribute.mat`` in either folder (or ``Market-1501_Attribute/`` inside them)."""

    dataset_dir = "market1501"
    registered_name = "market1501_attr"
    schema_name = "market1501"
    env_var = "ATTRIMETER_MARKET1501_ATTRIBUTES"
    torchreid_reader = compat.TorchreidMarket1501
    image_folders = ("Market-1501-v15.09.15", "")
    attribute_file_candidates = (
        "market_attribute.mat",
        "Market-1501-v15.09.15/market_attribute.mat",
        "Market-1501_Attribute/market_attribute.mat",
        "Market-1501-v15.09.15/Market-1501_Attribute/market_attribute.mat",
    )


class DukeMTMCreIDAttributes(_LayoutAttributeDataset):
    """DukeMTMC-reID with DukeMTMC-attribute labels (23 attributes), torchreid name
    ``dukemtmcreid_attr``. Folder: ``<root>/dukemtmc-reid/DukeMTMC-reID/``; attribute file
    ``duke_attribute.mat`` in ``dukemtmc-reid/`` or ``DukeMTMC-reID/`` (or ``DukeMTMC-attribute/``)."""

    dataset_dir = "dukemtmc-reid"
    registered_name = "dukemtmcreid_attr"
    schema_name = "dukemtmc"
    env_var = "ATTRIMETER_DUKEMTMC_ATTRIBUTES"
    torchreid_reader = compat.TorchreidDukeMTMCreID
    image_folders = ("DukeMTMC-reID",)
    attribute_file_candidates = (
        "duke_attribute.mat",
        "DukeMTMC-reID/duke_attribute.mat",
        "DukeMTMC-attribute/duke_attribute.mat",
        "DukeMTMC-reID/DukeMTMC-attribute/duke_attribute.mat",
    )

    def __init__(self, root: str = "", attribute_file: str | os.PathLike | None = None,
                 market1501_500k: bool = False, **kwargs: Any) -> None:
        # market1501_500k is a Market option the datamanager passes to every dataset: ignored here.
        super().__init__(root=root, attribute_file=attribute_file, **kwargs)


class SyntheticAttributes(_LayoutAttributeDataset):
    """The synthetic attribute-person dataset (Market layout and schema), torchreid name
    ``synthetic_attr``: ``<root>/synthetic_attr/``, made by ``tools/make_synthetic_dataset.py``."""

    dataset_dir = "synthetic_attr"
    registered_name = "synthetic_attr"
    schema_name = "market1501"
    env_var = "ATTRIMETER_SYNTHETIC_ATTRIBUTES"
    torchreid_reader = compat.TorchreidMarket1501
    image_folders = ("",)
    attribute_file_candidates = ("market_attribute.mat",)
    missing_hint = (
        " Generate the synthetic dataset first: python tools/make_synthetic_dataset.py --root ROOT "
        "(or torchreid_attrimeter.data.synthetic.generate_synthetic_dataset(ROOT))."
    )

    def __init__(self, root: str = "", attribute_file: str | os.PathLike | None = None,
                 market1501_500k: bool = False, **kwargs: Any) -> None:
        super().__init__(root=root, attribute_file=attribute_file, **kwargs)
