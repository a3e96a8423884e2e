"""Feature extraction: one batched pass of a model over a dataset split, reused by every metric."""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.collator import MedRegionCollator, make_dataloader


@dataclass
class SplitFeatures:
    """Normalised embeddings of one split: images (region-aware and global), reports, and every real ROI with its
    caption and hard negatives."""

    image_embeds: torch.Tensor
    global_image_embeds: torch.Tensor
    report_embeds: torch.Tensor
    labels: list
    region_embeds: torch.Tensor
    region_text_embeds: torch.Tensor
    region_captions: list[str]
    negative_text_embeds: torch.Tensor
    negative_mask: torch.Tensor
    region_image: torch.Tensor  # (N,) index of the image each region belongs to


@torch.no_grad()
def extract_features(model, processor, rows, batch_size: int = 32, max_length: int = 64, max_negatives=None):
    """Run `model` over `rows` (a `Dataset` or a list) once; ROI inputs are used where the rows have regions. The
    model runs in eval mode and is put back in the mode it was in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collator = MedRegionCollator(processor, max_length=max_length, max_negatives=max_negatives)
    parts: dict[str, list] = {key: [] for key in SplitFeatures.__dataclass_fields__}
    loader = make_dataloader(rows, collator, batch_size=batch_size)
    offset = 0
    for batch in tqdm(loader, desc="features", leave=False):
        batch = {key: value.to(device) for key, value in batch.items()}
        batch.pop("summary_input_ids"), batch.pop("summary_attention_mask")
        outputs = model(**batch)
        size = batch["pixel_values"].shape[0]
        parts["image_embeds"].append(outputs.image_embeds.float().cpu())
        parts["global_image_embeds"].append(outputs.global_image_embeds.float().cpu())
        parts["report_embeds"].append(outputs.text_embeds.float().cpu())
        parts["labels"].extend(rows[offset + i]["label"] for i in range(size))
        if outputs.region_embeds is not None:
            mask = outputs.region_mask
            parts["region_embeds"].append(outputs.region_embeds[mask].float().cpu())
            parts["region_text_embeds"].append(outputs.region_text_embeds[mask].float().cpu())
            negatives = outputs.negative_text_embeds[mask].float().cpu()
            negative_mask = outputs.negative_mask[mask].cpu()
            parts["negative_text_embeds"].append(negatives)
            parts["negative_mask"].append(negative_mask)
            parts["region_image"].append(mask.nonzero()[:, 0].cpu() + offset)
            for i in range(size):
                kept = collator.kept_regions(rows[offset + i])  # the collator's own choice, in its order
                parts["region_captions"].extend(region["caption"] for region in kept)
        offset += size
    model.train(was_training)
    width = max((n.shape[1] for n in parts["negative_text_embeds"]), default=0)
    padded = [
        torch.nn.functional.pad(n, (0, 0, 0, width - n.shape[1])) for n in parts["negative_text_embeds"]
    ]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in parts["negative_mask"]]
    dim = parts["image_embeds"][0].shape[-1]
    return SplitFeatures(
        image_embeds=torch.cat(parts["image_embeds"]),
        global_image_embeds=torch.cat(parts["global_image_embeds"]),
        report_embeds=torch.cat(parts["report_embeds"]),
        labels=parts["labels"],
        region_embeds=torch.cat(parts["region_embeds"]) if parts["region_embeds"] else torch.zeros(0, dim),
        region_text_embeds=torch.cat(parts["region_text_embeds"])
        if parts["region_text_embeds"]
        else torch.zeros(0, dim),
        region_captions=parts["region_captions"],
        negative_text_embeds=torch.cat(padded) if padded else torch.zeros(0, 0, dim),
        negative_mask=torch.cat(masks) if masks else torch.zeros(0, 0, dtype=torch.bool),
        region_image=torch.cat(parts["region_image"])
        if parts["region_image"]
        else torch.zeros(0, dtype=torch.long),
    )
