"""The sums of an evaluation run: what each piece of pairs adds (``PartialSums``, returned by the tile
backends), their running totals with the retrieval statistics of every query chunk (``RunTotals``),
and the summary of the totals: the metrics of docs/method.md §6 as ``ExplanationEvaluator.evaluate``
returns them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchreid_attrimeter.evaluation.explanation_metrics import SHARE_BINS, RelativeErrorHistogram, share_auc
from torchreid_attrimeter.evaluation.native_metrics import COUNT_NAMES
from torchreid_attrimeter.evaluation.query_totals import QueryTotals
from torchreid_attrimeter.evaluation.ranking import QueryRankStats
from torchreid_attrimeter.evaluation.run_options import RunOptions

logger = logging.getLogger(__name__)


@dataclass
class PartialSums:
    """What some pairs of a tile (one block of the torch path, or the whole tile in the C kernel) add
    to the run. counts and share_histogram are None without attribute labels; the query_* fields are
    None unless the run keeps per-query totals."""

    pairs: int
    adre_skipped: int = 0
    relative_error: RelativeErrorHistogram = field(default_factory=RelativeErrorHistogram)
    exclusive_sum: float = 0.0
    exclusive_pairs: int = 0
    common_sum: float = 0.0
    common_pairs: int = 0
    counts: dict[str, torch.Tensor] | None = None  # native_metrics.COUNT_NAMES -> (M,)
    share_histogram: torch.Tensor | None = None  # (2, M, SHARE_BINS), see share_auc
    # The pairs' query rows (global), the sums of their shares (rows, 4, M) float64 and the pairs
    # counted (rows, 4) int64, by category 2 * same identity + same camera (see QueryTotals).
    query_rows: slice | None = None
    query_share_sums: torch.Tensor | None = None
    query_pair_counts: torch.Tensor | None = None


class RetrievalTotals:
    """CMC, AP and INP sums over the queries of one ranking (the target's or the interpreter's)."""

    def __init__(self, max_rank: int, device: torch.device):
        self.ranks = torch.arange(max_rank, device=device)
        self.cmc = torch.zeros(max_rank, dtype=torch.float64, device=device)
        self.ap = self.inp = 0.0
        self.valid = self.skipped = 0

    def add(self, stats: QueryRankStats) -> None:
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


class RunTotals:
    """The running totals of one evaluation run: ``add`` each ``PartialSums`` and ``add_ranking`` each
    query chunk's rankings, in any tiling; ``summary`` turns them into the metrics. Per-query share
    sums go into ``query_totals`` when it is given."""

    def __init__(self, num_query: int, num_gallery: int, num_attributes: int, ranks: Sequence[int],
                 device: torch.device, with_attributes: bool, query_totals: QueryTotals | None = None):
        self.num_query, self.num_gallery, self.num_attributes = num_query, num_gallery, num_attributes
        self.with_attributes = with_attributes
        self.query_totals = query_totals
        max_rank = min(max(ranks), num_gallery)
        if max(ranks) > num_gallery:
            logger.warning("the gallery has %d images: ranks above %d are reported as None", num_gallery, num_gallery)
        self.retrieval = {name: RetrievalTotals(max_rank, device) for name in ("target", "interpreter")}
        self.relative_error = RelativeErrorHistogram()
        self.adre_skipped = 0
        self.exclusive_sum = self.common_sum = 0.0
        self.exclusive_pairs = self.common_pairs = self.explained_pairs = 0
        zeros = torch.zeros(num_attributes, dtype=torch.float64)
        self.attribute_counts = {name: zeros.clone() for name in COUNT_NAMES}
        self.share_histogram = torch.zeros(2, num_attributes, SHARE_BINS, dtype=torch.int64)

    def add_ranking(self, name: str, stats: QueryRankStats) -> None:
        """A query chunk's ranking by the 'target' or the 'interpreter' distances."""
        self.retrieval[name].add(stats)

    def add(self, part: PartialSums) -> None:
        if part.query_share_sums is not None:
            self.query_totals.share_sums[part.query_rows] += part.query_share_sums
            self.query_totals.pair_counts[part.query_rows] += part.query_pair_counts
        self.explained_pairs += part.pairs
        self.adre_skipped += part.adre_skipped
        self.relative_error.merge(part.relative_error)
        if part.counts is None:
            return
        self.exclusive_sum += part.exclusive_sum
        self.exclusive_pairs += part.exclusive_pairs
        self.common_sum += part.common_sum
        self.common_pairs += part.common_pairs
        for name in self.attribute_counts:
            self.attribute_counts[name] += part.counts[name].double().cpu()
        self.share_histogram += part.share_histogram.cpu()

    def summary(self, options: RunOptions, recognition_correct: torch.Tensor,
                recognition_known: torch.Tensor) -> dict[str, Any]:
        """Every metric as a flat JSON-safe dict (percentages), with 'per_attribute' a dict of dicts.
        recognition_correct / recognition_known: (M,) the attribute branch's correct and known labels."""
        results: dict[str, Any] = {
            "metric": options.metric, "pairs": options.pairs, "num_query": self.num_query,
            "num_gallery": self.num_gallery, "num_attributes": self.num_attributes,
            "explained_pairs": self.explained_pairs,
        }
        if options.pairs == "topk":
            results["topk"] = options.topk
        if options.pair_fraction is not None:
            results["pair_fraction"] = options.pair_fraction
        for name, totals in self.retrieval.items():
            results.update(totals.summary(name, options.ranks))
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
                "recognition_accuracy": _ratio(recognition_correct[index], recognition_known[index]),
                # Does the share of this attribute grow when it differs? 0.5: no better than chance.
                "share_auc": None if math.isnan(float(auc[index])) else float(auc[index]),
            }
        results["per_attribute"] = per_attribute
        return results


def _percent(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * float(value)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    return _percent(float(numerator) / float(denominator)) if float(denominator) > 0 else None
