"""``RunOptions``: the evaluator's options as one evaluation run reads them.

Frozen values, checked by ``ExplanationEvaluator`` when it is built, so that no piece of the run (the
pair stream, the tile backends, the run's totals) reaches back into the evaluator object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """See ``ExplanationEvaluator`` for what each option means."""

    attribute_names: tuple[str, ...]
    metric: str
    ranks: tuple[int, ...]
    pairs: str
    topk: int
    pair_fraction: float | None
    top_attributes: int
    memory_budget_mb: float
    seed: int
    native: bool | None
    progress: bool
    per_query: bool
