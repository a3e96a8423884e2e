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


def test_ties_rank_pessimistically_and_chunks_equal_the_full_matrix():
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1, 3])
    assert retrieval_ranks(queries, gallery, targets).tolist() == [1, 1, 1]  # a tie with another item counts
    generator = torch.Generator().manual_seed(3)
    queries, gallery = torch.randn(50, 8, generator=generator), torch.randn(40, 8, generator=generator)
    gallery[10] = gallery[3]
    targets = torch.randint(0, 40, (50,), generator=generator)
    full = retrieval_ranks(queries, gallery, targets, chunk=10_000)
    assert torch.equal(full, retrieval_ranks(queries, gallery, targets, chunk=7))


def test_retrieval_over_50k_by_50k_stays_within_2_gb():
    code = """
import resource, sys, torch
from regionmed_clip.evaluation import recall_at_k, retrieval_ranks
torch.manual_seed(0)
queries, gallery = torch.randn(50_000, 512), torch.randn(50_000, 512)
targets = torch.arange(50_000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
metrics = recall_at_k(retrieval_ranks(queries, gallery, targets))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 2**20, metrics["R@10"])
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    growth_gib, recall = (float(v) for v in result.stdout.split())
    print(f"\n50k x 50k retrieval: peak memory increase {growth_gib:.2f} GiB")
    assert growth_gib <= 2.0 and 0 <= recall < 0.01  # random embeddings: near-chance recall (10 / 50k)


def test_zero_shot_matches_scikit_learn_and_its_interval_holds_the_estimate():
    from sklearn.metrics import roc_auc_score

    from regionmed_clip.evaluation.classification import zero_shot

    generator = torch.Generator().manual_seed(4)
    prototypes = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    labels = np.array([i % 3 for i in range(60)])
    images = prototypes[labels] + 0.8 * torch.randn(60, 8, generator=generator)
    result = zero_shot(images, labels, prototypes, bootstrap=200, seed=0)
    scores = (torch.nn.functional.normalize(images, dim=-1) @ prototypes.t()).numpy()
    expected = np.mean([roc_auc_score(labels == c, scores[:, c]) for c in range(3)])
    assert result["macro_auc"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx((scores.argmax(1) == labels).mean())
    low, high = result["macro_auc_ci95"]
    assert low <= result["macro_auc"] <= high and high - low < 0.3
    assert zero_shot(images, labels, prototypes, bootstrap=200, seed=0)["macro_auc_ci95"] == (low, high)


def test_few_shot_prototype_rule_matches_a_naive_episode():
    from regionmed_clip.evaluation.classification import few_shot

    generator = torch.Generator().manual_seed(5)
    prototypes = torch.nn.functional.normalize(torch.randn(2, 6, generator=generator), dim=-1)
    support_labels = np.array([0, 0, 0, 1, 1, 1])
    support = prototypes[support_labels] + 0.5 * torch.randn(6, 6, generator=generator)
    query_labels = np.array([0, 1] * 10)
    queries = prototypes[query_labels] + 0.5 * torch.randn(20, 6, generator=generator)
    result = few_shot(support, support_labels, queries, query_labels, prototypes, shots=3, episodes=2, seed=0)
    # With 3 shots of 3 available, every episode uses all support images: the rule is fully determined.
    unit = torch.nn.functional.normalize
    means = torch.stack([unit(support[support_labels == c], dim=-1).mean(0) for c in range(2)])
    vectors = unit(prototypes + unit(means, dim=-1), dim=-1)
    expected = macro_auc((unit(queries, dim=-1) @ vectors.t()).numpy(), query_labels)["macro_auc"]
    assert result["prototype"]["mean"] == pytest.approx(expected) and result["prototype"][
        "std"
    ] == pytest.approx(0)
    assert 0.5 < result["linear_probe"]["mean"] <= 1.0
    with pytest.raises(ValueError, match="fewer than 5 shots"):
        few_shot(support, support_labels, queries, query_labels, prototypes, shots=5)


def test_cli_eval_all_tasks_writes_every_file(tmp_path, synth_folder, tokenizer):
    import json

    from regionmed_clip.cli import main

    from .conftest import make_processor, tiny_model

    tiny_model("crop").save_pretrained(tmp_path / "model")
    make_processor(tokenizer, "crop").save_pretrained(tmp_path / "model")
    code = main(
        [
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(synth_folder),
            "--tasks",
            "all",
            "--out",
            str(tmp_path / "eval"),
            "--bootstrap",
            "50",
            "--shots",
            "1",
            "--episodes",
            "2",
        ]
    )
    assert code == 0
    for name in ("metrics.json", "metrics.md", "roc_curves.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"zero_shot", "few_shot", "retrieval", "region", "grounding", "vqa", "provenance"} <= set(metrics)
    assert set(metrics["zero_shot"]) == set(metrics["retrieval"]) == {"region-aware", "global"}
    assert len(metrics["provenance"]["data_sha256"]) == 64 and metrics["provenance"]["versions"]["torch"]
    assert "MedRegion-synth" in metrics["vqa"]


def test_feature_cache_is_reused_and_keyed_on_the_model(tmp_path, synth_folder, tokenizer, monkeypatch):
    import json

    import regionmed_clip.evaluation.harness as harness

    from .conftest import make_processor, tiny_model

    tiny_model("pool").save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    run = dict(tasks="retrieval,region", cache_dir=tmp_path / "cache", bootstrap=0)
    first = harness.run_evaluation(tmp_path / "model", synth_folder, tmp_path / "a", **run)
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(harness, "extract_features", refuse)
    second = harness.run_evaluation(tmp_path / "model", synth_folder, tmp_path / "b", **run)
    assert (
        json.loads((tmp_path / "a" / "metrics.json").read_text())["retrieval"]
        == json.loads((tmp_path / "b" / "metrics.json").read_text())["retrieval"]
    )
    assert first["region"]["hard_negative_accuracy"] == second["region"]["hard_negative_accuracy"]
    tiny_model("pool", seed=1).save_pretrained(tmp_path / "model")  # other weights: the cache must not match
    with pytest.raises(AssertionError, match="extracted again"):
        harness.run_evaluation(tmp_path / "model", synth_folder, tmp_path / "c", **run)
