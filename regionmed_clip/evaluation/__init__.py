"""Evaluation: pure metric functions, one feature pass per model and split, and the harness that runs every task
(needs the `eval` extra)."""

from .classification import DEFAULT_TEMPLATES, class_prototypes, few_shot, zero_shot
from .controls import BoxOnlyControl, TextPrior
from .device import resolve_device
from .features import SplitFeatures, extract_features, roi_branch_status
from .grounding import patch_text_similarity, pointing_accuracy
from .harness import TASKS, region_metrics, retrieval_metrics, run_evaluation
from .metrics import hard_negative_accuracy, macro_auc, recall_at_k, retrieval_ranks, text_groups
from .report import CardFigure, model_index_figures
from .settings import EvalSettings
from .vqa import VQAExample, evaluate_vqa, load_slake, load_synth_vqa, load_vqa_rad

__all__ = [
    "BoxOnlyControl",
    "CardFigure",
    "DEFAULT_TEMPLATES",
    "EvalSettings",
    "SplitFeatures",
    "VQAExample",
    "TASKS",
    "TextPrior",
    "class_prototypes",
    "evaluate_vqa",
    "extract_features",
    "few_shot",
    "hard_negative_accuracy",
    "load_slake",
    "load_synth_vqa",
    "load_vqa_rad",
    "macro_auc",
    "model_index_figures",
    "patch_text_similarity",
    "pointing_accuracy",
    "recall_at_k",
    "region_metrics",
    "resolve_device",
    "retrieval_metrics",
    "retrieval_ranks",
    "roi_branch_status",
    "run_evaluation",
    "text_groups",
    "zero_shot",
]
