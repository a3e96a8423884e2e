"""Evaluate a model on a dataset split: image↔report retrieval, region-caption retrieval, hard-negative
accuracy and zero-shot classification of the row labels, all from one feature pass."""

import numpy as np
import torch

from .features import SplitFeatures, extract_features
from .metrics import hard_negative_accuracy, macro_auc, recall_at_k, retrieval_ranks


@torch.no_grad()
def class_embeddings(model, processor, class_names: list[str], template: str = "{}") -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = processor(text=[template.format(name) for name in class_names], return_tensors="pt").to(device)
    features = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return torch.nn.functional.normalize(features.pooler_output.float().cpu(), dim=-1)


def region_metrics(features: SplitFeatures) -> dict:
    """ROI → caption retrieval among the split's distinct captions, and hard-negative accuracy."""
    if len(features.region_embeds) == 0:
        return {}
    distinct = sorted(set(features.region_captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    first = {}
    for row, caption in enumerate(features.region_captions):
        first.setdefault(caption, row)
    gallery = features.region_text_embeds[[first[caption] for caption in distinct]]
    targets = torch.tensor([index[caption] for caption in features.region_captions])
    ranks = retrieval_ranks(features.region_embeds, gallery, targets)
    return {
        "region_to_caption": {
            **recall_at_k(ranks),
            "num_regions": len(targets),
            "num_captions": len(distinct),
        },
        "hard_negative_accuracy": hard_negative_accuracy(
            features.region_embeds,
            features.region_text_embeds,
            features.negative_text_embeds,
            features.negative_mask,
        ),
    }


def evaluate_split(model, processor, rows, batch_size: int = 32, template: str = "{}") -> dict:
    features = extract_features(model, processor, rows, batch_size=batch_size)
    targets = torch.arange(len(features.image_embeds))
    metrics = {
        "num_images": len(targets),
        "image_to_text": recall_at_k(retrieval_ranks(features.image_embeds, features.report_embeds, targets)),
        "text_to_image": recall_at_k(retrieval_ranks(features.report_embeds, features.image_embeds, targets)),
        **region_metrics(features),
    }
    labelled = [i for i, label in enumerate(features.labels) if label]
    if labelled:
        names = sorted({features.labels[i] for i in labelled})
        classes = class_embeddings(model, processor, names, template)
        scores = (
            torch.nn.functional.normalize(features.image_embeds[labelled], dim=-1) @ classes.t()
        ).numpy()
        labels = np.array([names.index(features.labels[i]) for i in labelled])
        auc = macro_auc(scores, labels)
        metrics["zero_shot"] = {
            "classes": names,
            "macro_auc": auc["macro_auc"],
            "per_class_auc": {names[i]: value for i, value in auc["per_class"].items()},
            "accuracy": float((scores.argmax(1) == labels).mean()),
            "template": template,
        }
    return metrics
