"""Unit tests of the annotation pipeline's pieces: NMS against a naive reference, joint scoring, calibration with a
known answer, the report parser on canned valid and invalid answers, retries, splits and the batch store."""

import itertools
import json

import pyarrow.parquet as pq
import pytest
import torch

from regionmed_clip import caption_key
from regionmed_clip.annotation.calibration import CalibrationResult, calibrate, match_image
from regionmed_clip.annotation.pipeline import AnnotateConfig, apply_calibration, split_of
from regionmed_clip.annotation.proposals import (
    Proposal,
    ProposalConfig,
    box_iou,
    joint_score,
    mask_to_box,
    nms,
    select_proposals,
    stability_score,
)
from regionmed_clip.annotation.reports import (
    ReportError,
    build_messages,
    parse_report,
    summary_problems,
    write_report,
)
from regionmed_clip.annotation.store import AnnotationStore

SUMMARY = "A round nodule is seen in the left upper zone of this image."  # 13 words

# ---- proposals ---------------------------------------------------------------------------------------------------


def naive_iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    overlap = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union > 0 else 0.0


def naive_nms(boxes, scores, threshold) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(naive_iou(boxes[i], boxes[j]) <= threshold for j in keep):
            keep.append(i)
    return keep


def random_boxes(generator: torch.Generator, count: int, size: float = 100.0) -> torch.Tensor:
    corners = torch.rand(count, 2, generator=generator) * size
    extent = torch.rand(count, 2, generator=generator) * size / 3 + 1
    return torch.cat([corners, corners + extent], dim=1)


def test_box_iou_matches_naive():
    generator = torch.Generator().manual_seed(0)
    a, b = random_boxes(generator, 7), random_boxes(generator, 5)
    expected = torch.tensor([[naive_iou(x.tolist(), y.tolist()) for y in b] for x in a])
    torch.testing.assert_close(box_iou(a, b), expected)
    degenerate = torch.tensor([[3.0, 3.0, 3.0, 8.0]])
    assert box_iou(degenerate, degenerate).item() == 0.0


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_naive_reference(threshold):
    generator = torch.Generator().manual_seed(1)
    for count in (0, 1, 2, 40):
        boxes = random_boxes(generator, count, size=40.0)  # small canvas: many overlaps
        scores = torch.rand(count, generator=generator)
        kept = nms(boxes, scores, threshold).tolist()
        assert kept == naive_nms(boxes.tolist(), scores.tolist(), threshold)


def test_nms_keeps_first_of_equal_scores_and_suppresses_duplicates():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.9]), 0.5).tolist() == [2, 0]


def test_mask_to_box_and_stability():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    assert mask_to_box(mask) is None
    mask[2:4, 1:6] = True
    assert mask_to_box(mask) == [1.0, 2.0, 6.0, 4.0]  # x1, y1 exclusive: width 5, height 2
    logits = torch.full((4, 4), -5.0)
    logits[:2] = 5.0  # sharp edge
    assert stability_score(logits) == 1.0
    logits[2] = 0.5  # a band between -1 and +1 logit: the mask moves with the threshold
    assert stability_score(logits) == pytest.approx(8 / 12)
    assert stability_score(torch.full((3, 3), -5.0)) == 0.0


def test_joint_score_is_the_stated_product_clamped():
    assert joint_score(0.8, 0.5, 0.25) == pytest.approx(0.1)
    assert joint_score(1.2, -0.1, 0.5) == 0.0
    assert joint_score(1.2, 1.0, 0.5) == pytest.approx(0.5)


def _proposal(box, score, term="nodule") -> Proposal:
    return Proposal(
        box=box, term=term, score=score, detection_score=score, mask_quality=1.0, box_agreement=1.0
    )


def test_select_proposals_threshold_nms_top_k_and_commutation():
    proposals = [
        _proposal([0, 0, 10, 10], 0.9),
        _proposal([1, 1, 10, 10], 0.8, "mass"),  # duplicate of the first, whatever its term
        _proposal([20, 20, 30, 30], 0.6),
        _proposal([40, 40, 50, 50], 0.4),
        _proposal([60, 60, 70, 70], 0.2),
    ]
    kept = select_proposals(proposals, score_threshold=0.3, nms_iou=0.5, top_k=5)
    assert [p.score for p in kept] == [0.9, 0.6, 0.4]
    assert [p.score for p in select_proposals(proposals, 0.0, 0.5, 2)] == [0.9, 0.6]
    # Thresholding after selection with no threshold gives the same set: what calibration relies on.
    everything = select_proposals(proposals, 0.0, 0.5, 3)
    assert [p for p in everything if p.score >= 0.5] == select_proposals(proposals, 0.5, 0.5, 3)


def test_proposal_config_checks_and_scoring_settings():
    with pytest.raises(ValueError, match="mask_quality"):
        ProposalConfig(mask_quality="area")
    with pytest.raises(ValueError, match="term"):
        ProposalConfig(prompt_template="a lesion")
    settings = ProposalConfig(device="cpu", score_threshold=0.9).scoring_settings()
    assert "device" not in settings and "score_threshold" not in settings
    assert settings == ProposalConfig(device="cuda").scoring_settings()


# ---- calibration -------------------------------------------------------------------------------------------------


def known_answer_data():
    labelled = {"a": [[0, 0, 10, 10], [20, 20, 30, 30]], "b": [[0, 0, 10, 10]], "c": []}
    predictions = {
        "a": [
            ([0, 0, 10, 10], 0.9),  # TP
            ([1, 1, 10, 10], 0.8),  # duplicate of a found box: FP
            ([50, 50, 60, 60], 0.7),  # FP
            ([20, 20, 30, 30], 0.6),  # TP
        ],
        "b": [([0, 0, 9, 10], 0.5), ([40, 40, 50, 50], 0.3)],  # TP (IoU 0.9), FP
    }
    return predictions, labelled


def test_match_image_greedy_by_score():
    hits = match_image([[1, 1, 10, 10], [0, 0, 10, 10]], [0.8, 0.9], [[0, 0, 10, 10]])
    assert hits == [False, True]
    assert match_image([[0, 0, 10, 10]], [0.5], [[0, 0, 10, 30]], iou_threshold=0.5) == [False]  # IoU 1/3


def test_calibration_known_answer():
    predictions, labelled = known_answer_data()
    result = calibrate(predictions, labelled, iou_threshold=0.5)
    # threshold: 0.9 → TP1 FP0, 0.8 → 1/1, 0.7 → 1/2, 0.6 → 2/2, 0.5 → 3/2, 0.3 → 3/3; 3 labelled boxes.
    assert [round(point["f1"], 4) for point in result.curve] == [0.5, 0.4, 0.3333, 0.5714, 0.75, 0.6667]
    assert result.threshold == 0.5
    assert (result.true_positives, result.false_positives, result.false_negatives) == (3, 2, 0)
    assert (
        result.precision == pytest.approx(0.6) and result.recall == 1.0 and result.f1 == pytest.approx(0.75)
    )
    assert result.per_image[0] == {
        "image": "a",
        "true_positives": 2,
        "false_positives": 2,
        "false_negatives": 0,
    }
    assert "threshold 0.5000" in result.describe()


def test_calibration_ties_prefer_the_higher_threshold_and_errors():
    labelled = {"a": [[0, 0, 10, 10], [20, 20, 30, 30]]}
    # 0.9: TP (P 1, R .5, F1 .667); 0.5: FP, 0.4: TP → P 2/3, R 1, F1 .8 ; 0.2: FP → .667
    predictions = {
        "a": [([0, 0, 10, 10], 0.9), ([5, 50, 9, 60], 0.5), ([20, 20, 30, 30], 0.4), ([70, 70, 80, 80], 0.2)]
    }
    assert calibrate(predictions, labelled).threshold == 0.4
    # F1 2/3 at 0.9 (TP 1, FN 1) and again at 0.5 (TP 2, FP 2): the higher threshold wins the tie.
    tie = {
        "a": [([0, 0, 10, 10], 0.9), ([70, 70, 80, 80], 0.7), ([5, 50, 9, 60], 0.6), ([20, 20, 30, 30], 0.5)]
    }
    tied = calibrate(tie, labelled)
    assert [round(point["f1"], 4) for point in tied.curve] == [0.6667, 0.5, 0.4, 0.6667]
    assert tied.threshold == 0.9
    with pytest.raises(ValueError, match="no boxes"):
        calibrate(predictions, {"a": []})
    with pytest.raises(ValueError, match="found nothing"):
        calibrate({}, labelled)
    with pytest.raises(ValueError, match="not in the labelled set"):
        calibrate({"z": []}, labelled)


def test_calibration_round_trip_and_settings_check(tmp_path):
    predictions, labelled = known_answer_data()
    result = calibrate(predictions, labelled)
    result.settings = ProposalConfig(top_k=3).scoring_settings()
    path = result.save(tmp_path / "calibration.json")
    assert CalibrationResult.load(path) == result
    applied = apply_calibration(ProposalConfig(top_k=3, device="cpu"), str(path))
    assert applied.score_threshold == 0.5
    with pytest.raises(ValueError, match="top_k=3"):
        apply_calibration(ProposalConfig(top_k=5), str(path))


# ---- report parser -----------------------------------------------------------------------------------------------


def answer(**fields) -> str:
    value = {
        "image": "x.png",
        "summary_caption": SUMMARY,
        "detailed_report": "A well-circumscribed round nodule in the left upper zone.",
        "region_extraction": "round|nodule|left upper",
    }
    value.update(fields)
    return json.dumps({key: item for key, item in value.items() if item is not None})


def test_parse_valid_single_region_generates_negatives():
    report = parse_report("Sure, here it is:\n```json\n" + answer() + "\n```", num_regions=1)
    assert report.summary_caption == SUMMARY
    (region,) = report.regions
    assert (region.adjective, region.term, region.position) == ("round", "nodule", "left upper")
    assert region.caption == "round nodule left upper"
    assert region.negatives_generated and len(region.negatives) == 5
    assert report.negatives_generated == 1
    assert caption_key(region.caption) not in {caption_key(n) for n in region.negatives}


def test_parse_valid_lists_negatives_and_no_finding():
    text = answer(
        region_extraction=["Oval|Cyst|Right Lower", "No Finding", "ill-defined|opacity|center"],
        negative_variations=[
            ["irregular", "spiculated", "linear", "round", "lobulated"],
            [],
            ["well-defined opacity center", "smooth", "circumscribed", "indistinct", "infiltrative"],
        ],
    )
    report = parse_report(text, num_regions=3)
    first, second, third = report.regions
    assert second is None
    assert first.caption == "oval cyst right lower" and not first.negatives_generated
    assert first.negatives[0] == "irregular cyst right lower"  # a bare adjective replaces the adjective
    assert (
        third.negatives[0] == "well-defined opacity center" and third.negatives[1] == "smooth opacity center"
    )
    assert report.negatives_generated == 0
    assert parse_report(answer(region_extraction="No Finding"), num_regions=2).regions == [None, None]
    single_list = answer(negative_variations=["oval", "irregular", "spiculated", "lobulated", "linear"])
    assert parse_report(single_list, num_regions=1).regions[0].negatives[1] == "irregular nodule left upper"
    assert parse_report(answer(region_extraction=None), num_regions=0).regions == []


@pytest.mark.parametrize(
    ("text", "regions", "expected"),
    [
        ("I cannot help with that.", 1, "no JSON object"),
        ('{"summary_caption": "x",}', 1, "does not parse"),
        ("[1, 2]", 1, "no JSON object"),
        (answer(summary_caption="Round nodule left upper."), 1, "has 4 words"),
        (answer(summary_caption="A round nodule, seen in the left upper zone of this image."), 1, "commas"),
        (answer(summary_caption="A round nodule is seen in the left upper zone of this image"), 1, "period"),
        (
            answer(summary_caption="A round nodule. It is seen in the left upper zone here."),
            1,
            "single sentence",
        ),
        (answer(detailed_report=""), 1, "detailed_report"),
        (answer(region_extraction=None), 1, "region_extraction is missing"),
        (answer(region_extraction="round|nodule|left upper"), 2, "list of 2 entries"),
        (answer(region_extraction="round nodule|left upper"), 1, "three parts"),
        (answer(region_extraction="round||left upper"), 1, "non-empty term"),
        (answer(region_extraction="round|nodule|apical segment"), 1, "use only"),
        (answer(negative_variations=["oval", "irregular"]), 1, "5 non-empty strings"),
        (answer(negative_variations=["round", "oval", "irregular", "linear", "lobulated"]), 1, "repeats"),
        (answer(negative_variations=["oval", "oval", "irregular", "linear", "lobulated"]), 1, "different"),
        (answer(negative_variations=[["oval"] * 5, ["round"] * 5]), 1, "list of 1 lists"),
        (answer(region_extraction="sessile|polyp|center"), 1, "not one we can contradict"),
    ],
)
def test_parse_invalid_answers(text, regions, expected):
    with pytest.raises(ReportError) as raised:
        parse_report(text, num_regions=regions)
    assert any(expected in problem for problem in raised.value.problems), raised.value.problems


def test_summary_rule_allows_decimals_and_counts_every_problem():
    assert summary_problems("A 3.5 cm round nodule is seen in the left upper lung zone.") == []
    assert len(summary_problems("Nodule, left; upper")) == 3


def test_prompt_lists_candidates_and_keeps_figure_6():
    messages = build_messages("scan.png", 100, 80, [([10, 10, 30, 30], "nodule"), ([60, 50, 90, 78], "mass")])
    assert messages[0]["role"] == "system" and "radiologist" in messages[0]["content"][0]["text"]
    image, text = messages[1]["content"]
    assert image == {"type": "image"}
    prompt = text["text"]
    for part in (
        "Role: Radiologist analyzing medical images",
        '"region_extraction"',
        "No Finding",
        "10 to 15",
    ):
        assert part in prompt
    assert "1. [10, 10, 30, 30] (detector: nodule; grid position: left upper)" in prompt
    assert "2. [60, 50, 90, 78] (detector: mass; grid position: right lower)" in prompt
    assert "No candidate regions" in build_messages("scan.png", 100, 80, [])[1]["content"][1]["text"]


def test_write_report_retries_with_feedback_then_succeeds_or_rejects():
    calls = []

    def flaky(image, messages):
        calls.append(messages)
        return "not json" if len(calls) == 1 else answer()

    outcome = write_report(flaky, image=_image(), image_name="x.png", regions=[([1, 1, 5, 5], "nodule")])
    assert outcome.report is not None and outcome.attempts == 2
    retry = calls[1]
    assert retry[-2] == {"role": "assistant", "content": [{"type": "text", "text": "not json"}]}
    assert "no JSON object" in retry[-1]["content"][0]["text"]

    calls.clear()
    outcome = write_report(
        lambda image, messages: calls.append(1) or "{}", _image(), "x.png", [], max_attempts=3
    )
    assert outcome.report is None and outcome.attempts == 3 and len(calls) == 3
    assert any("summary_caption" in problem for problem in outcome.problems)


def _image():
    from PIL import Image

    return Image.new("RGB", (20, 16))


# ---- images ------------------------------------------------------------------------------------------------------


def test_list_and_read_images(tmp_path):
    import numpy as np
    from PIL import Image

    from regionmed_clip.annotation.images import DecodeError, list_images, read_image

    (tmp_path / "sub").mkdir()
    Image.fromarray(np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 300).save(
        tmp_path / "sub" / "deep.png"
    )
    _image().save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    listed = list_images(tmp_path)
    assert [image_id for image_id, _ in listed] == ["a", "sub/deep"]
    image, stored = read_image(tmp_path / "sub" / "deep.png")
    assert image.mode == "RGB" and image.size == (12, 10)
    assert stored == {
        "bytes": (tmp_path / "sub" / "deep.png").read_bytes(),
        "path": "deep.png",
    }  # not re-encoded
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(DecodeError, match="broken.png"):
        read_image(tmp_path / "broken.png")
    _image().save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="would both get the id 'a'"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


# ---- splits and the store ----------------------------------------------------------------------------------------


def test_split_of_is_stable_and_follows_ratios():
    ids = [f"image-{index}" for index in range(2000)]
    splits = [split_of(image_id, (0.8, 0.1, 0.1)) for image_id in ids]
    assert splits == [split_of(image_id, (0.8, 0.1, 0.1)) for image_id in ids]
    assert 0.75 < splits.count("train") / len(ids) < 0.85
    assert {split_of(image_id, (1.0, 0.0, 0.0)) for image_id in ids} == {"train"}
    with pytest.raises(ValueError, match="ratios"):
        AnnotateConfig(images="x", out="y", ratios=(0.5, 0.5, 0.5))


def _row(image_id: str) -> dict:
    import io

    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    return {
        "id": image_id,
        "image": {"bytes": buffer.getvalue(), "path": f"{image_id}.png"},
        "modality": "unknown",
        "summary_caption": SUMMARY,
        "detailed_report": "report",
        "regions": [],
        "label": None,
    }


def test_store_batches_resume_and_finalize(tmp_path):
    with AnnotationStore(tmp_path) as store:
        assert (tmp_path / ".annotate.lock").read_text() != ""
        store.write_batch({"train": [_row("a"), _row("b")], "test": [_row("c")]}, {"rejected": {}})
        store.write_batch(
            {"train": [_row("d")]}, {"rejected": {"e": {"problems": ["bad"]}}, "unreadable": {}}
        )
        (tmp_path / "data" / ".train-batch-00002.parquet.partial").write_bytes(b"half a file")
    assert not (tmp_path / ".annotate.lock").exists()
    with open(tmp_path / "annotation_journal.jsonl", "a") as handle:
        handle.write('{"batch": 9, "rejec')  # a line cut short by a crash

    with AnnotationStore(tmp_path) as store:
        assert not list((tmp_path / "data").glob(".*"))
        assert store.written_ids() == {"a", "b", "c", "d"}
        assert store.failed_ids() == {"e": "bad"}
        assert store.write_batch({"validation": [_row("f")]}, {}) == 2
        counts = store.finalize("demo", "a test folder")
        assert counts == {"train": 3, "validation": 1, "test": 1}
        names = sorted(path.name for path in (tmp_path / "data").glob("*.parquet"))
        assert names == [
            "test-00000-of-00001.parquet",
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet",
            "validation-00000-of-00001.parquet",
        ]
        assert pq.read_table(tmp_path / "data" / names[1]).column("id").to_pylist() == ["a", "b"]
        # A later run adds a batch: earlier files keep their order, the new one goes last.
        store.write_batch({"train": [_row("g")]}, {})
        assert store.finalize("demo", "again")["train"] == 4
        assert pq.read_table(tmp_path / "data" / "train-00002-of-00003.parquet").column("id").to_pylist() == [
            "g"
        ]
    assert (tmp_path / "README.md").read_text().startswith("---")


def test_store_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".annotate.lock").write_text(str(sleeper.pid))
        with pytest.raises(RuntimeError, match="another annotate run"), AnnotationStore(tmp_path):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with AnnotationStore(tmp_path):  # the holder is dead: its lock is stale
        pass


def test_combinations_of_nms_thresholds_are_monotone():
    generator = torch.Generator().manual_seed(3)
    boxes, scores = random_boxes(generator, 30, size=30.0), torch.rand(30, generator=generator)
    counts = [len(nms(boxes, scores, t)) for t in (0.1, 0.3, 0.5, 0.9)]
    assert all(a <= b for a, b in itertools.pairwise(counts))
