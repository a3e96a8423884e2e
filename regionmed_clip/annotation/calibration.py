"""Calibration of the proposal threshold on a small hand-labelled set (the paper's "starting from a small manually
labeled set").

The proposer is run on the labelled images with no score threshold; every proposal is matched to the labelled
boxes at IoU >= 0.5 (greedily, best score first, each labelled box matched at most once: the COCO / VOC rule), so a
duplicate of a found lesion counts as a false positive. Keeping the proposals with score >= t then gives a
precision and a recall for every t; the chosen threshold maximises F1 = 2PR / (P + R), and among equal F1 the higher
threshold wins (fewer, surer regions). Because a proposal's match depends only on higher-scored proposals of its
image, one matching pass yields the whole precision / recall curve.

Iterating: the saved report lists the images with the most errors at the chosen threshold. Label a few more images
like those (or fix the prompt terms), add them to the box file and calibrate again; `annotate run --calibration`
then uses the new threshold.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.importers import read_box_file
from .images import list_images, read_image
from .proposals import ProposalConfig, box_iou


@dataclass
class CalibrationResult:
    """The chosen threshold with its precision / recall / F1 on the labelled set, the whole curve, per-image errors
    at the chosen threshold (worst first) and the proposal settings it is valid for."""

    threshold: float
    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int
    iou_threshold: float
    num_images: int
    num_labelled: int
    curve: list[dict] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def describe(self, worst: int = 5) -> str:
        lines = [
            f"threshold {self.threshold:.4f}: precision {self.precision:.3f}, recall {self.recall:.3f}, "
            f"F1 {self.f1:.3f} at IoU {self.iou_threshold} ({self.true_positives} TP, {self.false_positives} FP, "
            f"{self.false_negatives} FN over {self.num_labelled} labelled boxes in {self.num_images} images)"
        ]
        errors = [entry for entry in self.per_image if entry["false_positives"] + entry["false_negatives"]]
        if errors:
            lines.append("images with the most errors (label more like these, then calibrate again):")
            lines += [
                f"  {entry['image']}: {entry['false_positives']} FP, {entry['false_negatives']} FN"
                for entry in errors[:worst]
            ]
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationResult":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def match_image(
    boxes: list[list[float]], scores: list[float], labelled: list[list[float]], iou_threshold: float = 0.5
) -> list[bool]:
    """Whether each proposal of one image is a true positive: in descending score order, a proposal takes the
    still-unmatched labelled box it overlaps most, if that IoU is >= `iou_threshold`."""
    hits = [False] * len(boxes)
    if not boxes or not labelled:
        return hits
    overlaps = box_iou(torch.tensor(boxes, dtype=torch.float64), torch.tensor(labelled, dtype=torch.float64))
    taken = torch.zeros(len(labelled), dtype=torch.bool)
    for index in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        candidates = overlaps[index].masked_fill(taken, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou_threshold:
            taken[best] = True
            hits[index] = True
    return hits


def calibrate(
    predictions: dict[str, list[tuple[list[float], float]]],
    labelled: dict[str, list[list[float]]],
    iou_threshold: float = 0.5,
) -> CalibrationResult:
    """The F1-maximising score threshold of `predictions` ({image: [(box, score), ...]}) against `labelled`
    ({image: [box, ...]}; an image with an empty list has no lesion). Images missing from `predictions` had no
    proposals.

    Raises:
        ValueError: there are no proposals, or no labelled boxes, to calibrate on.
    """
    num_labelled = sum(len(boxes) for boxes in labelled.values())
    if num_labelled == 0:
        raise ValueError("the labelled set has no boxes: label at least a few lesions to calibrate against")
    unknown = sorted(set(predictions) - set(labelled))
    if unknown:
        raise ValueError(f"predictions for images that are not in the labelled set: {unknown[:5]}")
    scored = []  # (score, hit, image)
    for image, proposals in predictions.items():
        boxes = [list(box) for box, _ in proposals]
        scores = [float(score) for _, score in proposals]
        hits = match_image(boxes, scores, labelled[image], iou_threshold)
        scored += [(score, hit, image) for score, hit in zip(scores, hits, strict=True)]
    if not scored:
        raise ValueError(
            "the proposer found nothing on the labelled images: lower detection_threshold or check the terms"
        )
    scored.sort(key=lambda item: -item[0])

    curve, true_positives, false_positives = [], 0, 0
    best = None
    for position, (score, hit, _) in enumerate(scored):
        true_positives += hit
        false_positives += not hit
        if position + 1 < len(scored) and scored[position + 1][0] == score:
            continue  # a threshold keeps all proposals of equal score or none of them
        precision = true_positives / (true_positives + false_positives)
        recall = true_positives / num_labelled
        f1 = 2 * true_positives / (2 * true_positives + false_positives + (num_labelled - true_positives))
        point = {"threshold": score, "precision": precision, "recall": recall, "f1": f1}
        curve.append(point)
        # Strictly greater: scores descend, so on a tie the higher threshold (found first) is kept.
        if best is None or f1 > best[0]["f1"]:
            best = (point, true_positives, false_positives)
    point, true_positives, false_positives = best

    per_image = {image: {"image": image, "true_positives": 0, "false_positives": 0} for image in labelled}
    for score, hit, image in scored:
        if score >= point["threshold"]:
            per_image[image]["true_positives" if hit else "false_positives"] += 1
    for image, entry in per_image.items():
        entry["false_negatives"] = len(labelled[image]) - entry["true_positives"]
    ranked = sorted(
        per_image.values(), key=lambda e: (-(e["false_positives"] + e["false_negatives"]), e["image"])
    )
    return CalibrationResult(
        threshold=point["threshold"],
        precision=point["precision"],
        recall=point["recall"],
        f1=point["f1"],
        true_positives=true_positives,
        false_positives=false_positives,
        false_negatives=num_labelled - true_positives,
        iou_threshold=iou_threshold,
        num_images=len(labelled),
        num_labelled=num_labelled,
        curve=curve,
        per_image=ranked,
    )


@dataclass
class CalibrationSet:
    """The hand-labelled images `calibrate_folder` calibrates the proposal threshold on, and where it writes."""

    images: str = field(metadata={"help": "Folder of the labelled images"})
    boxes: str = field(
        metadata={
            "help": "Their boxes in pixels, keyed by file name relative to `images` (JSON or CSV; see "
            "`regionmed_clip.data.read_box_file`); an image listed with no boxes has no lesion"
        }
    )
    out: str = field(
        default="calibration.json",
        metadata={"help": "Where the calibration report goes; pass it to `annotate run --calibration`"},
    )
    iou_threshold: float = field(
        default=0.5, metadata={"help": "IoU at which a proposal finds a labelled box"}
    )


def calibrate_folder(
    labelled: CalibrationSet, proposals: ProposalConfig | None = None, proposer=None, progress: bool = True
) -> CalibrationResult:
    """Run the proposer on the labelled images and save the calibrated threshold to `labelled.out` (JSON).

    Args:
        labelled: The labelled images, their boxes, where the report goes and the IoU of a match.
        proposals: Detector / segmenter settings; the threshold is only valid for these (their own
            `score_threshold` is what calibration chooses, so it is not read).
        proposer: An object with `propose(images, score_threshold)` (default: `RoiProposer(proposals)`).
        progress: Show a progress bar.
    """
    from tqdm.auto import tqdm

    proposals = proposals or ProposalConfig()
    images, boxes = Path(labelled.images), labelled.boxes
    table = read_box_file(boxes)
    if not table:
        raise ValueError(f"{boxes} lists no images")
    by_name = {path.relative_to(images).as_posix(): path for _, path in list_images(images)}
    missing = sorted(name for name in table if name not in by_name)
    if missing:
        raise FileNotFoundError(f"labelled images not found under {images}: {missing[:5]}")
    if proposer is None:
        from .proposals import RoiProposer

        proposer = RoiProposer(proposals)
    predictions = {}
    for name in tqdm(sorted(table), desc="calibrate", unit="img", disable=not progress):
        image, _ = read_image(by_name[name])
        found = proposer.propose([image], score_threshold=0.0)[0]
        predictions[name] = [(proposal.box, proposal.score) for proposal in found]
    truth = {name: [entry["bbox"] for entry in entries] for name, entries in table.items()}
    result = calibrate(predictions, truth, labelled.iou_threshold)
    result.settings = proposals.scoring_settings()
    result.save(labelled.out)
    return result


__all__ = ["CalibrationResult", "CalibrationSet", "calibrate", "calibrate_folder", "match_image"]
