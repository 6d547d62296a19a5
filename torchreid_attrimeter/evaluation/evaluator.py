"""The explanation-aware evaluator (detectron2 style: ``reset`` / ``process`` / ``evaluate``): target
and interpreter retrieval, ADRE, X-mAP_e / X-mAP_c and per-attribute statistics (docs/method.md §6), plus
the extraction loop that feeds it from a model and torchreid loaders.

``process`` only stores embeddings (the maps are dropped). ``evaluate`` walks chunks of queries and,
within each, tiles of gallery columns, both sized by ``memory_budget_mb``. A tile is one batched product
of the attribute embeddings; its pairs are then finished (components from the products, their mean,
ADRE and the explanation metrics). On CPU one call of the fused C kernel (``native_metrics``) does
that for the whole tile on every core; otherwise (CUDA, no C compiler) torch does it block by block,
each block while it sits in the CPU cache, with the code of ``pairwise_components`` and
``pair_explanation_stats``. Each query chunk is ranked against the whole gallery by the target and by
the interpreter once its tiles are done. Nothing of size Q x G x M is ever held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from torchreid_attrimeter.decomposition import (
    SQUARED_DISTANCE_FLOOR,
    Decomposition,
    check_metric,
    distance_terms,
    distances_from_products,
    pairwise_distance,
)
from torchreid_attrimeter.evaluation import native_metrics
from torchreid_attrimeter.evaluation.definitions import ADRE_MIN_DISTANCE  # ADRE skips pairs at most this far
from torchreid_attrimeter.evaluation.explanation_metrics import (
    SHARE_BINS,
    RelativeErrorHistogram,
    descending_sorting_network,
    pair_explanation_stats,
    share_auc,
)
from torchreid_attrimeter.evaluation.ranking import GalleryIdentities, query_rank_stats

logger = logging.getLogger(__name__)

PAIR_MODES = ("all", "topk")
SPLITS = ("query", "gallery")
# The memory budget is split evenly between a query chunk's (q, G) arrays (target and interpreter
# distances and the ranking's temporaries, about 32 bytes per pair at their peak) and a tile's
# (M, q, g) float32 inner products. Everything else is computed per block of pairs (some 50 MB).
_BYTES_PER_CHUNK_PAIR = 32
_BYTES_PER_PAIR_ATTRIBUTE = 4
# Pairs per block: (M, 65536) tensors of a few MB stay in the L3 cache while every per-pair metric is
# computed from them, and their rows are long enough for torch to split each op across CPU threads.
# (Blocks of a few thousand pairs on one Python thread each were slower: with ops of a few
# microseconds, the threads spend their time handing the GIL to each other.)
_BLOCK_PAIRS = 65536
_TRIM_EVERY_BATCHES = 16
_HASH_PRIME = 2_147_483_647  # 2^31 - 1: (index * multiplier) mod prime stays inside int64


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
        parts = self._parts[split]
        has_attributes = attributes is not None
        if self._has_attributes[split] not in (None, has_attributes):
            raise ValueError(f"some {split} batches carry attribute labels and some do not; give all or none")
        self._has_attributes[split] = has_attributes
        if has_attributes:
            attributes = torch.as_tensor(np.asarray(attributes) if not isinstance(attributes, torch.Tensor)
                                         else attributes).detach().cpu()
            if tuple(attributes.shape) != (batch, num_attributes):
                raise ValueError(f"attributes must have shape ({batch}, {num_attributes}), got "
                                 f"{tuple(attributes.shape)}")
            if attributes_known is None:
                known = torch.ones(batch, num_attributes, dtype=torch.bool)
            else:
                known = torch.as_tensor(np.asarray(attributes_known) if not isinstance(attributes_known,
                                        torch.Tensor) else attributes_known).detach().cpu().bool()
                if tuple(known.shape) != (batch, num_attributes):
                    raise ValueError(f"attributes_known must have shape ({batch}, {num_attributes}), got "
                                     f"{tuple(known.shape)}")
            labels = attributes > 0.5
            parts["attributes"].append(labels)
            parts["known"].append(known)
            if decomposition.attribute_logits is not None:
                predicted = decomposition.attribute_logits.detach().cpu() > 0
                self._recognition_correct += ((predicted == labels) & known).sum(0).double()
                self._recognition_known += known.sum(0).double()
        embedding = decomposition.embedding.detach()
        attribute_embeddings = decomposition.attribute_embeddings.detach()
        for name, values in (("embedding", embedding), ("attribute embeddings", attribute_embeddings)):
            if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
                raise ValueError(f"the {split} {name} contain NaN/inf (batch of {batch}); the model diverged or "
                                 "overflowed in half precision: try amp=False")
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
        run = _Run(self, query, gallery, device, with_attributes)
        results = run.results()
        self.query_totals = run.query_totals
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


def _as_long(values: Any, name: str, batch: int) -> torch.Tensor:
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    tensor = tensor.reshape(-1).long()
    if tensor.numel() != batch:
        raise ValueError(f"{name} has {tensor.numel()} entries for a batch of {batch} images")
    return tensor


class _Run:
    """One evaluation pass over the stored query and gallery embeddings.

    Per query chunk: the target distances to the whole gallery (ranked at once), then tiles of
    gallery columns. A tile is one batched product of the M attribute embeddings, (M, q, g), into a
    reused buffer; its rows are then cut into blocks of about ``_BLOCK_PAIRS`` pairs, each finished
    (components, mean, ADRE, explanation metrics) while it is in the CPU cache.
    """

    def __init__(self, evaluator: ExplanationEvaluator, query: dict, gallery: dict, device: torch.device,
                 with_attributes: bool):
        self.options = evaluator
        self.query, self.gallery, self.device = query, gallery, device
        self.with_attributes = with_attributes
        self.num_query, self.num_gallery = len(query["pids"]), len(gallery["pids"])
        self.num_attributes = query["attribute_embeddings"].shape[0]
        self.gallery_embedding = gallery["embedding"].to(device)
        self.gallery_identities = GalleryIdentities(gallery["pids"].to(device), gallery["camids"].to(device))
        self.max_rank = min(max(evaluator.ranks), self.num_gallery)
        if max(evaluator.ranks) > self.num_gallery:
            logger.warning("the gallery has %d images: ranks above %d are reported as None",
                           self.num_gallery, self.num_gallery)
        self.retrieval = {name: _RetrievalAccumulator(self.max_rank, device) for name in ("target", "interpreter")}
        self.relative_error = RelativeErrorHistogram()
        self.adre_skipped = 0
        self.exclusive_sum = self.common_sum = 0.0
        self.exclusive_pairs = self.common_pairs = self.explained_pairs = 0
        zeros = torch.zeros(self.num_attributes, dtype=torch.float64)
        self.attribute_counts = {name: zeros.clone() for name in ("top_k", "top_k_differ", "differ", "known",
                                                                  "agree")}
        self.share_histogram = torch.zeros(2, self.num_attributes, SHARE_BINS, dtype=torch.int64)
        self.multiplier = int(torch.randint(1, _HASH_PRIME - 1, (1,),
                                            generator=torch.Generator().manual_seed(evaluator.seed)))
        self.native = self.use_native(evaluator.native)
        if self.native:  # the kernel's sorting network over M, built once per run
            self.comparators = np.asarray(descending_sorting_network(self.num_attributes),
                                          dtype=np.int32).reshape(-1, 2)
        if with_attributes:
            for data in (query, gallery):
                if self.native:
                    # One 64-bit mask per image: a pair's differing / known attributes are one XOR / AND.
                    data["label_bits"] = native_metrics.label_masks(data["attributes"])
                    data["known_bits"] = native_metrics.label_masks(data["known"])
                else:
                    # Attribute-major int32 0/1 labels: a block's (M, pairs) masks are one XOR / AND each.
                    data["labels_by_attribute"] = data["attributes"].t().to(device, torch.int32).contiguous()
                    data["known_by_attribute"] = data["known"].t().to(device, torch.int32).contiguous()
                    data["all_known"] = data["known"].all(1).to(device)
        self.products_buffer = torch.empty(0, device=device)
        self.gallery_norms = self.all_gallery_norms()
        self.query_totals = QueryTotals.empty(query, gallery, self.num_attributes) if evaluator.per_query else None

    def all_gallery_norms(self) -> torch.Tensor | None:
        """(M, G) squared norms of the gallery's attribute embeddings ('euclidean'), computed once per
        run rather than once per tile of every query chunk; None for 'cosine'."""
        if self.options.metric == "cosine":
            return None
        embeddings = self.gallery["attribute_embeddings"]
        step = 4096  # gallery rows at a time: the squares are a temporary copy
        return torch.cat([distance_terms(embeddings[:, start:start + step].to(self.device), "euclidean")[1]
                          for start in range(0, embeddings.shape[1], step)], dim=1)

    def gallery_terms(self, index: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``distance_terms`` of the gallery images ``index`` (a slice, or a tensor of indices)."""
        rows = index if isinstance(index, slice) else index.cpu()
        embeddings = self.gallery["attribute_embeddings"][:, rows].to(self.device)
        if self.gallery_norms is None:
            return distance_terms(embeddings, self.options.metric)
        return embeddings, self.gallery_norms[:, index].contiguous()

    def use_native(self, requested: bool | None) -> bool:
        if requested is False:
            return False
        usable = native_metrics.usable(self.device, self.num_attributes)
        if not usable and self.device.type == "cpu" and self.num_attributes > native_metrics.MAX_ATTRIBUTES:
            logger.info("%d attributes, more than the C kernel's %d: the evaluator uses its torch path",
                        self.num_attributes, native_metrics.MAX_ATTRIBUTES)
        if requested and not usable:
            raise RuntimeError(
                f"native=True, but the C kernel cannot evaluate here (device {self.device}, "
                f"{self.num_attributes} attributes, at most {native_metrics.MAX_ATTRIBUTES}; see the log for "
                "the compiler's message): use native=None to fall back to the torch path")
        return usable

    # -- tiling --------------------------------------------------------------------------------------

    def chunk_rows(self) -> int:
        """Queries per chunk: their (q, G) arrays fill half the memory budget."""
        half_budget = self.options.memory_budget_mb * 2 ** 20 / 2
        return max(1, min(self.num_query, int(half_budget / (_BYTES_PER_CHUNK_PAIR * self.num_gallery))))

    def tile_columns(self, rows: int, columns: int) -> int:
        """Gallery columns per tile of ``rows`` queries: the tile's products fill the other half."""
        half_budget = self.options.memory_budget_mb * 2 ** 20 / 2
        pairs = int(half_budget / (_BYTES_PER_PAIR_ATTRIBUTE * max(self.num_attributes, 1)))
        return max(1, min(columns, pairs // rows))

    def results(self) -> dict[str, Any]:
        query_chunk = self.chunk_rows()
        starts = range(0, self.num_query, query_chunk)
        bar = tqdm(total=self.num_query, desc="evaluating", unit="query", disable=not self.options.progress)
        for start in starts:
            rows = slice(start, min(start + query_chunk, self.num_query))
            self.process_query_chunk(rows)
            bar.update(rows.stop - rows.start)
        bar.close()
        self.products_buffer = torch.empty(0, device=self.device)
        return self.summary()

    def products(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(M, q, g) inner products of (M, q, D) and (M, g, D) rows, in the reused tile buffer."""
        shape = (query.shape[0], query.shape[1], gallery.shape[1])
        if self.products_buffer.numel() < math.prod(shape):
            self.products_buffer = torch.empty(math.prod(shape), device=self.device)
        return torch.bmm(query, gallery.transpose(1, 2), out=self.products_buffer[:math.prod(shape)].view(shape))

    def process_query_chunk(self, rows: slice) -> None:
        metric = self.options.metric
        query_attributes, query_norms = distance_terms(
            self.query["attribute_embeddings"][:, rows].to(self.device), metric)  # (M, q, D), (M, q)
        q_pids = self.query["pids"][rows].to(self.device)
        q_camids = self.query["camids"][rows].to(self.device)
        target = pairwise_distance(self.query["embedding"][rows].to(self.device), self.gallery_embedding, metric)
        _check_finite(target, "target distances")
        target_stats = query_rank_stats(target, q_pids, q_camids, self.gallery_identities)
        self.retrieval["target"].add(target_stats)
        if self.query_totals is not None:
            self.record_first_pairs(rows, target, target_stats, query_attributes, query_norms)

        if self.options.pairs == "all":
            columns = torch.arange(self.num_gallery, device=self.device)
            selected = None
            reconstructed = torch.empty_like(target)
        else:
            nearest = torch.topk(target, min(self.options.topk, self.num_gallery), dim=1, largest=False).indices
            columns = torch.unique(nearest)
            # selected[q, j]: gallery image columns[j] is among query q's top-k.
            selected = torch.zeros(len(q_pids), len(columns), dtype=torch.bool, device=self.device)
            selected.scatter_(1, torch.searchsorted(columns, nearest), True)
            reconstructed = None

        tile_columns = self.tile_columns(len(q_pids), len(columns))
        for first in range(0, len(columns), tile_columns):
            tile = columns[first:first + tile_columns]
            # Every gallery image in 'all' mode: a contiguous slice, read without a copy.
            gallery_index = slice(int(tile[0]), int(tile[-1]) + 1) if selected is None else tile
            gallery_attributes, gallery_norms = self.gallery_terms(gallery_index)
            tile_selected = selected[:, first:first + len(tile)] if selected is not None else None
            work = _Tile(rows=rows, columns=tile, gallery_index=gallery_index, first_column=first,
                         products=self.products(query_attributes, gallery_attributes), query_norms=query_norms,
                         gallery_norms=gallery_norms, target=target[:, gallery_index], selected=tile_selected,
                         reconstructed=reconstructed)
            if self.native:
                self.add_block(self.finish_tile_natively(work))
                continue
            rows_per_block = max(1, _BLOCK_PAIRS // len(tile))
            blocks = [slice(start, min(start + rows_per_block, len(q_pids)))
                      for start in range(0, len(q_pids), rows_per_block)]
            for block in blocks:
                self.add_block(self.finish_block(work, block))
        if reconstructed is not None:
            self.retrieval["interpreter"].add(query_rank_stats(reconstructed, q_pids, q_camids,
                                                               self.gallery_identities))
        _release_freed_memory()

    def finish_block(self, work: _Tile, block: slice) -> _BlockResult:
        """Components, mean and metrics of the pairs of rows ``block`` (local to the chunk) of a tile."""
        components = distances_from_products(
            work.products[:, block], None if work.query_norms is None else work.query_norms[:, block],
            work.gallery_norms, self.options.metric)  # (M, r, g)
        mean_components = components.mean(0)
        _check_finite(mean_components, "attribute components")
        if work.reconstructed is not None:
            work.reconstructed[block, work.first_column:work.first_column + len(work.columns)] = mean_components
        query_rows = slice(work.rows.start + block.start, work.rows.start + block.stop)
        pair_mask = self.subsample(query_rows, work.columns, work.selected[block] if work.selected is not None
                                   else None)
        if self.query_totals is not None:
            self.add_query_shares(components, query_rows, work.gallery_index, pair_mask)
        return self.block_result(components, work.target[block], mean_components, pair_mask, query_rows,
                                 work.gallery_index)

    def finish_tile_natively(self, work: _Tile) -> _BlockResult:
        """What ``finish_block`` computes, for every pair of the tile in one call of the C kernel."""
        columns = len(work.columns)
        reconstructed = (None if work.reconstructed is None
                         else work.reconstructed[:, work.first_column:work.first_column + columns])
        pair_mask = self.subsample(work.rows, work.columns, work.selected)
        labels = None
        if self.with_attributes:
            labels = (self.query["label_bits"][work.rows], self.query["known_bits"][work.rows],
                      self.gallery["label_bits"][work.gallery_index], self.gallery["known_bits"][work.gallery_index])
        totals = native_metrics.tile_totals(
            work.products, work.query_norms, work.gallery_norms, work.target, reconstructed, pair_mask, labels,
            squared_floor=SQUARED_DISTANCE_FLOOR, top_k=self.options.top_attributes,
            comparators=self.comparators, adre_min_distance=ADRE_MIN_DISTANCE,
            histogram_range=(RelativeErrorHistogram.LOG_MIN, RelativeErrorHistogram.LOG_MAX,
                             RelativeErrorHistogram.BINS),
            num_threads=torch.get_num_threads(),
            identities=None if self.query_totals is None else (
                self.query["pids"][work.rows], self.query["camids"][work.rows],
                self.gallery["pids"][work.gallery_index], self.gallery["camids"][work.gallery_index]))
        if totals.query_share_sums is not None:
            self.query_totals.share_sums[work.rows] += totals.query_share_sums
            self.query_totals.pair_counts[work.rows] += totals.query_pair_counts
        if totals.nonfinite:
            raise ValueError(_NOT_FINITE.format(name="attribute components"))
        result = _BlockResult(pairs=totals.pairs, adre_skipped=totals.adre_skipped)
        result.relative_error.add_counts(totals.histogram, totals.error_sum, totals.error_count, totals.error_max)
        if self.with_attributes:
            result.exclusive_sum, result.exclusive_pairs = totals.exclusive_sum, totals.exclusive_pairs
            result.common_sum, result.common_pairs = totals.common_sum, totals.common_pairs
            result.counts = totals.counts
            result.share_histogram = totals.share_histogram
        return result

    def subsample(self, rows: slice, tile: torch.Tensor, pair_mask: torch.Tensor | None) -> torch.Tensor | None:
        """pair_mask restricted to the deterministic subsample, for query rows ``rows`` (global) x ``tile``."""
        if self.options.pair_fraction is None or self.options.pair_fraction >= 1.0:
            return pair_mask
        # A fixed hash of the pair's global index: the same pairs whatever the tiling.
        query_index = torch.arange(rows.start, rows.stop, device=self.device)
        pair_index = query_index[:, None] * self.num_gallery + tile[None, :]
        hashed = (pair_index % _HASH_PRIME) * self.multiplier % _HASH_PRIME
        keep = hashed < int(self.options.pair_fraction * _HASH_PRIME)
        return keep if pair_mask is None else pair_mask & keep

    # -- per-query totals of the model audit -------------------------------------------------------

    def record_first_pairs(self, rows: slice, target: torch.Tensor, target_stats, query_attributes: torch.Tensor,
                           query_norms: torch.Tensor | None) -> None:
        """The target's rank-1 gallery image of each query of the chunk (torchreid's protocol: the
        query's identity seen by its own camera is left out; ties go to the lower column, as a stable
        sort settles them), its components' shares, and the queries' rank statistics."""
        totals = self.query_totals
        ranked = target.clone()
        same_rows, same_columns, junk = self.gallery_identities.same_identity_pairs(
            self.query["pids"][rows].to(self.device), self.query["camids"][rows].to(self.device))
        ranked[same_rows[junk], same_columns[junk]] = float("inf")
        best = ranked.min(1)
        first = best.indices.cpu()
        available = torch.isfinite(best.values).cpu()
        # The rank-1 pairs' components, from the same distance terms as the tiles' (one pair per query).
        gallery_attributes, gallery_norms = self.gallery_terms(first.to(self.device))
        products = (query_attributes * gallery_attributes).sum(-1)  # (M, q)
        if query_norms is None:
            components = 1.0 - products
        else:
            squared = torch.add(query_norms, products, alpha=-2.0) + gallery_norms
            components = squared.clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()
        components = components.t().float().cpu()  # (q, M)
        total = components.sum(1, keepdim=True)
        shares = torch.where(total > 0, components / total.clamp_min(torch.finfo(torch.float32).tiny),
                             torch.full_like(components, float("nan")))
        available &= (total[:, 0] > 0)
        totals.first_index[rows] = torch.where(available, first, -1)
        totals.first_shares[rows] = torch.where(available[:, None], shares, float("nan"))
        totals.first_distance[rows] = torch.where(available, best.values.float().cpu(), float("nan"))
        totals.first_correct[rows] = available & (self.gallery["pids"][first] == self.query["pids"][rows])
        totals.valid[rows] = target_stats.valid.cpu()
        totals.first_match[rows] = target_stats.first_match.cpu()
        totals.average_precision[rows] = target_stats.average_precision.double().cpu()

    def add_query_shares(self, components: torch.Tensor, query_rows: slice, gallery_index,
                         pair_mask: torch.Tensor | None) -> None:
        """Torch path of the kernel's per-query share sums: components (M, r, g) of query rows
        ``query_rows`` (global) x gallery ``gallery_index``."""
        total = components.sum(0)  # (r, g)
        counted = total > 0  # a zero distance has no shares
        if pair_mask is not None:
            counted &= pair_mask
        weight = torch.where(counted, 1.0 / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        gallery_rows = gallery_index if isinstance(gallery_index, slice) else gallery_index.cpu()
        same_identity = (self.query["pids"][query_rows][:, None] == self.gallery["pids"][gallery_rows][None, :])
        same_camera = (self.query["camids"][query_rows][:, None] == self.gallery["camids"][gallery_rows][None, :])
        category = (2 * same_identity.long() + same_camera.long()).to(components.device)
        by_query = components.permute(1, 0, 2)  # (r, M, g)
        for index in range(native_metrics.NUM_CATEGORIES):
            chosen = counted & (category == index)
            if not bool(chosen.any()):
                continue
            sums = torch.bmm(by_query, (weight * chosen)[:, :, None])[:, :, 0]  # (r, M)
            self.query_totals.share_sums[query_rows, index] += sums.double().cpu()
            self.query_totals.pair_counts[query_rows, index] += chosen.sum(1).cpu()

    # -- per-pair metrics ----------------------------------------------------------------------------

    def block_result(self, components: torch.Tensor, target: torch.Tensor, reconstructed: torch.Tensor,
                     pair_mask: torch.Tensor | None, query_rows: slice, gallery_index) -> _BlockResult:
        """Metrics of one block: components (M, r, g), target/reconstructed (r, g), pair_mask (r, g) bool
        or None (all); query_rows (global) and gallery_index select the block's labels."""
        num_attributes = components.shape[0]
        flat_components = components.reshape(num_attributes, -1)
        flat_target, flat_reconstructed = target.reshape(-1), reconstructed.reshape(-1)
        chosen = None if pair_mask is None else pair_mask.reshape(-1).nonzero()[:, 0]
        if chosen is not None:
            flat_components = flat_components[:, chosen]
            flat_target, flat_reconstructed = flat_target[chosen], flat_reconstructed[chosen]
        result = _BlockResult(pairs=flat_target.numel())
        measurable = flat_target > ADRE_MIN_DISTANCE
        result.adre_skipped = int((~measurable).sum())
        error = (flat_target - flat_reconstructed).abs() / flat_target.clamp_min(ADRE_MIN_DISTANCE)
        result.relative_error.add(error[measurable])
        if not self.with_attributes or result.pairs == 0:
            return result

        def pair_labels(name: str, combine) -> torch.Tensor:
            # (M, pairs) from the query's (M, r) and the gallery's (M, g) labels, flattened like the pairs.
            query_labels = self.query[name][:, query_rows][:, :, None]
            gallery_labels = self.gallery[name][:, gallery_index][:, None, :]
            labels = combine(query_labels, gallery_labels).reshape(num_attributes, -1)
            return labels if chosen is None else labels[:, chosen]

        differ = pair_labels("labels_by_attribute", torch.bitwise_xor)
        everything_known = bool(self.query["all_known"][query_rows].all()) and bool(
            self.gallery["all_known"][gallery_index].all())
        known = None if everything_known else pair_labels("known_by_attribute", torch.bitwise_and)
        stats = pair_explanation_stats(flat_components, differ, known, self.options.top_attributes)
        result.exclusive_sum, result.exclusive_pairs = float(stats.exclusive_ap.sum()), int(stats.has_exclusive.sum())
        result.common_sum, result.common_pairs = float(stats.common_ap.sum()), int(stats.has_common.sum())
        result.counts = {name: getattr(stats, name) for name in native_metrics.COUNT_NAMES}
        result.share_histogram = stats.share_histogram
        return result

    def add_block(self, result: _BlockResult) -> None:
        self.explained_pairs += result.pairs
        self.adre_skipped += result.adre_skipped
        self.relative_error.merge(result.relative_error)
        if result.counts is None:
            return
        self.exclusive_sum += result.exclusive_sum
        self.exclusive_pairs += result.exclusive_pairs
        self.common_sum += result.common_sum
        self.common_pairs += result.common_pairs
        for name in self.attribute_counts:
            self.attribute_counts[name] += result.counts[name].double().cpu()
        self.share_histogram += result.share_histogram.cpu()

    # -- results -------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        options = self.options
        results: dict[str, Any] = {
            "metric": options.metric, "pairs": options.pairs, "num_query": self.num_query,
            "num_gallery": self.num_gallery, "num_attributes": self.num_attributes,
            "explained_pairs": self.explained_pairs,
        }
        if options.pairs == "topk":
            results["topk"] = options.topk
        if options.pair_fraction is not None:
            results["pair_fraction"] = options.pair_fraction
        for name, accumulator in self.retrieval.items():
            results.update(accumulator.summary(name, options.ranks))
        histogram = self.relative_error
        results["ADRE"] = _percent(histogram.mean)
        for percentile in (50, 90, 99):
            results[f"ADRE_p{percentile}"] = _percent(histogram.percentile(percentile / 100))
        results["ADRE_max"] = _percent(histogram.maximum if histogram.count else float("nan"))
        results["ADRE_pairs"] = histogram.count
        results["ADRE_skipped_pairs"] = self.adre_skipped
        results["attributes_available"] = self.with_attributes
        if not self.with_attributes:
            for name in ("X-mAP_e", "X-mAP_c"):
                results[name] = None
            results["per_attribute"] = {}
            return results
        results["X-mAP_e"] = _percent(self.exclusive_sum / self.exclusive_pairs if self.exclusive_pairs else math.nan)
        results["X-mAP_e_pairs"] = self.exclusive_pairs
        results["X-mAP_c"] = _percent(self.common_sum / self.common_pairs if self.common_pairs else math.nan)
        results["X-mAP_c_pairs"] = self.common_pairs
        counts = self.attribute_counts
        recognition = self.options._recognition_known
        k = options.top_attributes
        auc = share_auc(self.share_histogram)
        defined = auc[~auc.isnan()]
        results["share_AUC_macro"] = float(defined.mean()) if len(defined) else None
        per_attribute = {}
        for index, name in enumerate(options.attribute_names):
            per_attribute[name] = {
                f"top{k}_precision": _ratio(counts["top_k_differ"][index], counts["top_k"][index]),
                f"top{k}_recall": _ratio(counts["top_k_differ"][index], counts["differ"][index]),
                "agreement": _ratio(counts["agree"][index], counts["known"][index]),
                "differ_rate": _ratio(counts["differ"][index], counts["known"][index]),
                "recognition_accuracy": _ratio(self.options._recognition_correct[index], recognition[index]),
                # Does the share of this attribute grow when it differs? 0.5: no better than chance.
                "share_auc": None if math.isnan(float(auc[index])) else float(auc[index]),
            }
        results["per_attribute"] = per_attribute
        return results


# Pair categories of QueryTotals.share_sums: index = 2 * same identity + same camera.
PAIR_CATEGORIES = ("other identity, other camera", "other identity, same camera",
                   "same identity, other camera (true match)", "same identity, same camera (left out)")


@dataclass
class QueryTotals:
    """Per-query totals of an evaluation run with ``per_query=True`` (what the model audit needs),
    for Q queries, M attributes. A pair's share of attribute m is p^m = d^m / sum_k d^k.

    share_sums: (Q, 4, M) float64, the sum of the shares over the query's pairs of each category of
        PAIR_CATEGORIES; pair_counts (Q, 4) int64 the pairs summed (pairs whose components sum to 0 have no
        shares and are not counted).
    first_index: (Q,) int64, the target's rank-1 gallery image under torchreid's protocol (-1: none);
        first_shares (Q, M) float32 its shares (NaN: none); first_distance (Q,) its target distance;
        first_correct (Q,) bool, it shows the query's identity.
    valid, first_match, average_precision: the target's rank statistics per query (ranking.QueryRankStats).
    query_pids, query_camids (Q,), gallery_pids, gallery_camids (G,): the identities and cameras.
    """

    share_sums: torch.Tensor
    pair_counts: torch.Tensor
    first_index: torch.Tensor
    first_shares: torch.Tensor
    first_distance: torch.Tensor
    first_correct: torch.Tensor
    valid: torch.Tensor
    first_match: torch.Tensor
    average_precision: torch.Tensor
    query_pids: torch.Tensor
    query_camids: torch.Tensor
    gallery_pids: torch.Tensor
    gallery_camids: torch.Tensor

    @classmethod
    def empty(cls, query: dict, gallery: dict, num_attributes: int) -> QueryTotals:
        size = len(query["pids"])
        return cls(
            share_sums=torch.zeros(size, len(PAIR_CATEGORIES), num_attributes, dtype=torch.float64),
            pair_counts=torch.zeros(size, len(PAIR_CATEGORIES), dtype=torch.int64),
            first_index=torch.full((size,), -1, dtype=torch.int64),
            first_shares=torch.full((size, num_attributes), float("nan")),
            first_distance=torch.full((size,), float("nan")),
            first_correct=torch.zeros(size, dtype=torch.bool),
            valid=torch.zeros(size, dtype=torch.bool),
            first_match=torch.zeros(size, dtype=torch.int64),
            average_precision=torch.zeros(size, dtype=torch.float64),
            query_pids=query["pids"].cpu().clone(), query_camids=query["camids"].cpu().clone(),
            gallery_pids=gallery["pids"].cpu().clone(), gallery_camids=gallery["camids"].cpu().clone(),
        )


@dataclass
class _Tile:
    """A tile of a query chunk (global rows ``rows``) x gallery columns, shared by its blocks.

    products: (M, q, g) inner products; query_norms (M, q) / gallery_norms (M, g) or None (cosine);
    target: (q, g); selected: (q, g) bool or None (all pairs); reconstructed: the chunk's (q, G)
    interpreter distances, written at columns first_column.. ('all' mode), else None.
    """

    rows: slice
    columns: torch.Tensor
    gallery_index: slice | torch.Tensor
    first_column: int
    products: torch.Tensor
    query_norms: torch.Tensor | None
    gallery_norms: torch.Tensor | None
    target: torch.Tensor
    selected: torch.Tensor | None
    reconstructed: torch.Tensor | None


@dataclass
class _BlockResult:
    """What one block (torch path) or tile (C kernel) of pairs adds to the run; counts are None
    without attribute labels."""

    pairs: int
    adre_skipped: int = 0
    relative_error: RelativeErrorHistogram = field(default_factory=RelativeErrorHistogram)
    exclusive_sum: float = 0.0
    exclusive_pairs: int = 0
    common_sum: float = 0.0
    common_pairs: int = 0
    counts: dict[str, torch.Tensor] | None = None  # native_metrics.COUNT_NAMES -> (M,)
    share_histogram: torch.Tensor | None = None  # (2, M, SHARE_BINS), see share_auc


class _RetrievalAccumulator:
    def __init__(self, max_rank: int, device: torch.device):
        self.ranks = torch.arange(max_rank, device=device)
        self.cmc = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap = self.inp = 0.0
        self.valid = self.skipped = 0

    def add(self, stats) -> None:
        valid = stats.valid
        self.cmc += (stats.first_match[valid][:, None] <= self.ranks[None, :]).sum(0).double()
        self.ap += float(stats.average_precision[valid].sum())
        self.inp += float(stats.inverse_negative_penalty[valid].sum())
        self.valid += int(valid.sum())
        self.skipped += int((~valid).sum())

    def summary(self, name: str, ranks: Sequence[int]) -> dict[str, Any]:
        results: dict[str, Any] = {f"{name}_valid_queries": self.valid, f"{name}_skipped_queries": self.skipped}
        if self.valid == 0:
            for rank in ranks:
                results[f"{name}_rank{rank}"] = None
            results[f"{name}_mAP"] = results[f"{name}_mINP"] = None
            if self.skipped:
                logger.warning("no query of %d has a valid match in the gallery: %s retrieval metrics are None",
                               self.skipped, name)
            return results
        cmc = (self.cmc / self.valid).cpu()
        for rank in ranks:
            results[f"{name}_rank{rank}"] = _percent(float(cmc[rank - 1])) if rank <= len(cmc) else None
        results[f"{name}_mAP"] = _percent(self.ap / self.valid)
        results[f"{name}_mINP"] = _percent(self.inp / self.valid)
        return results


_NOT_FINITE = "{name} contain NaN/inf: check the model's embeddings (e.g. evaluate with amp=False)"


def _check_finite(values: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise ValueError(_NOT_FINITE.format(name=name))


def _percent(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * float(value)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    return _percent(float(numerator) / float(denominator)) if float(denominator) > 0 else None


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
