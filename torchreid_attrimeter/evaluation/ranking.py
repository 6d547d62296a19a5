"""Vectorised retrieval metrics (CMC, mAP, mINP) under torchreid's protocol: gallery images of the
query's identity taken by the query's camera are removed, queries without any remaining match are
skipped and counted. Works on numpy arrays or torch tensors (on their device), in chunks of queries.

Instead of sorting every row of the distance matrix (what torchreid does), each query's valid matches
are sorted (there are few) and every other gallery image is placed among them with one
``searchsorted``: the rank of the j-th match is j plus the number of valid non-matches closer than it.
That gives the same numbers as a full sort whenever no non-match is at exactly the distance of a
match; rows with such a tie are re-ranked with a full sort that follows torchreid's order (numpy's
``argsort`` for numpy input, a stable sort for torch input).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from torchreid_attrimeter.evaluation import native_metrics

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# Default number of query rows handled at once: (chunk, G) tensors of a few kinds stay well under
# ~100 MB for Market-sized galleries.
DEFAULT_QUERY_CHUNK = 512
CUHK03_REPEATS = 10  # torchreid's eval_cuhk03 draws 10 single-shot galleries per query


@dataclass
class QueryRankStats:
    """Per-query results for a chunk of c queries.

    valid: (c,) bool, the query has at least one valid match.
    first_match: (c,) long, 0-based position of the first valid match in the filtered ranking.
    average_precision: (c,) float64; inverse_negative_penalty: (c,) float64 (matches / position of the
    last match). Values of invalid queries are 0.
    """

    valid: torch.Tensor
    first_match: torch.Tensor
    average_precision: torch.Tensor
    inverse_negative_penalty: torch.Tensor


@dataclass
class RankMetrics:
    """CMC curve (max_rank,), mAP, mINP (fractions in [0, 1]) and how many queries were used."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int


def as_tensor(values: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values.detach()
    else:
        tensor = torch.as_tensor(np.asarray(values))
    return tensor if device is None else tensor.to(device)


def check_finite_distances(distances: torch.Tensor, name: str = "distmat", row_offset: int = 0) -> None:
    finite = torch.isfinite(distances)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise ValueError(
            f"{name} has NaN/inf values ({count} in rows {row_offset}..{row_offset + len(distances) - 1}; "
            f"first at row {bad[0] + row_offset}, column {bad[1]}: "
            f"{distances[bad[0], bad[1]].item()}); check the features for NaN (e.g. a diverged model or "
            "fp16 overflow) before ranking"
        )


def _positions_from_order(order: torch.Tensor, valid_match: torch.Tensor, junk: torch.Tensor) -> QueryRankStats:
    """Metrics of rows ranked by an explicit order (r, G): the slow-but-sure path for tied rows."""
    match_sorted = valid_match.gather(1, order)
    kept_sorted = ~junk.gather(1, order)
    kept_position = kept_sorted.cumsum(1)  # 1-based position among kept images
    match_count = match_sorted.cumsum(1)
    num_matches = match_sorted.sum(1)
    valid = num_matches > 0
    precision = torch.where(match_sorted, match_count.double() / kept_position.clamp_min(1).double(), 0.0)
    average_precision = precision.sum(1) / num_matches.clamp_min(1).double()
    positions = torch.where(match_sorted, kept_position, torch.zeros_like(kept_position))
    big = torch.full_like(positions, order.shape[1] + 1)
    first = torch.where(match_sorted, positions, big).min(1).values - 1
    last = positions.max(1).values
    inp = num_matches.double() / last.clamp_min(1).double()
    zero = torch.zeros_like(average_precision)
    return QueryRankStats(valid, torch.where(valid, first, torch.zeros_like(first)),
                          torch.where(valid, average_precision, zero), torch.where(valid, inp, zero))


class GalleryIdentities:
    """The gallery's pids sorted once, so that each query's same-identity images are found without
    building (Q, G) masks: a query with pid p owns the slice of the sorted gallery holding p."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor):
        self.pids = g_pids
        self.camids = g_camids
        self.order = torch.sort(g_pids, stable=True).indices
        self.sorted_pids = g_pids[self.order].contiguous()

    def same_identity_pairs(self, q_pids: torch.Tensor, q_camids: torch.Tensor):
        """(rows, cols, junk) of every (query, gallery) pair with the same pid; junk = same camera too."""
        start = torch.searchsorted(self.sorted_pids, q_pids.contiguous(), right=False)
        stop = torch.searchsorted(self.sorted_pids, q_pids.contiguous(), right=True)
        counts = stop - start
        rows = torch.repeat_interleave(torch.arange(len(q_pids), device=q_pids.device), counts)
        first_of_row = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        offset = torch.arange(len(rows), device=q_pids.device) - first_of_row
        cols = self.order[start[rows] + offset]
        junk = self.camids[cols] == q_camids[rows]
        return rows, cols, junk


def _sorted_matches(
    distances: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, junk: torch.Tensor, with_columns: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Each query's valid matches as (c, K) tables, K the most matches of any query (at least 1).

    Returns the match distances in increasing order, padded with +inf; with ``with_columns`` the matches'
    gallery columns in the same (distance, column) order, padded with G (else None); and (c,) the number
    of valid matches of each query. (rows, cols, junk) are the same-identity pairs of the queries.
    """
    num_rows, device = distances.shape[0], distances.device
    match_rows, match_cols = rows[~junk], cols[~junk]
    match_distances = distances[match_rows, match_cols]
    num_matches = torch.bincount(match_rows, minlength=num_rows)
    max_matches = max(int(num_matches.max()) if num_rows else 0, 1)
    # Sorted by distance, then (stably) by row: each row's matches end up contiguous and in order.
    by_distance = torch.sort(match_distances, stable=True).indices
    by_row = by_distance[torch.sort(match_rows[by_distance], stable=True).indices]
    rank_in_row = torch.arange(len(by_row), device=device) - (num_matches.cumsum(0) - num_matches)[
        match_rows[by_row]]
    sorted_matches = torch.full((num_rows, max_matches), float("inf"), dtype=distances.dtype, device=device)
    sorted_matches[match_rows[by_row], rank_in_row] = match_distances[by_row]
    sorted_columns = None
    if with_columns:
        sorted_columns = torch.full((num_rows, max_matches), distances.shape[1], dtype=torch.long, device=device)
        sorted_columns[match_rows[by_row], rank_in_row] = match_cols[by_row]
    return sorted_matches, sorted_columns, num_matches


def _counted_own_bins(
    distances: torch.Tensor, sorted_matches: torch.Tensor, sorted_columns: torch.Tensor | None,
    rows: torch.Tensor, cols: torch.Tensor,
) -> torch.Tensor:
    """The bins the C kernel put the query's own-identity images (rows, cols) in, recomputed for those
    few images only so that they can be taken out of its histogram."""
    own_distances, candidates = distances[rows, cols][:, None], sorted_matches[rows]
    if sorted_columns is None:
        return 2 * (candidates < own_distances).sum(1) + (candidates == own_distances).any(1).long()
    closer = (candidates < own_distances) | ((candidates == own_distances)
                                             & (sorted_columns[rows] < cols[:, None]))
    return 2 * closer.sum(1)


def _searchsorted_histogram(
    distances: torch.Tensor, sorted_matches: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of the match-bin histogram (without the C kernel): (c, 2K + 1) counts of every
    gallery image and the bins of the own-identity images (rows, cols)."""
    num_rows, max_matches = sorted_matches.shape
    num_bins = 2 * max_matches + 1
    # The boundaries p_1, p_1+, p_2, p_2+, ... (p+ = next float up) give the same bins with one
    # searchsorted.
    boundaries = torch.stack([sorted_matches, torch.nextafter(sorted_matches, sorted_matches.new_tensor(
        float("inf")))], dim=2).reshape(num_rows, 2 * max_matches)
    bin_index = torch.searchsorted(boundaries, distances.contiguous(), right=True, out_int32=True)
    own_bins = bin_index[rows, cols].long()
    # Offset each row's bins so that a single bincount fills the whole (c, 2K + 1) table.
    bin_index += (torch.arange(num_rows, device=distances.device, dtype=torch.int32) * num_bins)[:, None]
    histogram = torch.bincount(bin_index.view(-1), minlength=num_rows * num_bins).view(num_rows, num_bins)
    return histogram, own_bins


def _nonmatch_histogram(
    distances: torch.Tensor, sorted_matches: torch.Tensor, sorted_columns: torch.Tensor | None,
    rows: torch.Tensor, cols: torch.Tensor,
) -> torch.Tensor:
    """(c, 2K + 1) per-query histogram of where the valid non-matches fall among the query's matches.

    Bin 2i: exactly i matches strictly closer and none at the image's distance; bin 2i + 1: i strictly
    closer and a match at exactly its distance (a tie with match i + 1). With ``sorted_columns`` ties
    are settled by gallery column instead and only even bins are used.
    """
    histogram = native_metrics.match_bins(sorted_matches, distances, sorted_columns)
    if histogram is not None:  # the C kernel counts the matches below each image
        own_bins = _counted_own_bins(distances, sorted_matches, sorted_columns, rows, cols)
    else:
        histogram, own_bins = _searchsorted_histogram(distances, sorted_matches, rows, cols)
    # Images of the query's own identity (matches and junk) never push a match down: take them out.
    histogram.index_put_((rows, own_bins), torch.full_like(rows, -1), accumulate=True)
    return histogram


def _stats_from_histogram(histogram: torch.Tensor, num_matches: torch.Tensor) -> tuple[QueryRankStats, torch.Tensor]:
    """Rank statistics from the non-match histogram (see ``_nonmatch_histogram``), and (c,) bool: the
    query has a non-match at exactly a match's distance, where the order depends on the sort."""
    max_matches = histogram.shape[1] // 2
    tied = histogram[:, 1::2].sum(1) > 0
    # nonmatches_before[q, j-1]: non-matches strictly closer than the j-th match.
    nonmatches_before = histogram.cumsum(1)[:, 0:-1:2]
    match_index = torch.arange(1, max_matches + 1, device=histogram.device)
    position = match_index[None, :] + nonmatches_before  # 1-based position of the j-th match
    is_real = match_index[None, :] <= num_matches[:, None]
    valid = num_matches > 0
    precision = torch.where(is_real, match_index[None, :].double() / position.double(), 0.0)
    average_precision = precision.sum(1) / num_matches.clamp_min(1).double()
    last_position = position.gather(1, (num_matches - 1).clamp_min(0)[:, None])[:, 0]
    inp = num_matches.double() / last_position.double()
    zero = torch.zeros_like(average_precision)
    stats = QueryRankStats(
        valid,
        torch.where(valid, position[:, 0] - 1, torch.zeros_like(position[:, 0])),
        torch.where(valid, average_precision, zero),
        torch.where(valid, inp, zero),
    )
    return stats, tied


def _rerank_tied_rows(
    stats: QueryRankStats,
    tied_rows: torch.Tensor,
    distances: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tie_order_source: np.ndarray | None,
) -> None:
    """Overwrite the statistics of ``tied_rows`` with those of a full sort in torchreid's order
    (``np.argsort`` of ``tie_order_source`` when given, else a stable torch sort). pairs: the chunk's
    same-identity (rows, cols, junk)."""
    rows, cols, junk = pairs
    num_rows, device = distances.shape[0], distances.device
    if tie_order_source is not None:
        order = torch.from_numpy(np.argsort(tie_order_source[tied_rows.cpu().numpy()], axis=1))
        order = order.to(distances.device)
    else:
        order = torch.sort(distances[tied_rows], dim=1, stable=True).indices
    # Dense masks for the few tied rows only.
    row_slot = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    row_slot[tied_rows] = torch.arange(len(tied_rows), device=device)
    in_tied = row_slot[rows] >= 0
    valid_match = torch.zeros(len(tied_rows), distances.shape[1], dtype=torch.bool, device=device)
    junk_mask = torch.zeros_like(valid_match)
    valid_match[row_slot[rows[in_tied]], cols[in_tied]] = ~junk[in_tied]
    junk_mask[row_slot[rows[in_tied]], cols[in_tied]] = junk[in_tied]
    exact = _positions_from_order(order, valid_match, junk_mask)
    stats.first_match[tied_rows] = exact.first_match
    stats.average_precision[tied_rows] = exact.average_precision
    stats.inverse_negative_penalty[tied_rows] = exact.inverse_negative_penalty


def query_rank_stats(
    distances: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor,
    gallery: GalleryIdentities,
    tie_order_source: np.ndarray | None = None,
) -> QueryRankStats:
    """Rank statistics of c queries against the whole gallery.

    distances: (c, G) finite; pids/camids: (c,). ``tie_order_source`` is the numpy version of
    ``distances`` when the caller passed numpy: tied rows are then ordered with ``np.argsort`` exactly as
    torchreid does, otherwise with a stable torch sort.
    """
    rows, cols, junk = gallery.same_identity_pairs(q_pids, q_camids)
    # For torch input the ties are settled as a stable sort settles them (lower gallery column first),
    # which the C kernel does while counting: the matches' columns, in the same (distance, column) order.
    sorted_matches, sorted_columns, num_matches = _sorted_matches(distances, rows, cols, junk,
                                                                  with_columns=tie_order_source is None)
    histogram = _nonmatch_histogram(distances, sorted_matches, sorted_columns, rows, cols)
    stats, tied = _stats_from_histogram(histogram, num_matches)
    tied_rows = (tied & stats.valid).nonzero()[:, 0]
    if tied_rows.numel():
        _rerank_tied_rows(stats, tied_rows, distances, (rows, cols, junk), tie_order_source)
    return stats


def cuhk03_first_match_rates(
    distances: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    max_rank: int,
    generator: torch.Generator,
    repeats: int = CUHK03_REPEATS,
) -> torch.Tensor:
    """(c, max_rank) cuhk03 single-gallery-shot CMC of each query, averaged over ``repeats`` draws.

    Same procedure as torchreid's eval_cuhk03 (one random kept image per gallery identity, 10 draws),
    with its own random numbers, so single draws differ from torchreid's while the expectation is equal.
    """
    same_pid = q_pids[:, None] == g_pids[None, :]
    kept = ~(same_pid & (q_camids[:, None] == g_camids[None, :]))
    _, identity = torch.unique(g_pids, return_inverse=True)
    num_identities = int(identity.max()) + 1
    identity = identity[None, :].expand_as(distances)
    rates = torch.zeros(distances.shape[0], max_rank, dtype=torch.float64, device=distances.device)
    ranks = torch.arange(max_rank, device=distances.device)
    for _ in range(repeats):
        lottery = torch.rand(distances.shape, generator=generator, device="cpu").to(distances.device)
        lottery = torch.where(kept, lottery, torch.full_like(lottery, -1.0))
        winner = torch.full((distances.shape[0], num_identities), -1.0, device=distances.device)
        winner.scatter_reduce_(1, identity, lottery, reduce="amax")
        drawn = kept & (lottery == winner.gather(1, identity))
        drawn_match = drawn & same_pid
        match_distance = torch.where(drawn_match, distances, torch.full_like(distances, float("inf"))).min(1)
        closer = (drawn & ~same_pid & (distances < match_distance.values[:, None])).sum(1)
        rates += (closer[:, None] <= ranks[None, :]).double()
    return rates / repeats


def _checked_rank_inputs(
    distmat: ArrayLike,
    identities: dict[str, ArrayLike],
    max_rank: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The distance matrix and the four id arrays (``q_pids``, ``g_pids``, ``q_camids``, ``g_camids``)
    as tensors on its device, checked against its shape, and the CMC length: ``max_rank``, cut to the
    gallery size (with a warning) when the gallery is smaller. Raises ValueError on unusable input."""
    distances = as_tensor(distmat, "distmat")
    if distances.dim() != 2:
        raise ValueError(f"distmat must be a 2-D (num_query, num_gallery) matrix, got shape "
                         f"{tuple(distances.shape)}")
    num_query, num_gallery = distances.shape
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"cannot rank an empty set: distmat has {num_query} queries and {num_gallery} "
                         "gallery images; check the query/gallery loaders")
    expected_sizes = {"q_pids": num_query, "g_pids": num_gallery, "q_camids": num_query, "g_camids": num_gallery}
    ids = {}
    for name, values in identities.items():
        tensor = as_tensor(values, name, distances.device).reshape(-1)
        if tensor.numel() != expected_sizes[name]:
            raise ValueError(f"{name} has {tensor.numel()} entries but distmat has shape "
                             f"{tuple(distances.shape)}; they must match")
        ids[name] = tensor
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if num_gallery < max_rank:
        logger.warning("the gallery has only %d images: the CMC curve stops at rank %d instead of %d",
                       num_gallery, num_gallery, max_rank)
        max_rank = num_gallery
    return distances, ids, max_rank


def _summed_rank_stats(
    distances: torch.Tensor,
    ids: dict[str, torch.Tensor],
    max_rank: int,
    use_metric_cuhk03: bool,
    query_chunk: int,
    seed: int,
    tie_order_source: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sums over the valid queries, ranked ``query_chunk`` at a time: (max_rank,) CMC hits, AP and INP
    (float64 tensors), and the number of valid queries. Each chunk is checked for NaN/inf first."""
    num_query, device = distances.shape[0], distances.device
    generator = torch.Generator().manual_seed(seed)
    gallery = GalleryIdentities(ids["g_pids"], ids["g_camids"])
    ranks = torch.arange(max_rank, device=device)
    cmc_sum = torch.zeros(max_rank, dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_valid = 0
    for start in range(0, num_query, query_chunk):
        rows = slice(start, min(start + query_chunk, num_query))
        chunk = distances[rows]
        if not bool(torch.isfinite(chunk.sum())):  # one cheap pass; the detailed check only on failure
            check_finite_distances(chunk, row_offset=start)
        stats = query_rank_stats(chunk, ids["q_pids"][rows], ids["q_camids"][rows], gallery,
                                 tie_order_source=None if tie_order_source is None else tie_order_source[rows])
        valid = stats.valid
        if use_metric_cuhk03:
            rates = cuhk03_first_match_rates(chunk, ids["q_pids"][rows], ids["g_pids"], ids["q_camids"][rows],
                                             ids["g_camids"], max_rank, generator)
            cmc_sum += rates[valid].sum(0)
        else:
            cmc_sum += (stats.first_match[valid][:, None] <= ranks[None, :]).sum(0).double()
        ap_sum += stats.average_precision[valid].sum()
        inp_sum += stats.inverse_negative_penalty[valid].sum()
        num_valid += int(valid.sum())
    return cmc_sum, ap_sum, inp_sum, num_valid


def rank_metrics(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    seed: int = 0,
) -> RankMetrics:
    """CMC, mAP and mINP of a (Q, G) distance matrix (numpy or torch, smaller = closer).

    Same numbers as torchreid's ``evaluate_rank`` (Python path); cuhk03 mode draws its single-shot
    galleries with a torch generator seeded by ``seed``.
    """
    identities = {"q_pids": q_pids, "g_pids": g_pids, "q_camids": q_camids, "g_camids": g_camids}
    distances, ids, max_rank = _checked_rank_inputs(distmat, identities, max_rank)
    # numpy input: tied rows are re-ranked with np.argsort on the caller's array, as torchreid does.
    tie_order_source = distmat if isinstance(distmat, np.ndarray) else None
    cmc_sum, ap_sum, inp_sum, num_valid = _summed_rank_stats(distances, ids, max_rank, use_metric_cuhk03,
                                                             query_chunk, seed, tie_order_source)
    num_query = distances.shape[0]
    if num_valid == 0:
        raise ValueError(f"none of the {num_query} query identities appears in the gallery under another "
                         "camera, so no ranking metric is defined; check that query and gallery come from "
                         "the same split and that pids/camids are passed in the right order")
    if num_valid < num_query:
        logger.info("%d of %d queries have no valid gallery match and were skipped", num_query - num_valid,
                    num_query)
    cmc = (cmc_sum / num_valid).cpu().numpy().astype(np.float32)
    return RankMetrics(cmc, float(ap_sum / num_valid), float(inp_sum / num_valid), num_valid,
                       num_query - num_valid)


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    return_mINP: bool = False,
):
    """Drop-in for torchreid's ``evaluate_rank``: returns ``(cmc, mAP)`` (``(cmc, mAP, mINP)`` with
    ``return_mINP=True``); cmc is a float32 array of length min(max_rank, num_gallery)."""
    metrics = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_metric_cuhk03)
    if return_mINP:
        return metrics.cmc, metrics.mAP, metrics.mINP
    return metrics.cmc, metrics.mAP
