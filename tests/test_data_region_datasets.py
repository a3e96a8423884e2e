"""Real region layouts (COCO anatomy, VinDr-CXR-style detection CSV, MS-CXR-style phrase grounding) → dataset
folders with free-text regions and per-dataset hard negatives, trained through `regionmed-clip train` and
`finetune`; and the training collator's region sampling."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import metadata_load
from PIL import Image

from regionmed_clip import caption_key
from regionmed_clip.data import (
    AnnotationSource,
    CocoSource,
    DetectionCsvSource,
    GroundingCsvSource,
    ImportOptions,
    InvalidRowsError,
    import_annotations,
    import_coco,
)
from regionmed_clip.data.collator import MedRegionCollator, region_passes, visit_region_indices
from regionmed_clip.data.folder import load_rows
from regionmed_clip.data.importers import import_detection_csv, import_phrase_grounding, merge_reader_boxes
from regionmed_clip.data.negatives import NO_FINDING, NegativeStrategy, RegionTriple
from regionmed_clip.data.vocabulary import POSITION_WORDS
from regionmed_clip.evaluation.metrics import hard_negative_accuracy
from regionmed_clip.training.data import stage_dataloader

from .conftest import make_processor, random_image, tiny_model
from .test_data_importers import _images
from .test_losses import objective_of
from .test_training import ENV, ROOT, tiny_training_config, write_config

ANATOMY = [
    "left hippocampus",
    "right hippocampus",
    "left amygdala",
    "right amygdala",
    "left thalamus",
    "right thalamus",
    "left precentral",
    "right caudate",
]


def _mri_slices(root: Path, count: int, size: int = 64) -> list[str]:
    """MRI slices of 64 px: pydicom's real MR test slice (DICOM), and brain-like ellipses of tissue with noise as
    16-bit TIFF and 8-bit PNG, in turn."""
    from pydicom.data import get_testdata_file

    root.mkdir(parents=True, exist_ok=True)
    names = []
    yy, xx = np.mgrid[0:size, 0:size]
    for index in range(count):
        rng = np.random.default_rng(index)
        head = ((xx - size / 2) / (size * 0.42)) ** 2 + ((yy - size / 2) / (size * 0.48)) ** 2 < 1
        pixels = head * (0.6 + 0.2 * rng.random((size, size)))
        if index % 3 == 0:
            name = f"slice{index:02d}.dcm"
            shutil.copy(get_testdata_file("MR_small.dcm"), root / name)
        elif index % 3 == 1:
            name = f"slice{index:02d}.tif"
            Image.fromarray((pixels * 4000).astype(np.uint16)).save(root / name)
        else:
            name = f"slice{index:02d}.png"
            Image.fromarray((pixels * 255).astype(np.uint8), mode="L").save(root / name)
        names.append(name)
    return names


# Numbered anatomy, as spine, chest and dental datasets name their regions.
NUMBERED_ANATOMY = ["L3 vertebra", "L4 vertebra", "L5 vertebra", "S1 vertebra", "rib 5", "rib 6", "tooth 36"]


def coco_anatomy(tmp_path: Path, count: int = 10, categories: list[str] = ANATOMY) -> tuple[Path, Path]:
    """A COCO file of MRI slices whose categories are anatomical names (no lesion adjective), one region per
    category in each image."""
    images = tmp_path / "mri"
    names = _mri_slices(images, count)
    coco = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(categories)]
    for index, name in enumerate(names):
        coco["images"].append({"id": index + 1, "file_name": name, "width": 64, "height": 64})
        for category in range(len(categories)):
            coco["annotations"].append(
                {
                    "id": 100 * index + category,
                    "image_id": index + 1,
                    "category_id": category + 1,
                    "bbox": [2 + 7 * category, 6 + index % 5, 6, 9],
                    "area": 72,
                    "iscrowd": 0,
                }
            )
    path = tmp_path / "anatomy.json"
    path.write_text(json.dumps(coco), encoding="utf-8")
    return path, images


VINDR_HEADER = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
CLASSES = ["Aortic enlargement", "Cardiomegaly", "Pleural effusion", "Nodule/Mass", "Lung Opacity"]


def vindr_csv(tmp_path: Path, count: int = 10) -> tuple[Path, Path]:
    """A VinDr-CXR-style CSV over real DICOM files (pydicom's CT_small, 128 px): three readers per image, two of
    whom mark the same finding with slightly different boxes; every third image is "No finding"."""
    from pydicom.data import get_testdata_file

    images = tmp_path / "dicom"
    images.mkdir()
    rows = [VINDR_HEADER]
    for index in range(count):
        image_id = f"{index:03d}a1b2c3"
        shutil.copy(get_testdata_file("CT_small.dcm"), images / f"{image_id}.dicom")
        if index % 3 == 2:
            rows += [[image_id, "No finding", 14, f"R{r}", "", "", "", ""] for r in (1, 2, 3)]
            continue
        first, second = CLASSES[index % len(CLASSES)], CLASSES[(index + 2) % len(CLASSES)]
        rows.append([image_id, first, 0, "R1", 10, 12, 60, 70])
        rows.append([image_id, first, 0, "R2", 12, 10, 62, 72])
        rows.append([image_id, second, 3, "R2", 80, 80, 120, 110])
        rows.append([image_id, "No finding", 14, "R3", "", "", "", ""])
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path, images


GROUNDING_HEADER = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width"]


def grounding_csv(tmp_path: Path, count: int = 10) -> tuple[Path, Path]:
    """An MS-CXR-style phrase-grounding CSV over JPEG files: one phrase per image, some with two boxes."""
    images = tmp_path / "jpg"
    (images / "files").mkdir(parents=True)
    phrases = [
        ("Pleural effusion", "small left pleural effusion"),
        ("Pneumonia", "right lower lobe pneumonia"),
        ("Cardiomegaly", "cardiomegaly"),
        ("Atelectasis", "bibasilar atelectasis"),
    ]
    rows = [GROUNDING_HEADER]
    for index in range(count):
        name = f"files/p{index}.jpg"
        random_image(64, 56, seed=index, mode="L").save(images / name, quality=90)
        category, phrase = phrases[index % len(phrases)]
        rows.append([f"d{index}", category, phrase, name, 5, 6, 20, 18, 64])
        if index % 4 == 3:
            rows.append([f"d{index}", category, phrase, name, 36, 30, 22, 20, 64])
    path = tmp_path / "MS_CXR_Local_Alignment.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path, images


def _rows(folder: Path) -> list[dict]:
    splits = [split for split in ("train", "validation", "test") if any((folder / "data").glob(f"{split}-*"))]
    return [row for split in splits for row in load_rows(folder, split)]


# ---- importers ---------------------------------------------------------------------------------------------------


def test_coco_anatomy_imports_every_row_with_position_and_term_negatives(tmp_path):
    path, images = coco_anatomy(tmp_path)
    summary = import_coco(
        CocoSource(path), ImportOptions(images, tmp_path / "out", negatives="adjective,position,term")
    )
    assert summary.report.invalid == {} and sum(summary.counts.values()) == 10
    rows = _rows(tmp_path / "out")
    regions = [region for row in rows for region in row["regions"]]
    assert len(regions) == 80
    by_id = {row["id"]: row for row in rows}
    assert by_id["1"]["image"].size == by_id["2"]["image"].size == (64, 64)  # the DICOM and the 16-bit TIFF
    assert by_id["2"]["image"].mode.startswith("I")  # the TIFF is stored as it is, 16 bits
    hippocampus = next(region for region in regions if region["caption"] == "left hippocampus")
    assert (hippocampus["adjective"], hippocampus["term"]) == ("", "hippocampus")
    assert hippocampus["position"] == "left"
    assert hippocampus["negatives"][0] == "right hippocampus"  # laterality first: no adjective to swap
    assert "left amygdala" in hippocampus["negatives"] and len(hippocampus["negatives"]) == 5
    assert len(set(map(caption_key, hippocampus["negatives"]))) == 5
    assert all(region["caption"] not in region["negatives"] for region in regions)
    metadata = metadata_load(tmp_path / "out" / "README.md")["hard_negatives"]
    assert metadata["kinds"] == ["adjective", "position", "term"] and metadata["made"]["adjective"] == 0
    assert metadata["made"]["position"] == 80  # one laterality swap each; the term swaps make the other four
    assert sum(metadata["made"].values()) == sum(len(region["negatives"]) for region in regions)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`position`, `term`, tried in that order" in card
    assert "Term vocabulary (5 names): amygdala, caudate, hippocampus, precentral, thalamus." in card


def test_fewer_negatives_than_asked_are_kept_and_counted(tmp_path):
    path, images = coco_anatomy(tmp_path, count=4)
    summary = import_coco(
        CocoSource(path),
        ImportOptions(images, tmp_path / "out", negatives="position", ratios=(1.0, 0.0, 0.0)),
    )
    assert summary.report.invalid == {}
    rows = _rows(tmp_path / "out")
    assert all(len(region["negatives"]) == 1 for row in rows for region in row["regions"])
    metadata = metadata_load(tmp_path / "out" / "README.md")["hard_negatives"]
    assert metadata["regions_with_fewer"] == 32 and metadata["made"] == {"position": 32}


def test_negative_strategies_are_seeded_and_each_kind_does_its_part():
    vocabulary = ("hippocampus", "amygdala", "thalamus", "putamen", "caudate", "insula")
    one = NegativeStrategy(("term",), num=3, vocabulary=vocabulary, seed=0)
    assert (
        one.make("Left hippocampus", term="hippocampus")[0]
        == one.make("Left hippocampus", term="hippocampus")[0]
    )
    negatives, kinds = one.make("Left hippocampus", term="hippocampus")
    assert kinds == ["term"] * 3 and all(n.startswith("Left ") and n != "Left hippocampus" for n in negatives)
    others = {
        tuple(
            NegativeStrategy(("term",), 3, vocabulary, seed).make("left hippocampus", term="hippocampus")[0]
        )
        for seed in range(6)
    }
    assert len(others) > 1  # the seed chooses among the vocabulary
    mixed = NegativeStrategy(("adjective", "position"), num=5)
    negatives, kinds = mixed.make("round nodule left upper", adjective="round")
    assert kinds == ["adjective"] * 5
    negatives, kinds = NegativeStrategy(("position",), num=5).make("nodule left upper")
    assert negatives == ["nodule right lower", "nodule right upper", "nodule left lower"]
    given, kinds = NegativeStrategy.from_text("auto").make("x", given=["a", "b"])
    assert given == ["a", "b"] and kinds == ["given", "given"]  # given negatives are not topped up
    with pytest.raises(ValueError, match="negative kinds"):
        NegativeStrategy.from_text("adjective,colour")


def test_detection_csv_merges_readers_and_no_finding_images_have_no_regions(tmp_path):
    path, images = vindr_csv(tmp_path)
    summary = import_detection_csv(
        DetectionCsvSource(path), ImportOptions(images, tmp_path / "merged", ratios=(1.0, 0.0, 0.0))
    )
    assert summary.report.invalid == {} and summary.counts == {"train": 10}
    rows = {row["id"]: row for row in load_rows(tmp_path / "merged", "train")}
    normal = rows["002a1b2c3"]
    assert normal["regions"] == [] and normal["label"] == NO_FINDING
    assert normal["detailed_report"] == f"{NO_FINDING}."
    first = rows["000a1b2c3"]
    assert first["image"].size == (128, 128)  # the DICOM file, stored as its decoded PNG
    aortic, effusion = sorted(first["regions"], key=lambda region: region["caption"])
    assert aortic["caption"] == "Aortic enlargement" and aortic["term"] == "aortic enlargement"
    assert aortic["bbox"] == [11.0, 11.0, 61.0, 71.0] and aortic["score"] == pytest.approx(2 / 3)
    assert aortic["source"] == "R1,R2" and aortic["adjective"] == ""
    assert effusion["caption"] == "Pleural effusion" and effusion["score"] == pytest.approx(1 / 3)
    assert "Cardiomegaly" in aortic["negatives"]  # term swap among the file's classes
    assert first["detailed_report"] == "Findings: Aortic enlargement; Pleural effusion."

    import_detection_csv(
        DetectionCsvSource(path, readers="keep"),
        ImportOptions(images, tmp_path / "kept", ratios=(1.0, 0.0, 0.0)),
    )
    kept = {row["id"]: row for row in load_rows(tmp_path / "kept", "train")}
    assert sorted(region["source"] for region in kept["000a1b2c3"]["regions"]) == ["R1", "R2", "R2"]


def test_reader_boxes_merge_by_overlap_and_never_within_one_reader():
    boxes = [([0, 0, 10, 10], "R1"), ([1, 0, 11, 10], "R2"), ([0, 1, 10, 11], "R2"), ([50, 50, 60, 60], "R3")]
    merged = merge_reader_boxes(boxes, num_readers=3)
    assert [(score, readers) for _, score, readers in merged] == [
        (2 / 3, ["R1", "R2"]),
        (1 / 3, ["R2"]),
        (1 / 3, ["R3"]),
    ]
    assert merged[0][0] == [0.5, 0.0, 10.5, 10.0]


def test_detection_csv_row_without_a_box_names_file_and_line(tmp_path):
    path, images = vindr_csv(tmp_path, count=3)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(["001a1b2c3", "Cardiomegaly", 3, "R1", "", "", "", ""])
    with pytest.raises(InvalidRowsError, match="train.csv line 13: class 'Cardiomegaly' has no box"):
        import_detection_csv(DetectionCsvSource(path), ImportOptions(images, tmp_path / "out"))


def test_phrase_grounding_imports_phrases_with_one_or_more_boxes(tmp_path):
    path, images = grounding_csv(tmp_path)
    summary = import_phrase_grounding(
        GroundingCsvSource(path), ImportOptions(images, tmp_path / "out", ratios=(1.0, 0.0, 0.0))
    )
    assert summary.report.invalid == {} and summary.counts == {"train": 10}
    rows = {row["id"]: row for row in load_rows(tmp_path / "out", "train")}
    two = rows["files/p3"]["regions"]
    assert [region["caption"] for region in two] == ["bibasilar atelectasis"] * 2
    assert two[1]["bbox"] == [36.0, 30.0, 58.0, 50.0]
    effusion = rows["files/p0"]["regions"][0]
    assert (effusion["term"], effusion["position"], effusion["adjective"]) == ("pleural effusion", "left", "")
    assert effusion["negatives"][0] == "small right pleural effusion"
    assert {"small left pneumonia", "small left cardiomegaly"} <= set(effusion["negatives"])
    assert rows["files/p0"]["summary_caption"] == "small left pleural effusion."


def test_a_caption_with_a_quoted_newline_imports_through_the_cli(tmp_path):
    """A phrase typed over two lines in a spreadsheet (a quoted field holding a newline) is one caption, with its
    whitespace folded; the rows after it keep their own line numbers, so a bad one is still named by its line."""
    path, images = grounding_csv(tmp_path, count=4)
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    rows[1][2] = "small left\npleural effusion"
    rows.append(["d9", "Pneumonia", "right lower lobe pneumonia", "files/p1.jpg", "x", 6, 20, 18, 64])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    assert '"small left\npleural effusion"' in path.read_text(encoding="utf-8")

    out = tmp_path / "out"
    result = _cli(
        "data",
        "import-grounding",
        "--csv-path",
        path,
        "--image-root",
        images,
        "--out-dir",
        out,
        "--ratios",
        "1",
        "0",
        "0",
        "--skip-invalid",
    )
    # Header, the two-line phrase (lines 2-3), p1, p2, p3's two boxes: the bad row is on line 8.
    assert (
        "skipped 1 invalid rows" in result.stdout
        and "MS_CXR_Local_Alignment.csv line 8: box" in result.stdout
    )
    imported = {row["id"]: row for row in load_rows(out, "train")}
    assert set(imported) == {"files/p0", "files/p2", "files/p3"}
    assert [region["caption"] for region in imported["files/p0"]["regions"]] == [
        "small left pleural effusion"
    ]


def test_triples_without_adjective_import_and_only_bad_captions_are_errors(tmp_path):
    images = _images(tmp_path / "images", 3)
    records = [
        {
            "image": "img0.png",
            "summary_caption": "s.",
            "detailed_report": "r.",
            "region_extraction": "|hippocampus|left",
        },
        {
            "image": "img1.png",
            "summary_caption": "s.",
            "detailed_report": "r.",
            "region_extraction": "|amygdala|right",
        },
    ]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "boxes.json").write_text(
        json.dumps({"img0.png": [[2, 3, 20, 25]], "img1.png": [[1, 1, 9, 9]]})
    )
    summary = import_annotations(
        AnnotationSource(tmp_path / "a.json", tmp_path / "boxes.json"),
        ImportOptions(images, tmp_path / "out"),
    )
    assert summary.report.invalid == {}
    (row,) = [row for row in _rows(tmp_path / "out") if row["id"] == "img0"]
    assert row["regions"][0]["caption"] == "hippocampus left"
    assert row["regions"][0]["negatives"][:2] == ["hippocampus right", "amygdala left"]
    assert RegionTriple.parse("|hippocampus|left") == RegionTriple("", "hippocampus", "left")

    records[1]["negative_variations"] = [["amygdala right", "amygdala left"]]
    (tmp_path / "a.json").write_text(json.dumps(records))
    with pytest.raises(InvalidRowsError) as raised:
        import_annotations(
            AnnotationSource(tmp_path / "a.json", tmp_path / "boxes.json"),
            ImportOptions(images, tmp_path / "bad"),
        )
    assert "of a.json are invalid" in str(
        raised.value
    ) and "img1: region 0: negative 'amygdala right' equals" in str(raised.value)

    coco = {
        "images": [{"id": 1, "file_name": "img2.png", "width": 40, "height": 30}],
        "annotations": [{"id": 5, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 9, "caption": "  "}],
        "categories": [{"id": 9, "name": ""}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(InvalidRowsError, match="1: annotation 5 has no caption"):
        import_coco(CocoSource(tmp_path / "c.json"), ImportOptions(images, tmp_path / "bad2"))


NUMBERED_NEGATIVES = [
    "acute fracture L4 vertebra",
    "acute fracture L3 vertebra",
    "acute fracture S1 vertebra",
    "Acute fracture, T12 vertebra.",
    "old",
]
CHINESE_NEGATIVES = ["不规则", "分叶状", "毛刺状", "椭圆形", "圆形 肿块 左肺上叶"]


def test_import_annotations_keeps_negatives_that_differ_by_a_number_and_a_chinese_row(tmp_path):
    """Through the command line: negatives that differ from the caption only by a vertebra's number, a row in
    Chinese with multi-character parts and bare adjectives, and a multi-word adjective; no row refused, every
    negative kept."""
    images = _images(tmp_path / "images", 3)
    records = [
        {
            "image": "img0.png",
            "summary_caption": "Acute fracture of the L5 vertebra.",
            "detailed_report": "Acute compression fracture of the L5 vertebral body.",
            "region_extraction": "acute|fracture|L5 vertebra",
            "negative_variations": NUMBERED_NEGATIVES,
        },
        {
            "image": "img1.png",
            "summary_caption": "左肺上叶见圆形结节。",
            "detailed_report": "左肺上叶可见一圆形结节，边界清楚。",
            "region_extraction": "圆形|结节|左肺上叶",
            "negative_variations": CHINESE_NEGATIVES,
        },
        {
            "image": "img2.png",
            "summary_caption": "Ground glass opacity in the right lower lobe.",
            "detailed_report": "A ground glass opacity in the right lower lobe.",
            "region_extraction": "ground glass|opacity|right lower",
        },
    ]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    boxes = {name: [[2, 3, 20, 25]] for name in ("img0.png", "img1.png", "img2.png")}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "out"
    imported = _cli(
        *(
            "data",
            "import-annotations",
            "--annotations",
            tmp_path / "a.json",
            "--boxes",
            tmp_path / "boxes.json",
        ),
        *("--image-root", images, "--out-dir", out),
    )
    assert "invalid" not in imported.stdout and "skipped" not in imported.stdout
    rows = {row["id"]: row for row in _rows(out)}
    assert set(rows) == {"img0", "img1", "img2"}
    fracture = rows["img0"]["regions"][0]
    assert fracture["caption"] == "acute fracture l5 vertebra"
    assert fracture["negatives"] == NUMBERED_NEGATIVES[:4] + ["old fracture l5 vertebra"]
    nodule = rows["img1"]["regions"][0]
    assert nodule["caption"] == "圆形 结节 左肺上叶"
    assert nodule["negatives"] == [f"{adjective} 结节 左肺上叶" for adjective in CHINESE_NEGATIVES[:4]] + [
        "圆形 肿块 左肺上叶"
    ]
    opacity = rows["img2"]["regions"][0]
    assert opacity["caption"] == "ground glass opacity right lower" and len(opacity["negatives"]) == 5
    for region in (fracture, nodule, opacity):
        keys = [caption_key(negative) for negative in region["negatives"]]
        assert caption_key(region["caption"]) not in keys and len(set(keys)) == len(keys)


def test_annotation_reports_use_the_one_triple_parser():
    from regionmed_clip.annotation.reports import ReportError, parse_report

    answer = {
        "summary_caption": "A round nodule is seen in the left upper zone of this chest image.",
        "detailed_report": "A nodule in the left upper zone.",
        "region_extraction": "|nodule|left upper",
        "negative_variations": [
            "nodule right upper",
            "mass left upper",
            "cyst left upper",
            "nodule left lower",
            "x",
        ],
    }
    (region,) = parse_report(json.dumps(answer), num_regions=1).regions
    assert (region.adjective, region.term, region.caption) == ("", "nodule", "nodule left upper")
    answer.pop("negative_variations")
    with pytest.raises(ReportError, match="it has no adjective we can contradict"):
        parse_report(json.dumps(answer), num_regions=1)
    answer["region_extraction"] = "round|nodule|apical"
    with pytest.raises(ReportError) as raised:
        parse_report(json.dumps(answer), num_regions=1)
    with pytest.raises(ValueError) as direct:
        RegionTriple.parse("round|nodule|apical", position_words=POSITION_WORDS)
    assert str(direct.value) in raised.value.problems[0]


# ---- the collator's region sampling ------------------------------------------------------------------------------


def _many_region_rows(count: int = 3, regions: int = 20) -> list[dict]:
    image = random_image(64, 64, seed=0)
    return [
        {
            "id": f"row{index}",
            "image": image,
            "summary_caption": "s",
            "detailed_report": "r",
            "regions": [
                {
                    "bbox": [k, k, k + 20, k + 20],
                    "caption": f"region {index} {k}",
                    "negatives": [],
                    "score": 1.0,
                }
                for k in range(regions)
            ],
        }
        for index in range(count)
    ]


def test_every_region_is_drawn_over_an_epoch_of_visits(tokenizer):
    """20 regions, `max_regions` 4: the cycle of ceil(20 / 4) = 5 epochs draws each region exactly once."""
    rows = _many_region_rows()
    collator = MedRegionCollator(
        make_processor(tokenizer, max_regions=4), region_sampling="cycle", seed=3, stage=2
    )
    drawn = {row["id"]: [] for row in rows}
    for epoch in range(5):
        collator.set_epoch(epoch)
        batch = collator(rows)
        assert batch["roi_mask"].sum().item() == 4 * len(rows)
        for row in rows:
            drawn[row["id"]] += [region["caption"] for region in collator.kept_regions(row)]
    for row in rows:
        assert sorted(drawn[row["id"]]) == sorted(region["caption"] for region in row["regions"])
    assert collator.dropped_regions == 0
    assert len({tuple(captions[:4]) for captions in drawn.values()}) == 3  # each row has its own draw

    resumed = MedRegionCollator(
        make_processor(tokenizer, max_regions=4), region_sampling="cycle", seed=3, stage=2
    )
    resumed.set_epoch(3)
    assert [region["caption"] for region in resumed.kept_regions(rows[1])] == drawn["row1"][12:16]
    loader = stage_dataloader(rows, resumed, 3, rank=0, world=1, seed=0, num_workers=2)
    (order,) = list(loader.batch_sampler)
    (batch,) = list(loader)  # the epoch travels with the collator into the workers
    in_process = resumed([rows[index] for index in order])
    assert torch.equal(batch["region_input_ids"], in_process["region_input_ids"])
    # The next cycle (epochs 5 to 9) is a fresh permutation that again draws every region once.
    cycles = [
        [index for visit in visits for index in visit_region_indices([1.0] * 20, 4, visit, "3|2|row1")]
        for visits in (range(5), range(5, 10))
    ]
    assert [f"region 1 {index}" for index in cycles[0]] == drawn["row1"]
    assert sorted(cycles[1]) == list(range(20)) and cycles[1] != cycles[0]


def test_sampling_is_weighted_by_score_and_a_cycle_covers_uneven_counts():
    scores = [1.0] * 6 + [0.0] * 4 + [5.0]
    first = visit_region_indices(scores, 4, 0, "key")
    assert all(scores[index] > 0 for index in first)
    cycle = [index for visit in range(3) for index in visit_region_indices(scores, 4, visit, "key")]
    assert set(cycle) == set(range(11)) and len(cycle) == 12  # the last visit is filled up, so 12 draws
    assert set(cycle[7:11]) == {6, 7, 8, 9}  # score 0 comes last in the cycle's permutation
    leads = sum(visit_region_indices(scores, 4, 0, f"k{seed}")[0] == 10 for seed in range(200))
    assert leads > 60  # weight 5 of 11: far above the uniform 1 in 7 (about 29 of 200)


def test_top_mode_is_deterministic_counts_truncation_and_region_passes_cover_all(tokenizer, caplog):
    rows = _many_region_rows(count=2, regions=10)
    rows[0]["regions"][7]["score"] = 9.0
    collator = MedRegionCollator(make_processor(tokenizer, max_regions=4))
    with caplog.at_level("WARNING"):
        first = collator(rows)
    assert collator.dropped_regions == 12 and "truncated regions are counted" in caplog.text
    collator.set_epoch(5)
    assert torch.equal(collator(rows)["roi_boxes"], first["roi_boxes"])  # no sampling in "top" mode
    assert collator.kept_regions(rows[0])[0]["caption"] == "region 0 7"
    passes = region_passes(rows[0], 4)
    assert [len(part["regions"]) for part in passes] == [4, 4, 2]
    assert sorted(r["caption"] for part in passes for r in part["regions"]) == sorted(
        r["caption"] for r in rows[0]["regions"]
    )
    counted = MedRegionCollator(make_processor(tokenizer, max_regions=4))
    counted(passes)
    assert counted.dropped_regions == 0


def test_regions_with_fewer_negatives_are_padded_and_masked(tokenizer):
    rows = _many_region_rows(count=1, regions=3)
    for region, negatives in zip(rows[0]["regions"], ([], ["a b"], ["c", "d", "e"]), strict=True):
        region["negatives"] = negatives
    batch = MedRegionCollator(make_processor(tokenizer))(rows)
    present = batch["negative_attention_mask"].sum(-1) > 0
    assert present.tolist() == [[[False, False, False], [True, False, False], [True, True, True]]]
    outputs = objective_of(tiny_model(), {"neg_loss": 1.0})(**batch)
    assert outputs.negative_mask.tolist() == present.tolist()


def test_hard_negative_accuracy_leaves_out_regions_without_negatives():
    generator = torch.Generator().manual_seed(0)
    regions, positives = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    negatives = torch.randn(6, 3, 4, generator=generator)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[:2] = False  # two regions have no negatives: nothing to be right or wrong about
    cosine = torch.nn.functional.cosine_similarity
    expected = np.mean(
        [
            all(
                cosine(regions[i], positives[i], dim=0) > cosine(regions[i], negatives[i, k], dim=0)
                for k in range(3)
            )
            for i in range(2, 6)
        ]
    )
    assert hard_negative_accuracy(regions, positives, negatives, mask) == pytest.approx(expected)
    assert np.isnan(
        hard_negative_accuracy(regions, positives, negatives, torch.zeros(6, 3, dtype=torch.bool))
    )


# ---- reproducible synth ------------------------------------------------------------------------------------------


def test_data_synth_is_byte_identical_across_processes_vqa_included(tmp_path):
    """Two `data synth` processes with one seed and different hash seeds (set order of strings differs) write the
    same files."""
    for name, hash_seed in (("a", "1"), ("b", "2")):
        command = [sys.executable, "-m", "regionmed_clip.cli", "data", "synth", "--out", str(tmp_path / name)]
        command += ["--train", "12", "--val", "2", "--test", "2", "--image-size", "48"]
        result = subprocess.run(
            command, env={**ENV, "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()) == files
    assert any(str(path).startswith("vqa/") for path in files)
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path


# ---- end to end: import, train, fine-tune ------------------------------------------------------------------------


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "regionmed_clip.cli", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _import_and_train(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """Import a dataset of `layout`, check the import refused nothing, train a tiny model on it; returns the
    dataset folder and the model folder."""
    out = tmp_path / "data"
    if layout in ("coco", "numbered"):
        path, images = coco_anatomy(tmp_path, categories=ANATOMY if layout == "coco" else NUMBERED_ANATOMY)
        imported = _cli(
            "data", "import-coco", "--annotations", path, "--image-root", images, "--out-dir", out
        )
    elif layout == "detection":
        path, images = vindr_csv(tmp_path)
        imported = _cli(
            "data", "import-detection", "--csv-path", path, "--image-root", images, "--out-dir", out
        )
    else:
        path, images = grounding_csv(tmp_path)
        imported = _cli(
            "data", "import-grounding", "--csv-path", path, "--image-root", images, "--out-dir", out
        )
    assert "skipped" not in imported.stdout and "invalid" not in imported.stdout
    made_by_number = "number 0," if layout != "numbered" else "number 350,"  # 10 images × 7 regions × 5
    assert f"hard negatives made: given 0, adjective 0, {made_by_number} position" in imported.stdout
    assert all(f"{split} {count}" in imported.stdout for split, count in (("train", 8), ("validation", 1)))
    assert "hard_negatives" in metadata_load(out / "README.md")
    assert "Hard negatives (5 per region" in (out / "README.md").read_text()

    config = tiny_training_config(tmp_path / "run", out, batch_size=4, steps=(1, 1, 2, 2))
    _cli("train", "--config", write_config(tmp_path / "train.yaml", config))
    model = tmp_path / "run" / "model"
    assert (model / "model.safetensors").is_file()
    return out, model


@pytest.mark.parametrize("layout", ["coco", "numbered", "detection", "grounding"])
def test_real_layouts_import_with_no_refused_rows_then_train(tmp_path, layout):
    _import_and_train(tmp_path, layout)


def test_a_model_trained_on_an_imported_layout_finetunes_with_lora(tmp_path):
    """Fine-tuning reads the same schema whatever the importer made it from: one layout runs it."""
    out, model = _import_and_train(tmp_path, "coco")
    tuned = tmp_path / "tuned"
    _cli(
        "finetune",
        "--method",
        "lora",
        "--model",
        model,
        "--data",
        out,
        "--output-dir",
        tuned,
        "--steps",
        2,
        "--batch-size",
        4,
        "--max-length",
        64,
        "--mixed-precision",
        "no",
        "--report-to",
        "none",
    )
    losses = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(np.isfinite(record["loss/roi_loss"]) for record in losses)
    assert (tuned / "model" / "model.safetensors").is_file()
