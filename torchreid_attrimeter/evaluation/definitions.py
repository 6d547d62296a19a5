"""The evaluator's metrics, one pair at a time: the readable specification (docs/method.md §6).

``ExplanationEvaluator`` computes the same figures fast, over tiles of query x gallery pairs, in two
ways: the torch path (``explanation_metrics``, vectorised over pairs, for CUDA and wherever no compiler
is found) and the fused C kernel (``pair_metrics.c``, on CPU). Neither is easy to read; this module is.
The tests hold both fast paths to these functions on cases with ties, unknown labels and pairs where
nothing differs. It is far too slow for real galleries (a Python loop per pair).

Conventions shared with the fast paths:
- Within a pair, attributes rank by their component d^m (all shares have the same denominator), compared
  as float32 with the lowest mantissa bit cleared; among equal keys the differing attribute ranks first
  (a tie is settled in favour of the explanation, in both X-mAP variants).
- Attributes unknown for either image are left out of the pair (its share denominator too).
- ADRE leaves out pairs whose target distance is at most ``ADRE_MIN_DISTANCE``.
- Retrieval follows torchreid's protocol: gallery images of the query's identity and camera are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from torchreid_attrimeter.decomposition import Decomposition

ADRE_MIN_DISTANCE = 1e-6


def rank_key(component: float) -> int:
    """A component as attributes are ranked within a pair: its float32 bits, lowest bit cleared."""
    return int(np.array([component], dtype=np.float32).view(np.int32)[0]) & ~1


def average_precision(relevant: Sequence[bool]) -> float:
    """Mean of precision@k over the positions k of the relevant items of a ranked list (at least one)."""
    hits, total = 0, 0.0
    for position, is_relevant in enumerate(relevant, start=1):
        if is_relevant:
            hits += 1
            total += hits / position
    return total / hits


class PairMetrics(NamedTuple):
    """What one pair contributes to the attribute metrics."""

    exclusive_ap: float | None  # X-mAP_e term: do the differing attributes take the largest shares?
    common_ap: float | None  # X-mAP_c term: do the shared attributes take the smallest shares?
    top_k: set[int]  # the k attributes with the largest shares
    large: set[int]  # attributes above the even share (agreement: large exactly when they differ)


def pair_metrics(components: Sequence[float], differ: Sequence[bool], known: Sequence[bool],
                 top_k: int) -> PairMetrics:
    """X-mAP_e / X-mAP_c terms, top-k set and large-share set of one pair (None: undefined for the pair).

    When nothing differs (N = 0), X-mAP_c asks that every attribute stay at most twice the even share.
    """
    attributes = [m for m in range(len(components)) if known[m]]
    if not attributes:
        return PairMetrics(None, None, set(), set())
    total = sum(float(components[m]) for m in attributes)
    order = sorted(attributes, key=lambda m: (rank_key(components[m]), bool(differ[m])), reverse=True)
    num_differ = sum(bool(differ[m]) for m in attributes)
    exclusive = average_precision([bool(differ[m]) for m in order]) if num_differ else None
    if num_differ == 0:
        common = average_precision([float(components[m]) * len(attributes) <= 2 * total for m in order])
    elif num_differ < len(attributes):
        common = average_precision([not differ[m] for m in reversed(order)])
    else:
        common = None
    large = {m for m in attributes if float(components[m]) * len(attributes) > total}
    return PairMetrics(exclusive, common, set(order[:top_k]), large)


def share_auc(differing: Sequence[float], shared: Sequence[float]) -> float | None:
    """P(share when the attribute differs > share when it is shared), ties counted half; None when either
    kind of pair is missing. (The evaluator compares shares binned 0.54 % wide, so it is close, not equal.)"""
    if not differing or not shared:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in differing for n in shared)
    return wins / (len(differing) * len(shared))


def retrieval(distances: np.ndarray, query_pids, gallery_pids, query_camids, gallery_camids,
              ranks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """mAP and rank-k (in %) of a (queries, gallery) distance matrix, torchreid's protocol, stable order."""
    aps, firsts = [], []
    for q in range(len(query_pids)):
        kept = [g for g in np.argsort(distances[q], kind="stable")
                if not (gallery_pids[g] == query_pids[q] and gallery_camids[g] == query_camids[q])]
        positions = [i + 1 for i, g in enumerate(kept) if gallery_pids[g] == query_pids[q]]
        if positions:
            aps.append(np.mean([(j + 1) / p for j, p in enumerate(positions)]))
            firsts.append(positions[0])
    results = {"mAP": 100 * float(np.mean(aps))}
    for rank in ranks:
        results[f"rank{rank}"] = 100 * float(np.mean([first <= rank for first in firsts]))
    return results


class Split(NamedTuple):
    """The query or gallery side: decompositions and, per image, identity, camera and attribute labels."""

    decomposition: Decomposition
    pids: torch.Tensor
    camids: torch.Tensor
    labels: torch.Tensor  # (n, M) 0/1
    known: torch.Tensor  # (n, M) bool: the label is annotated


def _distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """The distance of two embeddings under ``metric`` ('cosine': 1 - cos, else Euclidean)."""
    if metric == "cosine":
        return 1 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.linalg.norm(a - b))


def _pair_distances(query: Split, gallery: Split, metric: str, num_attributes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's target distance (Q, G) and attribute components d^m (Q, G, M), one at a time."""
    q_emb, g_emb = query.decomposition.embedding.numpy(), gallery.decomposition.embedding.numpy()
    q_att, g_att = query.decomposition.attribute_embeddings.numpy(), gallery.decomposition.attribute_embeddings.numpy()
    target = np.array([[_distance(a, b, metric) for b in g_emb] for a in q_emb])
    components = np.array([[[_distance(q_att[q, m], g_att[g, m], metric) for m in range(num_attributes)]
                            for g in range(len(g_emb))] for q in range(len(q_emb))])
    return target, components


def evaluate_pairs(query: Split, gallery: Split, attribute_names: Sequence[str], metric: str = "euclidean",
                   top_k: int = 3, pairs: Sequence[tuple[int, int]] | None = None,
                   ranks: Sequence[int] = (1, 5, 10)) -> dict:
    """Every figure of the evaluator, pair by pair: retrieval of the target and of the interpreter (over
    all pairs), and ADRE, X-mAP_e, X-mAP_c and the per-attribute figures over ``pairs`` (q, g) (default:
    all). Same keys as ``ExplanationEvaluator.evaluate``, plus ``ADRE_errors`` (each pair's error)."""
    num_attributes = len(attribute_names)
    target, components = _pair_distances(query, gallery, metric, num_attributes)
    results = {}
    identities = (query.pids.numpy(), gallery.pids.numpy(), query.camids.numpy(), gallery.camids.numpy())
    for name, distances in (("target", target), ("interpreter", components.mean(-1))):
        results.update({f"{name}_{key}": value for key, value in retrieval(distances, *identities, ranks).items()})

    num_queries, num_gallery = len(query.decomposition.embedding), len(gallery.decomposition.embedding)
    pair_list = pairs if pairs is not None else [(q, g) for q in range(num_queries) for g in range(num_gallery)]
    errors, exclusive, common = [], [], []
    top, top_differ, differ_count, known_count, agree = (np.zeros(num_attributes) for _ in range(5))
    shares = [([], []) for _ in range(num_attributes)]  # per attribute: where it differs, where it is shared
    for q, g in pair_list:
        if target[q, g] > ADRE_MIN_DISTANCE:
            errors.append(abs(target[q, g] - components[q, g].mean()) / target[q, g])
        known = query.known[q].numpy() & gallery.known[g].numpy()
        differ = (query.labels[q].numpy() != gallery.labels[g].numpy()) & known
        pair = pair_metrics(components[q, g].astype(np.float32), differ, known, top_k)
        if pair.exclusive_ap is not None:
            exclusive.append(pair.exclusive_ap)
        if pair.common_ap is not None:
            common.append(pair.common_ap)
        total = sum(components[q, g, m] for m in range(num_attributes) if known[m])
        for m in range(num_attributes):
            top[m] += m in pair.top_k
            top_differ[m] += m in pair.top_k and differ[m]
            differ_count[m] += differ[m]
            known_count[m] += known[m]
            agree[m] += known[m] and ((m in pair.large) == bool(differ[m]))
            if known[m]:
                shares[m][0 if differ[m] else 1].append(components[q, g, m] / total)
    results.update({"ADRE": 100 * float(np.mean(errors)), "ADRE_errors": np.array(errors),
                    "X-mAP_e": 100 * float(np.mean(exclusive)), "X-mAP_e_pairs": len(exclusive),
                    "X-mAP_c": 100 * float(np.mean(common)), "X-mAP_c_pairs": len(common)})

    def percent(part, whole):
        return 100 * part / whole if whole else None

    results["per_attribute"] = {
        name: {f"top{top_k}_precision": percent(top_differ[m], top[m]),
               f"top{top_k}_recall": percent(top_differ[m], differ_count[m]),
               "agreement": percent(agree[m], known_count[m]),
               "share_auc": share_auc(*shares[m])}
        for m, name in enumerate(attribute_names)}
    return results


def query_totals(query: Split, gallery: Split, metric: str = "euclidean") -> dict[str, np.ndarray]:
    """What ``ExplanationEvaluator(per_query=True)`` adds up for the model audit, pair by pair:
    ``share_sums`` (Q, 4, M), the sum over the query's pairs of each category (2 * same identity + same
    camera) of the shares p^m = d^m / sum_k d^k over all M attributes (labels play no part; a pair whose
    components sum to 0 has no shares and is not counted), ``pair_counts`` (Q, 4), and the target's
    rank-1 pair under torchreid's protocol: ``first_index`` (Q,) (the first in a stable order, -1 when no
    gallery image is left) and its ``first_shares`` (Q, M)."""
    def distance(a, b):
        if metric == "cosine":
            return 1 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        return float(np.linalg.norm(a - b))

    q_emb, g_emb = query.decomposition.embedding.numpy(), gallery.decomposition.embedding.numpy()
    q_att, g_att = query.decomposition.attribute_embeddings.numpy(), gallery.decomposition.attribute_embeddings.numpy()
    num_query, num_attributes = q_att.shape[:2]
    sums, counts = np.zeros((num_query, 4, num_attributes)), np.zeros((num_query, 4), dtype=np.int64)
    first_index = np.full(num_query, -1)
    first_shares = np.full((num_query, num_attributes), np.nan)
    for q in range(num_query):
        best = np.inf
        for g in range(len(g_emb)):
            same_identity = bool(query.pids[q] == gallery.pids[g])
            same_camera = bool(query.camids[q] == gallery.camids[g])
            components = np.array([distance(q_att[q, m], g_att[g, m]) for m in range(num_attributes)])
            total = components.sum()
            if total > 0:
                sums[q, 2 * same_identity + same_camera] += components / total
                counts[q, 2 * same_identity + same_camera] += 1
            target = distance(q_emb[q], g_emb[g])
            if not (same_identity and same_camera) and target < best:
                best, first_index[q] = target, g
                first_shares[q] = components / total if total > 0 else np.nan
    return {"share_sums": sums, "pair_counts": counts, "first_index": first_index, "first_shares": first_shares}
