"""The forward's FLOP rate against the machine's matmul peak, per precision, with `torch.compile` optionally."""

import copy
import time

import torch
import torch.nn.functional as F

from benchmarks.common import batch_inputs, interleaved, median_time, models

HEADING = "## Roofline"


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


def compile_for_inference(model):
    """`torch.compile` for CPU inference: with freezing, inductor folds the weights as constants and calls oneDNN
    linear kernels with the bias (and GELU) fused, which plain eager bf16 spends a third of its time on."""
    return torch.compile(model, options={"freezing": True})


def run(settings) -> list[str]:
    from torch.utils.flop_counter import FlopCounterMode

    square = {dtype: matmul_flops(dtype, 2048, 2048, 2048) for dtype in (torch.float32, torch.bfloat16)}
    # The GEMMs of the ViT at batch 32 (6304 tokens): AMX runs these thin shapes faster than a square one.
    best_bf16 = max(matmul_flops(torch.bfloat16, *shape) for shape in ((6304, 384, 384), (6304, 384, 1536)))
    ours, _ = models()
    ours.eval()
    inputs = batch_inputs(0, "pool", batch=32)
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
        if settings.compile:
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
        times = interleaved(variants, settings.repeats)
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
    return rows
