"""Publishing to the Hugging Face Hub: the model card (`card`) and the upload (`publish`)."""

from .card import MODEL_CARD_TEMPLATE, eval_results, fill_template, render_model_card
from .publish import (
    PublishArgs,
    PublishError,
    PublishResult,
    check_access,
    dataset_files,
    finite_timeouts,
    model_files,
    publish,
    publish_dataset,
    publish_model,
)

__all__ = [
    "MODEL_CARD_TEMPLATE",
    "PublishArgs",
    "PublishError",
    "PublishResult",
    "check_access",
    "dataset_files",
    "eval_results",
    "fill_template",
    "finite_timeouts",
    "model_files",
    "publish",
    "publish_dataset",
    "publish_model",
    "render_model_card",
]
