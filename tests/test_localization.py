"""Finding a finding without boxes (phrase grounding and detection): the metrics against hand-computed figures and
naive references, and the harness tasks."""

import json
from itertools import pairwise

import numpy as np
import pytest
import torch

from regionmed_clip.evaluation.localization import (
    PRESENCE_THRESHOLDS,
    box_iou,
    box_rates,
    coco_box_metrics,
    contrast_to_noise,
    presence_auc,
)

from .conftest import make_processor, tiny_model


def naive_iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def naive_auc(scores, positive):
    """P(a positive outscores a negative), a tie counting half: the ROC AUC by its definition."""
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_box_iou_matches_a_naive_reference():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 0.6, (30, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(0.05, 0.4, (30, 2))], axis=1)
    iou = box_iou(boxes[:10], boxes[10:])
    for i in range(10):
        for j in range(20):
            assert iou[i, j] == pytest.approx(naive_iou(boxes[i], boxes[10 + j]))


def test_coco_box_metrics_give_the_hand_computed_figures():
    """Two images, two categories. Category 0 has a box on each image: a perfect detection on image 0 (0.9), its
    duplicate (0.8, a false positive) and a miss on image 1 (0.7): precision 1 up to recall 1/2, so COCO's 101
    recall points give 51/101 at every IoU threshold and AR 1/2. Category 1 has one box, on image 1: first a
    detection on image 0, which lacks the category (0.95, a false positive), then one of IoU 0.72 on image 1 (0.6):
    precision 1/2 at recall 1 for the thresholds 0.50 … 0.70 and nothing at 0.75 … 0.95, so AP50 1/2, AP@[.5:.95]
    5/10 × 1/2 and AR 5/10."""
    a, b, c = np.array([0.1, 0.1, 0.3, 0.3]), np.array([0.5, 0.5, 0.8, 0.9]), np.array([0.0, 0.0, 0.4, 0.4])
    assert naive_iou(c, [0.0, 0.0, 0.4, 0.288]) == pytest.approx(0.72)
    truths = {(0, 0): a[None], (1, 0): b[None], (1, 1): c[None]}
    detections = {
        (0, 0): (np.array([0.9, 0.8]), np.stack([a, a])),
        (1, 0): (np.array([0.7]), np.array([[0.0, 0.6, 0.2, 0.8]])),
        (0, 1): (np.array([0.95]), c[None]),
        (1, 1): (np.array([0.6]), np.array([[0.0, 0.0, 0.4, 0.288]])),
    }
    figures = coco_box_metrics(truths, detections, num_images=2)
    assert figures["ap50"] == pytest.approx((51 / 101 + 1 / 2) / 2)
    assert figures["ap"] == pytest.approx((51 / 101 + 1 / 4) / 2)
    assert figures["ar@100"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    # Without the false positive on the image that lacks category 1, that category is perfect up to IoU 0.70.
    del detections[0, 1]
    assert coco_box_metrics(truths, detections, num_images=2)["ap50"] == pytest.approx((51 / 101 + 1) / 2)
    assert coco_box_metrics(truths, {}, num_images=2) == {"ap": 0.0, "ap50": 0.0, "ar@100": 0.0}
    assert all(np.isnan(v) for v in coco_box_metrics({}, detections, num_images=2).values())


def test_presence_auc_matches_a_naive_reference_and_leaves_out_one_class_queries():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, size=(12, 5)).astype(float) / 4  # ties on purpose
    holds = rng.uniform(size=(12, 5)) < 0.4
    holds[:, 3] = True  # every image holds query 3, none query 4: neither has an AUC
    holds[:, 4] = False
    holds[0, :3], holds[1, :3] = True, False  # both classes in each of the others
    result = presence_auc(scores, holds)
    expected = np.mean([naive_auc(scores[:, q], holds[:, q]) for q in range(3)])
    assert result == {"presence_auc": pytest.approx(expected), "num_presence_queries": 3}


def test_box_rates_count_the_pairs_a_threshold_keeps_among_holders_and_the_rest():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(9, 4)).astype(float) / 10  # scores on the thresholds on purpose
    holds = rng.uniform(size=(9, 4)) < 0.4
    result = box_rates(scores, holds, thresholds=(0.1, 0.3))
    for threshold in (0.1, 0.3):
        kept = {True: [], False: []}
        for image in range(9):
            for query in range(4):
                kept[bool(holds[image, query])].append(scores[image, query] >= threshold)
        assert result[f"{threshold:g}"] == {
            "holds": pytest.approx(sum(kept[True]) / len(kept[True])),
            "lacks": pytest.approx(sum(kept[False]) / len(kept[False])),
        }
    assert np.isnan(box_rates(scores, np.zeros_like(holds), thresholds=(0.3,))["0.3"]["holds"])


def test_contrast_to_noise_matches_the_formula():
    rng = np.random.default_rng(1)
    heatmap = rng.normal(size=(16, 16))
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:9, 2:12] = True
    values_in, values_out = heatmap[inside], heatmap[~inside]
    expected = abs(values_in.mean() - values_out.mean()) / np.sqrt(values_in.var() + values_out.var())
    assert contrast_to_noise(heatmap, inside) == pytest.approx(expected)
    assert np.isnan(contrast_to_noise(heatmap, np.ones_like(inside)))


def saved_detector(folder, tokenizer):
    """A tiny detector saved as a model folder, its proposer drawn so that it has several peaks (it starts at
    zero)."""
    from regionmed_clip import RegionMedCLIPForZeroShotObjectDetection

    model = tiny_model("pool")
    with torch.no_grad():
        model.region_proposer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    RegionMedCLIPForZeroShotObjectDetection(model.config, model=model).save_pretrained(folder)
    make_processor(tokenizer, "pool").save_pretrained(folder)
    return folder


def test_cli_eval_finds_every_finding_in_both_protocols_beside_their_controls(
    tmp_path, synth_folder, tokenizer
):
    from regionmed_clip.cli import main
    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.data.vocabulary import without_position_words

    model = saved_detector(tmp_path / "model", tokenizer)
    arguments = ["eval", "--model", str(model), "--data", str(synth_folder), "--bootstrap", "0"]
    assert main([*arguments, "--tasks", "localization,detection", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = load_rows(synth_folder, "test")
    section = metrics["localization"]
    findings = sum(len({region["caption"] for region in row["regions"] or []}) for row in rows)
    assert section["caption"]["num_queries"] == findings
    position_free = [
        {without_position_words(region["caption"]) for region in row["regions"] or []} for row in rows
    ]
    assert section["position_free"]["num_queries"] == sum(map(len, position_free))
    for kind in ("caption", "position_free", "term"):
        figures = section[kind]
        assert set(figures["controls"]) == {"objectness_only", "box_prior"}
        for key in ("pointing_accuracy", "mean_iou", "ap50", "heatmap_pointing_accuracy"):
            assert 0.0 <= figures[key] <= 1.0, (kind, key)
        for control in figures["controls"].values():
            assert set(control) == {"pointing_accuracy", "mean_iou", "ap50"}
    # Detection asks every image every query: the split's distinct position-free captions and terms.
    detection = metrics["detection"]
    assert set(detection) == {"position_free", "term"}
    assert detection["position_free"]["num_queries"] == len(set().union(*position_free))
    terms = {region["term"] for row in rows for region in row["regions"] or []}
    assert detection["term"]["num_queries"] == len(terms)
    for figures in detection.values():
        assert figures["num_images"] == len(rows)
        assert set(figures["controls"]) == {"objectness_only", "box_prior", "heatmap_peak"}
        for result in (figures, *figures["controls"].values()):
            assert {"ap", "ap50", "ar@100", "presence_auc"} <= set(result)
            assert all(0.0 <= result[key] <= 1.0 for key in ("ap", "ap50", "ar@100", "presence_auc"))
        # No image: the prior scores a query alike on every image, which tells no image from another.
        assert figures["controls"]["box_prior"]["presence_auc"] == 0.5
        # A higher threshold keeps fewer pairs, in both groups; controls' scores are no probabilities.
        rates = [figures["box_rate"][f"{threshold:g}"] for threshold in PRESENCE_THRESHOLDS]
        for group in ("holds", "lacks"):
            assert all(a[group] >= b[group] for a, b in pairwise(rates)), group
        assert not any("box_rate" in control for control in figures["controls"].values())
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "## Phrase grounding without boxes" in table and "## Detection without boxes" in table
    # Detection alone asks its own kinds only.
    assert main([*arguments, "--tasks", "detection", "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert "localization" not in alone and alone["detection"] == detection


def test_detection_scores_what_the_pipeline_gives_a_user(tmp_path, synth_folder, tokenizer):
    """Each (image, query) of the evaluation holds the pipeline's detections for that label: the same scores, and
    the same boxes once the pipeline's pixels are read as fractions of the image (the processor stretches it)."""
    from transformers import AutoProcessor, pipeline

    from regionmed_clip import RegionMedCLIPForZeroShotObjectDetection
    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.evaluation.harness import split_regions
    from regionmed_clip.evaluation.localization import run_queries

    folder = saved_detector(tmp_path / "model", tokenizer)
    rows = load_rows(synth_folder, "test")
    detector = RegionMedCLIPForZeroShotObjectDetection.from_pretrained(folder).eval()
    run = run_queries(
        detector,
        AutoProcessor.from_pretrained(folder),
        rows,
        split_regions(synth_folder, "train"),
        kind="term",
        every_image=True,
        progress=False,
    )
    users = pipeline("zero-shot-object-detection", model=str(folder))
    for image in (0, 1):
        picture = rows[image]["image"].convert("RGB")
        for query, text in enumerate(run.texts[:2]):
            expected = users(picture, candidate_labels=[text], threshold=0.0)
            scores, boxes = run.detections["model"][image, query]
            assert scores == pytest.approx([d["score"] for d in expected], abs=1e-5)
            size = np.array(picture.size * 2)
            pixels = np.array([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in expected])
            assert np.abs(boxes * size - pixels).max() <= 1.0  # the pipeline rounds to whole pixels


def test_cli_locate_draws_the_pipelines_best_boxes_over_the_heatmap(tmp_path, synth_folder, tokenizer):
    from transformers import pipeline

    from regionmed_clip.cli import main
    from regionmed_clip.data.folder import load_rows

    model = tiny_model("pool")
    with torch.no_grad():
        model.region_proposer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "model")
    make_processor(tokenizer, "pool").save_pretrained(tmp_path / "model")
    row = load_rows(synth_folder, "test")[0]
    image = tmp_path / "scan.png"
    row["image"].save(image)
    text = row["regions"][0]["caption"]
    out = tmp_path / "locate.png"
    arguments = ["locate", "--model", str(tmp_path / "model"), "--image", str(image), "--text", text]
    assert main([*arguments, "--out", str(out), "--top-k", "2"]) == 0
    assert out.is_file() and out.stat().st_size > 0
    expected = pipeline("zero-shot-object-detection", model=str(tmp_path / "model"))(
        row["image"].convert("RGB"), candidate_labels=[text], threshold=0.0, top_k=2
    )
    from regionmed_clip.evaluation.grounding import LocateArgs, locate

    assert LocateArgs("m", "i", "t").out == "locate.png"
    result = locate(LocateArgs(tmp_path / "model", image, text, out=tmp_path / "again.png", top_k=2))
    assert [d["box"] for d in result["detections"]] == [d["box"] for d in expected]
    assert [d["score"] for d in result["detections"]] == pytest.approx(
        [d["score"] for d in expected], abs=1e-6
    )
