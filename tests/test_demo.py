"""`make demo`'s program end to end on a tiny config: trains both models, evaluates, writes the report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

from regionmed_clip.experiments.demo import global_only
from regionmed_clip.training import load_config

from .test_training import ENV, ROOT, tiny_training_config


def test_global_only_baseline_has_the_same_number_of_steps():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    baseline = global_only(demo, Path("elsewhere"))
    assert sum(s.steps for s in baseline.stages) == sum(s.steps for s in demo.stages)
    assert [s.uses_regions for s in baseline.stages] == [False, False]
    assert "roi_processor" in baseline.stages[1].frozen


def test_demo_program_writes_model_report_and_metrics(tmp_path):
    config = tiny_training_config(tmp_path / "demo", tmp_path / "synth", steps=(2, 2, 3, 2))
    config["data"]["synth"] = {"train": 24, "validation": 4, "test": 8, "image_size": 64}
    # The demo recipe's region-transfer terms and pool, so its self-proposed box-free rows are exercised too.
    config["model"]["config"]["global_pool"] = "cls_proposer"
    for stage in config["stages"][2:]:
        stage["loss_weights"].update(dense_loss=2.0, global_region_loss=0.25, proposal_loss=1.0)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "regionmed_clip.cli", "demo", "--config", str(path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    expected_files = (
        "report.md",
        "metrics.json",
        "comparison.png",
        "loss_curves.png",
        "model/model.safetensors",
        "model/modeling_regionmed_clip.py",
        "global-only/model/config.json",
        "eval/4-stage/metrics.json",
        "eval/4-stage/metrics.md",
        "eval/4-stage/roc_curves.png",
        "eval/global-only/metrics.json",
    )
    for name in expected_files:
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["learning_check"]) == {"4-stage (region-aware)", "global-only"}
    figures = list(metrics["learning_check"]["global-only"])
    assert figures[:3] == [
        "image → report R@1 (box-free)",
        "report → image R@1 (box-free)",
        "zero-shot macro AUC (box-free)",
    ]
    # Box-free rows first (the image-level figures, then finding a finding from the text alone), then GT boxes.
    box_free = [name for name in figures if name.endswith("(box-free)")]
    assert figures[: len(box_free)] == box_free
    assert {"finding pointing, term (box-free)", "finding AP50, term (box-free)"} <= set(box_free)
    assert {"detection AP50, term (box-free)", "detection presence AUC, term (box-free)"} <= set(box_free)
    assert all(name.endswith("(GT boxes at test)") for name in figures[len(box_free) :])
    assert "hard-negative accuracy (GT boxes at test)" in figures
    # The 4-stage model's proposer was trained: its self-proposed box-free rows follow z_global's.
    aware = list(metrics["learning_check"]["4-stage (region-aware)"])
    assert aware[:3] == figures[:3]
    assert [name for name in aware if "self-proposed" not in name] == figures
    assert all(name.endswith("(box-free, self-proposed regions)") for name in aware[3:6])
    assert "– (no trained proposer)" in (out / "report.md").read_text(encoding="utf-8")
    evaluation = json.loads((out / "eval" / "4-stage" / "metrics.json").read_text())
    baseline = json.loads((out / "eval" / "global-only" / "metrics.json").read_text())
    # The baseline's ROI branch is never trained: its regions go through its global path on crops.
    assert metrics["region_paths"] == {
        "4-stage (region-aware)": "roi_processor",
        "global-only": "global_on_crops",
    }
    assert baseline["embeddings"]["roi_branch_trained"] is False
    assert (
        metrics["learning_check"]["global-only"]["image → report R@1 (box-free)"]
        == (baseline["retrieval"]["box_free"]["global"]["image_to_text"]["R@1"])
    )
    assert (
        metrics["controls"]["hard-negative accuracy (GT boxes at test)"]["value"]
        == (evaluation["region"]["controls"]["text_only_prior"]["hard_negative_accuracy"])
    )
    assert (
        metrics["controls"]["region → caption R@1 (GT boxes at test)"]["value"]
        == (evaluation["region"]["controls"]["box_only"]["region_to_caption"]["R@1"])
    )
    assert {"zero_shot", "few_shot", "retrieval", "region", "grounding", "vqa"} <= set(evaluation)
    assert len(metrics["pipeline_example"]["scores"]) == len(evaluation["classes"])
    report = (out / "report.md").read_text()
    assert (
        "| region → caption R@1 (GT boxes at test) |" in report
        and "box-only (nearest training boxes): " in report
    )
    assert report.index("| image → report R@1 (box-free) |") < report.index(
        "| region → caption R@1 (GT boxes"
    )
    assert "Zero-shot classification" in report and "VQA" in report
    # Detection: the 4-stage model beside each control and the global-only model's detector.
    assert "## Detection: every test image asked every query" in report
    row = next(line for line in report.splitlines() if line.startswith("| term | presence AUC |"))
    assert row.count("|") == 8 and "–" not in row
    # Presence scores as the pipeline gives them, for every term of the split on one test image.
    from regionmed_clip.data.folder import load_rows

    rows = load_rows(tmp_path / "synth", "test")
    terms = {region["term"] for row in rows for region in row["regions"] or []}
    presence = metrics["presence_example"]["scores"]
    assert {entry["label"] for entry in presence} == terms
    assert all(0.0 <= entry["score"] <= 1.0 for entry in presence)
    assert {entry["label"] for entry in presence if entry["in_image"]} == {
        region["term"] for region in rows[0]["regions"] or []
    }
    assert "## Presence scores on test image 0" in report
    assert "total" in result.stdout
    assert os.path.getsize(out / "comparison.png") > 1000
    card = (out / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "zero-shot-image-classification"
    assert {"medical", "clip", "region-aware"} <= set(front["tags"])
    index = {m["name"]: m["value"] for r in front["model-index"][0]["results"] for m in r["metrics"]}
    retrieval = evaluation["retrieval"]
    expected = {
        "region → caption R@1 (GT boxes at test)": evaluation["region"]["region_to_caption"]["R@1"],
        "hard-negative accuracy (GT boxes at test)": evaluation["region"]["hard_negative_accuracy"],
        "image → text R@1 (global, box-free)": retrieval["box_free"]["global"]["image_to_text"]["R@1"],
        "image → text R@1 (region-aware, GT boxes at test)": retrieval["gt_boxes"]["region-aware"][
            "image_to_text"
        ]["R@1"],
        "pointing accuracy (GT boxes at test)": evaluation["grounding"]["pointing_accuracy"],
        "overall accuracy": evaluation["vqa"]["MedRegion-synth"]["overall"],
    }
    auc = evaluation["zero_shot"]["box_free"]["global"]["macro_auc"]
    # NaN when a test class has no positives; the card then leaves the figure out rather than invent one.
    if not math.isnan(auc):
        expected["macro AUC (global embedding, box-free)"] = auc
    assert {name: index[name] for name in expected} == expected
    assert "| warmup |" in card and "Not for clinical use" in card and "random weights" in card
    assert "{{" not in card
