"""Text-queried localization without boxes: its metrics against naive references, and the harness task."""

import json

import numpy as np
import pytest
import torch

from regionmed_clip.evaluation.localization import average_precision, box_iou, contrast_to_noise

from .conftest import make_processor, tiny_model


def naive_iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def naive_ap50(detections, truths):
    """VOC all-point AP: greedy matching in score order, then the area under the monotone precision envelope."""
    used = [[False] * len(boxes) for boxes in truths]
    hits = []
    for _, query, box in sorted(detections, key=lambda item: -item[0]):
        best, best_iou = None, 0.5
        for index, truth in enumerate(truths[query]):
            overlap = naive_iou(box, truth)
            if not used[query][index] and overlap >= best_iou:
                best, best_iou = index, overlap
        if best is not None:
            used[query][best] = True
        hits.append(best is not None)
    total = sum(len(boxes) for boxes in truths)
    ap, previous_recall = 0.0, 0.0
    for rank in range(len(hits)):
        recall = sum(hits[: rank + 1]) / total
        envelope = max(sum(hits[: k + 1]) / (k + 1) for k in range(rank, len(hits)))
        ap += (recall - previous_recall) * envelope
        previous_recall = recall
    return ap


def test_box_iou_and_ap50_match_naive_references():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 0.6, (30, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(0.05, 0.4, (30, 2))], axis=1)
    iou = box_iou(boxes[:10], boxes[10:])
    for i in range(10):
        for j in range(20):
            assert iou[i, j] == pytest.approx(naive_iou(boxes[i], boxes[10 + j]))
    truths = [boxes[:2], boxes[2:3], boxes[3:6]]
    detections = []
    for query, truth in enumerate(truths):
        for box in truth:  # a near copy of every truth box (a hit) and a random box (mostly a miss)
            detections.append((float(rng.uniform()), query, box + rng.normal(0, 0.01, 4)))
            detections.append((float(rng.uniform()), query, boxes[rng.integers(6, 30)]))
    assert average_precision(detections, truths) == pytest.approx(naive_ap50(detections, truths))
    perfect = [(1.0, query, box) for query, truth in enumerate(truths) for box in truth]
    assert average_precision(perfect, truths) == pytest.approx(1.0)
    # A duplicate of a matched box is a false positive, not a second hit.
    assert average_precision([*perfect, (0.5, 0, truths[0][0])], truths) == pytest.approx(1.0)
    assert average_precision([(0.9, 0, truths[0][0]), (0.95, 0, truths[0][0])], truths) == pytest.approx(
        1 / 6
    )


def test_contrast_to_noise_matches_the_formula():
    rng = np.random.default_rng(1)
    heatmap = rng.normal(size=(16, 16))
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:9, 2:12] = True
    values_in, values_out = heatmap[inside], heatmap[~inside]
    expected = abs(values_in.mean() - values_out.mean()) / np.sqrt(values_in.var() + values_out.var())
    assert contrast_to_noise(heatmap, inside) == pytest.approx(expected)
    assert np.isnan(contrast_to_noise(heatmap, np.ones_like(inside)))


def test_cli_eval_localization_scores_every_finding_beside_its_controls(tmp_path, synth_folder, tokenizer):
    from regionmed_clip.cli import main
    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.data.vocabulary import without_position_words

    model = tiny_model("pool")
    with torch.no_grad():  # a proposer with several peaks (it starts at zero)
        model.region_proposer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "model")
    make_processor(tokenizer, "pool").save_pretrained(tmp_path / "model")
    arguments = ["eval", "--model", str(tmp_path / "model"), "--data", str(synth_folder), "--tasks"]
    assert main([*arguments, "localization", "--out", str(tmp_path / "eval"), "--bootstrap", "0"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    section = metrics["localization"]
    rows = load_rows(synth_folder, "test")
    findings = sum(len({region["caption"] for region in row["regions"] or []}) for row in rows)
    assert section["caption"]["num_queries"] == findings
    position_free = sum(
        len({without_position_words(region["caption"]) for region in row["regions"] or []}) for row in rows
    )
    assert section["position_free"]["num_queries"] == position_free
    for kind in ("caption", "position_free", "term"):
        figures = section[kind]
        assert set(figures["controls"]) == {"objectness_only", "box_prior"}
        for key in ("pointing_accuracy", "mean_iou", "ap50", "heatmap_pointing_accuracy"):
            assert 0.0 <= figures[key] <= 1.0, (kind, key)
        for control in figures["controls"].values():
            assert set(control) == {"pointing_accuracy", "mean_iou", "ap50"}
    assert "## Localization without boxes" in (tmp_path / "eval" / "metrics.md").read_text()


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
