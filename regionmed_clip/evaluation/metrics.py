"""Metric functions shared by every evaluation: pure functions of embeddings and labels."""

import numpy as np
import torch


def retrieval_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
    """0-based rank of each query's target in the gallery, by cosine similarity, computed `chunk` queries at a time
    so memory stays at `chunk × len(gallery)` whatever the sizes. Ties count against the query (pessimistic)."""
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    gallery = torch.nn.functional.normalize(gallery.float(), dim=-1)
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ gallery.t()
        target_scores = scores.gather(1, targets[start : start + chunk, None])
        ranks.append((scores >= target_scores).sum(1) - 1)
    return torch.cat(ranks)


def recall_at_k(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K (as fractions) and the median rank (1-based) from 0-based ranks."""
    metrics = {f"R@{k}": float((ranks < k).float().mean()) for k in ks}
    metrics["median_rank"] = float(ranks.float().median() + 1)
    return metrics


def hard_negative_accuracy(
    regions: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, mask
) -> float:
    """Share of ROIs whose own caption scores above every one of its hard negatives, over the ROIs that have at
    least one (a region may have none; NaN when no ROI has any).

    Args: `regions`, `positives` `(N, P)`; `negatives` `(N, M, P)`; `mask` `(N, M)` true for real negatives.
    """
    regions = torch.nn.functional.normalize(regions.float(), dim=-1)
    positive = (regions * torch.nn.functional.normalize(positives.float(), dim=-1)).sum(-1)
    negative = torch.einsum("np,nmp->nm", regions, torch.nn.functional.normalize(negatives.float(), dim=-1))
    negative = negative.masked_fill(~mask.bool(), float("-inf"))
    scored = mask.bool().any(-1)
    if not scored.any():
        return float("nan")
    return float((positive > negative.amax(-1))[scored].float().mean())


def macro_auc(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """One-vs-rest AUC per class and their macro mean (scikit-learn's `roc_auc_score`); classes absent from
    `labels` or present in every row are left out."""
    from sklearn.metrics import roc_auc_score

    per_class = {}
    for index in range(scores.shape[1]):
        positive = labels == index
        if 0 < positive.sum() < len(labels):
            per_class[index] = float(roc_auc_score(positive, scores[:, index]))
    return {
        "macro_auc": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "per_class": per_class,
    }
