"""Train step (forward + backward + AdamW) against VisionTextDualEncoderModel with the same towers, fp32 and bf16."""

import torch
import torch.nn.functional as F

from benchmarks import before
from benchmarks.common import BATCH, NEGATIVES, batch_inputs, interleaved, models, train_step

HEADING = "## Train step (forward + backward + AdamW) against VisionTextDualEncoderModel (VTDE)"


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


def step_ratios(repeats: int) -> tuple[list[str], dict[str, float]]:
    """The fp32 table, and the samples/s of the K=4 step of each mode."""
    rows = ["| RegionMed-CLIP variant, fp32 | step / VTDE step | target |", "|---|---|---|"]
    samples_per_second = {}
    for roi_mode, counts in (("pool", (0, 2, 4, 8)), ("crop", (2, 4))):
        ours, peer = models(roi_mode)
        functions = {
            "VTDE": train_step(peer, batch_inputs(0, roi_mode), torch.optim.AdamW(peer.parameters(), lr=1e-5))
        }
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5)
        for k in counts:
            functions[f"{roi_mode} K={k}"] = train_step(ours, batch_inputs(k, roi_mode), optimizer)
        if roi_mode == "pool":
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
            if name == "pool K=4":
                target = "≤ 1.15"
            elif roi_mode == "crop":
                target = f"≤ {1 + int(name.split('=')[1])}"
            rows.append(f"| {name} | {seconds / times['VTDE']:.2f}× | {target} |")
            if name == "pool K=4":
                recorded = before.POOL_K4_STEP
                rows.append(f"| {recorded.label(name)} | {recorded.ratio:.2f}× | |")
            if "captions" in name:
                rows.append(
                    f"| {name}, against VTDE doing the same caption forwards | "
                    f"{seconds / times['VTDE + the same captions']:.2f}× | |"
                )
        samples_per_second[roi_mode] = BATCH / times[f"{roi_mode} K=4"]
    return rows, samples_per_second


def bf16_ratios(repeats: int) -> list[str]:
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
    return [
        "| train step, bf16 autocast (pool K=4) | value | target |",
        "|---|---|---|",
        f"| ours bf16 / VTDE bf16 | {times['ours bf16'] / times['VTDE bf16']:.2f}× | ≤ 1.15 |",
        f"| ours: bf16 speed-up over fp32 | {times['ours fp32'] / times['ours bf16']:.2f}× | |",
        f"| VTDE: bf16 speed-up over fp32 | {times['VTDE fp32'] / times['VTDE bf16']:.2f}× | |",
    ]


def run(settings) -> list[str]:
    rows, _ = step_ratios(settings.repeats)
    return [*rows, "", *bf16_ratios(settings.repeats)]
