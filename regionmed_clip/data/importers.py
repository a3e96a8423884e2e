"""Importers from the formats people have into MedRegion dataset folders.

- `import_annotations`: the paper's annotation JSON / JSONL (`image`, `summary_caption`, `detailed_report`,
  `region_extraction` "adjective|term|position", `negative_variations`) plus a box file.
- `import_coco`: COCO-style detection JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`).
- `import_image_csv`: an image folder and a CSV of `path, report[, label]` for global-only data.

Every importer reads its input once to learn the row ids (for the split), then streams the rows through the
validator into parquet shards. A row that cannot be built or fails validation is reported by id; with
`skip_invalid=True` it is left out and counted instead.

Args (the parameters every importer shares; each importer's docstring adds its own):
    image_root: Folder the image file names are relative to.
    out_dir: The dataset folder to write (parquet shards and a dataset card).
    modality: The `modality` of rows that do not name their own.
    ratios: Train / validation / test shares of a seeded split, for rows without a `split` field.
    seed: Seed of the split and of the generated hard negatives.
    skip_invalid: Leave invalid rows out and count them, instead of stopping with the list of them.
    swap_position: Also make hard negatives by mirroring the position (left / right, upper / lower).
"""

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from .folder import DEFAULT_CONFIG, ShardedParquetWriter, write_dataset_card
from .negatives import NUM_NEGATIVES, WORD, RegionTriple, generate_negatives, region_caption
from .schema import FEATURES, SPLITS, ValidationReport, validate_rows
from .vocabulary import ADJECTIVE_TO_GROUP, POSITION_WORDS, TERMS, grid_position

NO_FINDING = "no finding"


class RowError(ValueError):
    """A record could not be turned into a row; carries the row id."""

    def __init__(self, row_id: str, message: str):
        self.row_id = row_id
        super().__init__(message)


@dataclass
class ImportSummary:
    out_dir: Path
    counts: dict[str, int]
    report: ValidationReport = field(default_factory=ValidationReport)

    def describe(self) -> str:
        counts = ", ".join(f"{split} {count}" for split, count in self.counts.items())
        skipped = len(self.report.invalid)
        return f"wrote {self.out_dir}: {counts}" + (f"; skipped {skipped} invalid rows" if skipped else "")


def split_assignment(
    ids: list[str], ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, str]:
    """A seeded split of `ids` into train / validation / test with exact ratio counts (paper: 80/10/10)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    num_train = round(ratios[0] * len(order))
    num_validation = round(ratios[1] * len(order))
    bounds = (num_train, num_train + num_validation)
    return {
        row_id: SPLITS[0] if i < bounds[0] else SPLITS[1] if i < bounds[1] else SPLITS[2]
        for i, row_id in enumerate(order)
    }


def _given_split(value, row_id: str) -> str:
    aliases = {"val": "validation", "valid": "validation", "dev": "validation"}
    split = aliases.get(str(value).lower(), str(value).lower())
    if split not in SPLITS:
        raise RowError(row_id, f"split {value!r} is not one of {SPLITS}")
    return split


def _image_value(root: Path, name: str, row_id: str) -> dict:
    path = root / name
    if not path.is_file():
        raise RowError(row_id, f"image file {path} does not exist")
    return {"bytes": path.read_bytes(), "path": Path(name).name}


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _decoded_lines(path: Path):
    """(line number, text) of a UTF-8 file, naming the line that is not valid UTF-8."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, error


def _write_folder(out_dir, records, build, split_of, skip_invalid, pretty_name, description) -> ImportSummary:
    """Build, validate and write rows; `records` yields (row_id, record), `build` turns a record into a row."""
    out_dir = Path(out_dir)
    report = ValidationReport()

    def built_rows():
        for row_id, record in records():
            try:
                if isinstance(record, Exception):
                    raise RowError(row_id, str(record))
                row = build(row_id, record)
                row["_split"] = split_of(row_id, record)
            except RowError as error:
                report.checked += 1
                report.invalid[row_id] = [str(error)]
                continue
            yield row

    writer = ShardedParquetWriter(out_dir)
    try:
        for row in validate_rows(built_rows(), skip_invalid=skip_invalid, report=report):
            writer.add(row.pop("_split"), row)
    except BaseException:
        writer.abort()
        raise
    counts = writer.close()
    write_dataset_card(out_dir, {DEFAULT_CONFIG: ("data", FEATURES, counts)}, pretty_name, description)
    return ImportSummary(out_dir, counts, report)


def _splitter(records, ratios, seed):
    """`split_of(row_id, record)`: a record's own `split` field, else a seeded ratio split over the ids of
    `records` ((row_id, record) pairs; unreadable records are not counted)."""
    assigned = split_assignment(
        [row_id for row_id, record in records if not isinstance(record, Exception)], ratios, seed
    )

    def split_of(row_id: str, record: dict) -> str:
        if isinstance(record, dict) and record.get("split"):
            return _given_split(record["split"], row_id)
        return assigned[row_id]

    return split_of


# ---- the paper's annotation JSON ---------------------------------------------------------------------------------


def _annotation_records(path: Path):
    """(row_id, record) pairs of a JSON list or a JSONL file; undecodable entries come as exceptions."""
    if path.suffix.lower() == ".jsonl":
        for number, line in _decoded_lines(path):
            where = f"{path.name} line {number}"
            if isinstance(line, Exception):
                yield where, ValueError(f"text is not valid UTF-8 ({line})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield where, ValueError(f"not valid JSON: {error}")
                continue
            yield _record_id(record, where), record
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: text is not valid UTF-8 ({error.reason})") from error
    records = json.loads(text)
    if isinstance(records, dict):
        records = records.get("annotations", [records])
    for index, record in enumerate(records):
        yield _record_id(record, f"{path.name} entry {index}"), record


def _record_id(record: dict, fallback: str) -> str:
    if record.get("id"):
        return str(record["id"])
    if record.get("image"):
        return Path(str(record["image"])).stem
    return fallback


def read_box_file(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Boxes per image file name from JSON (`{"img.png": [[x0, y0, x1, y1], ...]}` or entries with `bbox`,
    `score`, `source`) or CSV (`image,x0,y0,x1,y1[,score][,source]`). Coordinates are pixels."""
    path = Path(path)
    boxes: dict[str, list[dict]] = {}
    if path.suffix.lower() == ".csv":
        for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
            entry = {"bbox": [float(row[key]) for key in ("x0", "y0", "x1", "y1")]}
            if row.get("score"):
                entry["score"] = float(row["score"])
            if row.get("source"):
                entry["source"] = row["source"]
            boxes.setdefault(row["image"], []).append(entry)
        return boxes
    for name, entries in json.loads(path.read_text(encoding="utf-8")).items():
        boxes[name] = [entry if isinstance(entry, dict) else {"bbox": list(entry)} for entry in entries]
    return boxes


def _negatives_for(record: dict, triples: list[RegionTriple], row_id: str, swap_position: bool, seed: int):
    """Per region, its negative captions: from `negative_variations` when given, else generated.

    `negative_variations` may be full captions, or bare adjectives (the paper's "five alternative adjectives"),
    which replace the region's adjective; a list of lists gives one list per region.
    """
    given = record.get("negative_variations")
    if given and all(isinstance(item, list) for item in given):
        if len(given) != len(triples):
            raise RowError(row_id, f"negative_variations has {len(given)} lists for {len(triples)} regions")
        per_region = given
    else:
        per_region = [given] * len(triples) if given else [None] * len(triples)
    negatives = []
    for triple, variations in zip(triples, per_region, strict=True):
        if variations:
            negatives.append(
                [
                    region_caption(str(v).strip().lower(), triple.term, triple.position)
                    if len(WORD.findall(str(v))) == 1
                    else str(v).strip()
                    for v in variations
                ]
            )
            continue
        try:
            negatives.append(
                generate_negatives(triple.caption, triple.adjective, swap_position=swap_position, seed=seed)
            )
        except ValueError as error:
            raise RowError(row_id, str(error)) from error
    return negatives


def import_annotations(
    annotations: str | os.PathLike,
    boxes: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    modality: str = "unknown",
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    skip_invalid: bool = False,
    swap_position: bool = False,
) -> ImportSummary:
    """Import the paper's annotation JSON / JSONL and a box file (see `read_box_file`) into a dataset folder.

    `region_extraction` may be one "adjective|term|position" string or a list of them, paired in order with the
    image's boxes; "No Finding" means no regions. A record's `split`, `modality`, `label` and `id` fields are used
    when present.

    Args:
        annotations: The annotation JSON (a list of records) or JSONL file.
        boxes: The box file: pixel boxes per image file name or id (JSON or CSV; see `read_box_file`).
    """
    annotations, image_root = Path(annotations), Path(image_root)
    box_table = read_box_file(boxes)
    split_of = _splitter(_annotation_records(annotations), ratios, seed)

    def build(row_id: str, record: dict) -> dict:
        name = str(record.get("image") or "")
        if not name:
            raise RowError(row_id, "record has no image file name")
        image = _image_value(image_root, name, row_id)
        extraction = record.get("region_extraction") or []
        extraction = [extraction] if isinstance(extraction, str) else list(extraction)
        extraction = [item for item in extraction if str(item).strip().lower() != NO_FINDING]
        try:
            triples = [RegionTriple.parse(item) for item in extraction]
        except ValueError as error:
            raise RowError(row_id, str(error)) from error
        image_boxes = box_table.get(name, box_table.get(row_id, []))
        if len(image_boxes) != len(triples):
            raise RowError(row_id, f"{len(triples)} region_extraction entries but {len(image_boxes)} boxes")
        negatives = _negatives_for(record, triples, row_id, swap_position, seed)
        regions = [
            {
                "bbox": box["bbox"],
                "adjective": triple.adjective,
                "term": triple.term,
                "position": triple.position,
                "caption": triple.caption,
                "negatives": region_negatives,
                "score": float(box.get("score", 1.0)),
                "source": str(box.get("source", "annotation")),
            }
            for triple, box, region_negatives in zip(triples, image_boxes, negatives, strict=True)
        ]
        return {
            "id": row_id,
            "image": image,
            "modality": str(record.get("modality") or modality),
            "summary_caption": str(record.get("summary_caption") or ""),
            "detailed_report": str(record.get("detailed_report") or ""),
            "regions": regions,
            "label": record.get("label"),
        }

    return _write_folder(
        out_dir,
        lambda: _annotation_records(annotations),
        build,
        split_of,
        skip_invalid,
        pretty_name=Path(out_dir).name,
        description=f"Imported from {annotations.name} (RegionMed-CLIP annotation format) with boxes from "
        f"{Path(boxes).name}.",
    )


# ---- COCO --------------------------------------------------------------------------------------------------------


def parse_region_text(caption: str, box, width: float, height: float, fallback_term: str) -> dict:
    """Adjective, term and position of a free-text region caption (vocabulary look-up); a position not named in
    the text comes from the box centre."""
    words = [word.lower() for word in WORD.findall(caption)]
    adjective = next((word for word in words if word in ADJECTIVE_TO_GROUP), "")
    term = next((word for word in words if word in TERMS), fallback_term)
    position = " ".join(word for word in words if word in POSITION_WORDS)
    if not position:
        x0, y0, x1, y1 = box
        position = grid_position((x0 + x1) / 2 / width, (y0 + y1) / 2 / height)
    return {"adjective": adjective, "term": term, "position": position}


def import_coco(
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    caption_field: str = "caption",
    report_field: str = "report",
    modality: str = "unknown",
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    skip_invalid: bool = False,
    swap_position: bool = False,
) -> ImportSummary:
    """Import a COCO-style detection JSON: one row per image, one region per annotation with a `bbox`.

    A region's caption is the annotation's `caption_field`, or its category name; adjective / term / position are
    read from that text with the vocabulary (position from the box centre when not named). The image's report is
    its `report_field` (or `caption`), else the list of its region captions; the summary is the report's first
    sentence. Images may carry `split`, `modality` and `label`.

    Args:
        annotations: The COCO JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`).
        caption_field: The annotation field holding a region's caption (else its category name).
        report_field: The image field holding its report.
    """
    annotations, image_root = Path(annotations), Path(image_root)
    data = json.loads(annotations.read_text(encoding="utf-8"))
    categories = {category["id"]: category["name"] for category in data.get("categories", [])}
    by_image: dict = {}
    for annotation in data.get("annotations", []):
        if annotation.get("bbox") is not None:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = {str(image.get("id")): image for image in data.get("images", [])}
    split_of = _splitter(images.items(), ratios, seed)

    def build(row_id: str, image: dict) -> dict:
        value = _image_value(image_root, str(image.get("file_name", "")), row_id)
        width, height = float(image.get("width") or 0), float(image.get("height") or 0)
        if width <= 0 or height <= 0:
            raise RowError(row_id, "image entry needs positive width and height")
        regions = []
        for annotation in by_image.get(image["id"], []):
            x, y, w, h = (float(v) for v in annotation["bbox"])
            box = [x, y, x + w, y + h]
            category = str(categories.get(annotation.get("category_id"), "lesion"))
            caption = str(annotation.get(caption_field) or category)
            parsed = parse_region_text(caption, box, width, height, category)
            try:
                negatives = generate_negatives(
                    caption, parsed["adjective"] or None, swap_position=swap_position, seed=seed
                )
            except ValueError as error:
                raise RowError(row_id, f"annotation {annotation.get('id')}: {error}") from error
            regions.append(
                {
                    "bbox": box,
                    **parsed,
                    "caption": caption,
                    "negatives": negatives,
                    "score": float(annotation.get("score", 1.0)),
                    "source": "coco",
                }
            )
        report = str(image.get(report_field) or image.get("caption") or "")
        if not report and regions:
            report = "Findings: " + "; ".join(region["caption"] for region in regions) + "."
        return {
            "id": row_id,
            "image": value,
            "modality": str(image.get("modality") or modality),
            "summary_caption": str(image.get("summary") or _first_sentence(report)),
            "detailed_report": report,
            "regions": regions,
            "label": image.get("label"),
        }

    return _write_folder(
        out_dir,
        lambda: images.items(),
        build,
        split_of,
        skip_invalid,
        pretty_name=Path(out_dir).name,
        description=f"Imported from the COCO-style file {annotations.name}.",
    )


# ---- image folder + CSV ------------------------------------------------------------------------------------------


def _csv_records(path: Path, path_column: str):
    lines = list(_decoded_lines(path))
    bad = next(((number, line) for number, line in lines if isinstance(line, Exception)), None)
    if bad is not None and bad[0] == 1:
        raise ValueError(f"{path} line 1 (header): text is not valid UTF-8 ({bad[1]})")
    header = next(csv.reader([lines[0][1]]))
    for number, line in lines[1:]:
        where = f"{path.name} line {number}"
        if isinstance(line, Exception):
            yield where, ValueError(f"text is not valid UTF-8 ({line})")
            continue
        if not line.strip():
            continue
        record = dict(zip(header, next(csv.reader([line])), strict=False))
        yield (Path(record.get(path_column) or where).stem if record.get(path_column) else where), record


def import_image_csv(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    path_column: str = "path",
    report_column: str = "report",
    label_column: str = "label",
    modality: str = "unknown",
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    skip_invalid: bool = False,
) -> ImportSummary:
    """Import an image folder with a CSV of `path, report[, label][, split][, summary][, modality]` as global-only
    rows (no regions). The summary is the `summary` column, else the report's first sentence.

    Args:
        csv_path: The CSV file.
        path_column: The column holding each image's path, relative to `image_root`.
        report_column: The column holding each image's report.
        label_column: The column holding each image's class label (optional).
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    split_of = _splitter(_csv_records(csv_path, path_column), ratios, seed)

    def build(row_id: str, record: dict) -> dict:
        report = str(record.get(report_column) or "")
        return {
            "id": row_id,
            "image": _image_value(image_root, str(record.get(path_column) or ""), row_id),
            "modality": str(record.get("modality") or modality),
            "summary_caption": str(record.get("summary") or _first_sentence(report)),
            "detailed_report": report,
            "regions": [],
            "label": record.get(label_column) or None,
        }

    return _write_folder(
        out_dir,
        lambda: _csv_records(csv_path, path_column),
        build,
        split_of,
        skip_invalid,
        pretty_name=Path(out_dir).name,
        description=f"Imported from the image list {csv_path.name} (global image–report pairs, no regions).",
    )


__all__ = [
    "ImportSummary",
    "NUM_NEGATIVES",
    "import_annotations",
    "import_coco",
    "import_image_csv",
    "parse_region_text",
    "read_box_file",
    "split_assignment",
]
