"""The two ways of finishing a tile's pairs: from the (M, q, g) products of a ``pair_stream.Tile`` to
the components, their mean (the interpreter's distance), ADRE and the explanation metrics, returned as
``partial_sums.PartialSums``.

Both backends have one method, ``finish(tile) -> Iterator[PartialSums]``: a tile in, its partial sums
out. The backends hold no totals, so a backend can be read (and held to definitions.py) on its own and
the run adds every part alike. ``finish`` yields parts rather than returning one sum because the torch
path finishes a tile block by block and each block's part is added as soon as it is made: merging the
blocks first would hold every block's histograms at once and change the order in which the run's
floating-point totals add up. Exhaust it before asking the stream for the next tile, whose products
reuse the buffer.

- ``NativeTiles``: one call of the fused C kernel (``native_metrics``, ``pair_metrics.c``) for the
  whole tile, on every core (CPU, at most 64 attributes, a C compiler).
- ``TorchTiles``: torch operations, block by block, each block while it sits in the CPU cache, with
  the code of ``pairwise_components`` and ``explanation_metrics.pair_explanation_stats``.

``tile_backend`` chooses one, once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from torchreid_attrimeter.decomposition import SQUARED_DISTANCE_FLOOR, distances_from_products
from torchreid_attrimeter.evaluation import native_metrics
from torchreid_attrimeter.evaluation.definitions import ADRE_MIN_DISTANCE  # ADRE skips pairs at most this far
from torchreid_attrimeter.evaluation.explanation_metrics import (
    RelativeErrorHistogram,
    descending_sorting_network,
    pair_explanation_stats,
)
from torchreid_attrimeter.evaluation.pair_stream import NOT_FINITE, Tile, check_finite
from torchreid_attrimeter.evaluation.partial_sums import PartialSums

logger = logging.getLogger(__name__)

# Pairs per block: (M, 65536) tensors of a few MB stay in the L3 cache while every per-pair metric is
# computed from them, and their rows are long enough for torch to split each op across CPU threads.
# (Blocks of a few thousand pairs on one Python thread each were slower: with ops of a few
# microseconds, the threads spend their time handing the GIL to each other.)
_BLOCK_PAIRS = 65536


def tile_backend(requested: bool | None, query: dict, gallery: dict, device: torch.device, metric: str,
                 top_k: int, with_attributes: bool, per_query: bool) -> NativeTiles | TorchTiles:
    """The backend of a run: the C kernel where it can be used (``requested`` None) or must be (True),
    else torch. query / gallery: the stored splits (dicts of ``ExplanationEvaluator._collect``)."""
    num_attributes = query["attribute_embeddings"].shape[0]
    if requested is not False:
        usable = native_metrics.usable(device, num_attributes)
        if not usable and device.type == "cpu" and num_attributes > native_metrics.MAX_ATTRIBUTES:
            logger.info("%d attributes, more than the C kernel's %d: the evaluator uses its torch path",
                        num_attributes, native_metrics.MAX_ATTRIBUTES)
        if requested and not usable:
            raise RuntimeError(
                f"native=True, but the C kernel cannot evaluate here (device {device}, "
                f"{num_attributes} attributes, at most {native_metrics.MAX_ATTRIBUTES}; see the log for "
                "the compiler's message): use native=None to fall back to the torch path")
        if usable:
            return NativeTiles(query, gallery, top_k, with_attributes, per_query)
    return TorchTiles(query, gallery, device, metric, top_k, with_attributes, per_query)


class NativeTiles:
    """Finishes every pair of a tile in one call of the C kernel."""

    def __init__(self, query: dict, gallery: dict, top_k: int, with_attributes: bool, per_query: bool):
        self.top_k, self.with_attributes, self.per_query = top_k, with_attributes, per_query
        self.query_pids, self.query_camids = query["pids"], query["camids"]
        self.gallery_pids, self.gallery_camids = gallery["pids"], gallery["camids"]
        num_attributes = query["attribute_embeddings"].shape[0]
        # The kernel's sorting network over M, built once per run.
        self.comparators = np.asarray(descending_sorting_network(num_attributes), dtype=np.int32).reshape(-1, 2)
        if with_attributes:
            # One 64-bit mask per image: a pair's differing / known attributes are one XOR / AND.
            self.query_labels = native_metrics.label_masks(query["attributes"])
            self.query_known = native_metrics.label_masks(query["known"])
            self.gallery_labels = native_metrics.label_masks(gallery["attributes"])
            self.gallery_known = native_metrics.label_masks(gallery["known"])

    def finish(self, tile: Tile) -> Iterator[PartialSums]:
        rows, columns = tile.rows, tile.gallery_index
        labels = None
        if self.with_attributes:
            labels = (self.query_labels[rows], self.query_known[rows], self.gallery_labels[columns],
                      self.gallery_known[columns])
        totals = native_metrics.tile_totals(
            tile.products, tile.query_norms, tile.gallery_norms, tile.target, tile.reconstructed, tile.pair_mask,
            labels, squared_floor=SQUARED_DISTANCE_FLOOR, top_k=self.top_k, comparators=self.comparators,
            adre_min_distance=ADRE_MIN_DISTANCE,
            histogram_range=(RelativeErrorHistogram.LOG_MIN, RelativeErrorHistogram.LOG_MAX,
                             RelativeErrorHistogram.BINS),
            num_threads=torch.get_num_threads(),
            identities=None if not self.per_query else (
                self.query_pids[rows], self.query_camids[rows], self.gallery_pids[columns],
                self.gallery_camids[columns]))
        if totals.nonfinite:
            raise ValueError(NOT_FINITE.format(name="attribute components"))
        part = PartialSums(pairs=totals.pairs, adre_skipped=totals.adre_skipped)
        part.relative_error.add_counts(totals.histogram, totals.error_sum, totals.error_count, totals.error_max)
        if self.with_attributes:
            part.exclusive_sum, part.exclusive_pairs = totals.exclusive_sum, totals.exclusive_pairs
            part.common_sum, part.common_pairs = totals.common_sum, totals.common_pairs
            part.counts = totals.counts
            part.share_histogram = totals.share_histogram
        if self.per_query:
            part.query_rows = rows
            part.query_share_sums, part.query_pair_counts = totals.query_share_sums, totals.query_pair_counts
        yield part


class TorchTiles:
    """Finishes a tile's pairs with torch operations, a block of about ``_BLOCK_PAIRS`` pairs at a time."""

    def __init__(self, query: dict, gallery: dict, device: torch.device, metric: str, top_k: int,
                 with_attributes: bool, per_query: bool):
        self.metric, self.top_k, self.with_attributes, self.per_query = metric, top_k, with_attributes, per_query
        self.query_pids, self.query_camids = query["pids"], query["camids"]
        self.gallery_pids, self.gallery_camids = gallery["pids"], gallery["camids"]
        if with_attributes:
            # Attribute-major int32 0/1 labels: a block's (M, pairs) masks are one XOR / AND each.
            self.labels = {split: data["attributes"].t().to(device, torch.int32).contiguous()
                           for split, data in (("query", query), ("gallery", gallery))}
            self.known = {split: data["known"].t().to(device, torch.int32).contiguous()
                          for split, data in (("query", query), ("gallery", gallery))}
            self.all_known = {split: data["known"].all(1).to(device)
                              for split, data in (("query", query), ("gallery", gallery))}

    def finish(self, tile: Tile) -> Iterator[PartialSums]:
        num_rows, num_columns = tile.products.shape[1:]
        rows_per_block = max(1, _BLOCK_PAIRS // num_columns)
        for start in range(0, num_rows, rows_per_block):
            yield self.finish_block(tile, slice(start, min(start + rows_per_block, num_rows)))

    def finish_block(self, tile: Tile, block: slice) -> PartialSums:
        """Components, mean and metrics of the pairs of rows ``block`` (local to the tile) of a tile."""
        components = distances_from_products(
            tile.products[:, block], None if tile.query_norms is None else tile.query_norms[:, block],
            tile.gallery_norms, self.metric)  # (M, r, g)
        mean_components = components.mean(0)
        check_finite(mean_components, "attribute components")
        if tile.reconstructed is not None:
            tile.reconstructed[block] = mean_components
        query_rows = slice(tile.rows.start + block.start, tile.rows.start + block.stop)
        pair_mask = None if tile.pair_mask is None else tile.pair_mask[block]
        part = self.block_sums(components, tile.target[block], mean_components, pair_mask, query_rows,
                               tile.gallery_index)
        if self.per_query:
            part.query_rows = query_rows
            part.query_share_sums, part.query_pair_counts = self.query_shares(
                components, query_rows, tile.gallery_index, pair_mask)
        return part

    def block_sums(self, components: torch.Tensor, target: torch.Tensor, reconstructed: torch.Tensor,
                   pair_mask: torch.Tensor | None, query_rows: slice, gallery_index) -> PartialSums:
        """Metrics of one block: components (M, r, g), target/reconstructed (r, g), pair_mask (r, g) bool
        or None (all); query_rows (global) and gallery_index select the block's labels."""
        num_attributes = components.shape[0]
        flat_components = components.reshape(num_attributes, -1)
        flat_target, flat_reconstructed = target.reshape(-1), reconstructed.reshape(-1)
        chosen = None if pair_mask is None else pair_mask.reshape(-1).nonzero()[:, 0]
        if chosen is not None:
            flat_components = flat_components[:, chosen]
            flat_target, flat_reconstructed = flat_target[chosen], flat_reconstructed[chosen]
        part = PartialSums(pairs=flat_target.numel())
        measurable = flat_target > ADRE_MIN_DISTANCE
        part.adre_skipped = int((~measurable).sum())
        error = (flat_target - flat_reconstructed).abs() / flat_target.clamp_min(ADRE_MIN_DISTANCE)
        part.relative_error.add(error[measurable])
        if not self.with_attributes or part.pairs == 0:
            return part

        def pair_labels(by_attribute: dict[str, torch.Tensor], combine) -> torch.Tensor:
            # (M, pairs) from the query's (M, r) and the gallery's (M, g) labels, flattened like the pairs.
            query_labels = by_attribute["query"][:, query_rows][:, :, None]
            gallery_labels = by_attribute["gallery"][:, gallery_index][:, None, :]
            labels = combine(query_labels, gallery_labels).reshape(num_attributes, -1)
            return labels if chosen is None else labels[:, chosen]

        differ = pair_labels(self.labels, torch.bitwise_xor)
        everything_known = bool(self.all_known["query"][query_rows].all()) and bool(
            self.all_known["gallery"][gallery_index].all())
        known = None if everything_known else pair_labels(self.known, torch.bitwise_and)
        stats = pair_explanation_stats(flat_components, differ, known, self.top_k)
        part.exclusive_sum, part.exclusive_pairs = float(stats.exclusive_ap.sum()), int(stats.has_exclusive.sum())
        part.common_sum, part.common_pairs = float(stats.common_ap.sum()), int(stats.has_common.sum())
        part.counts = {name: getattr(stats, name) for name in native_metrics.COUNT_NAMES}
        part.share_histogram = stats.share_histogram
        return part

    def query_shares(self, components: torch.Tensor, query_rows: slice, gallery_index,
                     pair_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch path of the kernel's per-query share sums: (r, 4, M) float64 sums of the shares and
        (r, 4) int64 pairs counted, from components (M, r, g) of query rows ``query_rows`` (global) x
        gallery ``gallery_index``, by category 2 * same identity + same camera."""
        num_attributes, num_rows = components.shape[:2]
        share_sums = torch.zeros(num_rows, native_metrics.NUM_CATEGORIES, num_attributes, dtype=torch.float64)
        pair_counts = torch.zeros(num_rows, native_metrics.NUM_CATEGORIES, dtype=torch.int64)
        total = components.sum(0)  # (r, g)
        counted = total > 0  # a zero distance has no shares
        if pair_mask is not None:
            counted &= pair_mask
        weight = torch.where(counted, 1.0 / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        gallery_rows = gallery_index if isinstance(gallery_index, slice) else gallery_index.cpu()
        same_identity = (self.query_pids[query_rows][:, None] == self.gallery_pids[gallery_rows][None, :])
        same_camera = (self.query_camids[query_rows][:, None] == self.gallery_camids[gallery_rows][None, :])
        category = (2 * same_identity.long() + same_camera.long()).to(components.device)
        by_query = components.permute(1, 0, 2)  # (r, M, g)
        for index in range(native_metrics.NUM_CATEGORIES):
            chosen = counted & (category == index)
            if not bool(chosen.any()):
                continue
            share_sums[:, index] = torch.bmm(by_query, (weight * chosen)[:, :, None])[:, :, 0].double().cpu()
            pair_counts[:, index] = chosen.sum(1).cpu()
        return share_sums, pair_counts
