"""PyTorch RegionMed-CLIP model: a dual-encoder CLIP with region-of-interest features and an ROI processor, and a
text-queried detector built on it.

The file holds inference only, as a Hub folder carries it: the pretraining objective (region captions, hard
negatives, every loss term and its weight) lives in the package's training code, never next to the weights.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_regionmed_clip import RegionMedCLIPConfig

# Imported so that they travel with this file: `save_pretrained` copies a model file's relative imports, which puts the
# pipelines (named in the config's `custom_pipelines`) in every saved folder. transformers 4.57 copies a local folder's
# files only one import deep when it loads the model, so the pipelines' own imports are made here too.
from .image_processing_regionmed_clip import decode_image  # noqa: F401
from .pipeline_regionmed_clip import ZeroShotRegionClassificationPipeline  # noqa: F401

try:
    # transformers 5: init functions that skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:
    # transformers 4 loads checkpoint tensors after `_init_weights`, so torch's own functions are right there.
    from torch.nn import init


# ---------------------------------------------------------------------------------------------------------------------
# The image–text loss of `return_loss=True`
# ---------------------------------------------------------------------------------------------------------------------


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a square logit matrix whose diagonal holds the positives: the mean of the row-wise and
    the column-wise cross-entropy, each averaged over the batch (CLIP's `clip_loss`)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Regions without boxes: the proposer's boxes, and crops of them
# ---------------------------------------------------------------------------------------------------------------------


def patch_centres(grid_h: int, grid_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`(H'·W', 2)` x, y centres of the patch cells as fractions of the image, row-major (the token order)."""
    ys = (torch.arange(grid_h, device=device, dtype=dtype) + 0.5) / grid_h
    xs = (torch.arange(grid_w, device=device, dtype=dtype) + 0.5) / grid_w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)


def objectness_peaks(proposal_logits: torch.Tensor) -> torch.Tensor:
    """`(B, H'·W')` bool: the patches whose objectness is the largest of their 3 × 3 neighbourhood (ties included),
    from the proposer's `(B, H', W', 5)` output."""
    scores = proposal_logits[..., 0].float()
    peaks = scores == F.max_pool2d(scores[:, None], 3, stride=1, padding=1)[:, 0]
    return peaks.flatten(1)


def patch_boxes(edge_logits: torch.Tensor, at_least_one_patch: bool = True) -> torch.Tensor:
    """The box `(B, H'·W', 4)` (x0, y0, x1, y1 fractions) every patch predicts from its `(B, H', W', 4)` edge logits
    (FCOS's: the sigmoids are the distances from the patch centre to the left, top, right and bottom edges, as
    fractions of the image), clipped to the image; with `at_least_one_patch`, widened to at least one patch first
    (what RoIAlign of a self-proposed region needs), else as predicted (the detector's boxes, which may be smaller
    than a patch)."""
    batch_size, grid_h, grid_w = edge_logits.shape[:3]
    dtype = torch.promote_types(edge_logits.dtype, torch.float32)  # fp32 at least: edges are small fractions
    centres = patch_centres(grid_h, grid_w, edge_logits.device, dtype)[None]  # (1, P, 2)
    distances = edge_logits.to(dtype).sigmoid().reshape(batch_size, -1, 4)
    if at_least_one_patch:
        half = torch.tensor([0.5 / grid_w, 0.5 / grid_h], device=edge_logits.device, dtype=dtype)
        distances = torch.cat(
            (torch.maximum(distances[..., :2], half), torch.maximum(distances[..., 2:], half)), -1
        )
    low = (centres - distances[..., :2]).clamp(0.0, 1.0)
    high = (centres + distances[..., 2:]).clamp(0.0, 1.0)
    return torch.cat((low, high), dim=-1)


def objectness_order(proposal_logits: torch.Tensor) -> torch.Tensor:
    """The patches `(B, H'·W')` of the proposer's `(B, H', W', 5)` output ranked by objectness, local maxima (a 3 × 3
    neighbourhood, [`objectness_peaks`]) first, so the first K come from K different peaks while the map has them;
    ties keep the token order."""
    batch_size = proposal_logits.shape[0]
    scores, peaks = proposal_logits[..., 0].float().reshape(batch_size, -1), objectness_peaks(proposal_logits)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order.gather(1, torch.sort((~peaks).gather(1, order).to(torch.uint8), dim=1, stable=True).indices)


def propose_regions(proposal_logits: torch.Tensor, num_regions: int) -> torch.Tensor:
    """`num_regions` boxes `(B, K, 4)` per image from the proposer's `(B, H', W', 5)` output, deterministically: the
    [`patch_boxes`] boxes of the first K patches of [`objectness_order`], so every box lies inside [0, 1]."""
    grid_h, grid_w = proposal_logits.shape[1:3]
    if num_regions > grid_h * grid_w:
        raise ValueError(f"auto_regions={num_regions} exceeds the {grid_h}x{grid_w} patch grid.")
    chosen = objectness_order(proposal_logits)[:, :num_regions]  # (B, K)
    return patch_boxes(proposal_logits[..., 1:]).gather(1, chosen[..., None].expand(-1, -1, 4))


def crop_regions(pixel_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Bilinear crops `(B, K, C, H, W)` of normalised `boxes` `(B, K, 4)` from `pixel_values`, resized to its size.

    The crop of self-proposed regions in `crop` mode: there is no original image to cut from (the processor crops
    given boxes from the original), so the crop is taken from the resized input, at its resolution.
    """
    batch_size, num_boxes = boxes.shape[:2]
    height, width = pixel_values.shape[-2:]
    ys = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    grid_x = x0[..., None] + (x1 - x0)[..., None] * xs  # (B, K, W)
    grid_y = y0[..., None] + (y1 - y0)[..., None] * ys  # (B, K, H)
    grid = torch.stack(
        (grid_x[:, :, None, :].expand(-1, -1, height, -1), grid_y[:, :, :, None].expand(-1, -1, -1, width)),
        -1,
    )
    grid = (grid * 2 - 1).reshape(batch_size * num_boxes, height, width, 2).to(pixel_values.dtype)
    source = (
        pixel_values[:, None]
        .expand(-1, num_boxes, -1, -1, -1)
        .reshape(batch_size * num_boxes, -1, height, width)
    )
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return crops.reshape(batch_size, num_boxes, -1, height, width)


# ---------------------------------------------------------------------------------------------------------------------
# RoIAlign on a patch-token grid
# ---------------------------------------------------------------------------------------------------------------------


def roi_align(
    features: torch.Tensor, boxes: torch.Tensor, output_size: int, sampling_ratio: int
) -> torch.Tensor:
    """Average RoIAlign feature of each box, by bilinear sampling with `grid_sample` (no torchvision).

    Each box is split into `output_size × output_size` bins with `sampling_ratio²` bilinear samples per bin, as
    torchvision's `roi_align(aligned=True)`; since the bins are then averaged into one vector, this is the mean of all
    `(output_size · sampling_ratio)²` samples. Samples clamp to the border, which is what torchvision does for points
    inside the image.

    Args:
        features: `(B, D, H, W)` feature grid covering the whole (resized) image.
        boxes: `(B, K, 4)` boxes as `x0, y0, x1, y1` fractions of the image width / height.

    Returns:
        `(B, K, D)` ROI features.
    """
    batch_size, num_boxes = boxes.shape[:2]
    if num_boxes == 0:
        # A batch without ROIs has zero slots; grid_sample cannot sample an empty grid.
        return features.new_zeros((batch_size, 0, features.shape[1]))
    steps = output_size * sampling_ratio
    # Sample centres at (j + 0.5) / steps along each box side, in grid_sample's [-1, 1] frame (align_corners=False).
    fractions = (torch.arange(steps, device=boxes.device, dtype=boxes.dtype) + 0.5) / steps
    x0, y0, x1, y1 = boxes.unbind(-1)
    xs = x0[..., None] + (x1 - x0)[..., None] * fractions  # (B, K, steps)
    ys = y0[..., None] + (y1 - y0)[..., None] * fractions
    grid = torch.stack(
        (
            xs[:, :, None, :].expand(-1, -1, steps, -1),
            ys[:, :, :, None].expand(-1, -1, -1, steps),
        ),
        dim=-1,
    )  # (B, K, steps, steps, 2)
    grid = (grid * 2 - 1).reshape(batch_size, num_boxes * steps, steps, 2).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.reshape(batch_size, -1, num_boxes, steps * steps).mean(-1).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class RegionMedCLIPOutput(ModelOutput):
    r"""
    Output of [`RegionMedCLIPModel`]: CLIP's fields plus the region branch.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            The image–text contrastive loss of `logits_per_image` (image i pairs with text i): symmetric InfoNCE,
            or SigLIP's sigmoid loss for `config.loss_objective="sigmoid"`.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of `image_embeds` and `text_embeds`.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            Transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised image embeddings: region-aware (z_fused) when ROIs were given or self-proposed, else
            equal to `global_image_embeds`.
        global_image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised embeddings of the whole image alone (z_global).
        region_embeds (`torch.FloatTensor` of shape `(image_batch_size, max_rois, projection_dim)`, *optional*):
            L2-normalised fused region features F_i; zeros in padded slots. `None` without ROIs.
        region_mask (`torch.BoolTensor` of shape `(image_batch_size, max_rois)`, *optional*):
            True for real ROIs, False for padded slots.
        region_boxes (`torch.FloatTensor` of shape `(image_batch_size, max_rois, 4)`, *optional*):
            The boxes the ROI branch used: the given `roi_boxes`, or the self-proposed ones (`auto_regions`).
        dense_region_embeds (`torch.FloatTensor` of shape `(image_batch_size, max_rois, projection_dim)`, *optional*):
            L2-normalised projected RoIAlign features of the patch tokens over each box (no ROI processor, no box
            coordinates); zeros in padded slots. `None` without ROIs or for a tower without a patch grid.
        proposal_logits (`torch.FloatTensor` of shape `(image_batch_size, grid_height, grid_width, 5)`, *optional*):
            The region proposer's objectness logit and 4 edge-distance logits per patch, with ROIs.
        patch_embeds (`torch.FloatTensor` of shape `(image_batch_size, grid_height, grid_width, projection_dim)`, *optional*):
            With ROIs, the projected (not normalised) patch features, as `get_patch_features` gives them.
        text_model_output (`BaseModelOutputWithPooling`):
            Output of the text tower.
        vision_model_output (`BaseModelOutputWithPooling`):
            Output of the vision tower on the whole images.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    global_image_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    region_mask: torch.BoolTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    dense_region_embeds: torch.FloatTensor | None = None
    proposal_logits: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any]:
        return tuple(
            v.to_tuple() if k in ("text_model_output", "vision_model_output") else v for k, v in self.items()
        )


@dataclass
class RegionMedCLIPTextFeatures(BaseModelOutputWithPooling):
    r"""
    Output of [`RegionMedCLIPModel.get_text_features`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Text tower tokens.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Projected, not yet normalised text features, as CLIP's `get_text_features` returns them.
        tower_pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The tower's pooled output before `text_projection` (its pooler, or its first token without one), so
            that a caller may keep it while the tower is frozen and still train the projection on top.
    """

    tower_pooler_output: torch.FloatTensor | None = None


@dataclass
class RegionMedCLIPImageFeatures(BaseModelOutputWithPooling):
    r"""
    Output of [`RegionMedCLIPModel.get_image_features`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Vision tower tokens of the whole images.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Projected, not yet normalised image features (region-aware when ROIs were given), as CLIP's
            `get_image_features` returns them.
        global_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Projected features of the whole image alone.
        region_embeds (`torch.FloatTensor` of shape `(batch_size, max_rois, projection_dim)`, *optional*):
            Projected fused region features; zeros in padded slots.
        region_mask (`torch.BoolTensor` of shape `(batch_size, max_rois)`, *optional*):
            True for real ROIs.
        region_boxes (`torch.FloatTensor` of shape `(batch_size, max_rois, 4)`, *optional*):
            The boxes used: the given ones, or those the model proposed itself (`config.auto_regions`).
        dense_region_embeds (`torch.FloatTensor` of shape `(batch_size, max_rois, projection_dim)`, *optional*):
            Projected (not normalised) RoIAlign features of the patch tokens, the input of L_dense.
        proposal_logits (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width, 5)`, *optional*):
            The region proposer's per-patch objectness and edge-distance logits.
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width, projection_dim)`, *optional*):
            With ROIs, the projected (not normalised) patch features, as `get_patch_features` gives them.
    """

    global_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    region_mask: torch.BoolTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    dense_region_embeds: torch.FloatTensor | None = None
    proposal_logits: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None


@dataclass
class RegionMedCLIPPatchFeatures(BaseModelOutput):
    r"""
    Output of [`RegionMedCLIPModel.get_patch_features`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Vision tower tokens of the whole images.
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width, projection_dim)`):
            Projected, not normalised features of every patch. Cell `(i, j)` covers the `i`-th of `grid_height`
            equal rows and the `j`-th of `grid_width` equal columns of the input.
        proposal_logits (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width, 5)`):
            The region proposer's objectness logit and 4 edge-distance logits per patch.
    """

    patch_embeds: torch.FloatTensor | None = None
    proposal_logits: torch.FloatTensor | None = None


@dataclass
class RegionMedCLIPObjectDetectionOutput(ModelOutput):
    r"""
    Output of [`RegionMedCLIPForZeroShotObjectDetection`], in OWL-ViT's contract (one box and one logit per patch
    and query), which transformers' `zero-shot-object-detection` pipeline reads through the image processor's
    `post_process_object_detection`.

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_patches, num_queries)`):
            The logit of the box each patch proposes, per query: its sigmoid is the box's score for the query, the
            class head's probability times the region class head's (see [`RegionMedCLIPForZeroShotObjectDetection`]).
        pred_boxes (`torch.FloatTensor` of shape `(batch_size, num_patches, 4)`):
            Each patch's proposed box as normalised `(center_x, center_y, width, height)`.
        objectness_logits (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
            The proposer's objectness logit of each patch (the text plays no part in it).
        similarity (`torch.FloatTensor` of shape `(batch_size, num_queries, grid_height, grid_width)`):
            Cosine similarity of each patch feature with each query: the heatmap `explain` draws.
        text_embeds (`torch.FloatTensor` of shape `(num_queries, projection_dim)`):
            The normalised query embeddings.
    """

    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    objectness_logits: torch.FloatTensor | None = None
    similarity: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# ROI processor, region proposer and the detector's class head
# ---------------------------------------------------------------------------------------------------------------------


class RegionMedCLIPRoiAttention(nn.Module):
    """Multi-head cross-attention: ROI queries over the image's tokens. Plain `nn.Linear` projections named as in
    CLIP so PEFT LoRA can target `q_proj` / `k_proj` / `v_proj` / `out_proj`."""

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        self.embed_dim = config.vision_config.hidden_size
        self.num_heads = config.roi_num_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = config.roi_dropout
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = self._split_heads(self.q_proj(queries))
        key = self._split_heads(self.k_proj(context))
        value = self._split_heads(self.v_proj(context))
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(attended.transpose(1, 2).reshape(*queries.shape[:2], self.embed_dim))


class RegionMedCLIPRoiMLP(nn.Module):
    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.fc1 = nn.Linear(hidden_size, config.roi_intermediate_size)
        self.activation_fn = ACT2FN["gelu"]
        self.fc2 = nn.Linear(config.roi_intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class RegionMedCLIPRegionProposer(nn.Module):
    """The region proposer behind `auto_regions`: a layer norm and one linear map on every patch token of the
    global forward, giving an objectness logit and 4 edge-distance logits (FCOS's head reduced to one level and no
    centreness). It is trained by L_proposal on the boxes the data already has; [`propose_regions`] turns its map
    into boxes. One linear map keeps it cheap enough to run on every box-free forward."""

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        # The linear head's weight and bias are the module's own, zero-initialised (see `_init_weights`): an
        # `nn.Linear` would draw random initial weights at construction and again in `post_init`, shifting the
        # random stream every other layer of a seeded model is initialised from.
        self.weight = nn.Parameter(torch.zeros(5, hidden_size))
        self.bias = nn.Parameter(torch.zeros(5))

    def forward(self, patch_grid: torch.Tensor) -> torch.Tensor:
        """`(B, D, H', W')` patch grid → `(B, H', W', 5)` logits."""
        return F.linear(self.norm(patch_grid.permute(0, 2, 3, 1)), self.weight, self.bias)


class RegionMedCLIPRoiProcessor(nn.Module):
    """The paper's ROI processor (roles unspecified there; this is the design of DESIGN.md).

    A pre-LN transformer block in the vision hidden space: each ROI feature, plus an embedding of its box, is a query
    that cross-attends over the same image's `[CLS; patch]` tokens (8 heads by default), then a residual MLP. The
    result is the fused region feature F_i. ROIs never attend to each other, so a padded slot cannot change a real
    one. An attention pool over the valid F_i, scaled by a gate that starts at 0, is added to the global feature to
    give the region-aware image feature, so switching the ROI stage on does not disturb the global alignment already
    learned.
    """

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.box_embedding = nn.Linear(4, hidden_size)
        self.query_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.context_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = RegionMedCLIPRoiAttention(config)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = RegionMedCLIPRoiMLP(config)
        self.dropout = nn.Dropout(config.roi_dropout)
        self.pool_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.pool_score = nn.Linear(hidden_size, 1)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        roi_features: torch.Tensor,
        roi_boxes: torch.Tensor,
        roi_mask: torch.Tensor,
        context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            roi_features: `(B, K, D)` per-ROI features from the vision tower (crop) or RoIAlign (pool).
            roi_boxes: `(B, K, 4)` normalised boxes.
            roi_mask: `(B, K)` bool, true for real ROIs.
            context: `(B, N, D)` vision tokens of the whole image.

        Returns:
            fused `(B, K, D)` region features (zeros in padded slots) and the gated pooled region feature `(B, D)`.
        """
        hidden = roi_features + self.box_embedding(roi_boxes.to(roi_features.dtype))
        hidden = hidden + self.dropout(self.attention(self.query_norm(hidden), self.context_norm(context)))
        hidden = hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))
        hidden = hidden * roi_mask[..., None]

        scores = self.pool_score(self.pool_norm(hidden)).squeeze(-1).masked_fill(~roi_mask, float("-inf"))
        # An image whose slots are all padding has no region evidence: its weights become 0, not NaN.
        weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
        pooled = (weights[..., None] * hidden).sum(1)
        return hidden, self.gate * pooled


class RegionMedCLIPClassHead(nn.Module):
    """The detector's class head, OWL-ViT's: scores the box every patch proposes against every text query.

    A patch's logit for a query is `(cos(patch, query) + shift) · scale`, the cosine of its projected feature (the
    feature the patch–text heatmap shows) with the query, shifted and scaled by two linear maps of that feature, so
    each patch learns how much its cosine says (OWL-ViT's `logit_shift` / `logit_scale`). Trained by the
    pretraining objective's detection term with IoU-aware targets (the IoU of the patch's box with a finding the
    query describes, 0 where the image holds none), its sigmoid is a per-box score that is low on images without
    the finding and ranks well-fitting boxes above loose ones.
    """

    # Where the shift and the scale start (their maps start at zero): a scale of 10 (elu(9) + 1), so a cosine can
    # move the logit, and a shift that puts a patch of cosine 0 at logit −4.6 (sigmoid 0.01, focal losses' prior:
    # most boxes hold nothing), so early training is not swamped by negatives.
    initial_shift, initial_scale = -0.46, 9.0

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        # The two maps' weights and biases are the module's own, as the region proposer's (see there and
        # `_init_weights`): rows `shift`, `scale`.
        self.weight = nn.Parameter(torch.zeros(2, config.projection_dim))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, patch_embeds: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, N, P)` projected patch features (not normalised) and `(Q, P)` normalised queries → `(B, N, Q)`
        logits."""
        shift, scale = F.linear(patch_embeds, self.weight, self.bias).unbind(-1)
        cosine = F.normalize(patch_embeds, dim=-1) @ query_embeds.t()
        shift, scale = shift + self.initial_shift, F.elu(scale + self.initial_scale) + 1
        return (cosine + shift[..., None]) * scale[..., None]


class RegionMedCLIPBoxHead(nn.Module):
    """The detector's box head: two 3 × 3 convolutions over the grid of projected patch features and a linear map
    giving each patch the 4 edge logits of the box it proposes (the sigmoids are the distances from the patch centre
    to the box's edges, FCOS's parametrisation, so a box can be smaller than a patch). Convolutional as FCOS's head
    is, so a patch's box reads its neighbours, where a finding's edges lie: at the demo budget this lifts term
    detection AP of seed 0 from 0.06 to 0.14 against OWL-ViT's per-patch MLP. Trained by the detection term with
    L1 + GIoU against the box each patch is assigned. The region proposer's boxes (one linear map, in the base
    model) serve `auto_regions`; this head's are the detector's."""

    # The output layer starts at zero with every edge at sigmoid(−2.75) ≈ 0.06 of the image from the centre, the
    # size of a small finding.
    initial_edge = -2.75

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        width = config.projection_dim
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.activation_fn = ACT2FN["gelu"]
        # The output layer's weight and bias are the module's own (see `_init_weights`).
        self.weight = nn.Parameter(torch.zeros(4, width))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, H', W', P)` projected patch features → `(B, H', W', 4)` edge logits."""
        grid = patch_embeds.permute(0, 3, 1, 2)
        hidden = self.activation_fn(self.conv2(self.activation_fn(self.conv1(grid)))).permute(0, 2, 3, 1)
        return F.linear(hidden, self.weight, self.bias) + self.initial_edge


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class RegionMedCLIPPreTrainedModel(PreTrainedModel):
    config_class = RegionMedCLIPConfig
    config: RegionMedCLIPConfig
    base_model_prefix = "regionmed_clip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        """`PreTrainedModel._init_weights` is transformers' override point for initialisation (every model of the
        library defines it; `post_init` and `from_pretrained` call it for weights a checkpoint lacks), so the name
        is the library's, not a private call into it (tests: the gate, temperature and ROI layers after
        `from_pretrained` of a dual encoder)."""
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, RegionMedCLIPModel):
            # Weights of a checkpoint are loaded over this; tensors that are not plain layers must be set here, or
            # `from_pretrained` leaves them as uninitialised memory.
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
        elif isinstance(module, RegionMedCLIPRoiProcessor):
            # Every layer of the ROI processor is set here: for remote code, transformers never calls
            # `_init_weights` on a module without parameters of its own (the attention, the MLP), and the default
            # for a plain `nn.Linear` is std = initializer_factor = 1, which saturates the attention and the pool
            # softmax (whose gradients, scaled by the zero gate, then become subnormal and slow the backward).
            hidden_size = module.box_embedding.out_features
            init.normal_(module.box_embedding.weight, std=hidden_size**-0.5 * factor)
            init.zeros_(module.box_embedding.bias)
            attention, mlp = module.attention, module.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
            for layer in (*projections, mlp.fc1, mlp.fc2):
                init.normal_(layer.weight, std=layer.in_features**-0.5 * factor)
                init.zeros_(layer.bias)
            init.normal_(module.pool_score.weight, std=hidden_size**-0.5 * factor)
            init.zeros_(module.pool_score.bias)
            init.zeros_(module.gate)
        elif isinstance(module, RegionMedCLIPClassHead):
            # Zero: every patch starts with the head's initial shift and scale (see there).
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RegionMedCLIPBoxHead):
            # Its hidden layers as the ROI processor's (set here for the same reason); the output starts at zero, at
            # the head's initial edges.
            for layer in (module.conv1, module.conv2):
                init.normal_(layer.weight, std=(layer.in_channels * 9) ** -0.5 * factor)
                init.zeros_(layer.bias)
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RegionMedCLIPRegionProposer):
            # Set here for the same reason as the ROI processor's layers (no parameters of its own).
            # Zero: an untrained proposer scores every patch alike (the proposer-pooled global feature then starts
            # as the mean patch token); the head is the last layer, so it still learns from the first step.
            init.ones_(module.norm.weight)
            init.zeros_(module.norm.bias)
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class RegionMedCLIPModel(RegionMedCLIPPreTrainedModel):
    r"""
    RegionMed-CLIP: a vision tower and a text tower projected into one space (as `VisionTextDualEncoderModel`, with
    the same attribute names, so its checkpoints load here), plus the region branch: ROI features (crop or pool
    mode), the ROI processor and the region proposer.

    With no ROI inputs (and `config.auto_regions = 0`, the default) the model is exactly a CLIP: `logits_per_image`
    compares the global image embedding with the text. With `auto_regions = K > 0`, an image without boxes gets K
    regions from the model's own region proposer and the region-aware embedding, so every box-free entry point
    (`pipeline`, `get_image_features`) uses the region branch. With ROIs, `image_embeds` is the region-aware
    embedding and `region_embeds` holds one embedding per ROI. `return_loss=True` gives the image–text contrastive
    loss only, as `CLIPModel` does; the region-level pretraining objective is `RegionMedCLIPForPreTraining` of the
    package's training code. To start from pretrained towers or a whole dual encoder (CLIP, SigLIP), see
    `regionmed_clip.convert`.

    Args:
        config ([`RegionMedCLIPConfig`]): Model configuration.
        vision_model (`PreTrainedModel`, *optional*): An already built vision tower; built from
            `config.vision_config` otherwise.
        text_model (`PreTrainedModel`, *optional*): An already built text tower.

    Example:

    ```python
    >>> import torch
    >>> from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel

    >>> config = RegionMedCLIPConfig(
    ...     vision_config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                    "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    ...     text_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                  "intermediate_size": 64},
    ...     projection_dim=16, roi_num_heads=4,
    ... )
    >>> model = RegionMedCLIPModel(config).eval()
    >>> outputs = model(
    ...     input_ids=torch.tensor([[101, 2023, 102], [101, 2003, 102]]),
    ...     pixel_values=torch.randn(2, 3, 32, 32),
    ...     roi_boxes=torch.tensor([[[0.1, 0.1, 0.5, 0.5]], [[0.4, 0.2, 0.9, 0.6]]]),
    ... )
    >>> outputs.logits_per_image.shape, outputs.region_embeds.shape
    (torch.Size([2, 2]), torch.Size([2, 1, 16]))
    ```
    """

    # A folder that training saves is a detector's: its heads load with it and are no use to the base model, so
    # `AutoModel.from_pretrained(folder)` leaves them without reporting them as unexpected.
    _keys_to_ignore_on_load_unexpected = [r"class_head\.", r"box_head\."]

    def __init__(
        self,
        config: RegionMedCLIPConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = (
            vision_model if vision_model is not None else tower_from_config(config.vision_config)
        )
        self.text_model = text_model if text_model is not None else tower_from_config(config.text_config)
        # The towers share the composite config's sub-configs, so attention settings and edits reach both.
        # transformers keeps the attention backend a tower was built with only in `config._attn_implementation`
        # (no public reader on 4.57-5.x); test_modeling checks that an `eager` choice reaches both towers.
        self.config.vision_config._attn_implementation = self.vision_model.config._attn_implementation
        self.config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config
        for module in self.vision_model.modules():
            if isinstance(module, nn.MultiheadAttention) and module.batch_first:
                module.register_forward_pre_hook(_sequence_first_keys)

        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_embed_dim = config.text_config.hidden_size
        self.visual_projection = nn.Linear(self.vision_embed_dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, config.projection_dim, bias=False)
        self.roi_processor = RegionMedCLIPRoiProcessor(config)
        # In the base model, not only in the detector: `auto_regions` proposes the box-free ROIs with it, and with
        # `global_pool="cls_proposer"` it is part of the box-free embedding z_global, so a stage that freezes the
        # region branch (or a global-only run) still trains it.
        self.region_proposer = RegionMedCLIPRegionProposer(config)
        logit_scale = torch.tensor(config.logit_scale_init_value)
        if config.learnable_temperature:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            # A buffer, not a frozen parameter: stage-wise "unfreeze everything" must not start training τ, and the
            # state-dict key stays `logit_scale` as in CLIP / VisionTextDualEncoderModel checkpoints.
            self.register_buffer("logit_scale", logit_scale)
        # SigLIP's learnable bias exists only for the sigmoid objective, so InfoNCE checkpoints keep their keys.
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
            if config.loss_objective == "sigmoid"
            else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.set_input_embeddings(value)

    # ---- public feature API -------------------------------------------------------------------------------------

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> RegionMedCLIPTextFeatures:
        r"""
        Text tower output whose `pooler_output` is the projected (not normalised) text feature
        `(batch, projection_dim)`, as transformers' CLIP returns it; `tower_pooler_output` is the tower's own.
        Shorter inputs are padded to `config.text_pad_length` first, when it is set.

        Example:

        ```python
        >>> text_features = model.get_text_features(**tokenizer(["round nodule"], return_tensors="pt")).pooler_output
        ```
        """
        if position_ids is None:
            input_ids, attention_mask, token_type_ids = _pad_text(
                self.config, input_ids, attention_mask, token_type_ids
            )
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=True,
            **kwargs,
        )
        pooled = pooled_output(outputs)
        return RegionMedCLIPTextFeatures(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(pooled),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            tower_pooler_output=pooled,
        )

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
        auto_regions: int | None = None,
        **kwargs,
    ) -> RegionMedCLIPImageFeatures:
        r"""
        Image features. `pooler_output` is the projected (not normalised) image feature `(batch, projection_dim)`:
        region-aware when ROIs are given or self-proposed, global otherwise; `global_embeds`, `region_embeds` and
        the `region_boxes` used are there as well. Without boxes, `auto_regions` (default: `config.auto_regions`)
        self-proposed regions are used when it is above 0; passing it here leaves the config as it is.

        Example:

        ```python
        >>> inputs = processor(images=image, boxes=[[(30, 40, 90, 100)]], return_tensors="pt")
        >>> image_features = model.get_image_features(**inputs).pooler_output
        ```
        """
        auto_regions = self.config.auto_regions if auto_regions is None else auto_regions
        self_proposed = (
            roi_boxes is None and roi_mask is None and roi_pixel_values is None and auto_regions > 0
        )
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        pooled, grid, proposal_logits = self._global_features(
            vision_outputs, pixel_values, with_grid=roi_boxes is not None or self_proposed
        )
        if self_proposed:
            # Boxes are a discrete choice: no gradient flows through their coordinates.
            roi_boxes = propose_regions(proposal_logits.detach(), auto_regions).to(pixel_values.dtype)
            if self.config.roi_mode == "crop":
                roi_pixel_values = crop_regions(pixel_values, roi_boxes)
        global_embeds = self.visual_projection(pooled)
        features = dict(
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=getattr(vision_outputs, "hidden_states", None),
            attentions=getattr(vision_outputs, "attentions", None),
            pooler_output=global_embeds,
            global_embeds=global_embeds,
            proposal_logits=proposal_logits,
        )
        if roi_boxes is not None:
            roi_mask = _region_mask(pixel_values, roi_boxes, roi_mask)
            features.update(
                self._region_features(
                    vision_outputs, pixel_values, pooled, grid, roi_boxes, roi_mask, roi_pixel_values
                )
            )
        elif roi_pixel_values is not None or roi_mask is not None:
            raise ValueError("roi_mask / roi_pixel_values were given without roi_boxes; pass the boxes too.")
        return RegionMedCLIPImageFeatures(**features)

    def get_region_features(
        self,
        pixel_values: torch.Tensor,
        roi_boxes: torch.Tensor,
        roi_mask: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Projected (not normalised) fused region features `(batch, max_rois, projection_dim)`, zeros in padded slots.
        """
        return self.get_image_features(pixel_values, roi_boxes, roi_mask, roi_pixel_values).region_embeds

    def get_patch_features(self, pixel_values: torch.Tensor) -> RegionMedCLIPPatchFeatures:
        r"""
        The whole images' patch features through `visual_projection` (`patch_embeds`, `(batch, grid_height,
        grid_width, projection_dim)`, not normalised) and the region proposer's map over them: the patch tokens the
        model's RoIAlign, region proposer and detector read (after the tower's final layer norm, see `_patch_grid`).
        RoIAlign of `patch_embeds` over a box is the box's `dense_region_embeds` before normalisation (both maps are
        linear).

        Example:

        ```python
        >>> inputs = processor(images=image, return_tensors="pt")
        >>> patches = torch.nn.functional.normalize(model.get_patch_features(**inputs).patch_embeds, dim=-1)
        >>> heatmap = patches[0] @ text_embeds[0]  # (grid_height, grid_width) cosine similarities
        ```
        """
        if getattr(self.config.vision_config, "patch_size", None) is None:
            raise ValueError(f"The {self.config.vision_config.model_type} vision tower has no patch grid.")
        last_hidden_state = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        grid = _patch_grid(self.vision_model, last_hidden_state, pixel_values)
        return RegionMedCLIPPatchFeatures(
            last_hidden_state=last_hidden_state,
            patch_embeds=self.visual_projection(grid.permute(0, 2, 3, 1)),
            proposal_logits=self.region_proposer(grid),
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        roi_boxes: torch.FloatTensor | None = None,
        roi_mask: torch.Tensor | None = None,
        roi_pixel_values: torch.FloatTensor | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RegionMedCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`):
                Report (or prompt) token ids. With `return_loss=True`, row i is the text of image i.
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`):
                Whole images, as the image processor returns them.
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*):
                Mask of `input_ids`.
            roi_boxes (`torch.FloatTensor` of shape `(image_batch_size, max_rois, 4)`, *optional*):
                ROI boxes as `x0, y0, x1, y1` fractions of the image size. Without them the image embedding is
                z_global, or with `config.auto_regions` the region-aware one over self-proposed regions.
            roi_mask (`torch.Tensor` of shape `(image_batch_size, max_rois)`, *optional*):
                1 for real ROIs, 0 for padded slots (default: all real).
            roi_pixel_values (`torch.FloatTensor` of shape `(image_batch_size, max_rois, num_channels, height, width)`, *optional*):
                The ROI crops, resized to the input size; required in `crop` mode, rejected in `pool` mode. Also
                taken flat, `(num_real_rois, num_channels, height, width)`: the real ROIs' crops in the order
                `roi_pixel_values[roi_mask]` would list them.
            return_loss (`bool`, *optional*):
                Return the image–text contrastive loss of `logits_per_image` (image i pairs with text i).
            kwargs:
                `output_attentions` / `output_hidden_states`, passed to both towers.

        Example:

        ```python
        >>> from regionmed_clip import RegionMedCLIPModel, RegionMedCLIPProcessor
        >>> model = RegionMedCLIPModel.from_pretrained("path/to/regionmed-clip")
        >>> processor = RegionMedCLIPProcessor.from_pretrained("path/to/regionmed-clip")
        >>> inputs = processor(text=["round nodule", "normal"], images=image, padding=True, return_tensors="pt")
        >>> probs = model(**inputs).logits_per_image.softmax(dim=-1)
        ```
        """
        unknown = set(kwargs) - {"output_attentions", "output_hidden_states"}
        if unknown:
            raise TypeError(
                f"RegionMedCLIPModel.forward got {sorted(unknown)}; region captions, hard negatives and summaries "
                "are inputs of the pretraining objective (RegionMedCLIPForPreTraining), not of the model."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None and pixel_values is None:
            raise ValueError("Pass input_ids, pixel_values, or both.")
        vision_outputs = text_outputs = text_embeds = None
        image = {"image_embeds": None}
        if pixel_values is not None:
            vision_outputs = self.get_image_features(
                pixel_values, roi_boxes, roi_mask, roi_pixel_values, **kwargs
            )
            image = _normalized_image_outputs(vision_outputs)
        if input_ids is not None:
            text_outputs = self.get_text_features(
                input_ids, attention_mask, position_ids, token_type_ids, **kwargs
            )
            text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)

        loss = logits_per_image = logits_per_text = None
        if image["image_embeds"] is not None and text_embeds is not None:
            logits_per_image = self.logit_scale.exp() * image["image_embeds"] @ text_embeds.t()
            logits_per_text = logits_per_image.t()
        if return_loss:
            loss = _image_text_loss(logits_per_image, self.config.loss_objective, self.logit_bias)
        output = RegionMedCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            **image,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if return_dict else output.to_tuple()

    # ---- internals ----------------------------------------------------------------------------------------------

    def _global_features(
        self, vision_outputs, pixel_values: torch.Tensor, with_grid: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """z_global before the projection, the patch grid and the proposer's output (those two when regions are
        in play or the proposer pools z_global).

        With `global_pool="cls_proposer"`, z_global adds to the pooled token the patch tokens weighted by the
        proposer's objectness."""
        pooled = pooled_output(vision_outputs)
        proposer_pool = self.config.global_pool == "cls_proposer"
        if getattr(self.config.vision_config, "patch_size", None) is None or not (with_grid or proposer_pool):
            return pooled, None, None
        grid = _patch_grid(self.vision_model, vision_outputs.last_hidden_state, pixel_values)
        proposal_logits = self.region_proposer(grid)
        if proposer_pool:
            weights = proposal_logits[..., 0].flatten(1).softmax(-1).to(grid.dtype)  # (B, H'·W')
            pooled = pooled + torch.einsum("bn,bdn->bd", weights, grid.flatten(2))
        return pooled, grid, proposal_logits

    def _region_features(
        self, vision_outputs, pixel_values, pooled, grid, roi_boxes, roi_mask, roi_pixel_values
    ) -> dict:
        """The ROI branch: per-ROI features (RoIAlign on the patch grid, or the crops through the tower), fused
        with the image's tokens by the ROI processor, projected; the region-aware embedding; and the projected
        RoIAlign features of the patch grid when the tower has a grid."""
        context = vision_outputs.last_hidden_state
        if context.dim() != 3:
            raise ValueError(
                f"The ROI processor attends over vision tokens (batch, tokens, hidden); the "
                f"{self.config.vision_config.model_type} tower returned shape {tuple(context.shape)}."
            )
        if self.config.roi_mode == "pool":
            if roi_pixel_values is not None:
                raise ValueError(
                    "roi_pixel_values were given but the model has roi_mode='pool', which pools ROIs from the "
                    "global forward. Build the processor with roi_mode='pool' or load the model with roi_mode='crop'."
                )
            roi_features = _roi_align(self.config, grid, roi_boxes) * roi_mask[..., None]
        else:
            roi_features = _crop_features(
                self.vision_model, roi_boxes, roi_mask, roi_pixel_values, self.training
            )
        fused, pooled_regions = self.roi_processor(
            roi_features.to(context.dtype), roi_boxes, roi_mask, context
        )
        features = dict(
            region_embeds=self.visual_projection(fused), region_mask=roi_mask, region_boxes=roi_boxes
        )
        if grid is not None:
            patch_features = (
                roi_features if self.config.roi_mode == "pool" else _roi_align(self.config, grid, roi_boxes)
            )
            features["dense_region_embeds"] = self.visual_projection(patch_features.to(context.dtype))
            features["patch_embeds"] = self.visual_projection(grid.permute(0, 2, 3, 1))
        features["pooler_output"] = self.visual_projection(pooled + pooled_regions)
        return features


class RegionMedCLIPForZeroShotObjectDetection(RegionMedCLIPPreTrainedModel):
    r"""
    Text-queried localization without boxes, in OWL-ViT's shape and output contract: a [`RegionMedCLIPModel`] and a
    class head, so that `pipeline("zero-shot-object-detection", model=folder)` finds a finding by its description.
    Any saved RegionMed-CLIP folder loads as this class (the base model's weights sit under `regionmed_clip`).

    Every patch proposes one box, from its box head ([`RegionMedCLIPBoxHead`]: the patch centre and four predicted
    edge distances). The region proposer, a one-layer map of objectness and boxes, stays in the base model because
    the base reads it itself (`auto_regions` proposes box-free ROIs with it, and `global_pool="cls_proposer"` pools
    z_global with its objectness); the detector reports its objectness beside its own boxes, reading it through
    `get_patch_features`. The class head ([`RegionMedCLIPClassHead`]) scores each box against each query, and as for
    OWL-ViT a score is the sigmoid of its logit, per box and query: about the IoU of the box with a finding the
    query describes (the detection term's targets), near 0 on an image without one, so a pipeline `threshold`
    filters absent findings. The detector then reads each image's `config.detection_top_k` boxes of highest
    objectness again as regions, and multiplies their scores by the region class head's probability that the
    region is what the query describes ([`~RegionMedCLIPForZeroShotObjectDetection.region_log_probs`]): the region
    path sees a finding's appearance that one patch feature blurs. `post_process_object_detection` of the image
    processor applies the sigmoid, suppresses overlapping boxes of one query, and maps the boxes back to the
    original image.

    What the grid resolves: one box per patch, so a finding smaller than a patch is found from the patch holding its
    centre (its box can still be smaller than the patch), and two findings centred in one patch get one box.

    Args:
        config ([`RegionMedCLIPConfig`]): Model configuration.
        model ([`RegionMedCLIPModel`], *optional*): An already built base model (e.g. one being trained);
            built from `config` otherwise.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> detector = pipeline("zero-shot-object-detection", model="path/to/regionmed-clip", trust_remote_code=True)
    >>> detector("scan.png", candidate_labels=["round nodule in the upper left"], threshold=0.1)
    ```
    """

    def __init__(self, config: RegionMedCLIPConfig, model: RegionMedCLIPModel | None = None):
        super().__init__(config)
        self.regionmed_clip = model if model is not None else RegionMedCLIPModel(config)
        self.class_head = RegionMedCLIPClassHead(config)
        self.box_head = RegionMedCLIPBoxHead(config)
        self.region_class_head = RegionMedCLIPClassHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_embeds: torch.FloatTensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> RegionMedCLIPObjectDetectionOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(num_queries, sequence_length)`, *optional*):
                The text queries, each scored against every image.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                The images, as the image processor returns them.
            query_embeds (`torch.FloatTensor` of shape `(num_queries, projection_dim)`, *optional*):
                Normalised query embeddings instead of `input_ids` (e.g. encoded once for a whole dataset).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (query_embeds is None):
            raise ValueError("Pass the text queries as exactly one of input_ids and query_embeds.")
        if query_embeds is None:
            text = self.regionmed_clip.get_text_features(
                input_ids, attention_mask, position_ids, token_type_ids
            )
            query_embeds = F.normalize(text.pooler_output, dim=-1)
        patches = self.regionmed_clip.get_patch_features(pixel_values)
        patch_embeds, proposal_logits = patches.patch_embeds, patches.proposal_logits
        boxes = patch_boxes(self.box_head(patch_embeds), at_least_one_patch=False).to(patch_embeds.dtype)
        query_embeds = query_embeds.to(patch_embeds.dtype)
        logits = self.class_head(patch_embeds.flatten(1, 2), query_embeds)
        log_probs = self.region_log_probs(pixel_values, boxes, proposal_logits, query_embeds, logits.dtype)
        if log_probs is not None:
            logits = logit_of_product(logits, log_probs)
        centres, extents = (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
        outputs = RegionMedCLIPObjectDetectionOutput(
            logits=logits,
            pred_boxes=torch.cat((centres, extents), dim=-1),
            objectness_logits=proposal_logits[..., 0].flatten(1),
            similarity=torch.einsum("bhwd,qd->bqhw", F.normalize(patch_embeds, dim=-1), query_embeds),
            text_embeds=query_embeds,
        )
        return outputs if return_dict else outputs.to_tuple()

    def region_log_probs(
        self,
        pixel_values: torch.Tensor,
        boxes: torch.Tensor,
        proposal_logits: torch.Tensor,
        query_embeds: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """The second stage of the detector's score: `(B, N, Q)` log-probabilities that each box, read as a region,
        is what each query describes (None with `config.detection_top_k` 0).

        The class head reads one patch feature, which tells a finding from the background better than one finding
        from another. So the boxes of each image's first `config.detection_top_k` patches in the region proposer's
        [`objectness_order`] (its peaks first, as self-proposed regions are picked) are read again the way
        the model reads a box it is given (crop or RoIAlign, then the ROI processor:
        [`~RegionMedCLIPForZeroShotObjectDetection.read_top_regions`]), and the region class head
        ([`RegionMedCLIPClassHead`], trained by the detection term on the regions of the training data and on the
        boxes the detector proposes there) gives the sigmoid probability of each query for each region. The boxes
        are picked without the queries, so a box's score for a query does not depend on which other queries are
        asked (transformers' pipeline asks one label per forward). A box not read again gets, per query, the lowest log-probability of its image's boxes that
        were, so it never outranks them on this stage's account. The pretraining objective trains the proposer on the
        data's boxes; a detector whose proposer was never trained reads arbitrary boxes again.
        """
        if self.config.detection_top_k == 0:
            return None
        chosen, _, region_embeds = self.read_top_regions(
            pixel_values, boxes, proposal_logits, self.config.detection_top_k
        )
        log_probs = F.logsigmoid(self.region_class_head(region_embeds, query_embeds.to(region_embeds.dtype)))
        log_probs = log_probs.to(dtype)
        floor = log_probs.min(1, keepdim=True).values.expand(-1, boxes.shape[1], -1)
        return floor.scatter(1, chosen[..., None].expand(-1, -1, query_embeds.shape[0]), log_probs)

    def read_top_regions(
        self, pixel_values: torch.Tensor, boxes: torch.Tensor, proposal_logits: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's first `top_k` patches `(B, K)` in [`objectness_order`], their boxes `(B, K, 4)` (taken from
        the patches' `boxes` `(B, N, 4)`) and the normalised region embeddings `(B, K, P)` of those boxes, read the
        way the model reads a box it is given (crop of the input view, or RoIAlign; then the ROI processor). The
        second stage's input, at inference ([`~RegionMedCLIPForZeroShotObjectDetection.region_log_probs`]) and in
        training (the detection term trains the region class head on these regions too)."""
        chosen = objectness_order(proposal_logits)[:, : min(top_k, boxes.shape[1])]
        chosen_boxes = boxes.gather(1, chosen[..., None].expand(-1, -1, 4))
        crops = crop_regions(pixel_values, chosen_boxes) if self.config.roi_mode == "crop" else None
        region_embeds = self.regionmed_clip.get_region_features(pixel_values, chosen_boxes, None, crops)
        return chosen, chosen_boxes, F.normalize(region_embeds, dim=-1)


def logit_of_product(logits: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """The logit of σ(`logits`) · exp(`log_probs`), computed stably: z + log p − softplus(z + log(1 − p))."""
    return logits + log_probs - F.softplus(logits + torch.log(-torch.expm1(log_probs)))


def tower_from_config(config) -> PreTrainedModel:
    """The tower a sub-config describes: its `AutoModel` class, or for tower configs that transformers does not
    register with `AutoModel` (SigLIP's text tower) the model class named after the config (`SiglipTextConfig` →
    `SiglipTextModel`), as transformers names them."""
    try:
        return AutoModel.from_config(config)
    except ValueError as error:
        model_class = getattr(transformers, type(config).__name__.replace("Config", "Model"), None)
        if model_class is None or getattr(model_class, "config_class", None) is not type(config):
            raise error
        return model_class(config)


# Vision towers whose `last_hidden_state` precedes the final layer norm their pooled token passes through.
_PRE_NORM_TOKEN_TOWERS = ("clip_vision_model",)


# ---------------------------------------------------------------------------------------------------------------------
# The model's internals
# ---------------------------------------------------------------------------------------------------------------------


def _image_text_loss(logits_per_image: torch.Tensor | None, objective: str, logit_bias) -> torch.Tensor:
    """`return_loss`: the contrastive loss of a square `logits_per_image` (image i pairs with text i)."""
    if logits_per_image is None or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            "return_loss=True pairs image i with text i: pass as many texts as images (got logits "
            f"{None if logits_per_image is None else tuple(logits_per_image.shape)})."
        )
    if objective == "sigmoid":
        return sigmoid_loss(logits_per_image + logit_bias)
    return contrastive_loss(logits_per_image)


def _pad_text(config: RegionMedCLIPConfig, input_ids, attention_mask, token_type_ids):
    """Right-pad text inputs to `config.text_pad_length` (when set) as the tokenizer pads to `max_length`:
    `text_config.pad_token_id` in the ids, 0 in the masks."""
    missing = (config.text_pad_length or 0) - input_ids.shape[1]
    if missing <= 0:
        return input_ids, attention_mask, token_type_ids
    pad_id = config.text_config.pad_token_id
    if pad_id is None:
        raise ValueError("text_pad_length is set but text_config has no pad_token_id to pad with.")
    input_ids = F.pad(input_ids, (0, missing), value=pad_id)
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask, (0, missing), value=0)
    if token_type_ids is not None:
        token_type_ids = F.pad(token_type_ids, (0, missing), value=0)
    return input_ids, attention_mask, token_type_ids


def _patch_grid(vision_model: PreTrainedModel, last_hidden_state: torch.Tensor, pixel_values: torch.Tensor):
    """The patch tokens of the global forward as a `(B, D, H', W')` grid, after the tower's final layer norm.

    The one source of patch features: RoIAlign in `pool` mode, the dense region features, the proposer and its
    pool, and [`~RegionMedCLIPModel.get_patch_features`] all read this grid. CLIP's vision tower returns its
    tokens before the `post_layernorm` its pooled token passes through, so that norm is applied here:
    `visual_projection` (of a converted CLIP) has only ever seen normed features. Other towers (ViT, SigLIP,
    DINOv2) return their tokens after their final norm already.
    """
    config = vision_model.config
    if config.model_type in _PRE_NORM_TOKEN_TOWERS:
        norms = [module for name, module in vision_model.named_modules() if name.endswith("post_layernorm")]
        last_hidden_state = norms[0](last_hidden_state)
    patch_size = config.patch_size
    patch_h, patch_w = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    grid_h, grid_w = pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w
    num_prefix = last_hidden_state.shape[1] - grid_h * grid_w
    if num_prefix < 0:
        raise ValueError(
            f"The vision tower returned {last_hidden_state.shape[1]} tokens, fewer than the {grid_h}x{grid_w} "
            "patch grid; roi_mode='pool' cannot place boxes on it. Use roi_mode='crop'."
        )
    patches = last_hidden_state[:, num_prefix:]
    return patches.transpose(1, 2).reshape(patches.shape[0], -1, grid_h, grid_w)


def _region_mask(pixel_values: torch.Tensor, roi_boxes: torch.Tensor, roi_mask) -> torch.Tensor:
    """The boolean ROI mask (default: every slot real), once the boxes' shape is checked."""
    if roi_boxes.dim() != 3 or roi_boxes.shape[-1] != 4 or roi_boxes.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"roi_boxes must be (batch={pixel_values.shape[0]}, K, 4) normalised x0,y0,x1,y1; got "
            f"{tuple(roi_boxes.shape)}."
        )
    if roi_mask is None:
        return torch.ones(roi_boxes.shape[:2], dtype=torch.bool, device=roi_boxes.device)
    return roi_mask.bool()


def _roi_align(config: RegionMedCLIPConfig, grid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    return roi_align(grid, boxes, config.roi_align_size, config.roi_sampling_ratio)


def _crop_features(vision_model, roi_boxes, roi_mask, roi_pixel_values, training: bool) -> torch.Tensor:
    """`crop` mode: the real ROIs' crops through the vision tower, all of the batch in one forward, scattered back
    to their `(B, K, D)` slots (zeros in padded ones)."""
    if roi_pixel_values is None:
        raise ValueError(
            "roi_mode='crop' needs roi_pixel_values (B, K, C, H, W): call the processor with `boxes=`, whose "
            "image processor crops every box from the original image."
        )
    if roi_pixel_values.dim() == 4:
        # Flat: only the real ROIs' crops, in the order `roi_mask` lists them (what the training collator sends).
        # Counting the mask reads it back from the device, so training trusts the collator's count.
        crops = roi_pixel_values
        if not training and crops.shape[0] != int(roi_mask.sum()):
            raise ValueError(
                f"roi_pixel_values holds {crops.shape[0]} flat crops but roi_mask marks {int(roi_mask.sum())} "
                "real ROIs; give one crop per real ROI, in roi_mask order."
            )
    elif roi_pixel_values.shape[:2] != roi_boxes.shape[:2]:
        raise ValueError(
            f"roi_pixel_values has {tuple(roi_pixel_values.shape[:2])} (batch, slots) but roi_boxes has "
            f"{tuple(roi_boxes.shape[:2])}."
        )
    else:
        crops = roi_pixel_values[roi_mask]
    # A batch without any real crop encodes one blank placeholder, cut away again: every process then runs the
    # tower as often whatever its batch holds, which a sharded tower (FSDP) requires.
    real = crops.shape[0]  # the crops' count from their shape: reading `roi_mask.sum()` would wait again
    if real == 0:
        crops = crops.new_zeros((1, *crops.shape[1:]))
    pooled = pooled_output(vision_model(pixel_values=crops, return_dict=True))
    return _scatter(pooled[:real], roi_mask)


def _normalized_image_outputs(features: "RegionMedCLIPImageFeatures") -> dict:
    """The image fields of [`RegionMedCLIPOutput`]: L2-normalised embeddings (zeros in padded ROI slots), the ROI
    mask, the boxes used and, with ROIs, the proposer's output."""
    mask = features.region_mask

    def per_region(embeds: torch.Tensor | None) -> torch.Tensor | None:
        return None if embeds is None else F.normalize(embeds, dim=-1) * mask[..., None]

    return dict(
        image_embeds=F.normalize(features.pooler_output, dim=-1),
        global_image_embeds=F.normalize(features.global_embeds, dim=-1),
        region_embeds=per_region(features.region_embeds),
        region_mask=mask,
        region_boxes=features.region_boxes,
        dense_region_embeds=per_region(features.dense_region_embeds),
        proposal_logits=None if mask is None else features.proposal_logits,
        patch_embeds=features.patch_embeds,
    )


def _sequence_first_keys(module: nn.MultiheadAttention, args: tuple) -> tuple | None:
    """Forward pre-hook of a batch-first `nn.MultiheadAttention` in a vision tower (SigLIP's attention-pool head):
    the keys (= values) laid out sequence-first in memory, same shape and values.

    The module transposes its keys to `(L, B, E)` before projecting them. From batch-first memory that view cannot
    be flattened into one matrix for B > 1, and torch's matmul then multiplies per key position against an expanded
    copy of the key/value weight: L copies, 5 GB for SigLIP so400m at 448 px (1,024 positions), in the forward and
    again in the backward, whatever the batch. Sequence-first keys flatten, and the projection is one matrix product.
    One object goes in as both key and value, as the module's packed projection requires."""
    if len(args) < 3 or args[1] is not args[2] or args[1].dim() != 3:
        return None
    keys = args[1].transpose(0, 1).contiguous().transpose(0, 1)
    return (args[0], keys, keys, *args[3:])


def _scatter(rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """`rows` `(N, P)` placed where `where` (any shape, N true entries) is true; zeros elsewhere."""
    placed = rows.new_zeros((*where.shape, rows.shape[-1]))
    placed[where] = rows
    return placed


def pooled_output(outputs) -> torch.Tensor:
    """A tower's pooled output, or its first token when it has no pooler."""
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        pooled = outputs.last_hidden_state[:, 0]
    return pooled.flatten(1)


__all__ = [
    "RegionMedCLIPForZeroShotObjectDetection",
    "RegionMedCLIPImageFeatures",
    "RegionMedCLIPModel",
    "RegionMedCLIPObjectDetectionOutput",
    "RegionMedCLIPOutput",
    "RegionMedCLIPPatchFeatures",
    "RegionMedCLIPPreTrainedModel",
    "RegionMedCLIPTextFeatures",
    "contrastive_loss",
    "crop_regions",
    "objectness_peaks",
    "patch_boxes",
    "patch_centres",
    "pooled_output",
    "propose_regions",
    "roi_align",
    "sigmoid_loss",
    "tower_from_config",
]
