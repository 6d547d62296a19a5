"""Per-pair explanation metrics of docs/method.md §6 on blocks of pairs, vectorised over pairs (the
evaluator's torch path): X-mAP_e, X-mAP_c (with the N = 0 rule), top-k attribute precision/recall,
attribute agreement and the share histograms. definitions.py states each metric for one pair, readably;
this module and the C kernel (pair_metrics.c, used on CPU, which follows this one step by step) compute
the same numbers fast, and the tests hold all three together.

Layout: attribute-major, (M, n) for n pairs, the layout ``pairwise_components`` produces internally,
so that each attribute is one contiguous row. Ranking M attributes of every pair uses a sorting network
run row-wise over all pairs at once (a few hundred elementwise max/min over length-n rows), several
times faster than ``torch.sort`` on (n, M), whose cost is dominated by per-row overhead for small M.

Ranking keys: a share's order within a pair is the order of the components d^m (same denominator), and
non-negative float32 bit patterns sort like the floats as int32. The lowest mantissa bit is replaced by
"differs" so the sort carries the relevance with the key; among exactly equal shares the relevant
attribute therefore ranks first (ties are resolved in favour of the explanation, in both X-mAP
variants). Attributes unknown for either image get key -2 and are left out of that pair's ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

UNKNOWN_KEY = -2  # below every valid key, and its lowest ("differs") bit is clear

# Share histograms for the per-attribute AUC ("does the share of m grow when m differs?"). A share
# p in [0, 1] (float32) is binned by the top 16 bits of its bit pattern: sign, exponent and 7 mantissa
# bits, i.e. 128 logarithmic bins per octave (0.54 % wide), from 2^-18 (everything below is bin 0)
# to 1. Integer shifts, the same in torch and in the C kernel, so both paths bin a share alike.
SHARE_BIN_SHIFT = 16
SHARE_BIN_LOW = (127 - 18) << 7  # the bits of 2^-18, shifted
SHARE_BINS = (127 << 7) - SHARE_BIN_LOW + 1  # up to the bits of 1.0, shifted


@cache
def descending_sorting_network(size: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for ``size`` inputs.

    Built for the next power of two; comparators touching the padding are dropped, which is exact
    because padding would hold the smallest value and every such comparator would leave it in place.
    """
    padded = 1
    while padded < size:
        padded *= 2
    comparators = []
    block = 1
    while block < padded:
        step = block
        while step >= 1:
            for start in range(step % block, padded - step, 2 * step):
                for offset in range(min(step, padded - start - step)):
                    low, high = start + offset, start + offset + step
                    if low // (2 * block) == high // (2 * block) and high < size:
                        comparators.append((low, high))
            step //= 2
        block *= 2
    return tuple(comparators)


def sort_rows_descending(keys: torch.Tensor) -> torch.Tensor:
    """Sort each column of ``keys`` (M, n) in decreasing order along dim 0 → (M, n)."""
    rows = list(keys.unbind(0))
    for first, second in descending_sorting_network(len(rows)):
        larger = torch.maximum(rows[first], rows[second])
        rows[second] = torch.minimum(rows[first], rows[second])
        rows[first] = larger
    return torch.stack(rows)


def cumulative_rows(values: torch.Tensor) -> torch.Tensor:
    """values.cumsum(0) for (M, n): M - 1 in-place row additions, many times faster on CPU than
    ``cumsum`` along the first dimension."""
    total = values.clone()
    for index in range(1, total.shape[0]):
        total[index].add_(total[index - 1])
    return total


def ranking_keys(values: torch.Tensor, differ: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """(M, n) int32 keys: bits of the float32 components ``values`` (>= 0) with the lowest bit =
    differs; UNKNOWN_KEY where unknown. differ and known are int32 0/1 (M, n), differ already zero
    where unknown; known None = all known.
    """
    keys = values.view(torch.int32) & ~1
    keys |= differ
    if known is not None:
        keys |= (known - 1) << 1  # unknown: all bits but the lowest set, i.e. UNKNOWN_KEY
    return keys


@dataclass
class PairExplanationStats:
    """Per-pair and per-attribute results for a block of n pairs.

    exclusive_ap, common_ap: (n,) float64 AP of the pair (0 where undefined);
    has_exclusive: (n,) bool, N >= 1; has_common: (n,) bool, M_known - N >= 1.
    Per attribute (M,) counts: top_k (in the pair's top-k shares), top_k_differ (in top-k and
    differs), differ, known, agree ([share > 1/M_known] equals differs).
    """

    exclusive_ap: torch.Tensor
    has_exclusive: torch.Tensor
    common_ap: torch.Tensor
    has_common: torch.Tensor
    top_k: torch.Tensor
    top_k_differ: torch.Tensor
    differ: torch.Tensor
    known: torch.Tensor
    agree: torch.Tensor
    share_histogram: torch.Tensor


def share_bins(shares: torch.Tensor) -> torch.Tensor:
    """Bin index in [0, SHARE_BINS) of float32 shares in [0, 1] (see SHARE_BIN_SHIFT)."""
    bins = (shares.float().view(torch.int32) >> SHARE_BIN_SHIFT) - SHARE_BIN_LOW
    return bins.clamp_(0, SHARE_BINS - 1)


def share_histogram(known_values: torch.Tensor, total_known: torch.Tensor, differ: torch.Tensor,
                    known: torch.Tensor | None) -> torch.Tensor:
    """(2, M, SHARE_BINS) int64 histogram of the shares p^m = d^m / (sum of the pair's known d^k) of
    the known attributes of n pairs, split by differs (index 1) and shared (index 0).

    known_values: (M, n) components, zero where unknown; total_known: (n,) their sums; differ, known:
    (M, n) int32 0/1 (known None: all). A pair with nothing known has no share.
    """
    num_attributes = known_values.shape[0]
    shares = known_values / total_known.masked_fill(total_known == 0, 1.0)[None, :]
    attribute = torch.arange(num_attributes, device=shares.device)[:, None]
    index = (differ.long() * num_attributes + attribute) * SHARE_BINS + share_bins(shares)
    if known is not None:
        index = index[known.bool()]
    counts = torch.bincount(index.reshape(-1), minlength=2 * num_attributes * SHARE_BINS)
    return counts.view(2, num_attributes, SHARE_BINS)


def share_auc(histogram: torch.Tensor) -> torch.Tensor:
    """(M,) float64 AUC of the share for telling pairs that differ in attribute m from pairs that share
    it: P(share | differs > share | shared), ties (the same bin) counting one half. NaN where either
    kind of pair is missing. histogram: (2, M, SHARE_BINS) as ``share_histogram``."""
    shared, differs = histogram[0].double(), histogram[1].double()
    shared_below = shared.cumsum(1) - shared  # shared pairs in lower bins
    wins = (differs * (shared_below + 0.5 * shared)).sum(1)
    return wins / (differs.sum(1) * shared.sum(1))


def pair_explanation_stats(
    components: torch.Tensor, differ: torch.Tensor, known: torch.Tensor | None = None, top_k: int = 3
) -> PairExplanationStats:
    """Explanation metrics of n pairs from their components (M, n) and labels.

    components: (M, n) d^m >= 0; differ: (M, n) bool or 0/1 ints, the two identities differ in
    attribute m; known: (M, n) bool or 0/1 ints, attribute m is annotated for both images (others are
    excluded from the pair), or None when every attribute is known.

    Every step is a whole-row integer or float operation, avoiding what is slow in CPU torch at this
    size: ``where``, ``cumsum`` along dim 0, int64 sums, conversions from bool to float.
    """
    differ = differ.to(torch.int32)
    if known is not None:
        known = known.to(torch.int32)
        differ = differ & known
    values = components.float().clamp_min(0.0)
    keys = ranking_keys(values, differ, known)
    ranked = sort_rows_descending(keys)
    exclusive_ap, common_ap, num_differ, num_shared = _ranked_average_precisions(ranked)
    num_known = num_differ + num_shared

    # Components of unknown attributes zeroed with a bit mask (-known is all ones or all zeros).
    known_values = values if known is None else (values.view(torch.int32) & -known).view(torch.float32)
    total_known = known_values.sum(0)
    _common_ap_where_nothing_differs(common_ap, ranked, num_differ, num_known, total_known)
    in_top_k = _top_k_mask(keys, ranked, num_known, top_k)
    known_count, agree = _agreement_counts(known_values, total_known, num_known, differ, known)

    has_exclusive = num_differ >= 1.0
    has_common = num_shared >= 1.0
    return PairExplanationStats(
        exclusive_ap=(exclusive_ap * has_exclusive).double(),
        has_exclusive=has_exclusive,
        common_ap=(common_ap * has_common).double(),
        has_common=has_common,
        top_k=_row_counts(in_top_k),
        top_k_differ=_row_counts(in_top_k & differ),
        differ=_row_counts(differ),
        known=known_count,
        agree=agree,
        share_histogram=share_histogram(known_values, total_known, differ, known),
    )


def _ranked_average_precisions(
    ranked: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n,) float32 X-mAP_e and X-mAP_c (the N >= 1 rule) of each pair from its keys sorted in
    decreasing order (M, n), and (n,) float32 counts of differing and of shared known attributes.
    APs of pairs without relevant attributes are meaningless here; the caller masks them."""
    num_attributes = ranked.shape[0]
    # Relevance read back from the sorted keys: lowest bit = differs; sign bit = unknown. From here
    # on in float32, whose whole-row arithmetic is the fastest (and exact for these small counts).
    ranked_differ = (ranked & 1).float()
    ranked_shared = ((ranked >> 31) + 1).float() - ranked_differ  # known (1, or 0 if unknown) - differs
    differ_seen = cumulative_rows(ranked_differ)  # relevant items at or above each position
    shared_seen = cumulative_rows(ranked_shared)
    num_differ, num_shared = differ_seen[-1], shared_seen[-1]
    num_known = num_differ + num_shared
    # X-mAP_e: decreasing shares, relevant = differs; AP = (1/N) sum over relevant positions of
    # (relevant so far) / position.
    position = torch.arange(1, num_attributes + 1, device=ranked.device, dtype=torch.float32)
    exclusive_ap = ((1.0 / position) @ (ranked_differ * differ_seen)) / num_differ.clamp_min(1.0)
    # X-mAP_c with N >= 1: increasing shares, relevant = shared. Descending index m is position
    # M_known - m in increasing order, where the shared attributes so far are those at m and below.
    shared_from_here = (num_shared + 1.0)[None, :] - shared_seen
    shared_from_here *= ranked_shared
    increasing_position = (num_known[None, :] - (position - 1.0)[:, None]).clamp_min_(1.0)
    common_ap = (shared_from_here / increasing_position).sum(0) / num_shared.clamp_min(1.0)
    return exclusive_ap, common_ap, num_differ, num_shared


def _common_ap_where_nothing_differs(
    common_ap: torch.Tensor, ranked: torch.Tensor, num_differ: torch.Tensor, num_known: torch.Tensor,
    total_known: torch.Tensor,
) -> None:
    """Overwrite ``common_ap`` of the pairs with N = 0 (rare: same-attribute pairs) by that case's rule:
    decreasing shares, relevant = shares <= 2 / M_known. Only those pairs' columns are touched."""
    nothing_differs = (num_differ == 0) & (num_known > 0)
    if not bool(nothing_differs.any()):
        return
    columns = nothing_differs.nonzero()[:, 0]
    ranked_here = ranked[:, columns]
    known_here = ranked_here >= 0
    small = known_here & ((ranked_here & ~1).view(torch.float32) * num_known[columns]
                          <= 2.0 * total_known[columns])
    small = small.float()
    ranks = torch.arange(1, ranked.shape[0] + 1, device=ranked.device, dtype=torch.float32)[:, None]
    common_ap[columns] = (small * small.cumsum(0) / ranks).sum(0) / small.sum(0).clamp_min(1.0)


def _top_k_mask(keys: torch.Tensor, ranked: torch.Tensor, num_known: torch.Tensor, top_k: int) -> torch.Tensor:
    """(M, n) int32 0/1: the attribute is among its pair's top k shares.

    An attribute is in the top k if its key reaches the k-th largest known key (unknown keys are
    negative, below any known one; pairs with nothing known have no top k).
    """
    depth = min(top_k, ranked.shape[0])
    kth = (num_known.clamp(max=depth) - 1).clamp_min(0).long()
    threshold = ranked[:depth].gather(0, kth[None, :])
    threshold.masked_fill_((num_known == 0)[None, :], torch.iinfo(torch.int32).max)
    return (keys >= threshold).to(torch.int32)


def _agreement_counts(
    known_values: torch.Tensor, total_known: torch.Tensor, num_known: torch.Tensor, differ: torch.Tensor,
    known: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) int32 counts of the pairs where the attribute is known, and of those where [share >
    1 / M_known] equals [differs] (agreement)."""
    large = torch.gt(known_values * num_known[None, :], total_known[None, :]).to(torch.int32)
    disagree = large ^ differ
    if known is not None:
        disagree &= known
        known_count = _row_counts(known)
    else:
        num_attributes, num_pairs = known_values.shape
        known_count = torch.full((num_attributes,), num_pairs, dtype=torch.int32, device=known_values.device)
    return known_count, known_count - _row_counts(disagree)


def _row_counts(values: torch.Tensor) -> torch.Tensor:
    """(M,) sums of (M, n) int32 0/1 rows, kept in int32: the default int64 sum first copies the whole
    block to int64, which costs more than everything else here."""
    return values.sum(1, dtype=torch.int32)


class RelativeErrorHistogram:
    """Streaming distribution of relative errors on a log scale (1e-7 .. 1e3, ~1.2 % wide bins) for
    percentiles that need no per-pair storage; the mean and max are kept exactly."""

    LOG_MIN, LOG_MAX, BINS = -7.0, 3.0, 2000

    def __init__(self) -> None:
        self.counts = torch.zeros(self.BINS, dtype=torch.float64)
        self.total = 0.0
        self.count = 0
        self.maximum = 0.0

    def add(self, errors: torch.Tensor) -> None:
        if errors.numel() == 0:
            return
        errors = errors.double()
        self.total += float(errors.sum())
        self.count += errors.numel()
        self.maximum = max(self.maximum, float(errors.max()))
        logs = torch.log10(errors.clamp_min(10 ** self.LOG_MIN)).clamp(self.LOG_MIN, self.LOG_MAX)
        self.counts += torch.histc(logs, self.BINS, self.LOG_MIN, self.LOG_MAX).cpu()

    def add_counts(self, counts: torch.Tensor, total: float, count: int, maximum: float) -> None:
        """Add errors already binned on this histogram's bins (the evaluator's C kernel does that)."""
        if count == 0:
            return
        self.counts += counts.double().cpu()
        self.total += float(total)
        self.count += int(count)
        self.maximum = max(self.maximum, float(maximum))

    def merge(self, other: RelativeErrorHistogram) -> None:
        """Add another histogram's errors (e.g. one block's, computed on a worker thread)."""
        self.counts += other.counts
        self.total += other.total
        self.count += other.count
        self.maximum = max(self.maximum, other.maximum)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def percentile(self, fraction: float) -> float:
        """Approximate value below which ``fraction`` of the errors lie (bin's geometric centre)."""
        if not self.count:
            return float("nan")
        cumulative = self.counts.cumsum(0)
        index = int(torch.searchsorted(cumulative, torch.tensor(fraction * cumulative[-1].item(),
                                                                dtype=torch.float64)))
        index = min(index, self.BINS - 1)
        width = (self.LOG_MAX - self.LOG_MIN) / self.BINS
        return min(10 ** (self.LOG_MIN + (index + 0.5) * width), self.maximum)
