"""`make learning-check` (`regionmed_clip.experiments.learning_check`): aggregation against naive references, and
the check's figures pinned.

Pins (tests/pins/*.json) are the check's own output (`summary`: mean and std per figure over seeds 0, 1, 2). A new
run of one or two of those seeds must land within `PIN_STDS` standard deviations of the pinned mean (plus a floor
of one test item, for figures whose seeds agreed exactly): a change that moves what the recipe learns by more than
the seed-to-seed spread fails. `learning_check_tiny.json` is of a tiny model trained a few steps, so it runs in
the suite; `learning_check_demo.json` is `make learning-check` itself (configs/demo.yaml, three seeds), and its
test, which trains one seed at the demo budget, is marked `slow` (`make test-slow`; `make test` leaves it out).
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from regionmed_clip.experiments.demo import HEADLINE, evaluated_on
from regionmed_clip.experiments.learning_check import (
    REGION_ANNOTATIONS,
    SHUFFLED,
    aggregate,
    detection_verdict,
    flat_figures,
    localization_verdict,
    markdown,
    shuffled_region_copy,
    verdict,
)
from regionmed_clip.training.config import DataSpec

from .test_training import ENV, tiny_training_config

PINS = Path(__file__).parent / "pins"
PIN_STDS = 3.0


def test_flat_figures_keep_figures_and_drop_counts_breakdowns_and_intervals():
    metrics = {
        "provenance": {"seed": 0},
        "num_images": 8,
        "zero_shot": {
            "box_free": {
                "global": {"macro_auc": 0.7, "macro_auc_ci95": [0.6, 0.8], "per_class_auc": {"a": 0.5}}
            }
        },
        "retrieval": {
            "box_free": {"global": {"image_to_text": {"R@1": 0.25, "R@5": 1}}},
            "num_distinct_reports": 8,
        },
        "region": {"hard_negative_accuracy": 0.5, "region_to_caption": {"R@1": 0.125, "num_regions": 9}},
        "vqa": {"MedRegion-synth": {"overall": 0.9}},
    }
    assert flat_figures(metrics) == {
        "zero_shot/box_free/global/macro_auc": 0.7,
        "retrieval/box_free/global/image_to_text/R@1": 0.25,
        "retrieval/box_free/global/image_to_text/R@5": 1.0,
        "region/hard_negative_accuracy": 0.5,
        "region/region_to_caption/R@1": 0.125,
    }


def test_aggregate_and_verdict_match_naive_statistics():
    values = [0.1, 0.25, 0.19]
    entry = aggregate(values)
    assert entry["mean"] == pytest.approx(statistics.fmean(values))
    assert entry["std"] == pytest.approx(statistics.stdev(values))
    assert aggregate([0.3])["std"] == 0.0
    label, key = HEADLINE[0]
    summary = {
        "4-stage (region-aware)": {key: {"mean": 0.30, "std": 0.01}},
        "global-only": {key: {"mean": 0.25, "std": 0.02}},
    }
    check = verdict(summary, seeds=3)[label]
    assert check["margin"] == pytest.approx(0.05) and check["bar"] == pytest.approx(0.04) and check["beats"]
    summary["global-only"][key]["std"] = 0.03  # bar 0.06 > margin 0.05
    assert not verdict(summary, seeds=3)[label]["beats"]


def test_fewer_than_three_seeds_give_no_verdict_and_the_report_names_its_dataset():
    label, key = HEADLINE[0]
    summary = {
        "4-stage (region-aware)": {key: {"mean": 0.30, "std": 0.0}},
        "global-only": {key: {"mean": 0.25, "std": 0.0}},
    }
    for seeds in (1, 2):
        assert verdict(summary, seeds=seeds)[label] == {
            "margin": pytest.approx(0.05),
            "bar": None,
            "beats": None,
        }
    data = DataSpec(path="data/chest-xray")
    result = {
        "seeds": [0],
        "steps": {"global": 10},
        "dataset": evaluated_on(data),
        "summary": summary,
        "verdict": verdict(summary, seeds=1),
        "seconds": 60.0,
    }
    table = markdown(result)
    assert "on the test split of data/chest-xray;" in table and "MedRegion-synth" not in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    assert row.endswith("| +0.050 | – | spread unknown (1 seed; needs 3) |")
    synth = DataSpec(path="outputs/synth", synth={"train": 8})
    assert evaluated_on(synth) == "the test split of MedRegion-synth (outputs/synth)"


def entry(mean: float, std: float) -> dict:
    return {"mean": mean, "std": std}


def three_seed_result(summary: dict, **verdicts) -> dict:
    """What `markdown` reads of a learning check over seeds 0, 1, 2 with `summary`, given its control verdicts."""
    return {
        "seeds": [0, 1, 2],
        "steps": {"global": 10},
        "dataset": "the test split of D",
        "summary": summary,
        "verdict": verdict(summary, seeds=3),
        **verdicts,
        "seconds": 60.0,
    }


def test_localization_is_judged_against_each_of_its_controls():
    kind = "position_free/"
    summary = {
        "4-stage (region-aware)": {
            f"localization/{kind}pointing_accuracy": entry(0.60, 0.02),
            f"localization/{kind}controls/objectness_only/pointing_accuracy": entry(0.45, 0.01),
            f"localization/{kind}controls/box_prior/pointing_accuracy": entry(0.57, 0.0),
            f"localization/{kind}ap50": entry(0.10, 0.01),
            f"localization/{kind}controls/objectness_only/ap50": entry(0.05, 0.01),
            f"localization/{kind}controls/box_prior/ap50": entry(0.01, 0.0),
            f"localization/{kind}heatmap_pointing_accuracy": entry(0.50, 0.02),
        },
        "global-only": {
            f"localization/{kind}pointing_accuracy": entry(0.30, 0.05),
            f"localization/{kind}heatmap_pointing_accuracy": entry(0.52, 0.03),
            f"localization/{kind}ap50": entry(0.02, 0.01),
        },
    }
    rows = localization_verdict(summary, seeds=3)
    judged = {(row["metric"], row["control"].split(" (")[0].split(",")[0]): row for row in rows}
    assert set(judged) == {
        ("pointing", "objectness only"),
        ("pointing", "box prior"),
        ("pointing", "global-only model"),
        ("pointing", "global-only heatmap's peak"),
        ("pointing", "the model's own heatmap peak"),
        ("AP50", "objectness only"),
        ("AP50", "box prior"),
        ("AP50", "global-only model"),
    }  # the heatmap gives a point, so it has no AP50; the term and caption queries are absent from the run
    box_prior = judged[("pointing", "box prior")]  # margin 0.03, bar 2 × 0.02
    assert box_prior["margin"] == pytest.approx(0.03) and box_prior["bar"] == pytest.approx(0.04)
    assert box_prior["beats"] is False
    heatmap = judged[("pointing", "global-only heatmap's peak")]  # margin 0.08, bar 2 × 0.03
    assert heatmap["bar"] == pytest.approx(0.06) and heatmap["beats"] is True
    assert all(row["beats"] is None and row["bar"] is None for row in localization_verdict(summary, seeds=2))
    table = markdown(three_seed_result(summary, localization_verdict=rows))
    assert "## Localization without boxes against its controls" in table
    assert "| position_free | pointing | 0.600 ± 0.020 | box prior" in table
    assert table.count("| position_free |") == len(rows)


def test_detection_of_terms_is_judged_by_ap50_and_presence_against_every_control():
    aware, plain = {}, {}
    for kind in ("term", "position_free"):
        aware.update(
            {
                f"detection/{kind}/ap": entry(0.3, 0.01),
                f"detection/{kind}/ap50": entry(0.55, 0.02),
                f"detection/{kind}/ar@100": entry(0.6, 0.01),
                f"detection/{kind}/presence_auc": entry(0.92, 0.01),
            }
        )
        for control, ap50, presence in (
            ("objectness_only", 0.10, 0.60),
            ("box_prior", 0.02, 0.50),
            ("heatmap_peak", 0.50, 0.905),
        ):
            aware[f"detection/{kind}/controls/{control}/ap50"] = entry(ap50, 0.01)
            aware[f"detection/{kind}/controls/{control}/presence_auc"] = entry(presence, 0.0)
        plain.update(
            {f"detection/{kind}/ap50": entry(0.0, 0.0), f"detection/{kind}/presence_auc": entry(0.5, 0.05)}
        )
    summary = {"4-stage (region-aware)": aware, "global-only": plain}
    rows = detection_verdict(summary, seeds=3)
    judged = {(row["metric"], row["control"].split(" (")[0].split(",")[0]): row for row in rows}
    controls = {"objectness only", "box prior", "the model's heatmap peak", "global-only model"}
    assert set(judged) == {(metric, control) for metric in ("AP50", "presence AUC") for control in controls}
    assert {row["query"] for row in rows} == {"term"}  # position-free queries are tabled, not judged
    heatmap = judged[("AP50", "the model's heatmap peak")]  # margin 0.05, bar 2 × 0.02
    assert heatmap["bar"] == pytest.approx(0.04) and heatmap["beats"] is True
    presence = judged[("presence AUC", "the model's heatmap peak")]  # margin 0.015, bar 2 × 0.01
    assert presence["margin"] == pytest.approx(0.015) and presence["beats"] is False
    table = markdown(three_seed_result(summary, detection_verdict=rows))
    assert "| term | presence AUC | 0.920 ± 0.010 | 0.600 ± 0.000 | 0.500 ± 0.000 | 0.905 ± 0.000 |" in table
    assert "| position_free | AR@100 | 0.600 ± 0.010 | – | – | – | – |" in table
    assert table.count("| term | AP50 | 0.550 ± 0.020 | ") == 1 + len(
        controls
    )  # the table, then each verdict


def tiny_check_config(tmp_path: Path) -> Path:
    """The fast pin's config: the tests' tiny model, a small MedRegion-synth and a few steps per stage."""
    config = tiny_training_config(tmp_path / "unused", tmp_path / "synth", steps=(3, 3, 6, 4))
    config["data"]["synth"] = {"train": 32, "validation": 4, "test": 16, "image_size": 64, "seed": 0}
    path = tmp_path / "tiny-check.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_check(config: Path, out: Path, seeds: list[int], cwd: Path, *options: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "regionmed_clip.cli",
        "learning-check",
        "--config",
        str(config),
        *options,
    ]
    command += ["--output-dir", str(out), "--bootstrap", "0", "--seeds", *map(str, seeds)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=1800, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "learning_check.json").read_text(encoding="utf-8"))


def assert_within_pins(result: dict, pin_file: Path, floor: float):
    pins = json.loads(pin_file.read_text(encoding="utf-8"))["summary"]
    checked = 0
    for model, figures in pins.items():
        for _, key in HEADLINE:
            if key not in figures or math.isnan(figures[key]["mean"]):
                continue
            for seed, run in result["per_seed"].items():
                value, pin = run[model][key], figures[key]
                tolerance = PIN_STDS * pin["std"] + floor
                assert abs(value - pin["mean"]) <= tolerance, (model, key, seed, value, pin)
                checked += 1
    assert checked > 0


def test_learning_check_on_a_tiny_budget_writes_its_outputs_and_stays_within_the_pins(tmp_path):
    out = tmp_path / "learning-check"
    result = run_check(tiny_check_config(tmp_path), out, [0, 1], tmp_path)
    for name in ("learning_check.json", "learning_check.md", "learning_check.png"):
        assert (out / name).is_file(), name
    for model, figures in result["summary"].items():
        for key, entry in figures.items():
            values = [result["per_seed"][seed][model][key] for seed in ("0", "1")]
            assert entry["values"] == values
            if not any(math.isnan(v) for v in values):
                assert entry["mean"] == pytest.approx(statistics.fmean(values))
                assert entry["std"] == pytest.approx(statistics.stdev(values))
    table = (out / "learning_check.md").read_text(encoding="utf-8")
    assert table.index("(box-free)") < table.index("(GT boxes at test)")
    assert_within_pins(result, PINS / "learning_check_tiny.json", floor=1 / 16)

    # --reuse-trained evaluates the finished trainings again: same figures, no training process started; the
    # shuffled-label control is trained (on the shuffled copy) and reported beside them.
    log = out / "seed-1" / "train.log"
    written = log.stat().st_mtime_ns
    again = run_check(
        tiny_check_config(tmp_path), out, [1], tmp_path, "--reuse-trained", "--shuffled-control"
    )
    assert log.stat().st_mtime_ns == written
    figures = again["per_seed"]["1"]
    assert {name: figures[name] for name in result["per_seed"]["1"]} == result["per_seed"]["1"]
    assert set(figures) == {*result["per_seed"]["1"], SHUFFLED}
    control = yaml.safe_load((out / "seed-1" / "shuffled-regions" / "run_config.yaml").read_text())
    assert control["data"]["path"] == str(out / "shuffled-regions-data")
    assert again["shuffled_regions"]["moved"] > 0
    assert SHUFFLED in (out / "learning_check.md").read_text(encoding="utf-8")


def test_shuffled_region_copy_permutes_whole_annotations_and_keeps_everything_else(tmp_path, synth_folder):
    from regionmed_clip.data.folder import load_rows

    out = tmp_path / "shuffled"
    counts = shuffled_region_copy(Path(synth_folder), out, seed=3)
    before, after = load_rows(synth_folder, "train"), load_rows(out, "train")
    keys = REGION_ANNOTATIONS
    old = [region for row in before for region in row["regions"]]
    new = [region for row in after for region in row["regions"]]
    assert counts == {"regions": len(old), "moved": sum(a != b for a, b in zip(old, new, strict=True))}
    assert counts["moved"] > 0
    # The same annotations, each moved whole (a caption keeps its own term and negatives) ...
    whole = sorted(json.dumps([r[k] for k in keys]) for r in old)
    assert sorted(json.dumps([r[k] for k in keys]) for r in new) == whole
    # ... onto the same boxes of the same images and reports.
    for a, b in zip(before, after, strict=True):
        assert (a["id"], a["detailed_report"], a["summary_caption"]) == (
            b["id"],
            b["detailed_report"],
            b["summary_caption"],
        )
        assert [r["bbox"] for r in a["regions"]] == [r["bbox"] for r in b["regions"]]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    for split in ("validation", "test"):
        for name in (Path(synth_folder) / "data").glob(f"{split}-*.parquet"):
            assert (out / "data" / name.name).read_bytes() == name.read_bytes()
    with pytest.raises(ValueError, match="no train files"):
        shuffled_region_copy(tmp_path / "shuffled" / "vqa", tmp_path / "nothing")


@pytest.mark.slow
def test_learning_check_at_the_demo_budget_stays_within_its_pins(tmp_path):
    """One seed of `make learning-check` (configs/demo.yaml: the demo's data, model and steps) against the three
    seeds pinned from it. bf16 autocast (`mixed_precision: auto` on a CPU with AMX / avx512_bf16) against fp32 moves
    the figures by less than the seed-to-seed spread the tolerance allows."""
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    config["data"]["path"] = str(tmp_path / "medregion-synth")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_check(path, tmp_path / "learning-check", [0], tmp_path)
    assert_within_pins(result, PINS / "learning_check_demo.json", floor=1 / 250)
