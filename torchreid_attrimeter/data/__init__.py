"""Attribute datasets for torchreid. Importing this package registers ``market1501_attr``,
``dukemtmcreid_attr`` and ``synthetic_attr`` with ``torchreid.data.register_image_dataset``.

Batches from ``ImageDataManager`` built on these names are torchreid's dicts plus
``'attributes'`` (B, M) float32 in {0, 1} and ``'attributes_known'`` (B, M) bool.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import AttributeSchema
from torchreid_attrimeter.data.datasets import (
    AttributeImageDataset,
    CorruptImageError,
    DukeMTMCreIDAttributes,
    Market1501Attributes,
    MissingAttributeLabelsWarning,
    SyntheticAttributes,
    read_image_checked,
    set_attribute_file,
)

__all__ = [
    "ATTRIBUTE_DATASETS",
    "AttributeImageDataset",
    "CorruptImageError",
    "DukeMTMCreIDAttributes",
    "Market1501Attributes",
    "MissingAttributeLabelsWarning",
    "SyntheticAttributes",
    "attribute_positive_ratios",
    "attribute_schema_of",
    "read_image_checked",
    "register_attribute_datasets",
    "set_attribute_file",
]

ATTRIBUTE_DATASETS = {
    "market1501_attr": Market1501Attributes,
    "dukemtmcreid_attr": DukeMTMCreIDAttributes,
    "synthetic_attr": SyntheticAttributes,
}


def register_attribute_datasets() -> None:
    """Register the attribute datasets with torchreid (idempotent: re-imports are fine)."""
    for name, dataset_class in ATTRIBUTE_DATASETS.items():
        try:
            compat.register_image_dataset(name, dataset_class)
        except ValueError:
            # torchreid refuses a name twice; that is our own earlier registration (module reload),
            # unless another package took the name, which must not pass silently.
            registry = vars(compat.torchreid_submodule("data.datasets")).get("__image_datasets", {})
            registered = registry.get(name)
            if getattr(registered, "__name__", None) != dataset_class.__name__:
                raise ValueError(
                    f"the torchreid dataset name '{name}' is already taken by {registered!r}"
                ) from None
            registry[name] = dataset_class


register_attribute_datasets()


def _datamanager_datasets(datamanager: Any) -> tuple[Any, list[tuple[str, Any]]]:
    train_loader = getattr(datamanager, "train_loader", None)
    train_dataset = getattr(train_loader, "dataset", None)
    test_datasets = []
    for name, loaders in (getattr(datamanager, "test_loader", None) or {}).items():
        for split, loader in loaders.items():
            if loader is not None:
                test_datasets.append((f"{name}/{split}", loader.dataset))
    return train_dataset, test_datasets


def attribute_schema_of(datamanager: Any) -> AttributeSchema:
    """The attribute schema of a datamanager built on attribute datasets (its training set's, and
    every test set with attributes must share it)."""
    train_dataset, test_datasets = _datamanager_datasets(datamanager)
    sources = getattr(datamanager, "sources", "?")
    if not isinstance(train_dataset, AttributeImageDataset):
        raise TypeError(
            f"the datamanager's training set ({type(train_dataset).__name__}, sources={sources}) has no "
            f"attribute labels: use attribute datasets ({', '.join(ATTRIBUTE_DATASETS)}) for every source"
        )
    schema = train_dataset.attribute_schema
    for name, dataset in test_datasets:
        other = getattr(dataset, "attribute_schema", None)
        if other is not None and other != schema:
            raise ValueError(
                f"test set '{name}' uses attribute schema '{other.name}' ({other.num_attributes} attributes) "
                f"but training uses '{schema.name}' ({schema.num_attributes}): the interpreter's attributes "
                f"would not match; evaluate on targets with the training schema"
            )
    return schema


def attribute_positive_ratios(datamanager: Any) -> torch.Tensor:
    """(M,) float32: per attribute, the fraction of training images with a positive label among
    those where it is known (0 for an attribute never known). Image-level, since batches are."""
    schema = attribute_schema_of(datamanager)
    train_dataset, _ = _datamanager_datasets(datamanager)
    positives = np.zeros(schema.num_attributes, np.float64)
    known_counts = np.zeros(schema.num_attributes, np.float64)
    for item in train_dataset.train:
        values, known = train_dataset.labels_of(item[0])
        positives += values * known
        known_counts += known
    ratios = np.divide(positives, known_counts, out=np.zeros_like(positives), where=known_counts > 0)
    return torch.tensor(ratios, dtype=torch.float32)
