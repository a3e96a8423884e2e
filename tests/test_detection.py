"""The detector in OWL-ViT's sense, end to end: trained in the test on images that hold one of two findings, the
`zero-shot-object-detection` pipeline at `threshold=0.3` reports a well-fitting box where the finding is and no box
where it is not."""

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPImageProcessor, RegionMedCLIPProcessor
from regionmed_clip.training import RegionMedCLIPForPreTraining

from .conftest import tiny_text_config, tiny_vision_config

SIZE = 64
FINDINGS = ("round nodule", "dark square")


def scan(finding: str, rng: np.random.Generator) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A noisy grey image holding one finding, and its box in pixels: a bright disc or a dark square."""
    pixels = rng.normal(128, 12, (SIZE, SIZE)).clip(0, 255)
    half = rng.uniform(6, 9)
    cx, cy = rng.uniform(half + 1, SIZE - half - 1, size=2)
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    if finding == "round nodule":
        inside = np.hypot(xx - cx, yy - cy) <= half
        pixels[inside] = 235
    else:
        inside = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
        pixels[inside] = 25
    rows, cols = np.nonzero(inside)
    box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return Image.fromarray(pixels.astype(np.uint8)), box


def _iou(box, other) -> float:
    low, high = np.maximum(box[:2], other[:2]), np.minimum(box[2:], other[2:])
    inter = np.prod(np.clip(high - low, 0, None))
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    return inter / (area(box) + area(other) - inter)


def test_a_trained_detector_reports_the_finding_where_it_is_and_nothing_where_it_is_not(tmp_path, tokenizer):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = RegionMedCLIPConfig(
        vision_config=tiny_vision_config(image_size=SIZE),
        text_config=tiny_text_config(),
        projection_dim=16,
        roi_num_heads=4,
        max_regions=1,
    )
    processor = RegionMedCLIPProcessor(
        RegionMedCLIPImageProcessor(size={"height": SIZE, "width": SIZE}, max_regions=1), tokenizer
    )
    # The proposer's objectness picks the boxes the detector reads again as regions.
    objective = RegionMedCLIPForPreTraining(
        config, loss_weights={"detection_loss": 1.0, "proposal_loss": 1.0}
    ).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    for _ in range(600):
        findings = [FINDINGS[index % 2] for index in range(8)]
        images, boxes = zip(*(scan(finding, rng) for finding in findings), strict=True)
        batch = processor(
            images=list(images),
            boxes=[[box] for box in boxes],
            region_text=[[finding] for finding in findings],
            term_text=[[finding] for finding in findings],
            return_tensors="pt",
        )
        optimizer.zero_grad()
        objective(**batch).loss.backward()
        optimizer.step()

    objective.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    detector = pipeline("zero-shot-object-detection", model=str(tmp_path / "model"))
    hits, false_alarms = [], 0
    for trial in range(10):
        nodule, box = scan("round nodule", np.random.default_rng(100 + trial))
        square, _ = scan("dark square", np.random.default_rng(200 + trial))
        found = detector(nodule, candidate_labels=["round nodule"], threshold=0.3)
        hits.append(
            bool(found) and _iou(np.array(list(found[0]["box"].values()), float), np.array(box)) >= 0.5
        )
        false_alarms += len(detector(square, candidate_labels=["round nodule"], threshold=0.3))
    assert false_alarms == 0
    assert all(hits), hits
