"""MedRegion-synth: schema, card, reproducibility, the region-level property, and the CLI entry point."""

import filecmp
import os
import subprocess
import sys

import pytest
from datasets import load_dataset

from regionmed_clip.data import row_problems
from regionmed_clip.data.synth import (
    ADJECTIVES,
    MODALITIES,
    TERMS,
    SynthConfig,
    iter_synth,
    region_level_check,
)


def test_folder_loads_validates_and_has_a_card_with_counts(synth_folder):
    dataset = load_dataset(str(synth_folder))
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 24, "validation": 6, "test": 6}
    for split in dataset:
        for row in dataset[split]:
            assert row_problems(row) == []
    card = (synth_folder / "README.md").read_text()
    assert "num_examples: 24" in card and "config_name: vqa" in card and "name: negatives" in card
    vqa = load_dataset(str(synth_folder), "vqa", split="train")
    assert len(vqa) == 4 * 24
    assert set(vqa["answer_type"]) == {"CLOSED", "OPEN"}
    assert set(vqa["image_id"]) == set(dataset["train"]["id"])
    closed = [
        answer for answer, kind in zip(vqa["answer"], vqa["answer_type"], strict=True) if kind == "CLOSED"
    ]
    assert set(closed) == {"yes", "no"}


def test_rows_follow_the_lesion_facts():
    config = SynthConfig(out="unused", train=200, validation=0, test=0, image_size=96)
    rows = [row for row, _ in iter_synth(config, "train")]
    assert {row["modality"] for row in rows} == set(MODALITIES)
    for row in rows:
        assert 1 <= len(row["regions"]) <= 3
        words = row["summary_caption"].split()
        assert (
            10 <= len(words) <= 15
            and "," not in row["summary_caption"]
            and row["summary_caption"].endswith(".")
        )
        assert row["label"] == row["regions"][0]["term"]
        for region in row["regions"]:
            assert region["adjective"] in ADJECTIVES and region["term"] in TERMS
            assert region["caption"] == f"{region['adjective']} {region['term']} {region['position']}"
            assert len(set(region["negatives"])) == 5 and region["caption"] not in region["negatives"]
            assert f"{region['adjective']} {region['term']}" in row["detailed_report"]
            x0, y0, x1, y1 = region["bbox"]
            box_fraction = (x1 - x0) * (y1 - y0) / 96**2
            assert 0.008 <= box_fraction <= 0.2  # lesion area 1–6 %, its box a little more


def test_generation_is_reproducible_byte_for_byte(tmp_path):
    from regionmed_clip.data.synth import generate_synth

    for name in ("a", "b"):
        generate_synth(
            SynthConfig(out=str(tmp_path / name), train=5, validation=2, test=2, image_size=64), False
        )
    comparison = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    files = [
        os.path.relpath(os.path.join(root, f), tmp_path / "a")
        for root, _, fs in os.walk(tmp_path / "a")
        for f in fs
    ]
    assert len(files) == 7
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == [] and not comparison.left_only and not comparison.right_only
    generate_synth(
        SynthConfig(out=str(tmp_path / "c"), train=5, validation=2, test=2, image_size=64, seed=1), False
    )
    assert not filecmp.cmp(
        tmp_path / "a" / "data" / "train-00000-of-00001.parquet",
        tmp_path / "c" / "data" / "train-00000-of-00001.parquet",
        shallow=False,
    )


def test_lesion_details_are_region_level():
    """The same classifier reads the adjective from ROI crops far better than from downscaled whole images."""
    config = SynthConfig(out="unused", train=600, validation=0, test=0, image_size=96, max_lesions=1)
    scores = region_level_check((row for row, _ in iter_synth(config, "train")), size=32)
    print(
        f"\nadjective accuracy: whole image {scores['whole_image']:.3f}, ROI crop {scores['roi_crop']:.3f}, "
        f"chance {scores['chance']:.3f}"
    )
    assert scores["whole_image"] < scores["chance"] + 0.12
    assert scores["roi_crop"] > scores["whole_image"] + 0.3


def test_config_checks():
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(out="x", image_size=16)
    with pytest.raises(ValueError, match="max_lesions"):
        SynthConfig(out="x", max_lesions=4)


def test_cli_synth_and_validate(tmp_path):
    out = tmp_path / "synth"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "regionmed_clip.cli",
        "data",
        "synth",
        "--out",
        str(out),
        "--train",
        "6",
        "--val",
        "2",
        "--test",
        "2",
        "--image-size",
        "48",
        "--seed",
        "3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "default {'train': 6, 'validation': 2, 'test': 2}" in result.stdout
    check = subprocess.run(
        [sys.executable, "-m", "regionmed_clip.cli", "data", "validate", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "train: 6 rows, all valid" in check.stdout
