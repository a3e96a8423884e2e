"""Metric functions shared by every evaluation: pure functions of embeddings and labels."""

import numpy as np
import torch

from ..processing_regionmed_clip import caption_key


def ranks_from_scores(
    scores: torch.Tensor, targets: torch.Tensor, gallery_groups: torch.Tensor
) -> torch.Tensor:
    """0-based rank of each query's best-scoring correct item in `scores` `(Q, G)`: how many gallery items of
    another group score at least as high. A gallery item is correct for query q when its group is `targets[q]`;
    ties with a wrong item count against the query (pessimistic)."""
    correct = gallery_groups[None, :] == targets[:, None]
    if not correct.any(1).all():
        missing = int((~correct.any(1)).nonzero()[0, 0])
        raise ValueError(f"query {missing}: its target group {int(targets[missing])} has no gallery item")
    best = scores.masked_fill(~correct, float("-inf")).amax(1, keepdim=True)
    return ((scores >= best) & ~correct).sum(1)


def retrieval_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 1024,
    gallery_groups: torch.Tensor | None = None,
):
    """0-based rank of each query's target in the gallery, by cosine similarity, computed `chunk` queries at a time
    so memory stays at `chunk × len(gallery)` whatever the sizes. Ties with a wrong item count against the query
    (pessimistic).

    `gallery_groups` `(G,)` makes several gallery items one target: `targets` are then group ids, and any item of
    the query's group is a hit (e.g. two images with the same report text). By default every item is its own
    group, so `targets` are gallery indices.
    """
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    gallery = torch.nn.functional.normalize(gallery.float(), dim=-1)
    groups = torch.arange(len(gallery)) if gallery_groups is None else torch.as_tensor(gallery_groups)
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ gallery.t()
        ranks.append(ranks_from_scores(scores, targets[start : start + chunk], groups))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def text_groups(texts: list[str]) -> torch.Tensor:
    """One group id per text, equal for texts the model sees as identical (`caption_key`: case, punctuation and
    spacing aside); ids in order of first appearance."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(caption_key(text), len(index)) for text in texts], dtype=torch.long)


def caption_targets(captions: list[str]) -> tuple[list[int], torch.Tensor]:
    """Captions as retrieval targets: captions the model sees as identical (`caption_key`) are one target. Returns
    the row of each target's first caption, targets listed by that caption's spelling, and each caption's target
    index."""
    first: dict[str, int] = {}
    keys = [caption_key(caption) for caption in captions]
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    ordered = sorted(first, key=lambda key: captions[first[key]])
    index = {key: target for target, key in enumerate(ordered)}
    return [first[key] for key in ordered], torch.tensor([index[key] for key in keys], dtype=torch.long)


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
    return hard_negative_accuracy_from_scores(positive, negative, mask)


def hard_negative_accuracy_from_scores(positive: torch.Tensor, negative: torch.Tensor, mask) -> float:
    """[`hard_negative_accuracy`] from any scorer's scores: `positive` `(N,)`, `negative` `(N, M)`, `mask`
    `(N, M)`. Only regions with at least one real negative count (NaN when none has); a tie is a miss."""
    mask = torch.as_tensor(mask).bool()
    scored = mask.any(-1)
    if not scored.any():
        return float("nan")
    negative = torch.as_tensor(negative).float().masked_fill(~mask, float("-inf"))
    return float((torch.as_tensor(positive).float() > negative.amax(-1))[scored].float().mean())


def macro_auc(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """One-vs-rest AUC per class (column of `scores` `(N, C)`) and their macro mean (scikit-learn's
    `roc_auc_score`); classes absent from `labels` or present in every row are left out. `labels` is each row's
    class `(N,)`, or `(N, C)` bool where a row may hold several classes (or none)."""
    from sklearn.metrics import roc_auc_score

    positives = labels if labels.ndim == 2 else labels[:, None] == np.arange(scores.shape[1])
    per_class = {}
    for index in range(scores.shape[1]):
        positive = positives[:, index]
        if 0 < positive.sum() < len(labels):
            per_class[index] = float(roc_auc_score(positive, scores[:, index]))
    return {
        "macro_auc": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "per_class": per_class,
    }
