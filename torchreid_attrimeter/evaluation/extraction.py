"""Run a model over a torchreid loader once and keep what the evaluator needs: the decomposition
without its attention maps (they are by far the largest part), identities, cameras and labels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.evaluation.evaluator import ExplanationEvaluator

REQUIRED_KEYS = ("img", "pid", "camid")


def _batch_field(batch: Any, key: str) -> Any:
    if not isinstance(batch, dict):
        raise TypeError(f"loader batches must be dicts with keys {REQUIRED_KEYS} (torchreid's data manager "
                        f"format), got {type(batch).__name__}")
    if key not in batch:
        raise KeyError(f"loader batch has no '{key}' (keys: {sorted(batch)}); build the loader with "
                       "torchreid's ImageDataManager or give batches the same keys")
    return batch[key]


@torch.no_grad()
def iterate_decompositions(model: torch.nn.Module, loader: Iterable, device: torch.device | str | None = None,
                           amp: bool = True, progress: bool = True, description: str = "extracting"):
    """Yield ``(decomposition without maps, pids, camids, attributes | None, known | None)`` per batch."""
    if not hasattr(model, "decompose"):
        raise TypeError(f"{type(model).__name__} has no decompose(images): evaluate an AttriMeter "
                        "(torchreid_attrimeter.build_attrimeter), not a bare target model")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device_type="cuda", dtype=torch.float16) if amp and device.type == "cuda"
                else contextlib.nullcontext())
    try:
        for batch in tqdm(loader, desc=description, unit="batch", disable=not progress):
            images = _batch_field(batch, "img").to(device, non_blocking=True)
            with autocast:
                decomposition = model.decompose(images)
            decomposition = Decomposition(decomposition.embedding.float(),
                                          decomposition.attribute_embeddings.float(), None,
                                          None if decomposition.attribute_logits is None
                                          else decomposition.attribute_logits.float())
            attributes = batch.get("attributes")
            known = batch.get("attributes_known") if attributes is not None else None
            yield (decomposition, _batch_field(batch, "pid"), _batch_field(batch, "camid"), attributes, known)
    finally:
        model.train(was_training)


def extract_decompositions(model: torch.nn.Module, loader: Iterable, device: torch.device | str | None = None,
                           amp: bool = True, progress: bool = True):
    """Embeddings of every image of ``loader`` (each image once).

    Returns ``(Decomposition (N, ...) with maps=None, pids (N,), camids (N,), attributes (N, M) | None,
    attributes_known (N, M) bool | None)``; attributes are None when the loader carries no labels.
    """
    parts = list(iterate_decompositions(model, loader, device, amp, progress))
    if not parts:
        raise ValueError("the loader yielded no batches: the split is empty")
    decomposition = Decomposition.cat([part[0] for part in parts])
    pids = torch.cat([torch.as_tensor(part[1]).reshape(-1) for part in parts])
    camids = torch.cat([torch.as_tensor(part[2]).reshape(-1) for part in parts])
    if any(part[3] is None for part in parts):
        return decomposition, pids, camids, None, None
    attributes = torch.cat([torch.as_tensor(part[3]) for part in parts]).float()
    known = torch.cat([torch.ones_like(torch.as_tensor(part[3]), dtype=torch.bool) if part[4] is None
                       else torch.as_tensor(part[4]).bool() for part in parts])
    return decomposition, pids, camids, attributes, known


def evaluate_model(model: torch.nn.Module, query_loader: Iterable, gallery_loader: Iterable,
                   attribute_names: Sequence[str], metric: str = "euclidean", device: torch.device | str | None = None,
                   amp: bool = True, progress: bool = True, **evaluator_options) -> dict[str, Any]:
    """Extract query and gallery once and run the :class:`ExplanationEvaluator` (options passed on)."""
    evaluator = ExplanationEvaluator(attribute_names, metric=metric, progress=progress, **evaluator_options)
    for split, loader in (("query", query_loader), ("gallery", gallery_loader)):
        for decomposition, pids, camids, attributes, known in iterate_decompositions(
                model, loader, device, amp, progress, description=f"extracting {split}"):
            evaluator.process(decomposition, pids, camids, attributes, known, split=split)
    return evaluator.evaluate()
