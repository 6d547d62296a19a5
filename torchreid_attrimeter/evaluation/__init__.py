"""Evaluation: torchreid-compatible retrieval metrics and the explanation-aware evaluator."""

from torchreid_attrimeter.evaluation.evaluator import ExplanationEvaluator, format_table
from torchreid_attrimeter.evaluation.explanation_metrics import pair_explanation_stats
from torchreid_attrimeter.evaluation.extraction import evaluate_model, extract_decompositions
from torchreid_attrimeter.evaluation.ranking import RankMetrics, evaluate_rank, rank_metrics

__all__ = [
    "ExplanationEvaluator",
    "RankMetrics",
    "evaluate_model",
    "evaluate_rank",
    "extract_decompositions",
    "format_table",
    "pair_explanation_stats",
    "rank_metrics",
]
