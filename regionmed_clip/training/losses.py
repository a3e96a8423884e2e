"""The pretraining objective: every loss term as a registry entry (name → the batch fields it reads and the
function that computes it), the gather across processes, and the caption-identity masks.

The terms are pure functions of L2-normalised embeddings; each has an oracle test against a naive reference in
tests/test_losses.py. [`RegionMedCLIPForPreTraining`] (pretraining.py) computes the terms a stage weights and their
weighted sum; no Hub folder carries this file.

Distributed training: `accelerator.gather` carries no gradient (accelerate#1154) and transformers' CLIP loss sees
only the local batch (transformers#22252); both would make a multi-GPU run optimise a different objective from a
one-GPU run. The objective gathers with [`PaddedGather`], which concatenates each embedding of the whole global
batch with `torch.distributed.nn.functional.all_gather` (whose backward routes each gradient to the process that
owns the row). Every process then computes the full loss; the all-gather backward sums the identical losses of the
W processes and DDP averages over W, so parameters receive exactly the gradient of one process holding the whole
batch. On one process, gathering is a no-op.

Tensors differ in size between processes (each holds a different number of real ROIs, negatives, tokens, and a
micro-batch without regions holds none): they are padded to the largest shape, gathered, and the padding rows are
dropped again. Every process issues the same collectives in the same order whatever its batch holds, because each
is fed the same input fields (zero-slot ROI tensors for a batch without regions) and the terms gather by field.

Gradient accumulation averages the losses of micro-batches: the contrastive batch (the negatives each row sees)
is one micro-batch times the number of processes, not the accumulated batch.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..modeling_regionmed_clip import contrastive_loss, patch_boxes, patch_centres, sigmoid_loss

# ---------------------------------------------------------------------------------------------------------------------
# Loss functions
# ---------------------------------------------------------------------------------------------------------------------


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


def region_proposal_targets(
    boxes: torch.Tensor, box_mask: torch.Tensor, grid_h: int, grid_w: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FCOS-style targets of the region proposer on a `grid_h × grid_w` patch grid.

    A patch is positive for a real box when its centre lies strictly inside the box, or when it is the patch that
    holds the box centre (so a box smaller than a patch still has one positive). A patch positive for several boxes
    is assigned the smallest of them (FCOS's rule). Its distance targets are centre → left, top, right, bottom edge
    of that box, as fractions of the image.

    Args:
        boxes: `(B, K, 4)` normalised x0, y0, x1, y1.
        box_mask: `(B, K)` true for real boxes.

    Returns:
        objectness `(B, H'·W')` in {0, 1}, distances `(B, H'·W', 4)` (zeros where the patch is negative) and the
        index `(B, H'·W')` of the box each patch is assigned (meaningless where the patch is negative).
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
    return objectness, distances * objectness[..., None], smallest.squeeze(-1)


def generalized_box_iou(boxes: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU of matching boxes `(..., 4)` and `(..., 4)` (x0, y0, x1, y1), elementwise: GIoU is
    IoU minus the share of the smallest enclosing box that neither covers (Rezatofighi et al., 2019)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    other_area = (others[..., 2] - others[..., 0]) * (others[..., 3] - others[..., 1])
    low, high = torch.maximum(boxes[..., :2], others[..., :2]), torch.minimum(boxes[..., 2:], others[..., 2:])
    intersection = (high - low).clamp(min=0).prod(-1)
    union = area + other_area - intersection
    iou = intersection / union.clamp(min=1e-12)
    enclosing = torch.maximum(boxes[..., 2:], others[..., 2:]) - torch.minimum(
        boxes[..., :2], others[..., :2]
    )
    enclosing = enclosing.prod(-1)
    return iou, iou - (enclosing - union) / enclosing.clamp(min=1e-12)


def region_proposal_loss(
    proposal_logits: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor
) -> torch.Tensor:
    """L_proposal: binary cross-entropy of every patch's objectness (mean over patches), plus the box loss of
    positive patches ([`box_regression_loss`]): FCOS's targets with the L1 + GIoU box loss of DETR and OWL-ViT.

    Only images with at least one real box count: an image without boxes in the data is unannotated, not known to be
    free of findings. Without any real box the loss is 0 (still a function of the logits). Both means are masked
    sums over the whole batch, so no step waits for the device to count the annotated images or positive patches.

    Args:
        proposal_logits: `(B, H', W', 5)`: objectness logit, then the 4 edge logits (see `patch_boxes`).
        boxes: `(B, K, 4)` ground-truth boxes; `box_mask` `(B, K)` true for real ones.
    """
    batch_size, grid_h, grid_w = proposal_logits.shape[:3]
    logits = proposal_logits.reshape(batch_size, grid_h * grid_w, 5)
    annotated = box_mask.bool().any(-1)
    boxes = boxes.to(logits.dtype)
    targets = region_proposal_targets(boxes, box_mask, grid_h, grid_w)
    cross_entropy = F.binary_cross_entropy_with_logits(logits[..., 0], targets[0], reduction="none")
    cross_entropy = torch.where(annotated[:, None], cross_entropy, 0.0)
    loss = cross_entropy.sum() / (annotated.sum() * cross_entropy.shape[1]).clamp(min=1)
    box_loss, _ = box_regression_loss(proposal_logits[..., 1:], boxes, targets)
    return loss + box_loss


def box_regression_loss(
    edge_logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box loss of the patches a box is assigned (FCOS's rule, `targets` from [`region_proposal_targets`]):
    `l1_weight` times the L1 error of the 4 predicted edge distances (mean over positive patches and edges) plus
    `giou_weight` times the GIoU loss 1 − GIoU of the predicted box against the assigned one (mean over positive
    patches), so a box learns to fit its finding, not only to have edges near its edges. Also returns every patch's
    IoU with its assigned box `(B, H'·W')`.

    Args:
        edge_logits: `(B, H', W', 4)` the patches' edge logits (see `patch_boxes`).
        boxes: `(B, K, 4)` the ground-truth boxes the targets were made from.
    """
    objectness, distances, assigned = targets
    positive = objectness.bool()
    count = positive.sum().clamp(min=1)
    predicted = edge_logits.reshape(distances.shape).sigmoid()
    l1 = torch.where(positive[..., None], (predicted - distances).abs(), 0.0).sum() / (count * 4)
    corners = patch_boxes(edge_logits, at_least_one_patch=False).to(boxes.dtype)
    iou, giou = generalized_box_iou(corners, boxes.gather(1, assigned[..., None].expand(-1, -1, 4)))
    return l1_weight * l1 + giou_weight * torch.where(positive, 1 - giou, 0.0).sum() / count, iou


def detection_loss(
    logits: torch.Tensor,
    box_logits: torch.Tensor,
    boxes: torch.Tensor,
    box_mask: torch.Tensor,
    answers: torch.Tensor,
    beta: float = 2.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
) -> torch.Tensor:
    """L_detection: the detector's box loss ([`box_regression_loss`] of its box head) plus its class logits of every
    patch's box for every query, trained with IoU-aware targets (GFL's quality focal loss, Li et al., 2020): where
    a patch is assigned a box (FCOS's rule, [`region_proposal_targets`]) that answers the query, the target is the
    IoU of the patch's predicted box with it; for every other patch and query, 0. A query no box of an image answers
    teaches every patch of that image to score it low, which is what makes a score say whether the finding is
    there; the IoU makes a well-fitting box outrank a loose one. Each class term is BCE(logit, target) ·
    |σ(logit) − target|^β, summed over the number of (patch, query) positives. The box loss carries DETR's and
    OWL-ViT's weights (L1 5, GIoU 2): at the demo budget they lift term detection AP50 of seed 0 from 0.24 to 0.30
    together with the detection term in the global stage (configs/demo.yaml), where equal weights left the boxes loose.

    Only images with at least one real box count (as for L_proposal: an image without boxes is unannotated). The
    detection term adds [`region_class_loss`] of the detector's region class head on the real ROIs' region
    embeddings and on the boxes the detector itself proposes (`objective.detection_proposals` per image, targets
    from [`proposal_region_targets`]), against the same queries.

    Args:
        logits: `(B, H'·W', Q)` the class head's logits.
        box_logits: `(B, H', W', 4)` the box head's edge logits.
        boxes: `(B, K, 4)` ground-truth boxes, x0, y0, x1, y1 fractions; `box_mask` `(B, K)` true for real ones.
        answers: `(B, K, Q)` bool, true where box k of an image answers query q.
    """
    grid_h, grid_w = box_logits.shape[1:3]
    boxes = boxes.to(logits.dtype)
    targets = region_proposal_targets(boxes, box_mask, grid_h, grid_w)
    objectness, _, assigned = targets
    box_loss, iou = box_regression_loss(box_logits, boxes, targets, l1_weight, giou_weight)
    answered = (
        answers.gather(1, assigned[..., None].expand(-1, -1, answers.shape[-1]))
        & objectness.bool()[..., None]
    )
    loss = quality_focal_loss(logits, answered * iou.detach()[..., None], beta)
    loss = torch.where(box_mask.bool().any(-1)[:, None, None], loss, 0.0)
    return box_loss + loss.sum() / answered.sum().clamp(min=1)


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """GFL's quality focal loss, elementwise: BCE(logit, target) · |σ(logit) − target|^β, for soft targets."""
    modulation = (logits.sigmoid() - targets).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulation


def region_class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The region class head's loss: the binary cross-entropy of each region's logit for each query against its
    target, summed and divided by the targets' total, so the head's sigmoid says how likely (and, for a proposed box,
    how well) a region is what a query describes. Plain BCE, not the class head's focal loss: the focal modulation
    leaves easy positives and negatives under-confident, and this head's probability multiplies the class head's in
    the detector's score. At the demo budget (seed 0, term queries, with the proposals' targets) plain BCE gives
    detection AP50 0.61 and presence AUC 0.94 against 0.58 and 0.90 with the focal loss.

    Args:
        logits: `(R, Q)` the region class head's logits.
        targets: `(R, Q)` in [0, 1]: 1 or 0 for a real ROI (whether it answers the query), for a proposed box its
            IoU with the best-fitting box that answers the query (0 where none does).
    """
    targets = targets.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    return loss / targets.sum().clamp(min=1)


def proposal_region_targets(
    proposal_boxes: torch.Tensor, boxes: torch.Tensor, answers: torch.Tensor
) -> torch.Tensor:
    """The region class head's targets `(B, K', Q)` for proposed boxes `(B, K', 4)`: for each query, the IoU of the
    box with the best-fitting ground-truth box of its image (`boxes` `(B, K, 4)`) that answers the query
    (`answers` `(B, K, Q)` bool, false for padded slots); 0 where none does (the background)."""
    dtype = torch.promote_types(proposal_boxes.dtype, torch.float32)
    iou, _ = generalized_box_iou(proposal_boxes[:, :, None].to(dtype), boxes[:, None].to(dtype))
    return (iou[..., None] * answers[:, None]).amax(2)


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


def class_loss(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each image's scaled cosine logits over the `(C, P)` class-prompt embeddings.

    Computed on this process's images: every process holds the same prompts, and DDP's gradient average over
    equal local batches gives the global mean.
    """
    return F.cross_entropy(logit_scale * image_embeds @ class_embeds.t(), labels)


def no_gather(tensor: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """The gather of a single process: every row of the batch is already here."""
    return tensor


class PaddedGather:
    """`gather(tensor, with_grad)` of the objective: concatenates `tensor` from every process along dim 0.

    Tensors may differ in every dim and dim 0 may be 0: they are padded with zeros to the largest shape, gathered,
    and dim 0 is cut back to each process's rows (the other dims stay padded to the largest). Every process must
    call it, in the same order.

    The gathers run in a process group of their own. Their backward passes are collectives too (entered by every
    process, including one whose part has no gradient path), and they run while
    DDP all-reduces gradient buckets in the default group as parameters become ready; when the processes' batches
    differ in shape (one holds ROIs, another none), the two interleave differently on each process, and in one
    shared group that is a collective mismatch. The group is created at the first gather, which every process
    reaches at the same point of the same forward; so the object may be built before the processes are (e.g. by a
    script that then hands the model to transformers' `Trainer`).
    """

    def __init__(self):
        self.group = None
        self.world_size = 1

    def __call__(self, tensor: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return tensor
        if self.group is None:
            self.group, self.world_size = dist.new_group(), dist.get_world_size()
        shape = torch.tensor(tensor.shape, device=tensor.device, dtype=torch.long)
        shapes = [torch.zeros_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape, group=self.group)
        # The one read-back of a gather (a single process returned above): padding and cutting need the sizes on
        # the host, and they differ between processes (real ROIs, ROI slots, a streaming epoch's last batch).
        largest = torch.stack(shapes).amax(0).tolist()
        padding = []
        for size, target in zip(reversed(tensor.shape), reversed(largest), strict=True):
            padding += [0, target - size]
        padded = F.pad(tensor, padding)
        if with_grad:
            import torch.distributed.nn.functional as dist_fn

            if torch.is_grad_enabled() and not padded.requires_grad:
                # This process's part has no gradient path (e.g. zero ROIs, encoded as constant zeros) while the
                # others' have: the gather's backward is a collective all of them must enter.
                padded = padded.detach().requires_grad_()

            parts = dist_fn.all_gather(padded, group=self.group)
        else:
            parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[: int(rows[0])] for part, rows in zip(parts, shapes, strict=True)])


# ---------------------------------------------------------------------------------------------------------------------
# The terms: a registry over a lazily gathered batch
# ---------------------------------------------------------------------------------------------------------------------


class GatheredBatch:
    """One forward's features of this process's rows (`fields`: name → tensor or None), each gathered over every
    process on its first use, so a term nobody asks for gathers nothing.

    A field's presence is read from this process's fields, and every process holds the same fields (each is fed the
    same input fields); what depends on the data (how many ROIs) is read from the shapes of gathered tensors. Every
    process therefore computes the same terms and issues the same collectives in the same order. No term reads a
    tensor's values on the host to decide whether it exists (that would wait for the device at every step): a term
    whose rows exist but whose data leaves nothing to compare (ROIs without any negative, no real box) is a masked
    mean over nothing, 0.

    Args:
        fields: The model's outputs and the caption embeddings by name (`RegionMedCLIPForPreTrainingOutput`).
        gather: `gather(tensor, with_grad)`, see [`PaddedGather`].
        form: The contrastive form of the model (`config.loss_objective`): `"infonce"` or `"sigmoid"`.
        logit_scale / logit_bias: The model's scale (already exponentiated) and its sigmoid bias (None for InfoNCE).
        region_input_ids / region_attention_mask: The region captions, to group identical ones.
        term_input_ids / term_attention_mask: The region terms, to group them with the captions as queries.
        labels: `(B,)` class indices of classification fine-tuning; the text side is then `class_embeds`.
        detector: The detector whose heads (`class_head`, `box_head`) the detection term trains.
    """

    def __init__(
        self,
        fields: dict,
        gather,
        form: str,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        region_input_ids=None,
        region_attention_mask=None,
        term_input_ids=None,
        term_attention_mask=None,
        labels: torch.Tensor | None = None,
        detector=None,
    ):
        self.fields = fields
        self.gather = gather
        self.form = form
        self.region_input_ids = region_input_ids
        self.region_attention_mask = region_attention_mask
        self.term_input_ids = term_input_ids
        self.term_attention_mask = term_attention_mask
        self.labels = labels
        self.detector = detector
        self.region_mask = fields.get("region_mask")
        self.contrastive = {"logit_scale": logit_scale, "logit_bias": logit_bias}
        self._gathered = {}

    def rows(self, field: str, with_grad: bool = True) -> torch.Tensor | None:
        """`fields[field]` of every process, concatenated; boolean fields come back boolean, without gradient."""
        return self._gathered_field(field, with_grad, per_region=False)

    def region_rows(self, field: str) -> torch.Tensor | None:
        """The rows of the real ROI slots of a `(B, K, ...)` field of every process; None without ROIs."""
        return self._gathered_field(field, True, per_region=True)

    def _gathered_field(self, field: str, with_grad: bool, per_region: bool) -> torch.Tensor | None:
        key = (field, per_region)
        if key not in self._gathered:
            tensor = self.fields.get(field)
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

    def _region_ids(self, input_ids, attention_mask) -> torch.Tensor:
        """The attended token ids `(N, L)` of the real ROI slots of every process."""
        ids = input_ids[self.region_mask]
        if attention_mask is not None:
            ids = ids * attention_mask[self.region_mask]
        return self.gather(ids, False)

    @cached_property
    def _caption_grouping(self) -> tuple[torch.Tensor, int] | tuple[None, None]:
        if self.region_input_ids is None or self.region_mask is None:
            return None, None
        ids = self._region_ids(self.region_input_ids, self.region_attention_mask)
        return caption_groups_from_ids(ids, with_count=True)

    @cached_property
    def query_groups(self) -> tuple[torch.Tensor, int] | tuple[None, None]:
        """The detection queries of the global batch: group ids `(2N,)` of the real ROIs' region captions, then
        their terms (equal for identical texts, a term and a caption included), and how many distinct there are."""
        if self.region_input_ids is None or self.term_input_ids is None or self.region_mask is None:
            return None, None
        captions = self._region_ids(self.region_input_ids, self.region_attention_mask)
        terms = self._region_ids(self.term_input_ids, self.term_attention_mask)
        length = max(captions.shape[1], terms.shape[1])
        ids = torch.cat(
            [F.pad(captions, (0, length - captions.shape[1])), F.pad(terms, (0, length - terms.shape[1]))]
        )
        return caption_groups_from_ids(ids, with_count=True)

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

    def compute(batch: GatheredBatch, objective) -> torch.Tensor | None:
        if needs_regions and batch.region_mask is None:
            return None
        image, text = batch.rows(image_field), batch.rows(text_field)
        if image is None or text is None:
            return None
        return global_contrastive_loss(image, text, **batch.contrastive, objective=batch.form)

    return compute


def _region_caption_term(region_field: str, loss: Callable):
    """A contrastive term between the real ROIs' rows of `region_field` and their region captions, identical
    captions of the global batch grouped."""

    def compute(batch: GatheredBatch, objective) -> torch.Tensor | None:
        captions, regions = batch.region_rows("region_text_embeds"), batch.region_rows(region_field)
        if captions is None or regions is None or regions.shape[0] == 0:
            return None
        return loss(
            regions,
            captions,
            caption_groups=batch.caption_groups,
            **batch.contrastive,
            objective=batch.form,
        )

    return compute


def _negative_term(batch: GatheredBatch, objective) -> torch.Tensor | None:
    negatives, regions = batch.region_rows("negative_text_embeds"), batch.region_rows("region_embeds")
    if negatives is None or regions is None or regions.shape[0] == 0 or negatives.shape[1] == 0:
        return None
    present = batch.region_rows("negative_mask")
    return hard_negative_loss(
        regions, negatives, present, objective.neg_logit_scale, objective.neg_logit_bias
    )


def _global_region_term(batch: GatheredBatch, objective) -> torch.Tensor | None:
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
        objective=batch.form,
        num_groups=batch.num_caption_groups,
    )


def _proposal_term(batch: GatheredBatch, objective) -> torch.Tensor | None:
    if batch.region_mask is None or batch.fields.get("region_boxes") is None:
        return None
    logits = batch.rows("proposal_logits")
    if logits is None:
        return None
    boxes, present = batch.rows("region_boxes", with_grad=False), batch.rows("region_mask")
    # As the other region terms: no ROI slot in the global batch, no term (slots that are all padding give 0).
    if present.shape[1] == 0:
        return None
    return region_proposal_loss(logits, boxes, present)


def _detection_term(batch: GatheredBatch, objective) -> torch.Tensor | None:
    patches = batch.rows("patch_embeds")
    captions, terms = batch.region_rows("region_text_embeds"), batch.region_rows("term_embeds")
    groups, count = batch.query_groups
    if patches is None or captions is None or terms is None or groups is None:
        return None
    present = batch.rows("region_mask")
    if present.shape[1] == 0 or captions.shape[0] == 0:
        return None
    # One embedding per distinct query (its first text), and for every ROI slot the queries its box answers: its
    # caption's and its term's (a padded slot answers none: its group is the dropped last column).
    order = torch.arange(groups.shape[0], device=groups.device)
    first = torch.full((count,), groups.shape[0], device=groups.device).scatter_reduce(
        0, groups, order, "amin"
    )
    queries = torch.cat([captions, terms])[first]
    answers = present.new_zeros((*present.shape, count + 1))
    for field_groups in groups.split(captions.shape[0]):
        slots = present.new_full(present.shape, count, dtype=groups.dtype)
        slots[present] = field_groups
        answers.scatter_(2, slots[..., None], True)
    answers = answers[..., :count]
    logits = batch.detector.class_head(patches.flatten(1, 2), queries)
    box_logits = batch.detector.box_head(patches)
    loss = detection_loss(logits, box_logits, batch.rows("region_boxes", with_grad=False), present, answers)
    regions = batch.region_rows("region_embeds")
    if regions is None:
        return loss
    logits, targets = batch.detector.region_class_head(regions, queries), answers[present].to(loss.dtype)
    proposals = batch.rows("proposal_region_embeds")
    if proposals is not None:
        # Over the annotated images only: an image without boxes is unannotated, not empty.
        annotated = present.any(-1)
        quality = proposal_region_targets(
            batch.rows("proposal_region_boxes", with_grad=False),
            batch.rows("region_boxes", with_grad=False),
            answers,
        )
        proposal_logits = batch.detector.region_class_head(proposals[annotated], queries)
        logits = torch.cat([logits, proposal_logits.flatten(0, 1)])
        targets = torch.cat([targets, quality[annotated].flatten(0, 1).to(targets.dtype)])
    return loss + region_class_loss(logits, targets)


def _class_term(batch: GatheredBatch, objective) -> torch.Tensor | None:
    # Computed on this process's images: every process holds the same prompts, and DDP's gradient average over
    # equal local batches gives the global mean.
    if batch.labels is None:
        return None
    images, prompts = batch.fields["image_embeds"], batch.fields["class_embeds"]
    return class_loss(images, prompts, batch.labels, batch.contrastive["logit_scale"])


_ROI_INPUTS = ("pixel_values", "roi_boxes", "roi_mask", "roi_pixel_values")
_REGION_CAPTIONS = ("region_input_ids", "region_attention_mask")


@dataclass(frozen=True)
class LossTerm:
    """One term of the objective.

    Args:
        inputs: The batch fields the term reads; a training stage feeds exactly those of its weighted terms.
        compute: `compute(batch, objective)` → the term over the gathered batch, or None when its inputs are absent;
            `objective` holds the objective's settings (`ObjectiveSpec` of the training config).
        trains_roi_processor: Computed on the ROI processor's output (the fused region features, or the
            region-aware embedding), so it is a term that trains the processor.
    """

    inputs: tuple[str, ...]
    compute: Callable[[GatheredBatch, object], torch.Tensor | None]
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
    ),
    # z_global ↔ the region captions of its image, multi-positive.
    "global_region_loss": LossTerm((*_ROI_INPUTS, *_REGION_CAPTIONS), _global_region_term),
    # The region proposer's objectness and boxes against the given boxes (per image).
    "proposal_loss": LossTerm(_ROI_INPUTS, _proposal_term),
    # The detector: every patch's box scored against every region caption and term of the global batch.
    "detection_loss": LossTerm(
        (*_ROI_INPUTS, *_REGION_CAPTIONS, "term_input_ids", "term_attention_mask"), _detection_term
    ),
    # Classification fine-tuning: the image (region-aware where it has regions) ↔ one prompt per class.
    "class_loss": LossTerm(
        ("pixel_values", "input_ids", "attention_mask", *_ROI_INPUTS[1:], "labels"),
        _class_term,
        trains_roi_processor=True,
    ),
}


def stage_inputs(loss_weights: dict[str, float]) -> set[str]:
    """The batch fields a stage with these weights needs: those of every term weighted above 0."""
    return {name for term, weight in loss_weights.items() if weight > 0 for name in LOSS_TERMS[term].inputs}


__all__ = [
    "LOSS_TERMS",
    "GatheredBatch",
    "LossTerm",
    "PaddedGather",
    "caption_groups_from_ids",
    "class_loss",
    "box_regression_loss",
    "dense_region_loss",
    "detection_loss",
    "generalized_box_iou",
    "global_contrastive_loss",
    "global_region_loss",
    "hard_negative_loss",
    "multi_positive_contrastive_loss",
    "no_gather",
    "region_contrastive_loss",
    "region_proposal_loss",
    "region_proposal_targets",
    "stage_inputs",
]
