"""Distributed contrastive losses: every embedding is gathered from all processes WITH its gradient.

`accelerator.gather` carries no gradient (accelerate#1154) and transformers' CLIP loss sees only the local batch
(transformers#22252); both would make a multi-GPU run optimise a different objective from a one-GPU run. Here each
process gathers the image, text, summary, ROI, region-caption and negative embeddings of the whole global batch
with `torch.distributed.nn.functional.all_gather` (whose backward routes each gradient to the process that owns
the row) and computes the full loss on them. The all-gather backward sums the identical losses of the W processes
and DDP averages over W, so parameters receive exactly the gradient of one process holding the whole batch.
On one process, gathering is a no-op.

Region tensors differ in size between processes (each holds a different number of real ROIs, negatives, tokens):
they are padded to the largest shape, gathered, and the padding is dropped again. Identical region captions are
found on the gathered token ids, so the identity mask spans the global batch.

Gradient accumulation averages the losses of micro-batches: the contrastive batch (the negatives each row sees)
is one micro-batch times the number of processes, not the accumulated batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..modeling_regionmed_clip import caption_groups_from_ids, regionmed_loss_terms


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_padded(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0; tensors may differ in every dim (padded with zeros,
    then dim 0 is cut back to each process's rows; the other dims stay padded to the largest)."""
    world = _world_size()
    if world == 1:
        return tensor
    shape = torch.tensor(tensor.shape, device=tensor.device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    largest = torch.stack(shapes).amax(0).tolist()
    padding = []
    for size, target in zip(reversed(tensor.shape), reversed(largest), strict=True):
        padding += [0, target - size]
    padded = F.pad(tensor, padding)
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    return torch.cat([part[: int(rows[0])] for part, rows in zip(parts, shapes, strict=True)])


def class_loss(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each image's scaled cosine logits over the `(C, P)` class-prompt embeddings."""
    return F.cross_entropy(logit_scale * image_embeds @ class_embeds.t(), labels)


def training_loss_terms(
    outputs,
    batch: dict,
    logit_scale: torch.Tensor,
    neg_scale: float,
    neg_bias: float,
    labels: torch.Tensor | None = None,
):
    """The loss terms of a training step over the global batch (see the module docstring).

    With `labels`, the text side holds one prompt per class rather than one report per image: `class_loss` is
    then computed on this process's images (every process holds the same prompts; DDP's gradient average over
    equal local batches gives the global mean) and there is no `global_loss`.
    """
    image = outputs.image_embeds
    terms = {}
    if labels is not None:
        terms["class_loss"] = class_loss(image, outputs.text_embeds, labels, logit_scale)
    texts = outputs.text_embeds if labels is None else None
    terms_input = {
        "image_embeds": gather_padded(image, True) if image is not None else None,
        "text_embeds": gather_padded(texts, True) if texts is not None else None,
        "summary_embeds": gather_padded(outputs.summary_embeds, True)
        if outputs.summary_embeds is not None
        else None,
    }
    if outputs.region_embeds is not None and outputs.region_text_embeds is not None:
        mask = outputs.region_mask
        terms_input["region_embeds"] = gather_padded(outputs.region_embeds[mask], True)
        terms_input["region_text_embeds"] = gather_padded(outputs.region_text_embeds[mask], True)
        ids = gather_padded(batch["region_input_ids"][mask], False)
        attention = gather_padded(batch["region_attention_mask"][mask], False)
        terms_input["caption_groups"] = caption_groups_from_ids(ids, attention)
    if outputs.region_embeds is not None and outputs.negative_text_embeds is not None:
        mask = outputs.region_mask
        if "region_embeds" not in terms_input:
            terms_input["region_embeds"] = gather_padded(outputs.region_embeds[mask], True)
        terms_input["negative_text_embeds"] = gather_padded(outputs.negative_text_embeds[mask], True)
        terms_input["negative_mask"] = gather_padded(
            outputs.negative_mask[mask].to(torch.uint8), False
        ).bool()
    terms.update(regionmed_loss_terms(logit_scale, neg_scale=neg_scale, neg_bias=neg_bias, **terms_input))
    return terms
