"""The pretraining objective of RegionMed-CLIP: the loss terms as a registry (name → the model inputs it needs and
the function that computes it), the gather across processes, the caption-identity masks and the weights.

Part of the remote-code unit (the model file imports it), so `model(..., return_loss=True)` trains with the loss of
the paper from a saved folder alone, e.g. under transformers' `Trainer`. The terms are pure functions of
L2-normalised embeddings; each has an oracle test against a naive reference in tests/test_losses.py.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# Loss functions
# ---------------------------------------------------------------------------------------------------------------------


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a square logit matrix whose diagonal holds the positives: the mean of the row-wise and
    the column-wise cross-entropy, each averaged over the batch."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def sigmoid_loss(logits: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise loss of a square logit matrix (`s·cos + b`) whose diagonal holds the positives:
    −log σ(z_ij · logits_ij) with z = +1 on the diagonal and −1 elsewhere, summed over columns, mean over rows.

    `ignore` `(N, N)` leaves pairs out of the sum (neither positive nor negative).
    """
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    loss = -F.logsigmoid(signs * logits)
    if ignore is not None:
        loss = loss.masked_fill(ignore, 0.0)
    return loss.sum() / logits.shape[0]


def global_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    objective: str = "infonce",
) -> torch.Tensor:
    """L_global: contrastive loss between matched image and report embeddings `(N, P)`.

    `"infonce"`: symmetric InfoNCE, mean over the batch; the paper prints the image→text half (its eq. 7) and, as
    in CLIP, the text→image half is averaged in. `"sigmoid"`: SigLIP's [`sigmoid_loss`] on `s·cos + b`.
    """
    logits = logit_scale * image_embeds @ text_embeds.t()
    if objective == "sigmoid":
        return sigmoid_loss(logits + logit_bias)
    return contrastive_loss(logits)


def region_contrastive_loss(
    region_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_groups: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    objective: str = "infonce",
) -> torch.Tensor:
    """L_roi: contrastive loss between ROI embeddings `(N, P)` and their region-caption embeddings `(N, P)`.

    `caption_groups` `(N,)` gives equal ids to identical (normalised) captions. Short region captions repeat across
    images ("round nodule left upper"), so such pairs are left out instead of being pushed apart as negatives:
    removed from each other's InfoNCE denominators, or from the sigmoid loss's sum; each row keeps its own positive.
    """
    logits = logit_scale * region_embeds @ caption_embeds.t()
    same = None
    if caption_groups is not None:
        same = caption_groups[:, None] == caption_groups[None, :]
        same.fill_diagonal_(False)
    if objective == "sigmoid":
        return sigmoid_loss(logits + logit_bias, same)
    if same is not None:
        logits = logits.masked_fill(same, float("-inf"))
    return contrastive_loss(logits)


def hard_negative_loss(
    region_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: float = 0.0,
) -> torch.Tensor:
    """L_neg: mean over valid (i, k) of −log(1 − σ(s·N_ik + b)), N_ik = F_iᵀ R_neg^(k) (the paper's eq. 6 at s=1, b=0).

    Args:
        region_embeds: `(N, P)` ROI embeddings.
        negative_embeds: `(N, M, P)` embeddings of each ROI's negative captions.
        negative_mask: `(N, M)` true where a negative exists (ROIs may carry different numbers of negatives).
    """
    similarity = torch.einsum("np,nmp->nm", region_embeds, negative_embeds)
    # −log(1 − σ(x)) = softplus(x), which stays finite for large x.
    loss = F.softplus(scale * similarity + bias)
    if negative_mask is None:
        return loss.mean()
    negative_mask = negative_mask.to(loss.dtype)
    return (loss * negative_mask).sum() / negative_mask.sum().clamp(min=1)


def dense_region_loss(
    dense_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_groups: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    objective: str = "infonce",
) -> torch.Tensor:
    """L_dense: L_roi's contrastive form ([`region_contrastive_loss`]) on the region features of the patch tokens
    themselves: RoIAlign over the global forward's patch grid, `visual_projection`, L2 norm `(N, P)`.

    Why (the decision of DESIGN.md, "Progressive training"): L_roi trains the ROI processor's fused feature, which
    also sees the box coordinates and attends over the whole image, so a region caption's gradient reaches the
    patch tokens only through that processor and much of it is absorbed there (synth positions are a function of
    the box alone). L_dense has neither: only the patch tokens at the lesion can make the projected RoIAlign feature
    match its caption, in the space z_global is projected into. It is computed in both ROI modes (crop mode also
    runs the global forward), at the cost of one RoIAlign.
    """
    return region_contrastive_loss(
        dense_embeds, caption_embeds, logit_scale, caption_groups, logit_bias, objective
    )


def multi_positive_contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of an `(N, M)` logit matrix with any number of positives per row and column (`positives`
    `(N, M)` bool): per row −log(Σ_pos exp / Σ_all exp), mean over the rows that have a positive; the same over
    the columns; the mean of both directions. A square matrix with the identity as `positives` is
    [`contrastive_loss`]."""

    def one_direction(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = mask.any(-1)
        positive = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
        # A masked mean rather than indexing by `rows`: boolean indexing waits for the device to count the rows.
        # `where`, not a product: a row without positives holds inf, which must not reach the sum.
        per_row = torch.where(rows, torch.logsumexp(scores, dim=-1) - positive, 0.0)
        return per_row.sum() / rows.sum().clamp(min=1)

    return (one_direction(logits, positives) + one_direction(logits.t(), positives.t())) / 2


def global_region_loss(
    image_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    caption_images: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_groups: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    objective: str = "infonce",
    num_groups: int | None = None,
) -> torch.Tensor:
    """L_global-region: the box-free image embedding z_global `(B, P)` ↔ the region captions of its image.

    Every distinct caption of the batch (`caption_groups` `(N,)`, equal for identical captions; default: all
    distinct) is one column, and its positives are the images that have it (`caption_images` `(N,)`: the image row
    of each caption). `"infonce"`: [`multi_positive_contrastive_loss`], so an image is pulled towards each of its
    findings and a finding towards every image that shows it; `"sigmoid"`: SigLIP's pairwise loss with those
    positives, summed over columns, mean over images.

    Why (the decision of DESIGN.md, "Progressive training"): the region captions are the sharpest text the data
    has about what an image shows (one finding each, where the report mixes several and is cut at `max_length`),
    and this is the one region term whose gradient lands on z_global itself, which every box-free use of the model
    reads. No box or ROI feature enters it, so it cannot lean on box coordinates.

    `num_groups` is the number of distinct ids in `caption_groups` (the ids are 0 .. num_groups − 1); when it is
    not given it is read from the tensor, which waits for the device.
    """
    if caption_groups is None:
        caption_groups = torch.arange(caption_embeds.shape[0], device=caption_embeds.device)
        num_groups = caption_embeds.shape[0]
    if num_groups is None:
        num_groups = int(caption_groups.max()) + 1 if caption_groups.numel() else 0
    order = torch.arange(caption_groups.shape[0], device=caption_groups.device)
    first = torch.full(
        (num_groups,), caption_groups.shape[0], device=caption_groups.device, dtype=order.dtype
    )
    first = first.scatter_reduce(0, caption_groups, order, reduce="amin")
    positives = torch.zeros(image_embeds.shape[0], num_groups, dtype=torch.bool, device=image_embeds.device)
    positives[caption_images, caption_groups] = True
    logits = logit_scale * image_embeds @ caption_embeds[first].t()
    if objective == "sigmoid":
        signs = positives.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * (logits + logit_bias)).sum() / image_embeds.shape[0]
    return multi_positive_contrastive_loss(logits, positives)


def patch_centres(grid_h: int, grid_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`(H'·W', 2)` x, y centres of the patch cells as fractions of the image, row-major (the token order)."""
    ys = (torch.arange(grid_h, device=device, dtype=dtype) + 0.5) / grid_h
    xs = (torch.arange(grid_w, device=device, dtype=dtype) + 0.5) / grid_w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)


def region_proposal_targets(
    boxes: torch.Tensor, box_mask: torch.Tensor, grid_h: int, grid_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS-style targets of the region proposer on a `grid_h × grid_w` patch grid.

    A patch is positive for a real box when its centre lies strictly inside the box, or when it is the patch that
    holds the box centre (so a box smaller than a patch still has one positive). A patch positive for several boxes
    is assigned the smallest of them (FCOS's rule). Its distance targets are centre → left, top, right, bottom edge
    of that box, as fractions of the image.

    Args:
        boxes: `(B, K, 4)` normalised x0, y0, x1, y1.
        box_mask: `(B, K)` true for real boxes.

    Returns:
        objectness `(B, H'·W')` in {0, 1} and distances `(B, H'·W', 4)` (zeros where the patch is negative).
    """
    centres = patch_centres(grid_h, grid_w, boxes.device, boxes.dtype)  # (N, 2)
    cx, cy = centres[:, 0][None, :, None], centres[:, 1][None, :, None]  # (1, N, 1)
    x0, y0, x1, y1 = (boxes[..., i][:, None, :] for i in range(4))  # (B, 1, K)
    inside = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
    column = (((x0 + x1) / 2) * grid_w).long().clamp(0, grid_w - 1)
    row = (((y0 + y1) / 2) * grid_h).long().clamp(0, grid_h - 1)
    index = torch.arange(grid_h * grid_w, device=boxes.device)[None, :, None]
    assigned = (inside | (index == row * grid_w + column)) & box_mask[:, None, :].bool()  # (B, N, K)
    area = ((x1 - x0) * (y1 - y0)).expand_as(assigned).masked_fill(~assigned, float("inf"))
    smallest = area.argmin(-1, keepdim=True)  # (B, N, 1)
    objectness = assigned.any(-1).to(boxes.dtype)
    distances = torch.stack((cx - x0, cy - y0, x1 - cx, y1 - cy), dim=-1).expand(*assigned.shape, 4)
    distances = distances.gather(2, smallest[..., None].expand(-1, -1, 1, 4)).squeeze(2)
    return objectness, distances * objectness[..., None]


def region_proposal_loss(
    proposal_logits: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor
) -> torch.Tensor:
    """L_proposal: binary cross-entropy of every patch's objectness (mean over patches) plus the L1 error of the
    predicted edge distances (mean over positive patches and the 4 edges), FCOS without its centreness branch.

    Only images with at least one real box count: an image without boxes in the data is unannotated, not known to be
    free of findings. Without any real box the loss is 0 (still a function of the logits). Both means are masked
    sums over the whole batch, so no step waits for the device to count the annotated images or positive patches.

    Args:
        proposal_logits: `(B, H', W', 5)`: objectness logit, then the 4 distance logits (σ gives the fraction).
        boxes: `(B, K, 4)` ground-truth boxes; `box_mask` `(B, K)` true for real ones.
    """
    batch_size, grid_h, grid_w = proposal_logits.shape[:3]
    logits = proposal_logits.reshape(batch_size, grid_h * grid_w, 5)
    annotated = box_mask.bool().any(-1)
    objectness, distances = region_proposal_targets(boxes.to(logits.dtype), box_mask, grid_h, grid_w)
    cross_entropy = F.binary_cross_entropy_with_logits(logits[..., 0], objectness, reduction="none")
    cross_entropy = torch.where(annotated[:, None], cross_entropy, 0.0)
    loss = cross_entropy.sum() / (annotated.sum() * cross_entropy.shape[1]).clamp(min=1)
    # Only annotated images have positive patches (the targets come from their boxes).
    positive = objectness.bool()
    error = torch.where(positive[..., None], (logits[..., 1:].sigmoid() - distances).abs(), 0.0)
    return loss + error.sum() / (positive.sum() * 4).clamp(min=1)


def caption_groups_from_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, with_count: bool = False
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Group ids `(N,)` that are equal exactly where two tokenised captions are identical (0 .. G − 1); with
    `with_count`, also the number of groups G.

    The tokenizer lower-cases and strips punctuation, so identical ids mean identical normalised text.
    """
    if attention_mask is not None:
        input_ids = input_ids * attention_mask
    distinct, groups = torch.unique(input_ids, dim=0, return_inverse=True)
    return (groups, distinct.shape[0]) if with_count else groups


def no_gather(tensor: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """The gather of a single process: every row of the batch is already here."""
    return tensor


# ---------------------------------------------------------------------------------------------------------------------
# The objective: a registry of terms over a lazily gathered batch
# ---------------------------------------------------------------------------------------------------------------------


class GatheredBatch:
    """The features of a `RegionMedCLIPOutput` of this process's rows, each gathered over every process on its
    first use, so a term nobody asks for gathers nothing.

    A field's presence is read from this process's output, and every process holds the same fields (the trainer
    feeds each the same input fields); what depends on the data (how many ROIs) is read from the shapes of gathered
    tensors. Every process therefore computes the same terms and issues the same collectives in the same order.
    No term reads a tensor's values on the host to decide whether it exists (that would wait for the device at
    every step): a term whose rows exist but whose data leaves nothing to compare (ROIs without any negative, no
    real box) is a masked mean over nothing, 0.
    """

    def __init__(self, outputs, gather, region_input_ids=None, region_attention_mask=None):
        self.outputs = outputs
        self.gather = gather
        self.region_input_ids = region_input_ids
        self.region_attention_mask = region_attention_mask
        self.region_mask = outputs.region_mask
        self.contrastive = {"logit_scale": outputs.logit_scale, "logit_bias": outputs.logit_bias}
        self._gathered = {}

    def rows(self, field: str, with_grad: bool = True) -> torch.Tensor | None:
        """`outputs.<field>` of every process, concatenated; boolean fields come back boolean, without gradient."""
        return self._gathered_field(field, with_grad, per_region=False)

    def region_rows(self, field: str) -> torch.Tensor | None:
        """The rows of the real ROI slots of a `(B, K, ...)` field of every process; None without ROIs."""
        return self._gathered_field(field, True, per_region=True)

    def _gathered_field(self, field: str, with_grad: bool, per_region: bool) -> torch.Tensor | None:
        key = (field, per_region)
        if key not in self._gathered:
            tensor = getattr(self.outputs, field)
            if per_region and self.region_mask is None:
                tensor = None
            elif per_region and tensor is not None:
                tensor = tensor[self.region_mask]
            if tensor is None:
                self._gathered[key] = None
            elif tensor.dtype == torch.bool:
                self._gathered[key] = self.gather(tensor.to(torch.uint8), False).bool()
            else:
                self._gathered[key] = self.gather(tensor, with_grad)
        return self._gathered[key]

    @cached_property
    def _caption_grouping(self) -> tuple[torch.Tensor, int] | tuple[None, None]:
        if self.region_input_ids is None or self.region_mask is None:
            return None, None
        ids = self.region_input_ids[self.region_mask]
        if self.region_attention_mask is not None:
            ids = ids * self.region_attention_mask[self.region_mask]
        return caption_groups_from_ids(self.gather(ids, False), with_count=True)

    @property
    def caption_groups(self) -> torch.Tensor | None:
        """Equal ids for identical region captions of the global batch (None: every caption its own)."""
        return self._caption_grouping[0]

    @property
    def num_caption_groups(self) -> int | None:
        """How many distinct ids `caption_groups` holds (None with it)."""
        return self._caption_grouping[1]


def _image_text_term(image_field: str, text_field: str, needs_regions: bool = False):
    """A contrastive term between two per-image fields (image i pairs with text i)."""

    def compute(batch: GatheredBatch, config) -> torch.Tensor | None:
        if needs_regions and batch.region_mask is None:
            return None
        image, text = batch.rows(image_field), batch.rows(text_field)
        if image is None or text is None:
            return None
        return global_contrastive_loss(image, text, **batch.contrastive, objective=config.loss_objective)

    return compute


def _region_caption_term(region_field: str, loss: Callable):
    """A contrastive term between the real ROIs' rows of `region_field` and their region captions, identical
    captions of the global batch grouped."""

    def compute(batch: GatheredBatch, config) -> torch.Tensor | None:
        captions, regions = batch.region_rows("region_text_embeds"), batch.region_rows(region_field)
        if captions is None or regions is None or regions.shape[0] == 0:
            return None
        return loss(
            regions,
            captions,
            caption_groups=batch.caption_groups,
            **batch.contrastive,
            objective=config.loss_objective,
        )

    return compute


def _negative_term(batch: GatheredBatch, config) -> torch.Tensor | None:
    negatives, regions = batch.region_rows("negative_text_embeds"), batch.region_rows("region_embeds")
    if negatives is None or regions is None or regions.shape[0] == 0 or negatives.shape[1] == 0:
        return None
    present = batch.region_rows("negative_mask")
    return hard_negative_loss(regions, negatives, present, config.neg_logit_scale, config.neg_logit_bias)


def _global_region_term(batch: GatheredBatch, config) -> torch.Tensor | None:
    captions, image = batch.region_rows("region_text_embeds"), batch.rows("global_image_embeds")
    if captions is None or image is None or captions.shape[0] == 0:
        return None
    # The image row of each gathered caption: the gathered ROI masks are in the rank order of the gathered
    # images, so their true slots enumerate the captions in order, each image's as many as it has true slots.
    # The caption count is known from the shape, so the expansion needs no read-back (`nonzero` would).
    present = batch.rows("region_mask")
    caption_images = torch.arange(present.shape[0], device=present.device).repeat_interleave(
        present.sum(1), output_size=captions.shape[0]
    )
    return global_region_loss(
        image,
        captions,
        caption_images,
        caption_groups=batch.caption_groups,
        **batch.contrastive,
        objective=config.loss_objective,
        num_groups=batch.num_caption_groups,
    )


def _proposal_term(batch: GatheredBatch, config) -> torch.Tensor | None:
    if batch.region_mask is None or batch.outputs.region_boxes is None:
        return None
    logits = batch.rows("proposal_logits")
    if logits is None:
        return None
    boxes, present = batch.rows("region_boxes", with_grad=False), batch.rows("region_mask")
    # As the other region terms: no ROI slot in the global batch, no term (slots that are all padding give 0).
    if present.shape[1] == 0:
        return None
    return region_proposal_loss(logits, boxes, present)


_ROI_INPUTS = ("pixel_values", "roi_boxes", "roi_mask", "roi_pixel_values")
_REGION_CAPTIONS = ("region_input_ids", "region_attention_mask")


@dataclass(frozen=True)
class LossTerm:
    """One term of the objective.

    Args:
        inputs: The model inputs the term needs; a training stage feeds exactly those of its weighted terms.
        compute: `compute(batch, config)` → the term over the gathered batch, or None when its inputs are absent.
        weighted_only: `forward(return_loss=True)` computes it only when the config weights it: its inputs (the
            ROIs) come with every region batch, so "inputs present" would compute it for every user of `roi_loss`.
        trains_roi_processor: Computed on the ROI processor's output (the fused region features, or the
            region-aware embedding), so it is a term that trains the processor.
    """

    inputs: tuple[str, ...]
    compute: Callable[[GatheredBatch, object], torch.Tensor | None]
    weighted_only: bool = False
    trains_roi_processor: bool = False


#: Every term, in the order the objective computes them.
LOSS_TERMS: dict[str, LossTerm] = {
    # z_global (the whole image alone, what a user gets without boxes) ↔ the report.
    "global_loss": LossTerm(
        ("pixel_values", "input_ids", "attention_mask"),
        _image_text_term("global_image_embeds", "text_embeds"),
    ),
    # With ROIs, the region-aware embedding z_fused ↔ the report; kept beside `global_loss` in the region stages,
    # or z_global would drift from the text while every box-free use of the model reads it.
    "fused_global_loss": LossTerm(
        ("pixel_values", "input_ids", "attention_mask", *_ROI_INPUTS[1:]),
        # Without ROIs the region-aware embedding is the global one and has no term of its own.
        _image_text_term("image_embeds", "text_embeds", needs_regions=True),
        trains_roi_processor=True,
    ),
    # z_global ↔ the summary caption (a whole-image text like the report).
    "summary_loss": LossTerm(
        ("pixel_values", "summary_input_ids", "summary_attention_mask"),
        _image_text_term("global_image_embeds", "summary_embeds"),
    ),
    # ROI ↔ region caption; identical captions of the global batch are not each other's negatives.
    "roi_loss": LossTerm(
        (*_ROI_INPUTS, *_REGION_CAPTIONS),
        _region_caption_term("region_embeds", region_contrastive_loss),
        trains_roi_processor=True,
    ),
    # ROI vs. its hard-negative captions (the paper's sigmoid form).
    "neg_loss": LossTerm(
        (*_ROI_INPUTS, "negative_input_ids", "negative_attention_mask"),
        _negative_term,
        trains_roi_processor=True,
    ),
    # RoIAlign-pooled patch features (no ROI processor, no box coordinates) ↔ region caption.
    "dense_loss": LossTerm(
        (*_ROI_INPUTS, *_REGION_CAPTIONS),
        _region_caption_term("dense_region_embeds", dense_region_loss),
        weighted_only=True,
    ),
    # z_global ↔ the region captions of its image, multi-positive.
    "global_region_loss": LossTerm(
        (*_ROI_INPUTS, *_REGION_CAPTIONS), _global_region_term, weighted_only=True
    ),
    # The region proposer's objectness and boxes against the given boxes (per image).
    "proposal_loss": LossTerm(_ROI_INPUTS, _proposal_term, weighted_only=True),
}


class RegionMedCLIPLoss(nn.Module):
    r"""
    The loss of RegionMed-CLIP, in open_clip's `ClipLoss` shape: one module owns the process's rank, the world size
    and the gather, takes the model's features, gathers them, and returns the named terms of [`LOSS_TERMS`];
    `weighted_sum` applies the weights of the config (`<term>_weight`). The model builds one with [`no_gather`] and
    calls it from `forward(return_loss=True)`; distributed training passes a gather that concatenates a tensor from
    every process with its gradient, so every process computes the loss of the whole global batch and a run on W
    processes optimises what one process holding the global batch would.

    Each term is computed when its inputs are present. `config.loss_objective` picks the form of the contrastive
    terms: `"infonce"` (the paper's) or `"sigmoid"` (SigLIP's pairwise loss with the model's learnable
    `logit_bias`). `dense_loss`, `global_region_loss` and `proposal_loss` default to weight 0, so a plain config is
    the paper's loss; why the demo recipe weights them, and the variants screened to choose it, is in the README
    ("How the demo recipe was chosen").

    Args:
        config ([`RegionMedCLIPConfig`]): Weights and objective, read at every call (a training stage edits them).
        gather (`Callable[[torch.Tensor, bool], torch.Tensor]`, *optional*): `gather(tensor, with_grad)` returns
            the concatenation along dim 0 of `tensor` from every process in rank order. Tensors may differ in
            every dimension between processes, including zero rows; a gather pads the other dimensions to the
            largest. Default: [`no_gather`].
        rank (`int`, *optional*, defaults to 0): This process's rank.
        world_size (`int`, *optional*, defaults to 1): Number of processes.
    """

    #: The inputs of the model each term needs.
    term_inputs = {name: term.inputs for name, term in LOSS_TERMS.items()}
    weighted_only = tuple(name for name, term in LOSS_TERMS.items() if term.weighted_only)
    roi_processor_terms = tuple(name for name, term in LOSS_TERMS.items() if term.trains_roi_processor)

    def __init__(self, config, gather=None, rank: int = 0, world_size: int = 1):
        super().__init__()
        if world_size > 1 and gather is None:
            raise ValueError(f"world_size={world_size} needs a gather across the processes.")
        self.config = config
        self.gather = gather if gather is not None else no_gather
        self.rank = rank
        self.world_size = world_size

    def weights(self) -> dict[str, float]:
        """Each term's weight, from the config (`<term>_weight`)."""
        return {name: float(getattr(self.config, f"{name}_weight")) for name in LOSS_TERMS}

    def weighted_sum(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.weights()
        return sum(weights[name] * term for name, term in terms.items())

    def forward(
        self,
        outputs,
        region_input_ids: torch.Tensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        terms: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The terms of `outputs` (a `RegionMedCLIPOutput` of this process's rows) over the global batch.

        `region_input_ids` / `region_attention_mask` identify identical region captions for the region terms.
        `terms` restricts the computation to those names (default: every term whose inputs are present); the
        others' features are not gathered.
        """
        wanted = set(LOSS_TERMS if terms is None else terms)
        unknown = wanted - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        batch = GatheredBatch(outputs, self.gather, region_input_ids, region_attention_mask)
        computed = {}
        for name, term in LOSS_TERMS.items():
            if name in wanted:
                value = term.compute(batch, self.config)
                if value is not None:
                    computed[name] = value
        return computed

    def model_loss(
        self, outputs, region_input_ids: torch.Tensor | None, region_attention_mask: torch.Tensor | None
    ) -> dict:
        """`loss` and `loss_terms` of `forward(return_loss=True)`: every term whose inputs are present, those of
        `weighted_only` only when weighted, and their weighted sum."""
        images, texts = outputs.image_embeds, outputs.text_embeds
        if images is not None and texts is not None and len(images) != len(texts):
            raise ValueError(
                f"return_loss=True pairs image i with text i, but got {len(images)} images and {len(texts)} texts."
            )
        weights = self.weights()
        wanted = [name for name in LOSS_TERMS if name not in self.weighted_only or weights[name] > 0]
        terms = self(outputs, region_input_ids, region_attention_mask, terms=wanted)
        if not terms:
            raise ValueError(
                "return_loss=True found nothing to compare: pass input_ids with pixel_values (image i pairs with "
                "text i), or ROIs with region_input_ids / negative_input_ids."
            )
        return {"loss": self.weighted_sum(terms), "loss_terms": terms}


__all__ = [
    "LOSS_TERMS",
    "GatheredBatch",
    "LossTerm",
    "RegionMedCLIPLoss",
    "caption_groups_from_ids",
    "contrastive_loss",
    "dense_region_loss",
    "global_contrastive_loss",
    "global_region_loss",
    "hard_negative_loss",
    "multi_positive_contrastive_loss",
    "no_gather",
    "patch_centres",
    "region_contrastive_loss",
    "region_proposal_loss",
    "region_proposal_targets",
    "sigmoid_loss",
]
