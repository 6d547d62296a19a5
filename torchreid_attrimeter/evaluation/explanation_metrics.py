"""Per-pair explanation metrics of the method page §6 on blocks of pairs, vectorised over pairs:
X-mAP_e, X-mAP_c (with the N = 0 rule), top-k attribute precision/recall and attribute agreement.

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


def ranking_keys(components: torch.Tensor, differ: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(M, n) int32 keys: component bits with the lowest bit = differs; UNKNOWN_KEY where unknown."""
    bits = components.float().clamp_min(0.0).contiguous().view(torch.int32)
    keys = (bits & ~1) | differ.to(torch.int32)
    return torch.where(known, keys, torch.full_like(keys, UNKNOWN_KEY))


@dataclass
class PairExplanationStats:
    """Per-pair and per-attribute results for a block of n pairs.

    exclusive_ap, common_ap: (n,) float64 AP of the pair (0 where undefined);
    has_exclusive: (n,) bool, N >= 1; has_common: (n,) bool, M_known - N >= 1.
    Per attribute (M,) int32 counts: top_k (in the pair's top-k shares), top_k_differ (in top-k and
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


def pair_explanation_stats(
    components: torch.Tensor, differ: torch.Tensor, known: torch.Tensor, top_k: int = 3
) -> PairExplanationStats:
    """Explanation metrics of n pairs from their components (M, n) and labels.

    components: (M, n) d^m >= 0; differ: (M, n) bool, the two identities differ in attribute m;
    known: (M, n) bool, attribute m is annotated for both images (others are excluded from the pair).
    """
    num_attributes = components.shape[0]
    differ = differ & known
    keys = ranking_keys(components, differ, known)
    ranked = sort_rows_descending(keys).unbind(0)
    # Row by row over the M ranked positions: each step works on one length-n row that stays in cache.
    num_known = known.sum(0, dtype=torch.int32).float()
    num_differ = differ.sum(0, dtype=torch.int32).float()
    num_shared = num_known - num_differ
    differ_seen = torch.zeros_like(num_known)
    shared_seen = torch.zeros_like(num_known)
    exclusive_sum = torch.zeros_like(num_known)
    common_sum = torch.zeros_like(num_known)
    for index, row in enumerate(ranked):
        is_differ = (row & 1).float()  # UNKNOWN_KEY has its lowest bit clear
        is_shared = (row >= 0).float() - is_differ
        # X-mAP_e: decreasing shares, relevant = differing: precision at this position times relevance.
        differ_seen += is_differ
        exclusive_sum.addcmul_(is_differ, differ_seen, value=1.0 / (index + 1))
        # X-mAP_c with N >= 1: increasing shares = the known part read backwards. This position is
        # M_known - index in increasing order; the shared attributes up to it are those from here on.
        shared_from_here = num_shared - shared_seen
        shared_seen += is_shared
        common_sum.addcmul_(is_shared, shared_from_here / (num_known - index).clamp_min(1.0))
    exclusive_ap = exclusive_sum / num_differ.clamp_min(1.0)
    common_ap = common_sum / num_shared.clamp_min(1.0)

    known_components = components.float().clamp_min(0.0) * known
    total_known = known_components.sum(0)
    # X-mAP_c with N = 0 (rare: same-attribute pairs): decreasing shares, relevant = shares <= 2 / M_known.
    nothing_differs = (num_differ == 0) & (num_known > 0)
    if bool(nothing_differs.any()):
        columns = nothing_differs.nonzero()[:, 0]
        values = torch.stack(ranked)[:, columns]
        known_here = values >= 0
        small = known_here & ((values & ~1).view(torch.float32) * num_known[columns] <= 2.0 * total_known[columns])
        small = small.float()
        position = torch.arange(1, num_attributes + 1, device=components.device, dtype=torch.float32)[:, None]
        common_ap[columns] = (small * small.cumsum(0) / position).sum(0) / small.sum(0).clamp_min(1.0)

    # Top-k: an attribute is in the pair's top k if its key reaches the k-th largest known key.
    kth = (torch.clamp(num_known, max=top_k) - 1).clamp_min(0).long()
    threshold = torch.stack(ranked[:top_k]).gather(0, kth.clamp_max(min(top_k, num_attributes) - 1)[None, :])
    in_top_k = known & (keys >= threshold)
    large = torch.gt(known_components * num_known, total_known)  # share > 1 / M_known
    agree = known & (large == differ)

    has_exclusive = num_differ >= 1
    has_common = num_shared >= 1
    zero = torch.zeros_like(exclusive_ap)
    return PairExplanationStats(
        exclusive_ap=torch.where(has_exclusive, exclusive_ap, zero).double(),
        has_exclusive=has_exclusive,
        common_ap=torch.where(has_common, common_ap, zero).double(),
        has_common=has_common,
        top_k=(in_top_k).sum(1, dtype=torch.int32),
        top_k_differ=(in_top_k & differ).sum(1, dtype=torch.int32),
        differ=(differ).sum(1, dtype=torch.int32),
        known=(known).sum(1, dtype=torch.int32),
        agree=(agree).sum(1, dtype=torch.int32),
    )


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
