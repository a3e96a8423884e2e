"""Importers from the formats people have into MedRegion dataset folders.

- `import_annotations`: the paper's annotation JSON / JSONL (`image`, `summary_caption`, `detailed_report`,
  `region_extraction` "adjective|term|position", `negative_variations`) plus a box file.
- `import_coco`: COCO-style detection JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`).
- `import_detection_csv`: a VinDr-CXR-style detection CSV (`image_id, class_name, x_min, y_min, x_max, y_max`,
  several readers per image, "No finding" rows).
- `import_phrase_grounding`: an MS-CXR-style phrase-grounding CSV (an image, a phrase, one or more boxes).
- `import_image_csv`: an image folder and a CSV of `path, report[, label]` for global-only data.

A region's caption is free text (a class name, a phrase, a triple's words); its adjective / term / position are
read from it with the vocabulary where present and left empty otherwise. Hard negatives come from a
`NegativeStrategy` (`negatives="adjective,position"`, default `"auto"`: given, adjective, number, position,
term) whose term vocabulary is the dataset's own region names or classes; the dataset card records the strategy
and what each kind made. Images may be PNG, JPEG, TIFF (16-bit too) or DICOM (stored as the decoded PNG; see
`schema.stored_image`).

Every importer is a function of its source (a dataclass per format: the input file(s) and the format's own
options, e.g. [`CocoSource`]) and an [`ImportOptions`] (the options every importer shares: where the images are,
where to write, the split, the hard-negative strategy); `regionmed-clip data import-*` reads both from the command
line. It reads its input once to learn the row ids (for the split), then streams the rows through the validator
into parquet shards. A row that cannot be built or fails validation is reported by id; with `skip_invalid=True` it
is left out and counted instead.
"""

import csv
import io
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .folder import DEFAULT_CONFIG, ShardedParquetWriter, write_dataset_card
from .negatives import (
    NO_FINDING,
    NUM_NEGATIVES,
    WORD,
    NegativeStrategy,
    RegionTriple,
    is_no_finding,
    negative_caption,
)
from .schema import (
    FEATURES,
    IMAGE_SUFFIXES,
    SPLITS,
    ValidationReport,
    make_region,
    make_row,
    stored_image,
    validate_rows,
)
from .vocabulary import ADJECTIVE_TO_GROUP, POSITION_WORDS, TERMS, grid_position

_KINDS = (
    "_negative_kinds"  # a built row's per-region negative kinds, tallied for the card once the row is written
)


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
    negatives: NegativeStrategy | None = None  # the strategy the regions' negatives came from, with its tally

    def describe(self) -> str:
        counts = ", ".join(f"{split} {count}" for split, count in self.counts.items())
        skipped = len(self.report.invalid)
        text = f"wrote {self.out_dir}: {counts}" + (f"; skipped {skipped} invalid rows" if skipped else "")
        if self.negatives is not None:
            made = ", ".join(
                f"{kind} {count}" for kind, count in self.negatives.card_metadata()["made"].items()
            )
            text += f"\nhard negatives made: {made}; {self.negatives.short_regions} regions with fewer than "
            text += str(self.negatives.num)
        return text


@dataclass
class ImportOptions:
    """The options every importer shares; the `regionmed-clip data import-*` commands read them from the command
    line (`--image-root`, `--out-dir`, ...)."""

    image_root: str = field(metadata={"help": "Folder the image file names are relative to"})
    out_dir: str = field(metadata={"help": "The dataset folder to write (parquet shards and a dataset card)"})
    modality: str | None = field(
        default=None,
        metadata={
            "help": "The `modality` of rows that do not name their own; None: the format's own default (chest "
            "radiograph for the detection and phrase-grounding CSVs, else unknown)"
        },
    )
    ratios: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1],
        metadata={
            "help": "Train / validation / test shares of a seeded split, for rows without a `split` field"
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split and of the generated hard negatives"})
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Leave invalid rows out and count them, instead of stopping with the list of them"},
    )
    negatives: str = field(
        default="auto",
        metadata={
            "help": "The hard-negative strategy: a comma list of `given` (negatives in the file, used as they "
            "are), `adjective` (contrasting adjectives), `number` (a numbered name moved to its neighbours: L4 → "
            "L3 / L5), `position` (laterality / position mirrored), `term` (another region name or class of the "
            "same file), tried in that order; `auto` is all five (formats without regions ignore it)"
        },
    )
    num_negatives: int = field(
        default=NUM_NEGATIVES,
        metadata={
            "help": "Hard negatives per region; a region for which the strategy finds fewer keeps those"
        },
    )

    def strategy(self, vocabulary: Iterable[str]) -> NegativeStrategy:
        """The negative strategy, its `term` kind swapping among `vocabulary` (the file's region names or
        classes)."""
        names = {str(name).strip().lower(): str(name).strip() for name in vocabulary if str(name).strip()}
        return NegativeStrategy.from_text(
            self.negatives, num=self.num_negatives, seed=self.seed, vocabulary=tuple(sorted(names.values()))
        )

    def image(self, name: str, row_id: str) -> dict:
        """The stored image of `image_root / name`; a name without a suffix may be any image file of that stem
        (VinDr `image_id`s name `<id>.dicom` or `<id>.png`)."""
        root = Path(self.image_root)
        path = root / name
        if not path.is_file() and not path.suffix:
            path = next(
                (
                    root / f"{name}{suffix}"
                    for suffix in IMAGE_SUFFIXES
                    if (root / f"{name}{suffix}").is_file()
                ),
                path,
            )
        if not path.is_file():
            raise RowError(row_id, f"image file {path} does not exist")
        try:
            return stored_image(path)
        except Exception as error:
            raise RowError(row_id, str(error)) from error


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


def write_import(
    options: ImportOptions,
    records: Callable[[], Iterable[tuple[str, object]]],
    build: Callable[[str, object], dict],
    *,
    source: str,
    description: str,
    strategy: NegativeStrategy | None = None,
) -> ImportSummary:
    """The steps every importer shares: split the ids of `records()` ((row_id, record) pairs; an unreadable
    record comes as an exception), build each row with `build(row_id, record)`, validate and write the rows to
    `options.out_dir` with a dataset card whose text is `description` and which records `strategy`, the negative
    strategy the rows were built with. `records` is called twice (once for the split), so it reads the input again
    rather than holding every row."""
    out_dir = Path(options.out_dir)
    report = ValidationReport(source=source)
    split_of = _splitter(records(), options.ratios, options.seed)

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
        for row in validate_rows(built_rows(), skip_invalid=options.skip_invalid, report=report):
            for kinds in row.pop(_KINDS, []):
                strategy.tally(kinds)
            writer.add(row.pop("_split"), row)
    except BaseException:
        writer.abort()
        raise
    counts = writer.close()
    extra = {}
    if strategy is not None:
        description = f"{description}\n\n{strategy.describe()}"
        extra["hard_negatives"] = strategy.card_metadata()
    write_dataset_card(
        out_dir, {DEFAULT_CONFIG: ("data", FEATURES, counts)}, out_dir.name, description, metadata=extra
    )
    return ImportSummary(out_dir, counts, report, strategy)


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


def _given_negatives(record: dict, triples: list[RegionTriple], row_id: str) -> list[list[str]]:
    """Per region, the negative captions the record gives (`negative_variations`; empty lists where none).

    `negative_variations` may be full captions, or bare adjectives (the paper's "five alternative adjectives"),
    which replace the region's adjective (`negative_caption`); a list of lists gives one list per region.
    """
    given = record.get("negative_variations")
    if given and all(isinstance(item, list) for item in given):
        if len(given) != len(triples):
            raise RowError(row_id, f"negative_variations has {len(given)} lists for {len(triples)} regions")
        per_region = given
    else:
        per_region = [given or []] * len(triples)
    return [
        [negative_caption(variation, triple) for variation in variations]
        for triple, variations in zip(triples, per_region, strict=True)
    ]


def _triples(record: dict, row_id: str) -> list[RegionTriple]:
    """The record's `region_extraction` entries (one string or a list; "No Finding" means none)."""
    extraction = record.get("region_extraction") or []
    extraction = [extraction] if isinstance(extraction, str) else list(extraction)
    try:
        return [RegionTriple.parse(item) for item in extraction if not is_no_finding(item)]
    except ValueError as error:
        raise RowError(row_id, str(error)) from error


def region_structure(
    caption: str, box=None, size: tuple[float, float] | None = None, term: str = ""
) -> dict[str, str]:
    """Adjective, term and position of a free-text region caption, as far as the vocabulary finds them.

    The adjective is the first vocabulary adjective ("" when none: anatomy and detection captions have none); the
    term is `term` when given (a class name), else the first vocabulary lesion term, else the caption's words
    without position words and adjectives ("left hippocampus" → "hippocampus"); the position is the caption's
    position words, else the grid cell of the box centre when the image `size` (width, height) is known.
    """
    words = [word.lower() for word in WORD.findall(caption)]
    adjective = next((word for word in words if word in ADJECTIVE_TO_GROUP), "")
    core = [word for word in words if word not in POSITION_WORDS and word not in ADJECTIVE_TO_GROUP]
    term = term or next((word for word in words if word in TERMS), " ".join(core))
    position = " ".join(word for word in words if word in POSITION_WORDS)
    if not position and box is not None and size is not None:
        x0, y0, x1, y1 = box
        position = grid_position((x0 + x1) / 2 / size[0], (y0 + y1) / 2 / size[1])
    return {"adjective": adjective, "term": term.lower(), "position": position}


def _region(
    strategy: NegativeStrategy,
    box,
    caption: str,
    structure: dict,
    score: float = 1.0,
    source: str = "",
    given=(),
) -> tuple[dict, list[str]]:
    """A region (with its negatives from `strategy`) and the kinds that made its negatives."""
    negatives, kinds = strategy.make(caption, structure["adjective"], structure["term"], given)
    region = make_region(
        bbox=box, caption=caption, negatives=negatives, score=score, source=source, **structure
    )
    return region, kinds


def _built_row(built: list[tuple[dict, list[str]]], **fields) -> dict:
    """`make_row` of the `_region` results `built`, carrying their negative kinds for the card's tally."""
    row = make_row(regions=[region for region, _ in built], **fields)
    row[_KINDS] = [kinds for _, kinds in built]
    return row


def _regions_report(captions: list[str]) -> str:
    """The report of an image that has none of its own: its region captions, or "No Finding."."""
    return "Findings: " + "; ".join(captions) + "." if captions else f"{NO_FINDING}."


@dataclass
class AnnotationSource:
    """The paper's annotation file and its boxes, for `import_annotations`."""

    annotations: str = field(metadata={"help": "The annotation JSON (a list of records) or JSONL file"})
    boxes: str = field(
        metadata={
            "help": "The box file: pixel boxes per image file name or id (JSON or CSV; see `read_box_file`)"
        }
    )


def import_annotations(source: AnnotationSource, options: ImportOptions) -> ImportSummary:
    """Import the paper's annotation JSON / JSONL and a box file (see `read_box_file`) into a dataset folder.

    `region_extraction` may be one "adjective|term|position" string or a list of them, paired in order with the
    image's boxes; the adjective and position may be empty ("|hippocampus|left"); "No Finding" means no regions. A
    record's `split`, `modality`, `label` and `id` fields are used when present.
    """
    annotations, boxes = Path(source.annotations), source.boxes
    box_table = read_box_file(boxes)
    terms = []
    for row_id, record in _annotation_records(annotations):
        if isinstance(record, dict):
            try:
                terms += [triple.term for triple in _triples(record, row_id)]
            except RowError:
                continue  # reported when the row is built
    strategy = options.strategy(terms)

    def build(row_id: str, record: dict) -> dict:
        name = str(record.get("image") or "")
        if not name:
            raise RowError(row_id, "record has no image file name")
        image = options.image(name, row_id)
        triples = _triples(record, row_id)
        image_boxes = box_table.get(name, box_table.get(row_id, []))
        if len(image_boxes) != len(triples):
            raise RowError(row_id, f"{len(triples)} region_extraction entries but {len(image_boxes)} boxes")
        built = [
            _region(
                strategy,
                box["bbox"],
                triple.caption,
                {"adjective": triple.adjective, "term": triple.term, "position": triple.position},
                float(box.get("score", 1.0)),
                str(box.get("source", "annotation")),
                given,
            )
            for triple, box, given in zip(
                triples, image_boxes, _given_negatives(record, triples, row_id), strict=True
            )
        ]
        return _built_row(
            built,
            id=row_id,
            image=image,
            modality=str(record.get("modality") or options.modality or "unknown"),
            summary_caption=str(record.get("summary_caption") or ""),
            detailed_report=str(record.get("detailed_report") or ""),
            label=record.get("label"),
        )

    return write_import(
        options,
        lambda: _annotation_records(annotations),
        build,
        source=annotations.name,
        description=f"Imported from {annotations.name} (RegionMed-CLIP annotation format) with boxes from "
        f"{Path(boxes).name}.",
        strategy=strategy,
    )


# ---- COCO --------------------------------------------------------------------------------------------------------


@dataclass
class CocoSource:
    """A COCO-style detection file and where its captions and reports are, for `import_coco`."""

    annotations: str = field(
        metadata={"help": "The COCO JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`)"}
    )
    caption_field: str = field(
        default="caption",
        metadata={"help": "The annotation field holding a region's caption (else its category name)"},
    )
    report_field: str = field(default="report", metadata={"help": "The image field holding its report"})


def import_coco(source: CocoSource, options: ImportOptions) -> ImportSummary:
    """Import a COCO-style detection JSON: one row per image, one region per annotation with a `bbox`.

    A region's caption is the annotation's `caption_field`, or its category name (anatomical names such as "left
    hippocampus" work as they are); adjective / term / position come from the annotation's `attributes` when it has
    them, else from the caption with the vocabulary (see `region_structure`). Negatives given with an annotation
    (`negatives`, or `attributes.negatives`) are the `given` kind of the `negatives` strategy; the `term` kind swaps
    among the terms of the file's categories and captions. The image's report is its `report_field` (or
    `caption`), else the list of its region captions; the summary is the report's first sentence. Images may carry
    `split`, `modality` and `label`.
    """
    annotations = Path(source.annotations)
    caption_field, report_field = source.caption_field, source.report_field
    data = json.loads(annotations.read_text(encoding="utf-8"))
    categories = {category["id"]: category["name"] for category in data.get("categories", [])}
    by_image: dict = {}
    for annotation in data.get("annotations", []):
        if annotation.get("bbox") is not None:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = {str(image.get("id")): image for image in data.get("images", [])}

    def caption_of(annotation: dict) -> str:
        category = str(categories.get(annotation.get("category_id"), ""))
        return " ".join(str(annotation.get(caption_field) or category).split())

    def structure_of(annotation: dict, caption: str, box, size) -> dict:
        attributes = annotation.get("attributes") or {}
        structure = region_structure(caption, box, size, str(attributes.get("term") or ""))
        structure.update(
            {key: str(attributes[key]) for key in ("adjective", "position") if attributes.get(key)}
        )
        return structure

    vocabulary = [
        structure_of(annotation, caption_of(annotation), None, None)["term"]
        for annotations_of_image in by_image.values()
        for annotation in annotations_of_image
    ]
    strategy = options.strategy(vocabulary)

    def build(row_id: str, image: dict) -> dict:
        value = options.image(str(image.get("file_name", "")), row_id)
        width, height = float(image.get("width") or 0), float(image.get("height") or 0)
        if width <= 0 or height <= 0:
            raise RowError(row_id, "image entry needs positive width and height")
        built = []
        for annotation in by_image.get(image["id"], []):
            x, y, w, h = (float(v) for v in annotation["bbox"])
            box = [x, y, x + w, y + h]
            caption = caption_of(annotation)
            if not caption:
                raise RowError(
                    row_id, f"annotation {annotation.get('id')} has no caption and no category name"
                )
            given = annotation.get("negatives") or (annotation.get("attributes") or {}).get("negatives") or ()
            built.append(
                _region(
                    strategy,
                    box,
                    caption,
                    structure_of(annotation, caption, box, (width, height)),
                    float(annotation.get("score", 1.0)),
                    "coco",
                    given,
                )
            )
        regions = [region for region, _ in built]
        report = str(image.get(report_field) or image.get("caption") or "")
        if not report and regions:
            report = _regions_report([region["caption"] for region in regions])
        return _built_row(
            built,
            id=row_id,
            image=value,
            modality=str(image.get("modality") or options.modality or "unknown"),
            summary_caption=str(image.get("summary") or _first_sentence(report)),
            detailed_report=report,
            label=image.get("label"),
        )

    return write_import(
        options,
        images.items,
        build,
        source=annotations.name,
        description=f"Imported from the COCO-style file {annotations.name}.",
        strategy=strategy,
    )


# ---- tabular box files: detection (VinDr-CXR) and phrase grounding (MS-CXR) --------------------------------------


def _csv_rows(path: Path):
    """(line number, record) of every non-empty row of a UTF-8 CSV (a leading BOM ignored), read by the `csv`
    module, so a quoted field may hold commas and newlines; the number is the row's first line. A row holding
    bytes that are not UTF-8 comes as a `ValueError` instead of a record, for the caller to name with the file
    and line; a header like that, or an empty file, raises at once."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path} is empty")
    if bad := _undecodable(header):
        raise ValueError(f"{path} line 1 (header): text is not valid UTF-8 ({bad})")
    start = reader.line_num + 1
    for values in reader:
        number, start = start, reader.line_num + 1
        if not any(value.strip() for value in values):
            continue
        if bad := _undecodable(values):
            yield number, ValueError(f"text is not valid UTF-8 ({bad})")
        else:
            yield number, dict(zip(header, values, strict=False))


def _undecodable(values: list[str]) -> str:
    """The first byte of `values` that was not UTF-8 (decoded as a surrogate escape), described; "" when none."""
    for value in values:
        for char in value:
            if "\udc80" <= char <= "\udcff":
                return f"byte 0x{ord(char) - 0xDC00:02x}"
    return ""


def _table_records(path: Path, image_column: str) -> dict[str, list[tuple[int, dict]]]:
    """The rows of a CSV grouped by image, each with its line number; an undecodable row or a row without an
    image names the file and line."""
    grouped: dict[str, list[tuple[int, dict]]] = {}
    for number, record in _csv_rows(path):
        if isinstance(record, Exception):
            raise ValueError(f"{path} line {number}: {record}")
        name = str(record.get(image_column) or "").strip()
        if not name:
            raise ValueError(f"{path} line {number}: no {image_column!r} value")
        grouped.setdefault(name, []).append((number, record))
    return grouped


def _box(
    record: dict, columns: tuple[str, str, str, str], where: str, xywh: bool = False
) -> list[float] | None:
    """The pixel box `[x0, y0, x1, y1]` of a CSV row (`xywh`: the columns are x, y, width, height), or None when
    every box column is empty; some empty or a non-number is an error naming `where`."""
    values = [str(record.get(column) or "").strip() for column in columns]
    if not any(values) or all(value.lower() == "nan" for value in values):
        return None
    try:
        x0, y0, a, b = (float(value) for value in values)
    except ValueError as error:
        raise ValueError(f"{where}: box columns {columns} must be numbers, got {values}") from error
    return [x0, y0, x0 + a, y0 + b] if xywh else [x0, y0, a, b]


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_reader_boxes(
    boxes: list[tuple[list[float], str]], num_readers: int, iou_threshold: float = 0.4
) -> list[tuple[list[float], float, list[str]]]:
    """Fuse one class's boxes drawn by several readers on one image.

    Boxes are visited largest first; a box joins the first group whose mean box it overlaps with IoU ≥
    `iou_threshold` and that has no box of the same reader yet, else it starts a group. Each group gives one box,
    the mean of its members' coordinates, with the score `readers in the group / readers of the image` (the
    readers' agreement, which the collator's sampling weights by) and the group's readers.

    Args:
        boxes: (box, reader) pairs.
        num_readers: How many readers read the image (the agreement's denominator).
        iou_threshold: The overlap at which two readers' boxes are taken to mark the same finding.
    """
    groups: list[list[tuple[list[float], str]]] = []
    order = sorted(boxes, key=lambda item: -(item[0][2] - item[0][0]) * (item[0][3] - item[0][1]))
    for box, reader in order:
        for group in groups:
            mean = [sum(member[0][k] for member in group) / len(group) for k in range(4)]
            if reader not in {member[1] for member in group} and _iou(box, mean) >= iou_threshold:
                group.append((box, reader))
                break
        else:
            groups.append([(box, reader)])
    merged = []
    for group in groups:
        mean = [sum(member[0][k] for member in group) / len(group) for k in range(4)]
        readers = sorted({member[1] for member in group})
        merged.append((mean, len(readers) / max(num_readers, len(readers)), readers))
    return merged


@dataclass
class DetectionCsvSource:
    """A VinDr-CXR-style detection CSV, its columns and how its readers' boxes combine, for
    `import_detection_csv`."""

    csv_path: str = field(metadata={"help": "The detection CSV, one row per box"})
    image_column: str = field(
        default="image_id",
        metadata={
            "help": "The column naming each row's image (a file in `image_root`, with or without its suffix)"
        },
    )
    class_column: str = field(
        default="class_name",
        metadata={
            "help": "The column holding each box's class name (\"No finding\" rows mark a reader's normal read)"
        },
    )
    reader_column: str = field(
        default="rad_id", metadata={"help": "The column naming the reader who drew the box"}
    )
    readers: Literal["merge", "keep"] = field(
        default="merge",
        metadata={
            "help": "merge (fuse the readers' boxes of one finding) or keep (every reader's box is a region)"
        },
    )
    iou_threshold: float = field(
        default=0.4,
        metadata={
            "help": "With `--readers merge`, the overlap at which two readers' boxes mark the same finding"
        },
    )


def import_detection_csv(source: DetectionCsvSource, options: ImportOptions) -> ImportSummary:
    """Import a VinDr-CXR-style detection CSV: `image_id, class_name, x_min, y_min, x_max, y_max` (pixels), one
    row per box, `rad_id` naming the reader.

    Each region's caption is its class name ("Pleural effusion"; also its term); an image's only-"No finding" rows
    make an image with no regions. `image_id` names the file in `image_root` with or without its suffix (`.dicom`,
    `.png`, …). Several readers' boxes of one class on one image are merged with `readers="merge"` (the default,
    see `merge_reader_boxes`: one region per finding, its score the readers' agreement, its source the readers),
    or kept as they are with `readers="keep"` (one region per reader box, score 1, source the reader). A row with
    a class but no box (VinDr's test labels) is an error naming the file and line. The report is the list of the
    image's findings, or "No Finding."; the `label` is the image's most frequent class, or "No Finding". The
    `term` negatives swap among the file's class names.
    """
    image_column, class_column, reader_column = source.image_column, source.class_column, source.reader_column
    readers, iou_threshold = source.readers, source.iou_threshold
    if readers not in ("merge", "keep"):
        raise ValueError(f'readers must be "merge" or "keep", got {readers!r}')
    csv_path = Path(source.csv_path)
    columns = ("x_min", "y_min", "x_max", "y_max")
    grouped = _table_records(csv_path, image_column)
    classes = [record.get(class_column) or "" for rows in grouped.values() for _, record in rows]
    strategy = options.strategy(name for name in classes if not is_no_finding(name))
    records = {
        Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name: (name, rows)
        for name, rows in grouped.items()
    }

    def build(row_id: str, record) -> dict:
        name, rows = record
        per_class: dict[str, list[tuple[list[float], str]]] = {}
        for number, entry in rows:
            where = f"{csv_path.name} line {number}"
            class_name = " ".join(str(entry.get(class_column) or "").split())
            if not class_name:
                raise RowError(row_id, f"{where}: no {class_column!r} value")
            try:
                box = _box(entry, columns, where)
            except ValueError as error:
                raise RowError(row_id, str(error)) from error
            if is_no_finding(class_name):
                continue
            if box is None:
                raise RowError(row_id, f"{where}: class {class_name!r} has no box")
            per_class.setdefault(class_name, []).append((box, str(entry.get(reader_column) or "")))
        num_readers = len({str(entry.get(reader_column) or "") for _, entry in rows})
        found = []
        for class_name, boxes in per_class.items():
            if readers == "merge":
                found += [
                    (class_name, box, score, ",".join(names))
                    for box, score, names in merge_reader_boxes(boxes, num_readers, iou_threshold)
                ]
            else:
                found += [(class_name, box, 1.0, reader) for box, reader in boxes]
        built = [
            _region(
                strategy,
                box,
                class_name,
                region_structure(class_name, term=class_name),
                score,
                source or "detection",
            )
            for class_name, box, score, source in found
        ]
        regions = [region for region, _ in built]
        report = _regions_report(sorted({region["caption"] for region in regions}))
        counts = Counter(class_name for class_name, *_ in found)
        return _built_row(
            built,
            id=row_id,
            image=options.image(name, row_id),
            modality=options.modality or "chest radiograph",
            summary_caption=_first_sentence(report),
            detailed_report=report,
            label=min(counts, key=lambda c: (-counts[c], c)) if counts else NO_FINDING,
        )

    return write_import(
        options,
        records.items,
        build,
        source=csv_path.name,
        description=f"Imported from the detection CSV {csv_path.name} (readers' boxes: {readers}"
        + (f", IoU ≥ {iou_threshold} merged" if readers == "merge" else "")
        + ").",
        strategy=strategy,
    )


@dataclass
class GroundingCsvSource:
    """An MS-CXR-style phrase-grounding CSV and its columns, for `import_phrase_grounding`."""

    csv_path: str = field(metadata={"help": "The phrase-grounding CSV, one row per box"})
    image_column: str = field(
        default="path", metadata={"help": "The column holding each image's path, relative to `image_root`"}
    )
    phrase_column: str = field(
        default="label_text", metadata={"help": "The column holding the grounded phrase (the region caption)"}
    )
    category_column: str = field(
        default="category_name",
        metadata={"help": "The column holding the phrase's finding class (the region term; may be absent)"},
    )
    box_columns: list[str] = field(
        default_factory=lambda: ["x", "y", "w", "h"],
        metadata={"help": "The four columns of a box: x, y, width, height in pixels"},
    )

    def __post_init__(self):
        if len(self.box_columns) != 4:
            raise ValueError(f"box_columns names the x, y, width and height columns, got {self.box_columns}")


def import_phrase_grounding(source: GroundingCsvSource, options: ImportOptions) -> ImportSummary:
    """Import an MS-CXR-style phrase-grounding CSV (`dicom_id, category_name, label_text, path, x, y, w, h, …`):
    one row per box, the boxes of a phrase on consecutive rows.

    Each box is a region whose caption is its phrase (a phrase with two boxes gives two regions with the same
    caption; the region loss does not treat identical captions as negatives of each other). The term is the
    `category_column` value ("Pleural effusion") when there is one, and the `term` negatives swap among the
    file's categories where the phrase names its category. The report lists the image's phrases, the summary is
    the first. Boxes are `x, y, width, height` pixels (`box_columns`).
    """
    csv_path = Path(source.csv_path)
    image_column, phrase_column, category_column = (
        source.image_column,
        source.phrase_column,
        source.category_column,
    )
    box_columns = source.box_columns
    grouped = _table_records(csv_path, image_column)
    strategy = options.strategy(
        record.get(category_column) or "" for rows in grouped.values() for _, record in rows
    )
    records = {Path(name).with_suffix("").as_posix(): (name, rows) for name, rows in grouped.items()}

    def build(row_id: str, record) -> dict:
        name, rows = record
        built, phrases = [], []
        for number, entry in rows:
            where = f"{csv_path.name} line {number}"
            phrase = " ".join(str(entry.get(phrase_column) or "").split())
            try:
                box = _box(entry, box_columns, where, xywh=True)
            except ValueError as error:
                raise RowError(row_id, str(error)) from error
            if box is None:
                raise RowError(row_id, f"{where}: the phrase {phrase!r} has no box")
            category = " ".join(str(entry.get(category_column) or "").split())
            structure = region_structure(phrase, term=category)
            built.append(_region(strategy, box, phrase, structure, 1.0, "grounding"))
            if phrase not in phrases:
                phrases.append(phrase)
        report = ". ".join(phrase.rstrip(".") for phrase in phrases) + "."
        return _built_row(
            built,
            id=row_id,
            image=options.image(name, row_id),
            modality=options.modality or "chest radiograph",
            summary_caption=phrases[0].rstrip(".") + ".",
            detailed_report=report,
            label=" ".join(str(rows[0][1].get(category_column) or "").split()) or None,
        )

    return write_import(
        options,
        records.items,
        build,
        source=csv_path.name,
        description=f"Imported from the phrase-grounding CSV {csv_path.name}.",
        strategy=strategy,
    )


# ---- image folder + CSV ------------------------------------------------------------------------------------------


def _csv_records(path: Path, path_column: str):
    for number, record in _csv_rows(path):
        where = f"{path.name} line {number}"
        if isinstance(record, Exception):
            yield where, record
        else:
            yield (Path(record[path_column]).stem if record.get(path_column) else where), record


@dataclass
class ImageCsvSource:
    """A CSV listing images with their reports, and its columns, for `import_image_csv`."""

    csv_path: str = field(metadata={"help": "The CSV file"})
    path_column: str = field(
        default="path", metadata={"help": "The column holding each image's path, relative to `image_root`"}
    )
    report_column: str = field(default="report", metadata={"help": "The column holding each image's report"})
    label_column: str = field(
        default="label", metadata={"help": "The column holding each image's class label (optional)"}
    )


def import_image_csv(source: ImageCsvSource, options: ImportOptions) -> ImportSummary:
    """Import an image folder with a CSV of `path, report[, label][, split][, summary][, modality]` as global-only
    rows (no regions). The summary is the `summary` column, else the report's first sentence.
    """
    csv_path = Path(source.csv_path)
    path_column, report_column, label_column = source.path_column, source.report_column, source.label_column

    def build(row_id: str, record: dict) -> dict:
        report = str(record.get(report_column) or "")
        return make_row(
            id=row_id,
            image=options.image(str(record.get(path_column) or ""), row_id),
            modality=str(record.get("modality") or options.modality or "unknown"),
            summary_caption=str(record.get("summary") or _first_sentence(report)),
            detailed_report=report,
            label=record.get(label_column) or None,
        )

    return write_import(
        options,
        lambda: _csv_records(csv_path, path_column),
        build,
        source=csv_path.name,
        description=f"Imported from the image list {csv_path.name} (global image–report pairs, no regions).",
    )


__all__ = [
    "ImportOptions",
    "ImportSummary",
    "NUM_NEGATIVES",
    "import_annotations",
    "import_coco",
    "import_detection_csv",
    "import_image_csv",
    "import_phrase_grounding",
    "merge_reader_boxes",
    "read_box_file",
    "region_structure",
    "split_assignment",
    "write_import",
]
