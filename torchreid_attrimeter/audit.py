"""Model audit: what a ReID model relies on across a whole dataset, and where it goes wrong
(docs/audit.md).

One pass of the :class:`ExplanationEvaluator` over every query x gallery pair (``per_query=True``: the
audit's sums are added up in the evaluator's own tiles, no second pair loop) gives, per query, the
mean share p^m = d^m / sum_k d^k of every attribute over its pairs by category (true matches, other
identities from the same or another camera) and the shares of the target's rank-1 pair. From these:

- reliance: the mean share over true matches, over all pairs and over the rank-1 errors (a wrong
  person ranked first), each a mean over queries of the query's mean; the even share is 1/M;
- sensitivity: the evaluator's per-attribute share AUC (does the share grow when the attribute
  differs?), which needs attribute labels;
- blind spots: attributes whose labels differ in rank-1 errors but that get less than the even
  share there, with example pairs;
- where: the mean attention map per attribute (``explain.AverageMaps``), when a model is at hand;
- splits: same camera vs different camera, and the worst queries with their rank-1 explanation;
- comparison of two or more interpreters on the same data, with bootstrap confidence intervals over
  queries; a verdict only where the interval excludes zero.

The feature-level entry point is :class:`AuditAccumulator` (feed decompositions, get a
:class:`ModelAudit`); :func:`audit_checkpoints` runs interpreter checkpoints over a torchreid dataset;
:func:`compare_audits` compares audits. Writing (JSON, charts, HTML) is in ``audit_output``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from torchreid_attrimeter.attributes import NamedAttributes
from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.evaluation.evaluator import ExplanationEvaluator
from torchreid_attrimeter.evaluation.query_totals import PAIR_CATEGORIES, QueryTotals

AUDIT_FORMAT = "attrimeter-audit/1"
# Reliance measures, in the order the tables show them: (key, what it averages).
RELIANCE_MEASURES = (
    ("true_matches", "pairs of the query's identity from another camera"),
    ("all_pairs", "every pair of torchreid's protocol (the query's identity seen by its own camera left out)"),
    ("rank1_errors", "the target's rank-1 pair of queries whose rank-1 image shows another identity"),
)
SPLIT_MEASURES = (
    ("same_camera", "pairs of other identities seen by the query's camera"),
    ("different_camera", "pairs seen by another camera (true matches included)"),
)
COMPARED_MEASURES = tuple(key for key, _ in RELIANCE_MEASURES)
_OTHER_OTHER, _OTHER_SAME, _MATCH_OTHER, _MATCH_SAME = range(len(PAIR_CATEGORIES))


class AuditError(AttriMeterError, ValueError):
    """Input the audit cannot use (interpreters of different schemas or data, bad options); the message
    names what differs and the fix."""


@dataclass
class SplitLabels:
    """Attribute labels of one split: values (N, M) in {0, 1} and known (N, M) bool."""

    values: torch.Tensor
    known: torch.Tensor


@dataclass
class ModelAudit(NamedAttributes):
    """The audit of one interpreter (and its target) on one query / gallery set.

    ``evaluation`` is the evaluator's own result dict (retrieval, ADRE, X-mAP, per-attribute share
    AUC); ``totals`` its per-query sums. Labels are None when the data has none of this schema
    (``labels_missing`` then says why); paths are None for features without files; ``maps`` is set by
    :func:`audit_checkpoints` (the mean attention maps).
    """

    name: str
    attribute_names: tuple[str, ...]
    attribute_groups: dict[str, tuple[str, ...]]
    metric: str
    evaluation: dict[str, Any]
    totals: QueryTotals
    query_labels: SplitLabels | None = None
    gallery_labels: SplitLabels | None = None
    labels_missing: str | None = None
    query_paths: list[str] | None = None
    gallery_paths: list[str] | None = None
    maps: Any = None  # explain.AverageMaps
    maps_images: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, target, ... (for the JSON)
    worst_queries: int = 10
    examples: int = 3

    # --- per-query values (Q, M), NaN where the query has no such pair --------------------------------

    def per_query(self, measure: str) -> torch.Tensor:
        """(Q, M) float64: each query's mean share per attribute for ``measure`` (a RELIANCE_MEASURES or
        SPLIT_MEASURES key); rows of queries without such pairs are NaN."""
        sums, counts = self.totals.share_sums, self.totals.pair_counts.double()
        if measure == "rank1_errors":
            values = self.totals.first_shares.double().clone()
            values[~self.rank1_errors] = float("nan")
            return values
        categories = {
            "true_matches": (_MATCH_OTHER,),
            "all_pairs": (_OTHER_OTHER, _OTHER_SAME, _MATCH_OTHER),
            "same_camera": (_OTHER_SAME,),
            "different_camera": (_OTHER_OTHER, _MATCH_OTHER),
        }.get(measure)
        if categories is None:
            raise AuditError(f"unknown measure '{measure}': one of "
                             f"{[key for key, _ in RELIANCE_MEASURES + SPLIT_MEASURES]}")
        total = sums[:, list(categories)].sum(1)
        count = counts[:, list(categories)].sum(1)
        values = total / count.clamp_min(1)[:, None]
        values[count == 0] = float("nan")
        return values

    @property
    def rank1_errors(self) -> torch.Tensor:
        """(Q,) bool: the target ranks an image of another identity first (queries with a valid match)."""
        return (self.totals.first_index >= 0) & ~self.totals.first_correct & self.totals.valid

    def reliance(self, measure: str) -> tuple[torch.Tensor, int]:
        """(M,) mean over queries of ``per_query(measure)``, and the number of queries averaged."""
        values = self.per_query(measure)
        defined = ~torch.isnan(values[:, 0])
        if not bool(defined.any()):
            return torch.full((self.num_attributes,), float("nan"), dtype=torch.float64), 0
        return values[defined].mean(0), int(defined.sum())

    # --- label-based parts ----------------------------------------------------------------------------

    @property
    def has_labels(self) -> bool:
        return self.query_labels is not None and self.gallery_labels is not None

    def rank1_error_differences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the rank-1 errors: (query indices (E,), differ (E, M) bool: both labels known and
        different, shares (E, M))."""
        queries = self.rank1_errors.nonzero()[:, 0]
        gallery = self.totals.first_index[queries]
        query_labels, gallery_labels = self.query_labels, self.gallery_labels
        known = query_labels.known[queries] & gallery_labels.known[gallery]
        differ = (query_labels.values[queries] > 0.5) != (gallery_labels.values[gallery] > 0.5)
        return queries, differ & known, self.totals.first_shares[queries].double()

    def blind_spots(self) -> dict[str, Any]:
        """Per attribute, over the rank-1 errors whose labels differ in it: how many, the mean share it
        gets there and how often that share is below the even share. The blind spots ("the model
        confused these people although they differ in X") are the attributes that get less than the
        even share in most of the rank-1 errors where they differ (their median share there is below
        it: a few pairs with a large share do not hide the rest), most such errors first, each with
        example pairs (the lowest shares)."""
        if not self.has_labels:
            return {"available": False, "reason": self.labels_missing or "no attribute labels"}
        queries, differ, shares = self.rank1_error_differences()
        even = self.even_share
        per_attribute, spots = {}, []
        for m, name in enumerate(self.attribute_names):
            rows = differ[:, m].nonzero()[:, 0]
            values = shares[rows, m]
            below = int((values < even).sum())
            entry = {
                "errors_differing": len(rows),
                "mean_share_when_differing": float(values.mean()) if len(rows) else None,
                "below_even_share": below,
                "below_even_rate": below / len(rows) if len(rows) else None,
            }
            entry["blind_spot"] = bool(len(rows) and 2 * below > len(rows))
            per_attribute[name] = entry
            if entry["blind_spot"]:
                order = torch.argsort(values, stable=True)[:self.examples]
                entry["examples"] = [self.pair_record(int(queries[rows[int(index)]]), m) for index in order]
                spots.append(name)
        spots.sort(key=lambda name: -per_attribute[name]["below_even_share"])
        return {"available": True, "rank1_errors": len(queries), "attributes": spots, "per_attribute": per_attribute}

    def pair_record(self, query: int, attribute: int | None = None) -> dict[str, Any]:
        """A query and its target rank-1 image, for examples and the worst queries."""
        gallery = int(self.totals.first_index[query])
        record: dict[str, Any] = {
            "query": query, "query_pid": int(self.totals.query_pids[query]),
            "query_camid": int(self.totals.query_camids[query]),
            "gallery": gallery, "gallery_pid": int(self.totals.gallery_pids[gallery]),
            "gallery_camid": int(self.totals.gallery_camids[gallery]),
            "target_distance": _finite(self.totals.first_distance[query]),
        }
        if self.query_paths is not None and self.gallery_paths is not None:
            record["query_path"] = self.query_paths[query]
            record["gallery_path"] = self.gallery_paths[gallery]
        if attribute is not None:
            share = float(self.totals.first_shares[query, attribute])
            record["share"] = share
            record["times_even_share"] = share / self.even_share
        return record

    def top_attributes(self, query: int, k: int = 3) -> list[dict[str, Any]]:
        """The k largest shares of the query's rank-1 pair, with whether the labels differ."""
        shares = self.totals.first_shares[query]
        if bool(torch.isnan(shares).any()):
            return []
        gallery = int(self.totals.first_index[query])
        differ = known = None
        if self.has_labels:
            differ = ((self.query_labels.values[query] > 0.5) != (self.gallery_labels.values[gallery] > 0.5))
            known = self.query_labels.known[query] & self.gallery_labels.known[gallery]
        top = torch.argsort(shares, descending=True, stable=True)[:k]
        return [{"name": self.attribute_names[int(m)], "share": float(shares[m]),
                 "times_even_share": float(shares[m]) / self.even_share,
                 "labels_differ": None if differ is None or not bool(known[m]) else bool(differ[m])} for m in top]

    def worst(self) -> list[dict[str, Any]]:
        """The queries the target ranks worst (latest first true match, then lowest AP), each with its
        rank-1 pair and that pair's top attributes."""
        valid = self.totals.valid.nonzero()[:, 0]
        if not len(valid):
            return []
        # Lexicographic: by first-match position descending, then AP ascending (stable sorts, last key first).
        order = valid[torch.argsort(self.totals.average_precision[valid], stable=True)]
        order = order[torch.argsort(self.totals.first_match[order], descending=True, stable=True)]
        records = []
        for query in order[:self.worst_queries].tolist():
            record = self.pair_record(query) if self.totals.first_index[query] >= 0 else {"query": query}
            record.update(first_true_match_rank=int(self.totals.first_match[query]) + 1,
                          average_precision=float(self.totals.average_precision[query]),
                          rank1_correct=bool(self.totals.first_correct[query]),
                          top_attributes=self.top_attributes(query))
            records.append(record)
        return records

    def sensitivity(self) -> dict[str, Any]:
        per_attribute = self.evaluation.get("per_attribute") or {}
        if not self.has_labels or not per_attribute:
            return {"available": False, "reason": self.labels_missing or "no attribute labels"}
        return {"available": True, "share_auc": {name: per_attribute[name]["share_auc"] for name in self.attribute_names},
                "share_auc_macro": self.evaluation.get("share_AUC_macro")}

    # --- everything as JSON -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        even = self.even_share
        reliance: dict[str, Any] = {}
        queries_averaged = {}
        for measure, _ in RELIANCE_MEASURES + SPLIT_MEASURES:
            values, count = self.reliance(measure)
            queries_averaged[measure] = count
            reliance[measure] = {name: _finite(values[m]) for m, name in enumerate(self.attribute_names)}
        ranked = {measure: _rank_order(reliance[measure], self.attribute_names) for measure, _ in RELIANCE_MEASURES}
        evaluation = {key: value for key, value in self.evaluation.items() if key != "per_attribute"}
        where = None
        if self.maps is not None:
            where = {"available": True, "images": self.maps_images, "map_size": list(self.maps.with_attribute.shape[-2:]),
                     "labelled": self.has_labels,
                     "attributes": {name: {"images_with": int(self.maps.with_count[m]),
                                           "images_without": int(self.maps.without_count[m]),
                                           "mean_map_with": _rounded(self.maps.with_attribute[m]),
                                           "mean_map_without": _rounded(self.maps.without_attribute[m])
                                           if int(self.maps.without_count[m]) else None}
                                    for m, name in enumerate(self.attribute_names)}}
        return {
            "name": self.name,
            "source": self.source,
            "metric": self.metric,
            "even_share": even,
            "counts": {
                "queries": len(self.totals.query_pids), "gallery": len(self.totals.gallery_pids),
                "valid_queries": int(self.totals.valid.sum()),
                "rank1_errors": int(self.rank1_errors.sum()),
                "pairs": {category: int(self.totals.pair_counts[:, index].sum())
                          for index, category in enumerate(PAIR_CATEGORIES)},
                "queries_averaged": queries_averaged,
            },
            "evaluation": evaluation,
            "reliance": reliance,
            "reliance_order": ranked,
            "sensitivity": self.sensitivity(),
            "blind_spots": self.blind_spots(),
            "where": where if where is not None else {"available": False,
                                                      "reason": "no mean maps were computed (a feature-level audit, "
                                                                "or average_maps_images=0)"},
            "worst_queries": self.worst(),
        }


def _finite(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _rounded(values: torch.Tensor) -> list:
    return np.round(values.double().numpy(), 6).tolist()


def _rank_order(values: dict[str, float | None], names: Sequence[str]) -> list[str]:
    """Attribute names by decreasing value (undefined last), ties in schema order."""
    return sorted(names, key=lambda name: (values[name] is None, -(values[name] or 0.0)))


# --- the feature-level entry point ---------------------------------------------------------------------


class AuditAccumulator:
    """Feed query and gallery decompositions (as to an ExplanationEvaluator), then ``finish()`` for
    the :class:`ModelAudit`. Evaluator options (memory_budget_mb, native, progress, ...) are passed on."""

    def __init__(self, attribute_names: Sequence[str], metric: str = "euclidean", **evaluator_options: Any):
        for option in ("pairs", "per_query", "pair_fraction"):
            if option in evaluator_options:
                raise AuditError(f"the audit needs every pair: '{option}' cannot be set")
        self.attribute_names = tuple(attribute_names)
        self.evaluator = ExplanationEvaluator(self.attribute_names, metric=metric, per_query=True,
                                              **evaluator_options)
        self.labels: dict[str, list] = {"query": [], "gallery": []}
        self.paths: dict[str, list] = {"query": [], "gallery": []}

    def process(self, decomposition: Decomposition, pids: Any, camids: Any, attributes: Any | None = None,
                attributes_known: Any | None = None, split: str = "query", paths: Sequence[str] | None = None) -> None:
        self.evaluator.process(decomposition, pids, camids, attributes, attributes_known, split=split)
        if attributes is not None:
            values = torch.as_tensor(np.asarray(attributes) if not isinstance(attributes, torch.Tensor)
                                     else attributes).detach().cpu().float()
            known = (torch.ones_like(values, dtype=torch.bool) if attributes_known is None
                     else torch.as_tensor(np.asarray(attributes_known) if not isinstance(attributes_known, torch.Tensor)
                                          else attributes_known).detach().cpu().bool())
            self.labels[split].append((values, known))
        self.paths[split].append(None if paths is None else list(paths))

    def finish(self, name: str = "model", *, attribute_groups=None, labels_missing: str | None = None,
               worst_queries: int = 10, examples: int = 3, source: dict | None = None) -> ModelAudit:
        from torchreid_attrimeter.explain import _groups_for

        evaluation = self.evaluator.evaluate()
        labels = {}
        for split in ("query", "gallery"):
            parts = self.labels[split]
            labels[split] = (SplitLabels(torch.cat([values for values, _ in parts]), torch.cat([known for _, known in parts]))
                             if parts else None)
        with_labels = labels["query"] is not None and labels["gallery"] is not None
        if not with_labels and labels_missing is None:
            labels_missing = "the data carries no attribute labels"
        paths = {split: None if any(part is None for part in parts) or not parts else [p for part in parts for p in part]
                 for split, parts in self.paths.items()}
        return ModelAudit(
            name=name, attribute_names=self.attribute_names,
            attribute_groups=_groups_for(self.attribute_names, attribute_groups), metric=self.evaluator.metric,
            evaluation=evaluation, totals=self.evaluator.query_totals,
            query_labels=labels["query"] if with_labels else None,
            gallery_labels=labels["gallery"] if with_labels else None,
            labels_missing=None if with_labels else labels_missing,
            query_paths=paths["query"], gallery_paths=paths["gallery"],
            worst_queries=worst_queries, examples=examples, source=dict(source or {}),
        )


# --- comparing interpreters ------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Differences of reliance between interpreters on the same queries, each against the first
    (the reference): per other interpreter, measure and attribute, the difference (other minus
    reference), its bootstrap interval and a verdict ('higher' / 'lower') only where the interval
    excludes 0."""

    reference: str
    others: list[str]
    resamples: int
    confidence: float
    seed: int
    differences: dict[str, dict[str, dict[str, dict[str, Any]]]]  # other -> measure -> attribute -> entry

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "others": self.others, "resamples": self.resamples,
                "confidence": self.confidence, "seed": self.seed, "unit": "share (difference of means over queries)",
                "differences": self.differences}


def check_comparable(audits: Sequence[ModelAudit]) -> None:
    """Same attribute schema and the same queries / gallery, else an AuditError naming both."""
    first = audits[0]
    names = [audit.name for audit in audits]
    if len(set(names)) != len(names):
        raise AuditError(f"the interpreters need distinct names to be compared, got {names}")
    for other in audits[1:]:
        if other.attribute_names != first.attribute_names:
            raise AuditError(
                f"'{first.name}' and '{other.name}' explain different attribute schemas "
                f"({first.num_attributes} attributes: {', '.join(first.attribute_names[:4])}, ... against "
                f"{other.num_attributes}: {', '.join(other.attribute_names[:4])}, ...): compare interpreters "
                f"trained on the same schema"
            )
        for split in ("query", "gallery"):
            mine, theirs = getattr(first.totals, f"{split}_pids"), getattr(other.totals, f"{split}_pids")
            if not torch.equal(mine, theirs):
                raise AuditError(f"'{first.name}' and '{other.name}' were audited on different {split} sets "
                                 f"({len(mine)} and {len(theirs)} images): compare on the same data")


def bootstrap_difference(reference: torch.Tensor, other: torch.Tensor, resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Difference of the per-attribute means over queries (other minus reference) of (Q, M) per-query
    values (NaN rows: the query does not count for that interpreter), with a percentile bootstrap
    interval: the queries are resampled with replacement ``resamples`` times (seeded), the same
    resample for both. Returns (difference (M,), low (M,), high (M,))."""
    num_queries = reference.shape[0]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, num_queries, (resamples, num_queries), generator=generator)
    weights = torch.zeros(resamples, num_queries, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, num_queries, dtype=torch.float64))

    def means(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        defined = (~torch.isnan(values[:, 0])).double()
        counts = weights @ defined  # (B,)
        return (weights @ torch.nan_to_num(values, nan=0.0)) / counts[:, None]  # NaN where no query counts

    full = torch.ones(1, num_queries, dtype=torch.float64)
    difference = (means(other, full) - means(reference, full))[0]
    resampled = means(other, weights) - means(reference, weights)
    tail = (1.0 - confidence) / 2
    low = torch.nanquantile(resampled, tail, dim=0)
    high = torch.nanquantile(resampled, 1.0 - tail, dim=0)
    return difference, low, high


def compare_audits(audits: Sequence[ModelAudit], resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> Comparison:
    """Each audit after the first against the first, per measure of COMPARED_MEASURES."""
    if len(audits) < 2:
        raise AuditError("a comparison needs at least two interpreters")
    if resamples < 10 or not 0.5 < confidence < 1.0:
        raise AuditError(f"need at least 10 resamples and a confidence in (0.5, 1): got {resamples}, {confidence}")
    check_comparable(audits)
    reference = audits[0]
    differences = {}
    for other in audits[1:]:
        per_measure = {}
        for measure in COMPARED_MEASURES:
            difference, low, high = bootstrap_difference(reference.per_query(measure), other.per_query(measure),
                                                         resamples, seed, confidence)
            entries = {}
            for m, name in enumerate(reference.attribute_names):
                entry = {"difference": _finite(difference[m]), "low": _finite(low[m]), "high": _finite(high[m])}
                verdict = None
                if entry["low"] is not None and entry["high"] is not None:
                    if entry["low"] > 0:
                        verdict = "higher"
                    elif entry["high"] < 0:
                        verdict = "lower"
                entry["verdict"] = verdict
                entries[name] = entry
            per_measure[measure] = entries
        differences[other.name] = per_measure
    return Comparison(reference.name, [audit.name for audit in audits[1:]], resamples, confidence, seed, differences)


# --- a whole run: interpreters over a dataset ----------------------------------------------------------


@dataclass
class AuditRun:
    """Audits of one or more interpreters on one dataset, and their comparison (None for one)."""

    audits: list[ModelAudit]
    dataset: dict[str, Any]
    comparison: Comparison | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        first = self.audits[0]
        return {
            "format": AUDIT_FORMAT,
            "dataset": self.dataset,
            "attributes": list(first.attribute_names),
            "groups": {group: list(names) for group, names in first.attribute_groups.items()},
            "even_share": first.even_share,
            "measures": {key: text for key, text in RELIANCE_MEASURES + SPLIT_MEASURES},
            "interpreters": [audit.to_dict() for audit in self.audits],
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "timings_s": self.timings,
        }


def load_dataset(name: str, root: str):
    """The torchreid dataset (attribute datasets are registered by importing torchreid_attrimeter)."""
    from torchreid_attrimeter import compat

    datasets = compat.torchreid_submodule("data.datasets")
    with contextlib.redirect_stdout(io.StringIO()):  # torchreid prints its statistics table
        return datasets.init_image_dataset(name, root=root, mode="gallery")


def dataset_labels(dataset, items, attribute_names: tuple[str, ...]) -> tuple[SplitLabels | None, str | None]:
    """The labels of torchreid items (path, pid, camid, ...) in the interpreter's schema, or (None, why)."""
    names = tuple(getattr(dataset, "attribute_names", ()) or ())
    if not names:
        return None, (f"the dataset '{type(dataset).__name__}' has no attribute labels: the reliance parts "
                      "ran; sensitivity, blind spots and the with/without maps need an attribute dataset "
                      "(e.g. market1501_attr, dukemtmcreid_attr)")
    if names != tuple(attribute_names):
        return None, (f"the dataset's labels are of another schema ({len(names)} attributes) than the "
                      f"interpreter's ({len(attribute_names)}): the label-based parts are left out")
    values, known = zip(*(dataset.labels_of(item[0]) for item in items))
    return SplitLabels(torch.as_tensor(np.stack(values), dtype=torch.float32),
                       torch.as_tensor(np.stack(known), dtype=torch.bool)), None


def _interpreter_name(path: str, taken: set[str]) -> str:
    """A short unique name for a checkpoint: the run folder's name (…/<run>/model/model.pth.tar-N)."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    name = parts[-3] if len(parts) >= 3 and parts[-2] == "model" else os.path.basename(path)
    unique, number = name, 2
    while unique in taken:
        unique, number = f"{name}-{number}", number + 1
    taken.add(unique)
    return unique


def load_explainers(checkpoints: Sequence[str], *, names: Sequence[str] | None = None, target_weights=None,
                    trusted: bool = False, device=None, **explainer_options):
    """Explainers of every checkpoint, checked to share one attribute schema before any heavy work.
    ``target_weights``: one path for all, a list (one per checkpoint), or None."""
    from torchreid_attrimeter.explain import Explainer

    if not checkpoints:
        raise AuditError("give at least one interpreter checkpoint")
    if names is not None and len(names) != len(checkpoints):
        raise AuditError(f"{len(names)} names for {len(checkpoints)} checkpoints")
    if target_weights is None or isinstance(target_weights, (str, os.PathLike)):
        target_weights = [target_weights] * len(checkpoints)
    if len(target_weights) != len(checkpoints):
        raise AuditError(f"{len(target_weights)} target weights for {len(checkpoints)} checkpoints")
    explainers, taken = [], set(names or ())
    for index, (path, weights) in enumerate(zip(checkpoints, target_weights)):
        explainer = Explainer.from_checkpoint(path, target_weights=weights or None, trusted=trusted, device=device,
                                              **explainer_options)
        name = names[index] if names is not None else _interpreter_name(path, taken)
        if explainers and explainer.attribute_names != explainers[0][1].attribute_names:
            first_name, first = explainers[0][0], explainers[0][1]
            raise AuditError(
                f"the interpreters '{first_name}' ({checkpoints[0]}: schema "
                f"{first.checkpoint_record.get('schema')}, {len(first.attribute_names)} attributes) and '{name}' "
                f"({path}: schema {explainer.checkpoint_record.get('schema')}, {len(explainer.attribute_names)} "
                f"attributes) explain different attribute schemas: a comparison needs one schema"
            )
        explainers.append((name, explainer, path))
    return explainers


def _decompose_batches(explainer, paths: Sequence[str], batch_size: int, description: str, progress: bool):
    for start in tqdm(range(0, len(paths), batch_size), desc=description, unit="batch", disable=not progress):
        chunk = list(paths[start:start + batch_size])
        yield start, chunk, explainer.decompose(chunk, keep_maps=False)


def audit_explainer(explainer, name: str, dataset, *, query_labels: SplitLabels | None,
                    gallery_labels: SplitLabels | None, labels_missing: str | None, batch_size: int = 64,
                    average_maps_images: int = 200, seed: int = 0, progress: bool = True,
                    memory_budget_mb: float = 512.0, worst_queries: int = 10, examples: int = 3,
                    source: dict | None = None) -> ModelAudit:
    """Extract every query and gallery image of a torchreid dataset with the explainer's model, stream
    every pair through the evaluator, and add the mean attention maps of a seeded gallery sample."""
    accumulator = AuditAccumulator(explainer.attribute_names, explainer.metric, memory_budget_mb=memory_budget_mb,
                                   progress=progress)
    for split, items, labels in (("query", dataset.query, query_labels), ("gallery", dataset.gallery, gallery_labels)):
        paths = [item[0] for item in items]
        pids = torch.as_tensor([int(item[1]) for item in items])
        camids = torch.as_tensor([int(item[2]) for item in items])
        for start, chunk, decomposition in _decompose_batches(explainer, paths, batch_size,
                                                              f"{name}: extracting {split}", progress):
            rows = slice(start, start + len(chunk))
            accumulator.process(decomposition, pids[rows], camids[rows],
                                None if labels is None else labels.values[rows],
                                None if labels is None else labels.known[rows], split=split, paths=chunk)
    audit = accumulator.finish(name, attribute_groups=explainer.attribute_groups, labels_missing=labels_missing,
                               worst_queries=worst_queries, examples=examples, source=source)
    if average_maps_images > 0 and len(dataset.gallery):
        chosen = sorted(random.Random(seed).sample(range(len(dataset.gallery)),
                                                   min(average_maps_images, len(dataset.gallery))))
        if gallery_labels is not None:
            values, known = gallery_labels.values[chosen], gallery_labels.known[chosen]
        else:  # no labels: the mean map over every sampled image, as the 'with' side
            values = torch.ones(len(chosen), audit.num_attributes)
            known = torch.ones(len(chosen), audit.num_attributes, dtype=torch.bool)
        audit.maps = explainer.average_maps([dataset.gallery[index][0] for index in chosen], values, known)
        audit.maps_images = len(chosen)
    return audit


def audit_checkpoints(checkpoints: Sequence[str], dataset_name: str, root: str, *, names: Sequence[str] | None = None,
                      target_weights=None, trusted: bool = False, device=None, batch_size: int = 64,
                      average_maps_images: int = 200, seed: int = 0, progress: bool = True,
                      memory_budget_mb: float = 512.0, worst_queries: int = 10, examples: int = 3,
                      resamples: int = 1000, confidence: float = 0.95, **explainer_options) -> AuditRun:
    """Audit one or more interpreter checkpoints on the query and gallery sets of ``dataset_name``
    (a torchreid dataset name under ``root``); with two or more, compare them (the first is the
    reference). Every checkpoint is loaded and checked first (one schema; the target weights' sha256)
    so that bad input fails before any extraction."""
    import time

    explainers = load_explainers(checkpoints, names=names, target_weights=target_weights, trusted=trusted,
                                 device=device, **explainer_options)
    dataset = load_dataset(dataset_name, root)
    attribute_names = explainers[0][1].attribute_names
    query_labels, missing = dataset_labels(dataset, dataset.query, attribute_names)
    gallery_labels, _ = dataset_labels(dataset, dataset.gallery, attribute_names)
    info = {"name": dataset_name, "root": os.path.abspath(root), "queries": len(dataset.query),
            "gallery": len(dataset.gallery), "attribute_labels": missing is None, "labels_missing": missing}
    audits, timings = [], {}
    for name, explainer, path in explainers:
        started = time.perf_counter()
        record = explainer.checkpoint_record
        source = {"checkpoint": os.path.abspath(path), "target": record.get("target", {}).get("name"),
                  "target_weights": record.get("target", {}).get("weights"), "schema": record.get("schema"),
                  "image_size": list(explainer.image_size)}
        audits.append(audit_explainer(explainer, name, dataset, query_labels=query_labels,
                                      gallery_labels=gallery_labels, labels_missing=missing, batch_size=batch_size,
                                      average_maps_images=average_maps_images, seed=seed, progress=progress,
                                      memory_budget_mb=memory_budget_mb, worst_queries=worst_queries,
                                      examples=examples, source=source))
        timings[name] = time.perf_counter() - started
    comparison = compare_audits(audits, resamples, seed, confidence) if len(audits) > 1 else None
    return AuditRun(audits, info, comparison, timings)
