"""Streaming parquet shards against the map-style (Arrow cache) read of the same folder."""

import statistics
import tempfile
from pathlib import Path

from benchmarks.common import synth_rows, write_dataset
from benchmarks.fresh import run_job

HEADING = "## Streaming data"


def run(settings) -> list[str]:
    """Each mode in a fresh process: open a folder and collate 20 shuffled batches of 16 (the job of the scaling
    section's dataset rows); median of interleaved runs."""
    repeats = min(settings.repeats, 3)
    unique = synth_rows(64, 64)
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "rows"
        write_dataset(folder, 1_000, unique)
        for index in range(repeats):  # interleaved, so that the machine's load hits both modes alike
            for streaming in (False, True):
                cache = Path(scratch) / f"cache-{streaming}-{index}"
                env = {"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
                runs[streaming].append(
                    run_job("open_dataset", env, folder=str(folder), streaming=streaming)["seconds"]
                )
    seconds = {streaming: statistics.median(values) for streaming, values in runs.items()}
    table = [
        f"Median of {repeats} interleaved fresh processes each.",
        "",
        "| dataset (64 px rows, pool collator, 20 shuffled batches of 16), fresh process | open + 20 batches s | "
        "/ map-style | target |",
        "|---|---|---|---|",
    ]
    for streaming, mode in ((False, "map-style (Arrow cache)"), (True, "streaming")):
        target = "≤ 1.5" if streaming else ""
        table.append(
            f"| 1,000 rows, {mode} | {seconds[streaming]:.1f} | {seconds[streaming] / seconds[False]:.2f}× | {target} |"
        )
    return table
