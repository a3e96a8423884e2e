"""What every benchmark section shares: the towers, model pairs and batches, timing by interleaved medians, synthetic
rows and images, and a description of the machine and commit.

Towers: a ViT (hidden 384, 6 layers, 224 px, patch 16 → 196 patches) and a BERT of the same width (6 layers), the
size of ViT-S / MiniLM, so that the whole suite fits in minutes on 2 CPU cores.
"""

import contextlib
import io
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

import regionmed_clip  # noqa: F401  (registers the Auto classes)
from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel

ROOT = Path(__file__).resolve().parents[1]
VISION = {
    "model_type": "vit",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "image_size": 224,
    "patch_size": 16,
}
TEXT = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "vocab_size": 30522,
}
# Towers small enough that the data path, not the model, sets the pace (the loading and evaluation sections).
TINY_VISION = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 64,
    "patch_size": 16,
}
TINY_TEXT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "max_position_embeddings": 128,
}
BATCH, TEXT_LENGTH = 8, 32
CAPTION_LENGTH, NEGATIVES = 8, 5  # region captions are a few words; MedRegion rows carry five hard negatives


def median_time(function, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn so that machine noise hits all of them alike."""
    for function in functions.values():
        function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def config(roi_mode: str = "pool", image_size: int = 224) -> RegionMedCLIPConfig:
    return RegionMedCLIPConfig(
        vision_config={**VISION, "image_size": image_size},
        text_config=TEXT,
        projection_dim=256,
        roi_num_heads=8,
        roi_mode=roi_mode,
        max_regions=16,
    )


def models(roi_mode: str = "pool", image_size: int = 224):
    """RegionMed-CLIP and a VisionTextDualEncoderModel holding the same tower and projection weights."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(0)
    ours = RegionMedCLIPModel(config(roi_mode, image_size))
    peer = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig(
            vision_config={**VISION, "image_size": image_size}, text_config=TEXT, projection_dim=256
        )
    )
    peer.load_state_dict(ours.state_dict(), strict=False)
    return ours, peer


def batch_inputs(
    num_rois: int, roi_mode: str, captions: bool = False, image_size: int = 224, batch: int = BATCH
) -> dict:
    """A training batch; with `captions`, every ROI has a region caption and `NEGATIVES` hard negatives."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 5000, (batch, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(batch, TEXT_LENGTH, dtype=torch.long),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=generator),
    }
    if num_rois:
        corners = torch.rand(batch, num_rois, 2, generator=generator) * 0.6
        inputs["roi_boxes"] = torch.cat([corners, corners + 0.3], dim=-1)
        inputs["roi_mask"] = torch.ones(batch, num_rois, dtype=torch.long)
        if roi_mode == "crop":
            inputs["roi_pixel_values"] = torch.randn(
                batch, num_rois, 3, image_size, image_size, generator=generator
            )
        if captions:
            shape = (batch, num_rois, CAPTION_LENGTH)
            inputs["region_input_ids"] = torch.randint(1000, 5000, shape, generator=generator)
            inputs["negative_input_ids"] = torch.randint(
                1000, 5000, (batch, num_rois, NEGATIVES, CAPTION_LENGTH), generator=generator
            )
    return inputs


def train_step(model, inputs, optimizer, bf16: bool = False):
    """One forward + backward + AdamW step of `model` on `inputs`, as a function of no arguments. RegionMed-CLIP
    trains through its pretraining objective with the default weights (the global, region-aware, ROI and
    hard-negative terms, each where the inputs have what it reads); the peer through its own `return_loss`."""
    if isinstance(model, RegionMedCLIPModel):
        from regionmed_clip.training import RegionMedCLIPForPreTraining

        objective = RegionMedCLIPForPreTraining(model.config, model=model)

        def loss():
            return objective(**inputs).loss
    else:

        def loss():
            return model(**inputs, return_loss=True).loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = loss()
        value.backward()
        optimizer.step()

    return step


def gray_images(count: int, size: int) -> list[Image.Image]:
    """Decoded 8-bit grayscale images, as a radiograph dataset yields them."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    return images


def rgb_images(count: int, size: int) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8))
        for i in range(count)
    ]


def synth_rows(count: int, image_size: int) -> list[dict]:
    from regionmed_clip.data.synth import SynthConfig, synth_example

    settings = SynthConfig(out="unused", image_size=image_size)
    return [synth_example(settings, "train", index)[0] for index in range(count)]


def write_dataset(folder: Path, rows: int, unique: list[dict]):
    """A parquet dataset folder of `rows` train rows, cycling through `unique`."""
    from regionmed_clip.data.folder import ShardedParquetWriter

    writer = ShardedParquetWriter(folder, rows_per_shard=1000)
    for index in range(rows):
        writer.add("train", {**unique[index % len(unique)], "id": f"row-{index:06d}"})
    writer.close()


def commit() -> str:
    return subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def machine() -> str:
    """The CPU (with the flags bf16 speed depends on), cores, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        present = set(Path("/proc/cpuinfo").read_text().split())
        flags = ", ".join(flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in present)
    memory = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    accelerator = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu} ({flags or 'no AVX-512'}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        f"{memory}{accelerator}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}"
    )
