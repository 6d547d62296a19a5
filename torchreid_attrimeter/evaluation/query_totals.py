"""``QueryTotals``: what the model audit needs of an evaluation run, per query (``per_query=True``).

The pair stream records each query's rank-1 pair and rank statistics (``pair_stream.PairStream``); the
run's totals add the share sums that the tile backends return (``partial_sums.RunTotals``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
