"""The ROI stage's train step against the global stage's when region captions repeat, as they do in real data."""

import torch

from benchmarks import before
from benchmarks.common import CAPTION_LENGTH, NEGATIVES, TEXT_LENGTH, config, interleaved
from regionmed_clip import RegionMedCLIPModel

HEADING = "## ROI stage with repeated captions"
IMAGES, REGIONS, DISTINCT_CAPTIONS = 16, 24, 210


def repeated_caption_batch() -> tuple[dict, dict]:
    """A global-stage and a ROI-stage batch of `IMAGES` images with 16–24 regions each (≈20) and `NEGATIVES`
    negatives per region, every caption drawn from `DISTINCT_CAPTIONS` (as region captions repeat in real data:
    ≈1,900 caption slots, ≈210 distinct)."""
    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.randint(1000, 5000, (DISTINCT_CAPTIONS, CAPTION_LENGTH), generator=generator)
    counts = torch.randint(16, REGIONS + 1, (IMAGES,), generator=generator)
    mask = torch.arange(REGIONS)[None] < counts[:, None]
    corners = torch.rand(IMAGES, REGIONS, 2, generator=generator) * 0.6
    pick = torch.randint(0, DISTINCT_CAPTIONS, (IMAGES, REGIONS, 1 + NEGATIVES), generator=generator)
    ids = vocabulary[pick] * mask[..., None, None]
    attention = (ids > 0).long()
    global_batch = {
        "input_ids": torch.randint(1000, 5000, (IMAGES, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(IMAGES, TEXT_LENGTH, dtype=torch.long),
        "pixel_values": torch.randn(IMAGES, 3, 224, 224, generator=generator),
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


def run(settings) -> list[str]:
    """ROI-stage against global-stage train step with the text tower frozen, as the demo's ROI stage runs it (the
    text projection trains): the trainer's stage setup (frozen tower in eval mode, caption cache) and the
    pretraining objective with the stage's terms."""
    from regionmed_clip.training import RegionMedCLIPForPreTraining
    from regionmed_clip.training.stages import set_train_modes

    repeats = min(settings.repeats, 3)
    torch.manual_seed(0)
    model_config = config()
    model_config.max_regions = REGIONS
    objective = RegionMedCLIPForPreTraining(model_config, model=RegionMedCLIPModel(model_config))
    model = objective.model
    model.text_model.requires_grad_(False)
    set_train_modes(objective, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    global_batch, roi_batch = repeated_caption_batch()

    def step(batch, terms):
        def run_step():
            objective.loss_weights = dict.fromkeys(terms, 1.0)
            optimizer.zero_grad(set_to_none=True)
            objective(**batch).loss.backward()
            optimizer.step()

        return run_step

    cache = objective.enable_caption_cache()
    roi_step = step(roi_batch, ["global_loss", "fused_global_loss", "roi_loss", "neg_loss"])
    times = interleaved(
        {
            "global": step(global_batch, ["global_loss"]),
            "roi": roi_step,
            "roi, deduplicated, no cache": lambda: (cache.clear(), roi_step()),
        },
        repeats,
    )
    slots = int(roi_batch["roi_mask"].sum()) * (1 + NEGATIVES)
    captions = torch.cat(
        [roi_batch["region_input_ids"][..., None, :], roi_batch["negative_input_ids"]], dim=2
    )
    distinct = len(torch.unique(captions[roi_batch["roi_mask"].bool()].flatten(0, 1), dim=0))
    table = [
        f"Pool mode, batch {IMAGES} images with {int(roi_batch['roi_mask'].sum())} regions in all, {NEGATIVES} "
        f"negatives each: {slots:,} captions, {distinct} distinct; text tower frozen (eval mode), projection "
        f"trained; median of {repeats} interleaved steps after one warm-up step (which fills the cache).",
        "",
        "| train step, text tower frozen | s / step | / global-stage step | target |",
        "|---|---|---|---|",
    ]
    for name, seconds in times.items():
        target = "≤ 2" if name == "roi" else ""
        table.append(f"| {name} | {seconds:.2f} | {seconds / times['global']:.2f}× | {target} |")
    recorded = before.EVERY_CAPTION_ENCODED
    table.append(
        f"| {recorded.label('roi, every caption encoded')} | {recorded.value:.2f} | {recorded.ratio:.2f}× | |"
    )
    return table
