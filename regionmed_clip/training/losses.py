"""What distributed training adds to the model's loss module (`RegionMedCLIPLoss`): the gather across processes,
the class loss of classification fine-tuning, and the inputs each loss term needs.

`accelerator.gather` carries no gradient (accelerate#1154) and transformers' CLIP loss sees only the local batch
(transformers#22252); both would make a multi-GPU run optimise a different objective from a one-GPU run. The
trainer builds `RegionMedCLIPLoss` with `PaddedGather`, which concatenates each embedding of the whole global
batch with `torch.distributed.nn.functional.all_gather` (whose backward routes each gradient to the process that
owns the row). Every process then computes the full loss; the all-gather backward sums the identical losses of the
W processes and DDP averages over W, so parameters receive exactly the gradient of one process holding the whole
batch. On one process, gathering is a no-op.

Tensors differ in size between processes (each holds a different number of real ROIs, negatives, tokens, and a
micro-batch without regions holds none): they are padded to the largest shape, gathered, and the padding rows are
dropped again. Every process issues the same collectives in the same order whatever its batch holds, because the
trainer feeds each process the same input fields (zero-slot ROI tensors for a batch without regions) and the loss
module gathers by field.

Gradient accumulation averages the losses of micro-batches: the contrastive batch (the negatives each row sees)
is one micro-batch times the number of processes, not the accumulated batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..loss_regionmed_clip import RegionMedCLIPLoss

#: The model inputs each training term needs: the model's terms, and `class_loss` (prompts as the text side; the
#: image side is region-aware for rows with regions).
TERM_INPUTS = {
    **RegionMedCLIPLoss.term_inputs,
    # The report term's inputs, region-aware where rows have regions, with the labels.
    "class_loss": (*RegionMedCLIPLoss.term_inputs["fused_global_loss"], "labels"),
}
LOSS_TERMS = tuple(TERM_INPUTS)


def stage_inputs(loss_weights: dict[str, float]) -> set[str]:
    """The batch fields a stage with these weights needs: those of every term weighted above 0."""
    return {name for term, weight in loss_weights.items() if weight > 0 for name in TERM_INPUTS[term]}


class PaddedGather:
    """`gather(tensor, with_grad)` for `RegionMedCLIPLoss`: concatenates `tensor` from every process along dim 0.

    Tensors may differ in every dim and dim 0 may be 0: they are padded with zeros to the largest shape, gathered,
    and dim 0 is cut back to each process's rows (the other dims stay padded to the largest). Every process must
    call it, in the same order.

    The gathers run in a process group of their own. Their backward passes are collectives too (entered by every
    process, including one whose part has no gradient path), and they run while
    DDP all-reduces gradient buckets in the default group as parameters become ready; when the processes' batches
    differ in shape (one holds ROIs, another none), the two interleave differently on each process, and in one
    shared group that is a collective mismatch. Build it on every process at the same point (it creates the group).
    """

    def __init__(self):
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.group = dist.new_group() if self.distributed else None

    def __call__(self, tensor: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
        if not self.distributed:
            return tensor
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


def distributed_loss(config, rank: int, world_size: int) -> RegionMedCLIPLoss:
    """The model's loss module gathering across the `world_size` processes of this run (call on every process)."""
    return RegionMedCLIPLoss(config, gather=PaddedGather(), rank=rank, world_size=world_size)


def class_loss(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each image's scaled cosine logits over the `(C, P)` class-prompt embeddings.

    Computed on this process's images: every process holds the same prompts, and DDP's gradient average over
    equal local batches gives the global mean.
    """
    return F.cross_entropy(logit_scale * image_embeds @ class_embeds.t(), labels)
