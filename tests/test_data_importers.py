"""Importers → dataset folders that `datasets.load_dataset` reads, and what happens with bad input."""

import csv
import json

import pytest
from datasets import load_dataset

from regionmed_clip.data import (
    AnnotationSource,
    CocoSource,
    ImageCsvSource,
    ImportOptions,
    InvalidRowsError,
    import_annotations,
    import_coco,
    import_image_csv,
)
from regionmed_clip.data.importers import split_assignment

from .conftest import random_image


def _images(root, count, size=(40, 30)):
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        random_image(*size, seed=index).save(root / f"img{index}.png")
    return root


def _paper_records(count):
    records = []
    for index in range(count):
        record = {
            "image": f"img{index}.png",
            "summary_caption": f"Chest radiograph showing a round nodule number {index}.",
            "detailed_report": f"Findings: a round nodule in the left upper zone, case {index}.",
            "region_extraction": "round|nodule|left upper",
            "negative_variations": ["irregular", "spiculated", "oval", "lobulated", "linear"],
            "label": "nodule" if index % 2 else "mass",
        }
        records.append(record)
    records[1]["region_extraction"] = ["oval|cyst|right lower", "ill-defined|opacity|center"]
    records[1]["negative_variations"] = [
        ["round cyst right lower", "irregular cyst right lower"],
        ["well-defined opacity center", "smooth opacity center"],
    ]
    records[2]["region_extraction"] = "No Finding"
    records[2].pop("negative_variations")
    records[3].pop("negative_variations")  # generated
    return records


def _paper_boxes(count):
    boxes = {f"img{i}.png": [[2, 3, 20, 25]] for i in range(count)}
    boxes["img1.png"] = [{"bbox": [1, 1, 10, 10], "score": 0.9, "source": "gdino"}, [20, 5, 39, 29]]
    boxes["img2.png"] = []
    return boxes


def _write_paper_input(tmp_path, records, boxes, jsonl=False):
    annotations = tmp_path / ("annotations.jsonl" if jsonl else "annotations.json")
    if jsonl:
        annotations.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    else:
        annotations.write_text(json.dumps(records), encoding="utf-8")
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps(boxes), encoding="utf-8")
    return annotations, box_file


def _all_rows(folder):
    # Folders are rewritten in place within a test; `datasets` would serve the first version from its cache.
    dataset = load_dataset(str(folder), download_mode="force_redownload")
    return {row["id"]: (split, row) for split in dataset for row in dataset[split]}


def test_paper_format_round_trip(tmp_path):
    images = _images(tmp_path / "images", 10)
    records = _paper_records(10)
    annotations, box_file = _write_paper_input(tmp_path, records, _paper_boxes(10))
    summary = import_annotations(
        AnnotationSource(annotations, box_file),
        ImportOptions(images, tmp_path / "out", modality="chest radiograph"),
    )
    assert summary.counts == {"train": 8, "validation": 1, "test": 1}
    rows = _all_rows(tmp_path / "out")
    assert len(rows) == 10
    for index, record in enumerate(records):
        split, row = rows[f"img{index}"]
        assert row["summary_caption"] == record["summary_caption"]
        assert row["detailed_report"] == record["detailed_report"]
        assert row["label"] == record["label"]
        assert row["modality"] == "chest radiograph"
        assert row["image"].size == (40, 30)
        with open(images / record["image"], "rb") as handle:
            assert row["image"].tobytes() == __import__("PIL.Image").Image.open(handle).tobytes()
    first = rows["img0"][1]["regions"]
    assert first == [
        {
            "bbox": [2.0, 3.0, 20.0, 25.0],
            "adjective": "round",
            "term": "nodule",
            "position": "left upper",
            "caption": "round nodule left upper",
            "negatives": [
                f"{adj} nodule left upper"
                for adj in ("irregular", "spiculated", "oval", "lobulated", "linear")
            ],
            "score": 1.0,
            "source": "annotation",
        }
    ]
    two = rows["img1"][1]["regions"]
    assert [r["caption"] for r in two] == ["oval cyst right lower", "ill-defined opacity center"]
    assert two[1]["negatives"] == ["well-defined opacity center", "smooth opacity center"]
    assert two[0]["score"] == pytest.approx(0.9) and two[0]["source"] == "gdino"
    assert rows["img2"][1]["regions"] == []
    assert len(rows["img3"][1]["regions"][0]["negatives"]) == 5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "num_examples: 8" in card and "region_extraction" not in card and "name: regions" in card


def test_jsonl_with_given_splits_and_box_csv(tmp_path):
    images = _images(tmp_path / "images", 4)
    records = _paper_records(4)
    for record, split in zip(records, ["train", "val", "test", "train"], strict=True):
        record["split"] = split
    annotations, _ = _write_paper_input(tmp_path, records, {}, jsonl=True)
    box_csv = tmp_path / "boxes.csv"
    with open(box_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "x0", "y0", "x1", "y1", "score"])
        for index in (0, 3):
            writer.writerow([f"img{index}.png", 1, 2, 11, 12, 0.5])
        writer.writerows([["img1.png", 1, 1, 10, 10, ""], ["img1.png", 20, 5, 39, 29, ""]])
    summary = import_annotations(
        AnnotationSource(annotations, box_csv), ImportOptions(images, tmp_path / "out")
    )
    assert summary.counts == {"train": 2, "validation": 1, "test": 1}
    rows = _all_rows(tmp_path / "out")
    assert rows["img1"][0] == "validation" and rows["img2"][0] == "test"
    assert rows["img0"][1]["regions"][0]["bbox"] == [1.0, 2.0, 11.0, 12.0]


def test_coco_import(tmp_path):
    images = _images(tmp_path / "images", 3, size=(60, 60))
    coco = {
        "images": [
            {
                "id": 1,
                "file_name": "img0.png",
                "width": 60,
                "height": 60,
                "report": "Two findings. More text.",
            },
            {"id": 2, "file_name": "img1.png", "width": 60, "height": 60, "label": "mass"},
            {"id": 3, "file_name": "img2.png", "width": 60, "height": 60, "caption": "Normal study."},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "bbox": [5, 5, 10, 8],
                "category_id": 1,
                "caption": "spiculated mass, left upper",
            },
            {"id": 11, "image_id": 1, "bbox": [40, 40, 10, 10], "category_id": 2},
            {
                "id": 12,
                "image_id": 2,
                "bbox": [20, 25, 10, 10],
                "category_id": 1,
                "caption": "Irregular mass",
            },
        ],
        "categories": [{"id": 1, "name": "mass"}, {"id": 2, "name": "round nodule"}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    import_coco(CocoSource(path), ImportOptions(images, tmp_path / "out", ratios=(1.0, 0.0, 0.0)))
    rows = _all_rows(tmp_path / "out")
    first = rows["1"][1]
    assert (
        first["detailed_report"] == "Two findings. More text." and first["summary_caption"] == "Two findings."
    )
    mass, nodule = first["regions"]
    assert mass["bbox"] == [5.0, 5.0, 15.0, 13.0]
    assert (mass["adjective"], mass["term"], mass["position"]) == ("spiculated", "mass", "left upper")
    assert (nodule["adjective"], nodule["term"], nodule["position"]) == ("round", "nodule", "right lower")
    assert nodule["caption"] == "round nodule" and len(nodule["negatives"]) == 5
    second = rows["2"][1]
    assert second["regions"][0]["position"] == "center" and second["label"] == "mass"
    assert second["detailed_report"] == "Findings: Irregular mass."
    assert rows["3"][1]["regions"] == []


def test_csv_import_for_global_only_data(tmp_path):
    images = _images(tmp_path / "images", 5)
    csv_path = tmp_path / "list.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "report", "label"])
        for index in range(5):
            writer.writerow(
                [f"img{index}.png", f"Normal study {index}. Nothing else.", "normal" if index else ""]
            )
    summary = import_image_csv(
        ImageCsvSource(csv_path), ImportOptions(images, tmp_path / "out", ratios=(0.6, 0.2, 0.2))
    )
    assert summary.counts == {"train": 3, "validation": 1, "test": 1}
    rows = _all_rows(tmp_path / "out")
    row = rows["img1"][1]
    assert row["regions"] == [] and row["label"] == "normal" and row["summary_caption"] == "Normal study 1."
    assert rows["img0"][1]["label"] is None


def test_csv_fields_with_quoted_newlines_and_commas_import_and_later_lines_keep_their_numbers(tmp_path):
    """A report with line breaks and commas, quoted as any spreadsheet writes it, is one field; the line number
    named for a bad row after it is the row's own first line in the file; a BOM before the header is ignored."""
    images = _images(tmp_path / "images", 3)
    report = "Findings: normal heart size,\nclear lungs.\n\nImpression: no acute disease."
    csv_path = tmp_path / "list.csv"
    with open(csv_path, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "report"])
        writer.writerow(["img0.png", report])
        writer.writerow(["img1.png", "Second study."])
        writer.writerow(["img2.png", ""])
    summary = import_image_csv(
        ImageCsvSource(csv_path),
        ImportOptions(images, tmp_path / "out", ratios=(1.0, 0.0, 0.0), skip_invalid=True),
    )
    assert summary.counts == {"train": 2}
    assert list(summary.report.invalid) == ["img2"]  # the empty report, on line 7 of the file
    rows = _all_rows(tmp_path / "out")
    assert rows["img0"][1]["detailed_report"] == report
    csv_path.write_bytes(csv_path.read_bytes().replace(b"Second", b"S\xe9cond"))
    with pytest.raises(InvalidRowsError, match="list.csv line 6: text is not valid UTF-8 \\(byte 0xe9\\)"):
        import_image_csv(ImageCsvSource(csv_path), ImportOptions(images, tmp_path / "out2"))


def test_split_assignment_is_seeded_and_exact():
    ids = [f"id{i}" for i in range(100)]
    first = split_assignment(ids, seed=3)
    assert first == split_assignment(list(reversed(ids)), seed=3)
    assert first != split_assignment(ids, seed=4)
    assert sorted(first.values()).count("train") == 80 and list(first.values()).count("test") == 10
    with pytest.raises(ValueError, match="summing to 1"):
        split_assignment(ids, ratios=(0.5, 0.2, 0.2))


BAD_CASES = {
    "missing image": (
        lambda r, b, root: r.update(image="nowhere.png", id="img4"),
        "image file .*nowhere.png does not exist",
    ),
    "corrupt image": (
        lambda r, b, root: (root / r["image"]).write_bytes(b"\x89PNG junk"),
        "image does not decode",
    ),
    "box outside": (
        lambda r, b, root: b.update({r["image"]: [[30, 20, 50, 29]]}),
        "lies outside the 40x30 image",
    ),
    "zero-area box": (lambda r, b, root: b.update({r["image"]: [[5, 5, 5, 9]]}), "has no positive area"),
    "empty caption": (lambda r, b, root: r.update(summary_caption="  "), "summary_caption is empty"),
    "bad extraction": (
        lambda r, b, root: r.update(region_extraction="round nodule"),
        "adjective\\|term\\|position",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_invalid_rows_are_named_or_skipped_and_counted(tmp_path, case):
    images = _images(tmp_path / "images", 6)
    records, boxes = _paper_records(6), _paper_boxes(6)
    change, message = BAD_CASES[case]
    change(records[4], boxes, images)
    annotations, box_file = _write_paper_input(tmp_path, records, boxes)
    with pytest.raises(InvalidRowsError, match=f"img4: .*{message}") as error:
        import_annotations(AnnotationSource(annotations, box_file), ImportOptions(images, tmp_path / "out"))
    assert list(error.value.report.invalid) == ["img4"]
    assert not list((tmp_path / "out" / "data").glob("*.parquet"))
    summary = import_annotations(
        AnnotationSource(annotations, box_file), ImportOptions(images, tmp_path / "out", skip_invalid=True)
    )
    assert sum(summary.counts.values()) == 5 and len(summary.report.invalid) == 1
    assert "skipped 1 invalid rows" in summary.describe()
    assert "img4" not in _all_rows(tmp_path / "out")


def test_non_utf8_text_names_the_row(tmp_path):
    images = _images(tmp_path / "images", 4)
    annotations, box_file = _write_paper_input(tmp_path, _paper_records(4), _paper_boxes(4), jsonl=True)
    lines = annotations.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"Chest", b"Ch\xe9st")
    annotations.write_bytes(b"\n".join(lines))
    with pytest.raises(InvalidRowsError, match="annotations.jsonl line 2: text is not valid UTF-8"):
        import_annotations(AnnotationSource(annotations, box_file), ImportOptions(images, tmp_path / "out"))
    summary = import_annotations(
        AnnotationSource(annotations, box_file), ImportOptions(images, tmp_path / "out", skip_invalid=True)
    )
    assert sum(summary.counts.values()) == 3
    single = tmp_path / "single.json"
    single.write_bytes(b'[{"image": "img0.png",\n "summary_caption": "caf\xe9"}]')
    with pytest.raises(ValueError, match="single.json line 2: text is not valid UTF-8"):
        import_annotations(AnnotationSource(single, box_file), ImportOptions(images, tmp_path / "out2"))
    csv_path = tmp_path / "list.csv"
    csv_path.write_bytes(b"path,report\nimg0.png,fine report.\nimg1.png,caf\xe9 report.\n")
    with pytest.raises(InvalidRowsError, match="list.csv line 3: text is not valid UTF-8"):
        import_image_csv(ImageCsvSource(csv_path), ImportOptions(images, tmp_path / "out3"))


def test_cli_import_reports_and_skips_invalid_rows(tmp_path):
    import os
    import subprocess
    import sys

    images = _images(tmp_path / "images", 3)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "path,report\nimg0.png,Report zero.\nimg1.png,\nimg2.png,Report two.\n", encoding="utf-8"
    )
    command = [
        sys.executable,
        "-m",
        "regionmed_clip.cli",
        "data",
        "import-csv",
        "--csv-path",
        str(csv_path),
        "--image-root",
        str(images),
        "--out-dir",
        str(tmp_path / "out"),
        "--ratios",
        "1",
        "0",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert (
        failed.returncode == 2 and "img1: summary_caption is empty; detailed_report is empty" in failed.stderr
    )
    skipped = subprocess.run(
        command + ["--skip-invalid"], capture_output=True, text=True, env=env, timeout=120
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "train 2; skipped 1 invalid rows" in skipped.stdout and "img1" in skipped.stdout
