"""Evaluation: pure metric functions and one feature pass per model and split (needs the `eval` extra)."""

from .evaluate import evaluate_split, region_metrics
from .features import SplitFeatures, extract_features
from .metrics import hard_negative_accuracy, macro_auc, recall_at_k, retrieval_ranks

__all__ = [
    "SplitFeatures",
    "evaluate_split",
    "extract_features",
    "hard_negative_accuracy",
    "macro_auc",
    "recall_at_k",
    "region_metrics",
    "retrieval_ranks",
]
