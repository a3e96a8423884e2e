"""Oracle tests of the metric functions and the no-image controls against naive loops; feature extraction (every
region in passes, the global path for an untrained ROI branch, token limits, device); the eval command end to end."""

import math

import numpy as np
import pytest
import torch

from regionmed_clip.evaluation import (
    hard_negative_accuracy,
    macro_auc,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
    text_groups,
)

from .conftest import make_processor, tiny_model


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
    assert set(metrics["zero_shot"]) == set(metrics["few_shot"]) == {"box_free", "gt_boxes"}
    assert set(metrics["retrieval"]) == {"box_free", "gt_boxes", "num_distinct_reports"}
    for section in ("zero_shot", "few_shot", "retrieval"):
        assert set(metrics[section]["box_free"]) == {"global"}, section
        assert set(metrics[section]["gt_boxes"]) == {"region-aware"}, section
    assert set(metrics["region"]["controls"]) == {"box_only", "text_only_prior"}
    assert set(metrics["grounding"]["controls"]) == {"box_only"}
    table = (tmp_path / "eval" / "metrics.md").read_text()
    for heading in ("Zero-shot", "Few-shot", "Image–text retrieval"):
        section = table.split(heading, 1)[1].split("##", 1)[0]
        assert section.index("| none (box-free) | global |") < section.index(
            "| GT boxes at test | region-aware |"
        )
    assert "box-only control" in table and "text-only prior" in table
    assert len(metrics["provenance"]["data_sha256"]) == 64 and metrics["provenance"]["versions"]["torch"]
    assert "MedRegion-synth" in metrics["vqa"]


def test_feature_cache_is_reused_and_keyed_on_the_model(tmp_path, synth_folder, tokenizer, monkeypatch):
    import json

    import regionmed_clip.evaluation.harness as harness
    from regionmed_clip.evaluation import EvalSettings

    tiny_model("pool").save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    run = dict(tasks="retrieval,region", cache_dir=tmp_path / "cache", bootstrap=0)
    first = harness.run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "a", **run))
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(harness, "extract_features", refuse)
    second = harness.run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "b", **run))
    assert (
        json.loads((tmp_path / "a" / "metrics.json").read_text())["retrieval"]
        == json.loads((tmp_path / "b" / "metrics.json").read_text())["retrieval"]
    )
    assert first["region"]["hard_negative_accuracy"] == second["region"]["hard_negative_accuracy"]
    tiny_model("pool", seed=1).save_pretrained(tmp_path / "model")  # other weights: the cache must not match
    with pytest.raises(AssertionError, match="extracted again"):
        harness.run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "c", **run))


def test_one_settings_object_is_read_by_the_tasks_and_recorded_as_run(tmp_path, synth_folder, tokenizer):
    import dataclasses

    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    tiny_model("pool").save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    settings = EvalSettings(
        tmp_path / "model", synth_folder, tmp_path / "a", tasks="zero_shot,retrieval", bootstrap=0
    )
    metrics = run_evaluation(settings)
    used = dataclasses.replace(
        settings,
        device="cpu",
        max_length=metrics["text"]["max_length"],
        region_path=metrics["embeddings"]["region_path"],
        self_proposed=0,
    )
    assert metrics["provenance"]["settings"] == dataclasses.asdict(used)
    assert metrics["text"]["max_length_source"] == "tokenizer"
    assert (tmp_path / "a" / "roc_curves.png").is_file()
    # No task leaves anything for another: the tasks in the other order, or alone, give the same sections.
    reordered = run_evaluation(
        dataclasses.replace(settings, out_dir=tmp_path / "b", tasks="retrieval,zero_shot")
    )
    alone = run_evaluation(dataclasses.replace(settings, out_dir=tmp_path / "c", tasks="retrieval"))
    assert reordered["zero_shot"] == metrics["zero_shot"]
    assert reordered["retrieval"] == alone["retrieval"] == metrics["retrieval"]
    assert not (tmp_path / "c" / "roc_curves.png").exists()
    with pytest.raises(ValueError, match="VQA-RAD's JSON file and image folder"):
        dataclasses.replace(settings, vqa_rad=["vqa_rad.json"])


def naive_grouped_rank(query, gallery, groups, target):
    scores = [torch.nn.functional.cosine_similarity(query, item, dim=0).item() for item in gallery]
    best = max(score for score, group in zip(scores, groups, strict=True) if group == target)
    return sum(score >= best for score, group in zip(scores, groups, strict=True) if group != target)


def test_grouped_retrieval_ranks_match_a_naive_loop():
    generator = torch.Generator().manual_seed(6)
    queries, gallery = torch.randn(11, 5, generator=generator), torch.randn(9, 5, generator=generator)
    groups = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    targets = torch.randint(0, 6, (11,), generator=generator)
    gallery[5] = gallery[0]  # a wrong item tied with a right one counts against the query
    for chunk in (2, 1024):
        ranks = retrieval_ranks(queries, gallery, targets, chunk=chunk, gallery_groups=groups)
        expected = [
            naive_grouped_rank(q, gallery, groups.tolist(), int(t))
            for q, t in zip(queries, targets, strict=True)
        ]
        assert ranks.tolist() == expected
    with pytest.raises(ValueError, match="has no gallery item"):
        retrieval_ranks(queries[:1], gallery, torch.tensor([9]), gallery_groups=groups)


def test_identical_report_texts_are_one_target_in_both_directions():
    # Images 0 and 1 share a report word for word; image 0 sits on report 1's embedding, not on its own.
    reports = ["round nodule", "round nodule", "oval cyst"]
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    images = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.0, 0.1, 1.0]])
    assert text_groups(reports).tolist() == [0, 0, 1]
    result = retrieval_metrics(images, texts, reports)
    assert result["image_to_text"]["R@1"] == 1.0 and result["text_to_image"]["R@1"] == 1.0
    # Counting every image as its own target (the naive reading) misses image 0 → report 0 and report 0 → image 0.
    naive = recall_at_k(retrieval_ranks(images, texts, torch.arange(3)), ks=(1,))
    assert naive["R@1"] < 1.0
    # Identical as the model sees them (case, punctuation, spacing): one target; a digit or a script tells apart.
    spelled = [
        "X-Ray: round nodule.",
        "xray round  nodule",
        "XRAY ROUND NODULE",
        "xray round nodule 2",
        "рентген",
    ]
    assert text_groups(spelled).tolist() == [0, 0, 0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Measured controls
# ---------------------------------------------------------------------------------------------------------------------


def test_text_prior_matches_a_naive_logistic_regression_and_reads_negative_only_words():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    from regionmed_clip.evaluation import TextPrior
    from regionmed_clip.evaluation.controls import caption_words

    captions = ["round nodule left", "oval cyst right", "round mass upper", "oval nodule lower"] * 3
    negatives = [
        ["spiculated nodule left", "round cyst left"],
        ["lobulated cyst right"],
        [],
        ["oval mass lower"],
    ] * 3
    prior = TextPrior(captions, negatives)
    texts = captions + [text for per_region in negatives for text in per_region]
    vectorizer = CountVectorizer(analyzer=caption_words, binary=True)
    reference = LogisticRegression(max_iter=2000, random_state=0).fit(
        vectorizer.fit_transform(texts), [1] * len(captions) + [0] * (len(texts) - len(captions))
    )

    def score(text):
        return reference.decision_function(vectorizer.transform([text]))[0]

    test_captions = ["round nodule upper", "oval cyst left", "round cyst right"]
    test_negatives = [["spiculated nodule upper"], ["lobulated cyst left", "oval nodule left"], []]
    # The region without negatives has nothing to be told apart from: it does not count.
    expected = np.mean(
        [
            all(score(c) > score(n) for n in ns)
            for c, ns in zip(test_captions, test_negatives, strict=True)
            if ns
        ]
    )
    assert prior.hard_negative_accuracy(test_captions, test_negatives) == pytest.approx(expected)
    # Words that only negatives use give them away without any image.
    assert prior.hard_negative_accuracy(["round nodule upper"], [["spiculated nodule upper"]]) == 1.0


def naive_box_scores(train_boxes, train_captions, boxes, captions, k, smoothing=0.5):
    from regionmed_clip.evaluation.controls import caption_words

    def geometry(box):
        x0, y0, x1, y1 = box
        return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])

    scores = np.zeros((len(boxes), len(captions)))
    for i, box in enumerate(boxes):
        distances = [float(((geometry(box) - geometry(other)) ** 2).sum()) for other in train_boxes]
        nearest = sorted(range(len(train_boxes)), key=lambda j: (distances[j], j))[:k]
        for c, caption in enumerate(captions):
            words = set(caption_words(caption))
            log_ps = [
                np.log(sum(word in caption_words(train_captions[j]) for j in nearest) + smoothing)
                - np.log(k + 2 * smoothing)
                for word in words
            ]
            scores[i, c] = np.mean(log_ps)
    return scores


def test_box_only_control_matches_a_naive_nearest_box_vote_and_reads_positions_off_boxes():
    from regionmed_clip.evaluation import BoxOnlyControl

    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 0.5, (40, 2))
    train_boxes = np.concatenate([corners, corners + rng.uniform(0.1, 0.5, (40, 2))], axis=1)
    # Position words follow the box centre, as in MedRegion-synth.
    train_captions = [
        f"{rng.choice(['round', 'oval'])} nodule {'left' if (b[0] + b[2]) / 2 < 0.5 else 'right'}"
        for b in train_boxes
    ]
    control = BoxOnlyControl(train_boxes, train_captions, k=5)
    test_boxes = np.array([[0.05, 0.1, 0.25, 0.3], [0.7, 0.2, 0.9, 0.5], [0.1, 0.6, 0.3, 0.8]])
    captions = ["nodule left", "nodule right", "oval nodule middle"]
    expected = naive_box_scores(train_boxes, train_captions, test_boxes, captions, k=5)
    np.testing.assert_allclose(control.scores(test_boxes, captions).numpy(), expected, rtol=1e-9)
    retrieval = control.region_retrieval(test_boxes[:2], ["nodule left", "nodule right"])
    assert retrieval["R@1"] == 1.0
    pointing = control.pointing(test_boxes[:2], ["nodule left", "nodule right"], torch.tensor([0, 0]))
    assert pointing["pointing_accuracy"] == 1.0 and pointing["num_regions"] == 2


@pytest.mark.parametrize("chunk_bytes", [1, 2**30])
def test_box_only_control_in_chunks_keeps_the_nearest_boxes_and_their_ties_in_training_order(chunk_bytes):
    """Boxes on a coarse grid tie at the k-th distance: the earliest training boxes win, as a stable sort would
    have it, whether queries are scored one at a time or all at once."""
    from regionmed_clip.evaluation import BoxOnlyControl

    rng = np.random.default_rng(3)
    corners = rng.integers(0, 4, (60, 2)) / 10
    train_boxes = np.concatenate([corners, corners + rng.integers(1, 3, (60, 2)) / 10], axis=1)
    words = ["round", "oval", "nodule", "cyst", "left", "right"]
    train_captions = [" ".join(rng.choice(words, size=2)) for _ in range(60)]
    test_boxes, captions = train_boxes[::7] + 0.05, train_captions[::7]
    control = BoxOnlyControl(train_boxes, train_captions, k=6, chunk_bytes=chunk_bytes)
    expected = naive_box_scores(train_boxes, train_captions, test_boxes, captions, k=6)
    np.testing.assert_allclose(control.scores(test_boxes, captions).numpy(), expected, rtol=1e-12)
    query = control.geometry[:5] + 0.05
    distances = ((query[:, None] - control.geometry[None]) ** 2).sum(-1)
    expected_rows = np.argsort(distances, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(control.nearest(query), expected_rows)
    whole = BoxOnlyControl(train_boxes, train_captions, k=6, chunk_bytes=2**30)
    assert control.region_retrieval(test_boxes, captions) == whole.region_retrieval(test_boxes, captions)


# ---------------------------------------------------------------------------------------------------------------------
# Feature extraction: every region, the untrained-ROI path, token limits, device
# ---------------------------------------------------------------------------------------------------------------------

REGIONS_PER_IMAGE = 7


def many_region_rows(synth_folder) -> list[dict]:
    """The synth test rows, each with 7 regions (more than the 3 slots of the tiny model), distinct captions and
    descending scores, so the evaluation order is known."""
    from regionmed_clip.data.folder import load_rows

    rows = []
    for index, row in enumerate(load_rows(synth_folder, "test")):
        width, height = row["image"].size
        regions = []
        for k in range(REGIONS_PER_IMAGE):
            x0, y0 = 4 + 9 * k, 6 + 7 * k
            regions.append(
                {
                    "bbox": [float(x0), float(y0), float(min(x0 + 30, width)), float(min(y0 + 26, height))],
                    "adjective": "",
                    "term": "",
                    "position": "",
                    "caption": f"finding {k} of image {index} spreading over a long stretch of tissue",
                    "negatives": [f"other finding {k}", f"absent finding {k} of image {index}"],
                    "score": 1.0 - k / 10,
                    "source": "test",
                }
            )
        rows.append({**row, "regions": regions})
    return rows


def single_region_embedding(model, processor, row, region) -> torch.Tensor:
    inputs = processor(images=[row["image"]], boxes=[[region["bbox"]]], return_tensors="pt")
    return torch.nn.functional.normalize(model.get_region_features(**inputs)[0, 0], dim=-1)


def test_every_region_is_scored_in_passes_and_equals_its_own_forward(synth_folder, tokenizer):
    from regionmed_clip.evaluation import extract_features

    rows = many_region_rows(synth_folder)
    model, processor = tiny_model("pool"), make_processor(tokenizer, max_regions=3)
    features = extract_features(model, processor, rows, batch_size=4, max_length=32, progress=False)
    assert len(features.region_embeds) == REGIONS_PER_IMAGE * len(rows) == len(features.region_captions)
    assert features.region_image.tolist() == [i for i in range(len(rows)) for _ in range(REGIONS_PER_IMAGE)]
    assert features.region_captions == [region["caption"] for row in rows for region in row["regions"]]
    expected = torch.stack(
        [single_region_embedding(model, processor, row, region) for row in rows for region in row["regions"]]
    )
    torch.testing.assert_close(features.region_embeds, expected, rtol=1e-4, atol=1e-5)
    # The region-aware image embedding uses the first pass: the 3 highest-scoring regions.
    first = processor(
        images=[rows[0]["image"]], boxes=[[r["bbox"] for r in rows[0]["regions"][:3]]], return_tensors="pt"
    )
    aware = torch.nn.functional.normalize(model.get_image_features(**first).pooler_output[0], dim=-1)
    torch.testing.assert_close(features.gt_boxes["region-aware"][0], aware, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("region_path", ["roi_processor", "global_on_crops"])
def test_features_collated_in_worker_processes_equal_those_collated_in_process(
    synth_folder, tokenizer, region_path
):
    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.evaluation import extract_features

    rows = load_rows(synth_folder, "test")
    model, processor = tiny_model("pool"), make_processor(tokenizer, max_regions=2)
    settings = {"batch_size": 3, "max_length": 32, "region_path": region_path, "progress": False}
    alone = extract_features(model, processor, rows, **settings)
    workers = extract_features(model, processor, rows, num_workers=2, **settings)
    for field in ("region_embeds", "region_image", "region_boxes", "report_embeds"):
        assert torch.equal(getattr(alone, field), getattr(workers, field)), field
    assert alone.region_captions == workers.region_captions and alone.labels == workers.labels
    for name, embeds in alone.box_free.items():
        assert torch.equal(embeds, workers.box_free[name]), name


def write_split(folder, split: str, rows: list[dict]) -> None:
    from datasets import Dataset

    from regionmed_clip.data import FEATURES

    for old in (folder / "data").glob(f"{split}-*.parquet"):
        old.unlink()
    Dataset.from_list(rows, features=FEATURES).to_parquet(
        str(folder / "data" / f"{split}-00000-of-00001.parquet")
    )


def test_cli_eval_region_scores_every_region_of_the_split(tmp_path, synth_folder, tokenizer):
    import json
    import shutil

    from regionmed_clip.cli import main

    data = tmp_path / "data"
    shutil.copytree(synth_folder, data)
    rows = many_region_rows(synth_folder)
    write_split(data, "test", rows)
    tiny_model("pool").save_pretrained(tmp_path / "model")
    make_processor(tokenizer, max_regions=3).save_pretrained(tmp_path / "model")
    arguments = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data),
        "--tasks",
        "region,grounding",
    ]
    assert main([*arguments, "--out", str(tmp_path / "eval"), "--device", "cpu", "--batch-size", "4"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (
        metrics["region"]["num_regions"]
        == metrics["region"]["split_regions"]
        == REGIONS_PER_IMAGE * len(rows)
    )
    assert metrics["region"]["region_to_caption"]["num_captions"] == REGIONS_PER_IMAGE * len(rows)
    assert metrics["grounding"]["num_regions"] == REGIONS_PER_IMAGE * len(rows)
    assert metrics["provenance"]["settings"]["device"] == "cpu"
    assert metrics["provenance"]["settings"]["batch_size"] == 4


def test_roi_branch_status_from_the_training_config_or_the_gate():
    from regionmed_clip.evaluation import roi_branch_status

    model = tiny_model("pool")
    common = {"lr": 1e-4, "batch_size": 2, "steps": 3}
    global_stage = {"name": "global", "loss_weights": {"global_loss": 1.0}, "frozen": [], **common}
    region_stage = {
        "name": "roi",
        "loss_weights": {"global_loss": 1.0, "neg_loss": 1.0},
        "frozen": ["text_model"],
        **common,
    }
    frozen_region = {**region_stage, "frozen": ["roi_processor"]}
    partly_frozen = {**region_stage, "frozen": ["roi_processor.mlp"]}
    assert roi_branch_status(model, {"stages": [global_stage]})[0] is False
    assert roi_branch_status(model, {"stages": [global_stage, frozen_region]})[0] is False
    assert roi_branch_status(model, {"stages": [global_stage, region_stage]})[0] is True
    assert roi_branch_status(model, {"stages": [partly_frozen]})[0] is True
    # Terms that take ROI inputs but never read the processor's output do not train it.
    beside = {
        **region_stage,
        "loss_weights": {"dense_loss": 1.0, "global_region_loss": 1.0, "proposal_loss": 1.0},
    }
    assert roi_branch_status(model, {"stages": [global_stage, beside]})[0] is False
    with pytest.raises(ValueError, match="stage 0 has no loss_weights mapping"):
        roi_branch_status(model, {"stages": [{"name": "broken"}]})
    assert roi_branch_status(model, None)[0] is True  # the gate moved from 0 (0.7 in the tiny model)
    with torch.no_grad():
        model.roi_processor.gate.zero_()
    assert roi_branch_status(model, None)[0] is False
    # The training config outranks the gate: region losses train the ROI processor without moving it.
    assert roi_branch_status(model, {"stages": [region_stage]})[0] is True


def test_an_untrained_roi_branch_is_scored_through_the_global_path_on_crops(
    tmp_path, synth_folder, tokenizer
):
    import json

    import yaml

    from regionmed_clip.evaluation import EvalSettings, extract_features, run_evaluation

    model, processor = tiny_model("pool"), make_processor(tokenizer, max_regions=3)
    with torch.no_grad():
        model.roi_processor.gate.zero_()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    stages = [
        {
            "name": "global-only",
            "lr": 1e-4,
            "batch_size": 2,
            "steps": 3,
            "loss_weights": {"global_loss": 1.0},
            "frozen": ["roi_processor"],
        }
    ]
    (tmp_path / "model" / "training_config.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run = dict(tasks="region", bootstrap=0, device="cpu")
    metrics = run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "a", **run))
    assert metrics["embeddings"]["region_path"] == "global_on_crops"
    assert metrics["embeddings"]["roi_branch_trained"] is False
    # A random ROI processor plays no part: other ROI weights give the same region figures.
    with torch.no_grad():
        for parameter in model.roi_processor.parameters():
            parameter.normal_()
        model.roi_processor.gate.zero_()
    model.save_pretrained(tmp_path / "model")
    again = run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "b", **run))
    assert json.dumps(again["region"], sort_keys=True) == json.dumps(metrics["region"], sort_keys=True)
    # And the region embedding is the crop through the vision tower and projection.
    rows = many_region_rows(synth_folder)[:2]
    features = extract_features(
        model, processor, rows, max_length=32, region_path="global_on_crops", progress=False
    )
    crop_processor = make_processor(tokenizer, "crop", max_regions=3)
    crop = crop_processor(
        images=[rows[1]["image"]], boxes=[[rows[1]["regions"][4]["bbox"]]], return_tensors="pt"
    )
    expected = model.get_image_features(pixel_values=crop["roi_pixel_values"][0]).pooler_output[0]
    torch.testing.assert_close(
        features.region_embeds[REGIONS_PER_IMAGE + 4], torch.nn.functional.normalize(expected, dim=-1)
    )


def test_a_trained_proposer_adds_the_self_proposed_box_free_embedding(tmp_path, synth_folder, tokenizer):
    import yaml

    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    model, processor = tiny_model("pool"), make_processor(tokenizer, max_regions=2)
    with torch.no_grad():
        model.region_proposer.weight.normal_()  # a proposer that prefers some patches
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    stage = {"name": "roi", "lr": 1e-4, "batch_size": 2, "steps": 3, "frozen": []}
    config = tmp_path / "model" / "training_config.yaml"
    config.write_text(yaml.safe_dump({"stages": [{**stage, "loss_weights": {"roi_loss": 1.0}}]}))
    run = dict(tasks="zero_shot,retrieval", bootstrap=0, device="cpu")
    without = run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "a", **run))
    assert without["embeddings"]["self_proposed_regions"] == 0
    assert list(without["retrieval"]["box_free"]) == ["global"]
    weights = {"roi_loss": 1.0, "proposal_loss": 1.0}
    config.write_text(yaml.safe_dump({"stages": [{**stage, "loss_weights": weights}]}))
    metrics = run_evaluation(
        EvalSettings(
            tmp_path / "model",
            synth_folder,
            tmp_path / "b",
            **{**run, "tasks": "zero_shot,retrieval,few_shot"},
        )
    )
    regions = model.config.max_regions
    assert metrics["embeddings"]["self_proposed_regions"] == regions
    assert list(metrics["retrieval"]["box_free"]) == ["global", "self-proposed"]
    assert list(metrics["zero_shot"]["box_free"]) == ["global", "self-proposed"]
    # The support split's features carry it too (few-shot reads both splits).
    assert list(metrics["few_shot"]["box_free"]) == ["global", "self-proposed"]
    assert metrics["retrieval"]["box_free"]["global"] == without["retrieval"]["box_free"]["global"]
    # The figure is get_image_features with auto_regions: scored here by hand on the same texts.
    rows = load_rows(synth_folder, "test")
    reloaded = type(model).from_pretrained(tmp_path / "model", auto_regions=regions).eval()
    inputs = processor(
        images=[row["image"] for row in rows],
        text=[row["detailed_report"] for row in rows],
        max_length=metrics["text"]["max_length"],
        return_tensors="pt",
    )
    with torch.no_grad():
        images = torch.nn.functional.normalize(
            reloaded.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1
        )
        texts = torch.nn.functional.normalize(
            reloaded.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output, dim=-1
        )
    hits = (images @ texts.t()).argmax(-1) == torch.arange(len(rows))
    reports = [row["detailed_report"] for row in rows]
    hits |= torch.tensor([reports[j] == reports[i] for i, j in enumerate((images @ texts.t()).argmax(-1))])
    recall = metrics["retrieval"]["box_free"]["self-proposed"]["image_to_text"]["R@1"]
    assert recall == pytest.approx(hits.float().mean().item())


def test_texts_are_cut_at_the_training_max_length_and_the_cuts_are_counted(tmp_path, synth_folder, tokenizer):
    import yaml

    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    model, processor = tiny_model("pool"), make_processor(tokenizer)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    default = run_evaluation(
        EvalSettings(tmp_path / "model", synth_folder, tmp_path / "a", tasks="retrieval", bootstrap=0)
    )
    assert default["text"]["max_length"] == 64 and default["text"]["max_length_source"] == "tokenizer"
    (tmp_path / "model" / "training_config.yaml").write_text(yaml.safe_dump({"data": {"max_length": 12}}))
    metrics = run_evaluation(
        EvalSettings(tmp_path / "model", synth_folder, tmp_path / "b", tasks="retrieval,region", bootstrap=0)
    )
    assert (
        metrics["text"]["max_length"] == 12 and metrics["text"]["max_length_source"] == "training_config.yaml"
    )
    rows = load_rows(synth_folder, "test")

    def longer(texts):
        return sum(len(processor.tokenizer(text)["input_ids"]) > 12 for text in texts)

    reports = rows["detailed_report"]
    captions = [region["caption"] for regions in rows["regions"] for region in regions]
    negatives = [n for regions in rows["regions"] for region in regions for n in region["negatives"]]
    assert metrics["text"]["truncated"] == {
        "reports": longer(reports),
        "region_captions": longer(captions),
        "negatives": longer(negatives),
    }
    assert metrics["text"]["truncated"]["reports"] > 0  # synth reports are longer than 12 tokens
    assert metrics["text"]["num_texts"]["reports"] == len(reports)
    given = run_evaluation(
        EvalSettings(tmp_path / "model", synth_folder, tmp_path / "c", tasks="retrieval", max_length=20)
    )
    assert given["text"]["max_length"] == 20 and given["text"]["max_length_source"] == "given"


def test_resolve_device_auto_cpu_and_a_mocked_cuda(monkeypatch):
    from regionmed_clip.evaluation import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device(
        "cuda:1"
    )


def test_evaluation_moves_the_model_and_its_batches_to_the_resolved_device(
    tmp_path, synth_folder, tokenizer, monkeypatch
):
    from regionmed_clip import RegionMedCLIPModel
    from regionmed_clip.evaluation import EvalSettings, run_evaluation
    from regionmed_clip.evaluation.features import model_inputs

    tiny_model("pool").save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    moved = []

    class Moved(Exception):
        pass

    def record(self, *args, **kwargs):
        moved.append(torch.device(args[0]))
        raise Moved  # CUDA is mocked: stop before anything runs there

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(RegionMedCLIPModel, "to", record)
    with pytest.raises(Moved):
        run_evaluation(EvalSettings(tmp_path / "model", synth_folder, tmp_path / "eval", tasks="retrieval"))
    assert moved == [torch.device("cuda")]
    # Batches follow the model's parameters, floating tensors in its dtype (a meta model stands in for a GPU one).
    monkeypatch.undo()
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2, dtype=torch.bfloat16)
    batch = {"pixel_values": torch.zeros(1, 3, 4, 4), "input_ids": torch.zeros(1, 5, dtype=torch.long)}
    inputs = model_inputs(batch, meta)
    assert {t.device.type for t in inputs.values()} == {"meta"}
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long


def test_split_regions_match_the_boxes_and_captions_the_features_hold(synth_folder, tokenizer):
    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.evaluation import extract_features
    from regionmed_clip.evaluation.harness import split_regions

    table = split_regions(synth_folder, "test")
    features = extract_features(
        tiny_model("pool"), make_processor(tokenizer), load_rows(synth_folder, "test"), progress=False
    )
    torch.testing.assert_close(torch.from_numpy(table["boxes"]).float(), features.region_boxes)
    assert table["captions"] == features.region_captions and table["negatives"] == features.region_negatives
    assert torch.equal(table["image"], features.region_image)


def test_hard_negative_accuracy_from_scores_counts_ties_as_misses_and_leaves_out_regions_without_negatives():
    from regionmed_clip.evaluation.metrics import hard_negative_accuracy_from_scores

    positive = torch.tensor([0.5, 0.5, 0.5, 0.5])
    negative = torch.tensor([[0.4, 0.9], [0.5, -1.0], [0.1, 0.2], [0.0, 0.0]])
    mask = torch.tensor([[True, False], [True, True], [True, True], [False, False]])
    # Region 0: its real negative is below (the masked 0.9 does not count); 1: a tie; 2: above both; 3: none.
    assert hard_negative_accuracy_from_scores(positive, negative, mask) == pytest.approx(2 / 3)
    assert math.isnan(
        hard_negative_accuracy_from_scores(positive, torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.bool))
    )
    assert math.isnan(
        hard_negative_accuracy_from_scores(torch.zeros(0), torch.zeros(0, 2), torch.zeros(0, 2))
    )


def test_controls_without_training_regions_are_reported_as_skipped(tmp_path, synth_folder, tokenizer):
    import shutil

    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    data = tmp_path / "data"
    shutil.copytree(synth_folder, data)
    write_split(data, "train", [{**row, "regions": []} for row in load_rows(synth_folder, "train")])
    tiny_model("pool").save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    metrics = run_evaluation(
        EvalSettings(tmp_path / "model", data, tmp_path / "eval", tasks="region,grounding", bootstrap=0)
    )
    assert metrics["region"]["controls"] == {
        "box_only": {"skipped": "the train split has no regions to fit it on"},
        "text_only_prior": {"skipped": "no hard negatives in the train split or in the evaluated one"},
    }
    assert metrics["grounding"]["controls"] == {
        "box_only": {"skipped": "the train split has no regions to fit it on"}
    }
    assert "| pointing accuracy |" in (tmp_path / "eval" / "metrics.md").read_text()
    assert "skipped: the train split has no regions" in (tmp_path / "eval" / "metrics.md").read_text()
