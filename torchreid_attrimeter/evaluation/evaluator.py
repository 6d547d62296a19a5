"""The explanation-aware evaluator (detectron2 style: ``reset`` / ``process`` / ``evaluate``): target
and interpreter retrieval, ADRE, X-mAP_e / X-mAP_c and per-attribute statistics (docs/method.md §6).

``process`` only stores embeddings (the maps are dropped). ``evaluate`` is one pass of
``run_evaluation`` over them, in three pieces that each read on their own:

- ``pair_stream.PairStream``: query chunks (target distances, ranked against the whole gallery at
  once) and their tiles of gallery columns, sized by ``memory_budget_mb``; a tile is one batched
  product of the attribute embeddings;
- a tile backend (``tile_backends``: the fused C kernel on CPU, else torch) finishes a tile's pairs
  (components, their mean, ADRE, the explanation metrics) into partial sums;
- ``partial_sums.RunTotals`` adds them up and makes the summary.

definitions.py states every metric one pair at a time; the tests hold both backends to it. Nothing of
size Q x G x M is ever held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from torchreid_attrimeter.decomposition import Decomposition, check_metric
from torchreid_attrimeter.evaluation.pair_stream import PairStream
from torchreid_attrimeter.evaluation.partial_sums import RunTotals
from torchreid_attrimeter.evaluation.query_totals import PAIR_CATEGORIES, QueryTotals
from torchreid_attrimeter.evaluation.run_options import RunOptions
from torchreid_attrimeter.evaluation.tile_backends import tile_backend

# QueryTotals and PAIR_CATEGORIES live in query_totals.py; they are imported from here too.
__all__ = ["PAIR_CATEGORIES", "PAIR_MODES", "SPLITS", "ExplanationEvaluator", "QueryTotals", "format_table",
           "run_evaluation"]

PAIR_MODES = ("all", "topk")
SPLITS = ("query", "gallery")
_TRIM_EVERY_BATCHES = 16


class ExplanationEvaluator:
    """Streaming evaluator of a target model and its AttriMeter interpreter.

    Args:
        attribute_names: the M attribute names, in the order of the decompositions' attribute axis.
        metric: 'euclidean' (plain) or 'cosine' (1 - cos), as the target is tested.
        ranks: CMC ranks reported.
        pairs: 'all' (every query x gallery pair, the paper's protocol) or 'topk' (each query's ``topk``
            nearest gallery images by target distance, what a user looks at; interpreter retrieval
            metrics then need every pair and are reported as None).
        topk: gallery images per query in 'topk' mode.
        pair_fraction: if set, the explanation metrics use a deterministic subsample (by ``seed``) of
            this fraction of the pairs; retrieval metrics still rank the whole gallery.
        top_attributes: k of the per-attribute top-k precision.
        memory_budget_mb: working memory of the evaluation: half for a chunk of queries' distances to
            the whole gallery, half for a tile's attribute products (the stored embeddings come on top).
        device: where tiles are computed (default: where the embeddings are).
        native: on CPU, finish each tile's pairs with the fused C kernel (``native_metrics``): None
            (default) uses it when it can be compiled, False always uses the torch path, True
            requires the kernel.
        progress: show a tqdm bar.
        per_query: also add up, in the same pass over the tiles, what the model audit needs per query
            (``query_totals`` after ``evaluate``: share sums by pair category, the target's rank-1 pair
            and its shares, the query's rank statistics; see ``QueryTotals``). Needs pairs='all'. The
            returned metrics are the same with or without it.
    """

    def __init__(
        self,
        attribute_names: Sequence[str],
        metric: str = "euclidean",
        ranks: Sequence[int] = (1, 5, 10),
        pairs: str = "all",
        topk: int = 10,
        pair_fraction: float | None = None,
        top_attributes: int = 3,
        memory_budget_mb: float = 512.0,
        device: torch.device | str | None = None,
        seed: int = 0,
        native: bool | None = None,
        progress: bool = True,
        per_query: bool = False,
    ):
        self.attribute_names = tuple(attribute_names)
        self.metric = check_metric(metric)
        self.ranks = tuple(int(rank) for rank in ranks)
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks must be positive integers, got {tuple(ranks)}")
        if pairs not in PAIR_MODES:
            raise ValueError(f"pairs must be one of {PAIR_MODES}, got '{pairs}'")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if pair_fraction is not None and not 0.0 < pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in (0, 1], got {pair_fraction}")
        if memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        self.pairs, self.topk, self.pair_fraction = pairs, int(topk), pair_fraction
        self.top_attributes = int(top_attributes)
        self.memory_budget_mb = float(memory_budget_mb)
        self.device = None if device is None else torch.device(device)
        self.seed = int(seed)
        if native not in (None, True, False):
            raise ValueError(f"native must be None (automatic), True or False, got {native!r}")
        self.native = native
        self.progress = progress
        if per_query and pairs != "all":
            raise ValueError("per_query totals need every query x gallery pair: use pairs='all'")
        self.per_query = bool(per_query)
        self.query_totals: QueryTotals | None = None
        self.reset()

    # -- streaming interface -------------------------------------------------------------------------

    def reset(self) -> None:
        self._parts: dict[str, dict[str, list]] = {
            split: {"embedding": [], "attribute_embeddings": [], "pids": [], "camids": [], "attributes": [],
                    "known": []}
            for split in SPLITS
        }
        self._has_attributes: dict[str, bool | None] = {split: None for split in SPLITS}
        num_attributes = len(self.attribute_names)
        self._recognition_correct = torch.zeros(num_attributes, dtype=torch.float64)
        self._recognition_known = torch.zeros(num_attributes, dtype=torch.float64)

    def process(
        self,
        decomposition: Decomposition,
        pids: Any,
        camids: Any,
        attributes: Any | None = None,
        attributes_known: Any | None = None,
        split: str = "query",
    ) -> None:
        """Store a batch of B images of ``split``: embeddings (B, D), attribute embeddings (B, M, D),
        pids/camids (B,), attributes (B, M) in {0, 1} or None, attributes_known (B, M) bool or None
        (all known)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        batch = len(decomposition)
        num_attributes = decomposition.num_attributes
        if num_attributes != len(self.attribute_names):
            raise ValueError(f"the decomposition has {num_attributes} attribute components but the evaluator "
                             f"was built with {len(self.attribute_names)} attribute names; pass the schema the "
                             "model was trained with")
        pids = _as_long(pids, "pids", batch)
        camids = _as_long(camids, "camids", batch)
        self._store_labels(decomposition, attributes, attributes_known, split)
        self._store_embeddings(decomposition, pids, camids, split)

    def _store_labels(self, decomposition: Decomposition, attributes: Any | None, attributes_known: Any | None,
                      split: str) -> None:
        """Store a batch's attribute labels (0.5 splits them into 0/1) and which are known, and count the
        attribute branch's correct predictions on the known ones. A split's batches must all carry labels
        or none: the label metrics need them for every image."""
        has_attributes = attributes is not None
        if self._has_attributes[split] not in (None, has_attributes):
            raise ValueError(f"some {split} batches carry attribute labels and some do not; give all or none")
        self._has_attributes[split] = has_attributes
        if not has_attributes:
            return
        batch, num_attributes = len(decomposition), decomposition.num_attributes
        attributes = _as_cpu_tensor(attributes)
        if tuple(attributes.shape) != (batch, num_attributes):
            raise ValueError(f"attributes must have shape ({batch}, {num_attributes}), got "
                             f"{tuple(attributes.shape)}")
        if attributes_known is None:
            known = torch.ones(batch, num_attributes, dtype=torch.bool)
        else:
            known = _as_cpu_tensor(attributes_known).bool()
            if tuple(known.shape) != (batch, num_attributes):
                raise ValueError(f"attributes_known must have shape ({batch}, {num_attributes}), got "
                                 f"{tuple(known.shape)}")
        labels = attributes > 0.5
        self._parts[split]["attributes"].append(labels)
        self._parts[split]["known"].append(known)
        if decomposition.attribute_logits is not None:
            predicted = decomposition.attribute_logits.detach().cpu() > 0
            self._recognition_correct += ((predicted == labels) & known).sum(0).double()
            self._recognition_known += known.sum(0).double()

    def _store_embeddings(self, decomposition: Decomposition, pids: torch.Tensor, camids: torch.Tensor,
                          split: str) -> None:
        """Store a batch's embeddings (as float32), identities and cameras, refusing non-finite
        embeddings: one NaN would silently spoil every ranking it enters."""
        parts = self._parts[split]
        embedding = decomposition.embedding.detach()
        attribute_embeddings = decomposition.attribute_embeddings.detach()
        for name, values in (("embedding", embedding), ("attribute embeddings", attribute_embeddings)):
            if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
                raise ValueError(f"the {split} {name} contain NaN/inf (batch of {len(decomposition)}); the model "
                                 "diverged or overflowed in half precision: try amp=False")
        parts["embedding"].append(embedding.float())
        # Stored attribute-major (M, B, D) so that the evaluation's batched products read contiguous rows.
        parts["attribute_embeddings"].append(attribute_embeddings.float().transpose(0, 1).contiguous())
        parts["pids"].append(pids)
        parts["camids"].append(camids)
        if len(parts["pids"]) % _TRIM_EVERY_BATCHES == 0:
            _release_freed_memory()  # the caller's freed batches would otherwise stay resident

    def evaluate(self) -> dict[str, Any]:
        """Every metric as a flat JSON-safe dict (percentages), with 'per_attribute' a dict of dicts."""
        query, gallery = (self._collect(split) for split in SPLITS)
        for split, data in (("query", query), ("gallery", gallery)):
            if data is None:
                raise ValueError(f"no {split} images were processed: call process(..., split='{split}') "
                                 "before evaluate()")
        device = self.device or query["embedding"].device
        with_attributes = bool(self._has_attributes["query"] and self._has_attributes["gallery"])
        options = RunOptions(
            attribute_names=self.attribute_names, metric=self.metric, ranks=self.ranks, pairs=self.pairs,
            topk=self.topk, pair_fraction=self.pair_fraction, top_attributes=self.top_attributes,
            memory_budget_mb=self.memory_budget_mb, seed=self.seed, native=self.native, progress=self.progress,
            per_query=self.per_query)
        results, self.query_totals = run_evaluation(query, gallery, device, with_attributes, options,
                                                    self._recognition_correct, self._recognition_known)
        return results

    # -- helpers -------------------------------------------------------------------------------------

    def _collect(self, split: str) -> dict[str, Any] | None:
        parts = self._parts[split]
        if not parts["pids"]:
            return None
        data = {
            "embedding": torch.cat(parts["embedding"]),
            "attribute_embeddings": _concatenate_releasing(parts["attribute_embeddings"]),  # (M, N, D)
            "pids": torch.cat(parts["pids"]),
            "camids": torch.cat(parts["camids"]),
        }
        # The concatenation replaces the parts, so that a second evaluate() reuses it.
        parts["embedding"][:] = [data["embedding"]]
        parts["attribute_embeddings"][:] = [data["attribute_embeddings"]]
        if self._has_attributes[split]:
            data["attributes"] = torch.cat(parts["attributes"])
            data["known"] = torch.cat(parts["known"])
        return data


def _concatenate_releasing(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts, dim=1) for (M, B_i, D) parts, freeing each part once copied (the list is
    emptied), so the stored embeddings are never held twice."""
    if len(parts) == 1:
        return parts.pop()
    first = parts[0]
    total = sum(part.shape[1] for part in parts)
    joined = torch.empty(first.shape[0], total, *first.shape[2:], dtype=first.dtype, device=first.device)
    offset = 0
    parts.reverse()  # pop from the end, in the original order
    while parts:
        part = parts.pop()
        joined[:, offset:offset + part.shape[1]] = part
        offset += part.shape[1]
        del part
        if len(parts) % _TRIM_EVERY_BATCHES == 0:
            _release_freed_memory()
    return joined


def _release_freed_memory() -> None:
    """Hand the freed batch buffers back to the OS. Batches of a few MB live in glibc's heap, which
    keeps freed memory resident; the tiles that follow are separate large mappings that cannot reuse
    it, so without a trim the stored embeddings would count twice in the peak resident memory."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass


def _as_cpu_tensor(values: Any) -> torch.Tensor:
    """``values`` (a tensor, array or nested list) as a tensor on the CPU, detached from any graph."""
    return torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).detach().cpu()


def _as_long(values: Any, name: str, batch: int) -> torch.Tensor:
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    tensor = tensor.reshape(-1).long()
    if tensor.numel() != batch:
        raise ValueError(f"{name} has {tensor.numel()} entries for a batch of {batch} images")
    return tensor


def run_evaluation(query: dict, gallery: dict, device: torch.device, with_attributes: bool, options: RunOptions,
                   recognition_correct: torch.Tensor, recognition_known: torch.Tensor,
                   ) -> tuple[dict[str, Any], QueryTotals | None]:
    """One evaluation pass over the stored query and gallery embeddings (dicts of ``_collect``): the
    pair stream's tiles, finished by the run's tile backend, added up by the run's totals. Returns the
    metrics (``ExplanationEvaluator.evaluate``) and the per-query totals (None unless options.per_query).
    recognition_correct / recognition_known: (M,) the attribute branch's counts from ``process``."""
    num_attributes = query["attribute_embeddings"].shape[0]
    query_totals = QueryTotals.empty(query, gallery, num_attributes) if options.per_query else None
    totals = RunTotals(len(query["pids"]), len(gallery["pids"]), num_attributes, options.ranks, device,
                       with_attributes, query_totals)
    backend = tile_backend(options.native, query, gallery, device, options.metric, options.top_attributes,
                           with_attributes, options.per_query)
    stream = PairStream(query, gallery, device, options, query_totals)
    bar = tqdm(total=stream.num_query, desc="evaluating", unit="query", disable=not options.progress)
    for chunk in stream.chunks():
        totals.add_ranking("target", chunk.target_stats)
        for tile in stream.tiles(chunk):
            for part in backend.finish(tile):
                totals.add(part)
        interpreter_stats = stream.interpreter_stats(chunk)
        if interpreter_stats is not None:
            totals.add_ranking("interpreter", interpreter_stats)
        _release_freed_memory()
        bar.update(len(chunk))
    bar.close()
    return totals.summary(options, recognition_correct, recognition_known), query_totals


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of an ``evaluate()`` result: the summary metrics, then one row per attribute."""
    lines = ["metric                      value"]
    lines.append("-" * 34)
    for key, value in results.items():
        if key == "per_attribute":
            continue
        text = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<27} {text}")
    per_attribute = results.get("per_attribute") or {}
    if per_attribute:
        columns = list(next(iter(per_attribute.values())))
        lines.append("")
        lines.append(f"{'attribute':<20}" + "".join(f"{column:>22}" for column in columns))
        for name, values in per_attribute.items():
            cells = "".join(f"{'n/a' if values[c] is None else f'{values[c]:.2f}':>22}" for c in columns)
            lines.append(f"{name:<20}{cells}")
    return "\n".join(lines)
