"""The MedRegion row schema (one `datasets.Features`) and the row validator.

One row per image: `id`, `image`, `modality`, `summary_caption`, `detailed_report`, `regions` (each with a pixel
`bbox` [x0, y0, x1, y1], `adjective`, `term`, `position`, `caption`, `negatives`, `score`, `source`) and an optional
`label`. Synthetic VQA pairs live in a second config with `VQA_FEATURES`, pointing at rows by `image_id`.

A region's `caption` is free text and the only text a region needs; `adjective`, `term` and `position` are optional
structure (the paper's triple, or what the vocabulary finds in the caption), empty strings where absent: anatomy
and detection regions have no lesion adjective. `make_region` and `make_row` build every row that is written
(importers, MedRegion-synth, the annotation pipeline), so the dict layout is spelled once.
"""

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from ..image_processing_regionmed_clip import decode_image, is_dicom_file
from ..processing_regionmed_clip import caption_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom")

REGION_FEATURES = {
    "bbox": List(Value("float32"), length=4),
    "adjective": Value("string"),
    "term": Value("string"),
    "position": Value("string"),
    "caption": Value("string"),
    "negatives": List(Value("string")),
    "score": Value("float32"),
    "source": Value("string"),
}

FEATURES = Features(
    {
        "id": Value("string"),
        "image": Image(),
        "modality": Value("string"),
        "summary_caption": Value("string"),
        "detailed_report": Value("string"),
        "regions": List(REGION_FEATURES),
        "label": Value("string"),
    }
)

VQA_FEATURES = Features(
    {
        "id": Value("string"),
        "image_id": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "answer_type": Value("string"),
        "question_type": Value("string"),
    }
)

SPLITS = ("train", "validation", "test")


def stored_image(path: str | os.PathLike) -> dict:
    """The `image` value of a file: its own bytes (no re-encoding, so boxes stay in its pixel frame), except DICOM,
    which `datasets` cannot decode: it is stored as the PNG of the package's decoding (`decode_image`: modality and
    VOI LUT, MONOCHROME1 inverted), which keeps the pixel frame too.

    Raises:
        DecodeError: a DICOM file cannot be decoded; the message names it.
    """
    path = Path(path)
    if not is_dicom_file(path):
        return {"bytes": path.read_bytes(), "path": path.name}
    pixels = decode_image(path, where="image")
    buffer = io.BytesIO()
    PILImage.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB").save(
        buffer, format="PNG"
    )
    return {"bytes": buffer.getvalue(), "path": path.with_suffix(".png").name}


def make_region(
    *,
    bbox: Sequence[float],
    caption: str,
    negatives: Sequence[str] = (),
    adjective: str = "",
    term: str = "",
    position: str = "",
    score: float = 1.0,
    source: str = "",
) -> dict:
    """One region of a row: a pixel box `[x0, y0, x1, y1]`, its free-text caption, its hard negatives, and the
    optional adjective / term / position structure."""
    return {
        "bbox": [float(value) for value in bbox],
        "adjective": adjective or "",
        "term": term or "",
        "position": position or "",
        "caption": caption,
        "negatives": [str(negative) for negative in negatives],
        "score": float(score),
        "source": source,
    }


def make_row(
    *,
    id: str,
    image,
    summary_caption: str,
    detailed_report: str,
    regions: Sequence[dict] = (),
    modality: str = "unknown",
    label: str | None = None,
) -> dict:
    """One row: an image (PIL, or an encoded `{"bytes", "path"}` dict), its captions and its regions (each from
    `make_region`). `label` is `None` when the data has none."""
    return {
        "id": str(id),
        "image": image,
        "modality": modality,
        "summary_caption": summary_caption,
        "detailed_report": detailed_report,
        "regions": list(regions),
        "label": None if label is None else str(label),
    }


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a decoded PIL image or an encoded `{"bytes", "path"}` dict; raises if it cannot decode."""
    if isinstance(image, PILImage.Image):
        image.load()
        return image.size
    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
        if source is None:
            raise ValueError("image has neither bytes nor a path")
        with PILImage.open(source) as opened:
            opened.load()
            return opened.size
    raise ValueError(f"unsupported image value of type {type(image).__name__}")


def row_problems(row: dict) -> list[str]:
    """Everything wrong with one row, as readable strings (empty when the row is valid)."""
    problems = []
    try:
        width, height = _image_size(row["image"])
    except Exception as error:
        problems.append(f"image does not decode: {error}")
        width = height = None
    for name in ("id", "summary_caption", "detailed_report"):
        if not str(row.get(name) or "").strip():
            problems.append(f"{name} is empty")
    for index, region in enumerate(row.get("regions") or []):
        where = f"region {index}"
        box = region.get("bbox")
        if box is None or len(box) != 4:
            problems.append(f"{where}: bbox must be [x0, y0, x1, y1], got {box}")
        else:
            x0, y0, x1, y1 = box
            if not (x1 > x0 and y1 > y0):
                problems.append(f"{where}: bbox {list(box)} has no positive area")
            elif width is not None and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
                problems.append(f"{where}: bbox {list(box)} lies outside the {width}x{height} image")
        caption = str(region.get("caption") or "").strip()
        positive = caption_key(caption)
        if not caption:
            problems.append(f"{where}: caption is empty")
        elif not positive:
            problems.append(f"{where}: caption {caption!r} has no words once punctuation is removed")
        for negative in region.get("negatives") or []:
            if not str(negative).strip():
                problems.append(f"{where}: a negative caption is empty")
            elif caption_key(negative) == positive:
                problems.append(f"{where}: negative {negative!r} equals the caption")
    return problems


@dataclass
class ValidationReport:
    """What `validate_rows` found: invalid rows by id with their problems, how many rows were checked, and the
    file they came from (`source`, when known)."""

    checked: int = 0
    invalid: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def describe(self, limit: int = 20) -> str:
        where = f" of {self.source}" if self.source else ""
        lines = [f"{len(self.invalid)} of {self.checked} rows{where} are invalid:"]
        for row_id, problems in list(self.invalid.items())[:limit]:
            lines.append(f"  {row_id}: {'; '.join(problems)}")
        if len(self.invalid) > limit:
            lines.append(f"  ... and {len(self.invalid) - limit} more")
        return "\n".join(lines)


class InvalidRowsError(ValueError):
    """Rows failed validation; the message lists them by id."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(
            report.describe() + "\n(pass skip_invalid=True / --skip-invalid to drop and count them)"
        )


def validate_rows(rows, skip_invalid: bool = False, report: ValidationReport | None = None):
    """Yield the valid rows of an iterable, checking ids are unique.

    Invalid rows raise `InvalidRowsError` listing every bad row (after the whole input was checked), or with
    `skip_invalid=True` are left out and counted in `report`; nothing is dropped silently.
    """
    report = report if report is not None else ValidationReport()
    seen: set[str] = set()
    for row in rows:
        report.checked += 1
        problems = row_problems(row)
        row_id = str(row.get("id") or f"<row {report.checked - 1}>")
        if row_id in seen:
            problems.append("duplicate id")
        seen.add(row_id)
        if problems:
            report.invalid[row_id] = problems
        elif not report.invalid or skip_invalid:
            yield row
    if report.invalid and not skip_invalid:
        raise InvalidRowsError(report)
