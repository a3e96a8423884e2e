"""How the train step, the image processor, dataset reading and retrieval grow with their sizes."""

import tempfile
from pathlib import Path

from benchmarks.common import gray_images, interleaved, synth_rows, write_dataset
from benchmarks.fresh import run_job
from regionmed_clip import RegionMedCLIPImageProcessor

HEADING = "## Scaling"


def train_step_rows() -> list[str]:
    rows = [
        "| train step (pool, fp32), fresh process | s / step (median of 3) | peak RSS increase MiB |",
        "|---|---|---|",
    ]
    for batch, rois, size in (
        (4, 4, 224),
        (8, 4, 224),
        (16, 4, 224),
        (8, 8, 224),
        (8, 16, 224),
        (8, 4, 160),
        (8, 4, 320),
    ):
        run = run_job("train_step_time", batch=batch, rois=rois, image_size=size)
        rows.append(f"| batch {batch}, K={rois}, {size} px | {run['step']:.2f} | {run['mib']:.0f} |")
        print(rows[-1])
    return rows


def processor_rows() -> list[str]:
    rows = [
        "| image processor, 16 grayscale images (+ 3 ROI crops each) | images/s | images/s with crops |",
        "|---|---|---|",
    ]
    processor = RegionMedCLIPImageProcessor(roi_mode="crop", max_regions=4)
    for size in (256, 512, 1024, 2048):
        images = gray_images(16, size)
        scale = size / 512
        boxes = [
            [(scale * (10 + 20 * j), scale * 10, scale * (150 + 20 * j), scale * 180) for j in range(3)]
        ] * 16
        times = interleaved(
            {
                "plain": lambda images=images: processor(images, return_tensors="pt"),
                "crops": lambda images=images, boxes=boxes: processor(
                    images, boxes=boxes, return_tensors="pt"
                ),
            },
            3,
        )
        rows.append(f"| {size} px | {16 / times['plain']:.0f} | {16 / times['crops']:.0f} |")
        print(rows[-1])
    return rows


def dataset_rows() -> list[str]:
    rows = [
        "| dataset (64 px rows, pool collator, 20 shuffled batches of 16), fresh process | open s | "
        "open + 20 batches s | peak RSS above the built collator MiB |",
        "|---|---|---|---|",
    ]
    unique = synth_rows(64, 64)
    with tempfile.TemporaryDirectory() as scratch:
        for size in (1_000, 10_000):
            folder = Path(scratch) / f"rows-{size}"
            write_dataset(folder, size, unique)
            for streaming in (False, True):
                # A fresh datasets cache, so that the Arrow conversion of a non-streaming load is counted.
                cache = Path(scratch) / f"cache-{size}-{streaming}"
                env = {"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
                run = run_job("open_dataset", env, folder=str(folder), streaming=streaming)
                mode = "streaming" if streaming else "map-style (Arrow cache)"
                rows.append(
                    f"| {size:,} rows, {mode} | {run['open']:.1f} | {run['seconds']:.1f} | "
                    f"{run['mib'] - run['before']:.0f} |"
                )
                print(rows[-1])
    return rows


def retrieval_rows() -> list[str]:
    rows = [
        "| retrieval (512-d, I→T ranks), fresh process | seconds | peak RSS increase MiB |",
        "|---|---|---|",
    ]
    for size in (1_000, 10_000, 50_000):
        run = run_job("retrieval", size=size)
        rows.append(f"| {size:,} × {size:,} | {run['seconds']:.1f} | {run['mib']:.0f} |")
        print(rows[-1])
    return rows


def run(settings) -> list[str]:
    return [*train_step_rows(), "", *processor_rows(), "", *dataset_rows(), "", *retrieval_rows()]
