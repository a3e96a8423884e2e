"""Oracle tests of the metric functions against naive loops."""

import numpy as np
import pytest
import torch

from regionmed_clip.evaluation import hard_negative_accuracy, macro_auc, recall_at_k, retrieval_ranks


def naive_rank(query, gallery, target):
    scores = [torch.nn.functional.cosine_similarity(query, item, dim=0).item() for item in gallery]
    return sum(score >= scores[target] for score in scores) - 1


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_retrieval_ranks_match_a_naive_loop_in_any_chunk_size(chunk):
    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(7, 5, generator=generator), torch.randn(9, 5, generator=generator)
    targets = torch.tensor([0, 3, 8, 2, 2, 5, 1])
    ranks = retrieval_ranks(queries, gallery, targets, chunk=chunk)
    assert ranks.tolist() == [naive_rank(q, gallery, int(t)) for q, t in zip(queries, targets, strict=True)]


def test_recall_at_k_and_median_rank():
    metrics = recall_at_k(torch.tensor([0, 0, 4, 9, 20]), ks=(1, 5, 10))
    assert metrics == {
        "R@1": pytest.approx(0.4),
        "R@5": pytest.approx(0.6),
        "R@10": pytest.approx(0.8),
        "median_rank": 5.0,
    }


def test_hard_negative_accuracy_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(1)
    regions, positives = torch.randn(20, 6, generator=generator), torch.randn(20, 6, generator=generator)
    negatives = torch.randn(20, 4, 6, generator=generator)
    mask = torch.rand(20, 4, generator=generator) > 0.3
    mask[:, 0] = True
    cosine = torch.nn.functional.cosine_similarity
    expected = np.mean(
        [
            all(
                cosine(regions[i], positives[i], dim=0) > cosine(regions[i], negatives[i, k], dim=0)
                for k in range(4)
                if mask[i, k]
            )
            for i in range(20)
        ]
    )
    assert hard_negative_accuracy(regions, positives, negatives, mask) == pytest.approx(expected)


def test_macro_auc_matches_scikit_learn_per_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 60)
    scores = rng.random((60, 3)) + np.eye(3)[labels] * 0.5
    result = macro_auc(scores, labels)
    expected = [roc_auc_score(labels == c, scores[:, c]) for c in range(3)]
    assert result["per_class"] == pytest.approx(dict(enumerate(expected)))
    assert result["macro_auc"] == pytest.approx(np.mean(expected))
