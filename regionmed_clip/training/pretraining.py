"""The pretraining objective as a model: [`RegionMedCLIPForPreTraining`] wraps the Hub model (the detector, which
holds the base model) and owns everything only training needs: the region-caption, hard-negative and summary inputs,
their de-duplicated (and, while the text tower is frozen, cached) encoding, every loss term of `losses.LOSS_TERMS`
and the weights the stage in progress gives them. `save_pretrained` writes the Hub model alone, so a saved folder
carries no loss code and no loss weights.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configuration_regionmed_clip import RegionMedCLIPConfig
from ..data.captions import distinct_captions
from ..modeling_regionmed_clip import (
    RegionMedCLIPForZeroShotObjectDetection,
    RegionMedCLIPModel,
    RegionMedCLIPOutput,
    RegionMedCLIPPreTrainedModel,
    patch_boxes,
)
from .config import ObjectiveSpec
from .losses import LOSS_TERMS, GatheredBatch, PaddedGather, stage_inputs

#: The model outputs the terms read (besides the captions this module encodes).
GATHERED_FIELDS = (
    "text_embeds",
    "image_embeds",
    "global_image_embeds",
    "region_embeds",
    "region_mask",
    "region_boxes",
    "dense_region_embeds",
    "proposal_logits",
    "patch_embeds",
)
#: The paper's loss (its eq. 8 without the summary term) until a stage sets other weights.
DEFAULT_LOSS_WEIGHTS = {"global_loss": 1.0, "fused_global_loss": 1.0, "roi_loss": 1.0, "neg_loss": 1.0}


class CaptionEmbeddingCache:
    """The text tower's pooled outputs of captions, keyed on their attended token ids; least recently used entries
    are evicted beyond `max_entries`.

    Region captions repeat across images and steps ("round nodule left upper"), and with the text tower frozen
    their tower outputs never change. The objective reads the cache only while that holds (no text-tower parameter
    requires a gradient and the tower is in eval mode, so dropout is off), and it stores the output *before* the
    text projection, so a projection that still trains gets its gradient through every cached caption. Clear it
    whenever the tower's weights change (a checkpoint loaded, a stage that trains the tower).
    """

    def __init__(self, max_entries: int = 65536):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}.")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[int, ...], value: torch.Tensor):
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self):
        self._entries.clear()


@dataclass
class RegionMedCLIPForPreTrainingOutput(RegionMedCLIPOutput):
    r"""
    Output of [`RegionMedCLIPForPreTraining`]: the model's output ([`RegionMedCLIPOutput`]), with `loss` the
    objective's, its terms, and the caption embeddings they were computed from.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Weighted sum of `loss_terms` (the weights of `RegionMedCLIPForPreTraining.loss_weights`).
        loss_terms (`dict[str, torch.FloatTensor]`):
            Every weighted term whose inputs were given, unweighted, by name.
        class_embeds (`torch.FloatTensor` of shape `(num_classes, projection_dim)`, *optional*):
            With `labels`: the L2-normalised class prompts (the text inputs); `text_embeds` is then None.
        summary_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`, *optional*):
            L2-normalised embeddings of the summary captions.
        region_text_embeds (`torch.FloatTensor` of shape `(image_batch_size, max_rois, projection_dim)`, *optional*):
            L2-normalised region-caption embeddings, aligned with `region_embeds`; zeros in padded slots.
        term_embeds (`torch.FloatTensor` of shape `(image_batch_size, max_rois, projection_dim)`, *optional*):
            L2-normalised embeddings of each region's term (the finding's name), as `region_text_embeds`.
        negative_text_embeds (`torch.FloatTensor` of shape `(image_batch_size, max_rois, num_negatives, projection_dim)`, *optional*):
            L2-normalised hard-negative caption embeddings; zeros where `negative_mask` is False.
        negative_mask (`torch.BoolTensor` of shape `(image_batch_size, max_rois, num_negatives)`, *optional*):
            True for real negatives of real ROIs.
        proposal_region_boxes (`torch.FloatTensor` of shape `(image_batch_size, detection_proposals, 4)`, *optional*):
            With the detection term: the detector's proposed boxes its region class head trains on.
        proposal_region_embeds (`torch.FloatTensor` of shape `(image_batch_size, detection_proposals, projection_dim)`, *optional*):
            L2-normalised region embeddings of `proposal_region_boxes`.
    """

    loss_terms: dict[str, torch.FloatTensor] | None = None
    class_embeds: torch.FloatTensor | None = None
    summary_embeds: torch.FloatTensor | None = None
    region_text_embeds: torch.FloatTensor | None = None
    term_embeds: torch.FloatTensor | None = None
    negative_text_embeds: torch.FloatTensor | None = None
    negative_mask: torch.BoolTensor | None = None
    proposal_region_boxes: torch.FloatTensor | None = None
    proposal_region_embeds: torch.FloatTensor | None = None


class RegionMedCLIPForPreTraining(RegionMedCLIPPreTrainedModel):
    r"""
    RegionMed-CLIP's pretraining objective around the Hub model: the weighted terms of `losses.LOSS_TERMS` (the
    global, summary, ROI, hard-negative, dense, global-region, proposal and class terms) over a batch of images,
    reports, boxes, region captions, hard negatives and summaries, gathered across processes.

    Only the terms `loss_weights` weights above 0 are computed, and only the inputs they read are used (so one
    collator building every field serves every stage, as transformers' `Trainer` needs); a stage sets the weights
    (`stages.StageCallback`). `loss_objective` of the model config gives the contrastive form of the terms;
    `objective` the rest of their settings. Region captions and hard negatives repeat heavily, so each distinct
    caption of a batch goes through the text tower once, and while the tower is frozen its outputs are cached
    across steps (`enable_caption_cache`).

    `save_pretrained` saves the Hub model: a folder that `AutoModel.from_pretrained` loads as
    [`RegionMedCLIPModel`] and `pipeline("zero-shot-object-detection")` as the detector, with no loss code and no
    loss weights in it.

    Args:
        config ([`RegionMedCLIPConfig`]): Model configuration.
        model ([`RegionMedCLIPModel`] or [`RegionMedCLIPForZeroShotObjectDetection`], *optional*): The model to
            train: a base model (e.g. built from pretrained towers; the detector's heads start fresh around it) or
            a whole detector. Built from `config` otherwise.
        loss_weights (`dict[str, float]`, *optional*): Each term's weight (default `DEFAULT_LOSS_WEIGHTS`).
        objective ([`ObjectiveSpec`], *optional*): The terms' other settings (L_neg's scale and bias).
        gather (*optional*): `gather(tensor, with_grad)` across processes (default [`PaddedGather`], a no-op on
            one process).

    Example:

    ```python
    >>> from regionmed_clip.training import RegionMedCLIPForPreTraining
    >>> pretraining = RegionMedCLIPForPreTraining(config, loss_weights={"global_loss": 1.0, "roi_loss": 1.0})
    >>> outputs = pretraining(**processor(text=reports, images=images, boxes=boxes, region_text=captions,
    ...                                   padding=True, return_tensors="pt"))
    >>> outputs.loss.backward(); outputs.loss_terms
    >>> pretraining.save_pretrained("folder")  # loads with AutoModel.from_pretrained("folder")
    ```
    """

    def __init__(
        self,
        config: RegionMedCLIPConfig,
        model: RegionMedCLIPModel | RegionMedCLIPForZeroShotObjectDetection | None = None,
        loss_weights: dict[str, float] | None = None,
        objective: ObjectiveSpec | None = None,
        gather=None,
    ):
        super().__init__(config)
        if isinstance(model, RegionMedCLIPForZeroShotObjectDetection):
            self.detector = model
        else:
            self.detector = RegionMedCLIPForZeroShotObjectDetection(config, model=model)
        self.loss_weights = dict(DEFAULT_LOSS_WEIGHTS if loss_weights is None else loss_weights)
        self.objective = objective if objective is not None else ObjectiveSpec()
        self.gather = gather if gather is not None else PaddedGather()
        self.caption_cache: CaptionEmbeddingCache | None = None
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        loss_weights: dict[str, float] | None = None,
        objective: ObjectiveSpec | None = None,
        **kwargs,
    ) -> "RegionMedCLIPForPreTraining":
        """The objective around a saved RegionMed-CLIP folder (or Hub id), loaded as the detector (its heads
        included); the other arguments go to `from_pretrained`."""
        detector = RegionMedCLIPForZeroShotObjectDetection.from_pretrained(
            pretrained_model_name_or_path, *args, **kwargs
        )
        return cls(detector.config, model=detector, loss_weights=loss_weights, objective=objective)

    @property
    def model(self) -> RegionMedCLIPModel:
        """The base model being trained (under LoRA, its PEFT wrapper)."""
        return self.detector.regionmed_clip

    @property
    def loss_weights(self) -> dict[str, float]:
        return self._loss_weights

    @loss_weights.setter
    def loss_weights(self, weights: dict[str, float]):
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        self._loss_weights = {name: float(weight) for name, weight in weights.items()}

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs):
        """Save the Hub model (see the class docstring). A `state_dict` of this module (as transformers' `Trainer`
        passes one) is saved under the Hub model's names."""
        if state_dict is not None:
            prefix = "detector."
            state_dict = {name.removeprefix(prefix): tensor for name, tensor in state_dict.items()}
        self.detector.save_pretrained(save_directory, state_dict=state_dict, **kwargs)

    # ---- caption cache ------------------------------------------------------------------------------------------

    def enable_caption_cache(self, max_entries: int = 65536) -> CaptionEmbeddingCache:
        """Keep the text tower's outputs of captions across calls while the tower is frozen (see
        [`CaptionEmbeddingCache`]); returns the (new, empty) cache."""
        self.caption_cache = CaptionEmbeddingCache(max_entries)
        return self.caption_cache

    def disable_caption_cache(self):
        self.caption_cache = None

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        roi_boxes: torch.FloatTensor | None = None,
        roi_mask: torch.Tensor | None = None,
        roi_pixel_values: torch.FloatTensor | None = None,
        summary_input_ids: torch.LongTensor | None = None,
        summary_attention_mask: torch.Tensor | None = None,
        region_input_ids: torch.LongTensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        term_input_ids: torch.LongTensor | None = None,
        term_attention_mask: torch.Tensor | None = None,
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
    ) -> RegionMedCLIPForPreTrainingOutput:
        r"""
        Args:
            input_ids / attention_mask: Reports (row i describes image i), or with `labels` one prompt per class.
            pixel_values, roi_boxes, roi_mask, roi_pixel_values: As for [`RegionMedCLIPModel`].
            summary_input_ids / summary_attention_mask: One summary caption per image.
            region_input_ids / region_attention_mask: `(B, max_rois, L)` one region caption per ROI slot.
            term_input_ids / term_attention_mask: `(B, max_rois, L)` each region's term (the finding's name); with
                the captions, the queries of the detection term.
            negative_input_ids / negative_attention_mask: `(B, max_rois, M, L)` hard negatives of each ROI (a row
                whose mask is all 0 is padding).
            labels: `(B,)` the class of each image, for `class_loss`.
        """
        given = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            roi_boxes=roi_boxes,
            roi_mask=roi_mask,
            roi_pixel_values=roi_pixel_values,
            summary_input_ids=summary_input_ids,
            summary_attention_mask=summary_attention_mask,
            region_input_ids=region_input_ids,
            region_attention_mask=region_attention_mask,
            term_input_ids=term_input_ids,
            term_attention_mask=term_attention_mask,
            negative_input_ids=negative_input_ids,
            negative_attention_mask=negative_attention_mask,
            labels=labels,
        )
        needed = stage_inputs(self.loss_weights)
        inputs = {name: value for name, value in given.items() if value is not None and name in needed}
        model_outputs = self.model(
            **{name: inputs.get(name) for name in ("input_ids", "attention_mask", "pixel_values")},
            **{name: inputs.get(name) for name in ("roi_boxes", "roi_mask", "roi_pixel_values")},
            return_dict=True,
        )
        fields = {name: getattr(model_outputs, name) for name in GATHERED_FIELDS}
        labels = inputs.get("labels")
        if labels is not None:
            fields["class_embeds"], fields["text_embeds"] = fields["text_embeds"], None
        fields.update(self._encode_caption_fields(fields["region_mask"], inputs))
        fields.update(self._proposal_region_fields(inputs.get("pixel_values"), fields))
        batch = GatheredBatch(
            fields,
            self.gather,
            form=self.config.loss_objective,
            logit_scale=self.model.logit_scale.exp(),
            logit_bias=self.model.logit_bias,
            region_input_ids=inputs.get("region_input_ids"),
            region_attention_mask=inputs.get("region_attention_mask"),
            term_input_ids=inputs.get("term_input_ids"),
            term_attention_mask=inputs.get("term_attention_mask"),
            labels=labels,
            detector=self.detector,
        )
        self._check_pairs(fields)
        terms = {}
        for name, term in LOSS_TERMS.items():
            if self.loss_weights.get(name, 0.0) > 0:
                value = term.compute(batch, self.objective)
                if value is not None:
                    terms[name] = value
        if not terms:
            raise ValueError(
                f"none of the weighted loss terms {sorted(n for n, w in self.loss_weights.items() if w > 0)} found "
                f"its inputs among {sorted(inputs)}: pass input_ids with pixel_values (image i pairs with text i), "
                "or ROIs with region_input_ids / negative_input_ids."
            )
        loss = sum(self.loss_weights[name] * term for name, term in terms.items())
        return RegionMedCLIPForPreTrainingOutput(
            **{**dict(model_outputs), **fields, "loss": loss, "loss_terms": terms}
        )

    def _proposal_region_fields(self, pixel_values: torch.Tensor | None, fields: dict) -> dict:
        """The regions the detector's second stage will read at inference, for the detection term to train its
        region class head on: each image's first `objective.detection_proposals` boxes in the proposer's order
        ([`~RegionMedCLIPForZeroShotObjectDetection.read_top_regions`] of the box head's boxes, both detached, as
        Faster R-CNN's proposals are), read as regions. Without them the head only ever sees real findings and has
        no say on the background boxes it is asked about on an image that holds none."""
        count = self.objective.detection_proposals
        if (
            count == 0
            or self.loss_weights.get("detection_loss", 0.0) <= 0
            or pixel_values is None
            or fields.get("region_mask") is None
            or fields.get("patch_embeds") is None
        ):
            return {}
        with torch.no_grad():
            patches = fields["patch_embeds"]
            boxes = patch_boxes(self.detector.box_head(patches), at_least_one_patch=False).to(patches.dtype)
        _, proposal_boxes, proposal_embeds = self.detector.read_top_regions(
            pixel_values, boxes, fields["proposal_logits"].detach(), count
        )
        return {"proposal_region_boxes": proposal_boxes, "proposal_region_embeds": proposal_embeds}

    @staticmethod
    def _check_pairs(fields: dict):
        images, texts = fields["image_embeds"], fields["text_embeds"]
        if images is not None and texts is not None and len(images) != len(texts):
            raise ValueError(
                f"the objective pairs image i with text i, but got {len(images)} images and {len(texts)} texts."
            )

    # ---- captions: deduplicated, cached while the text tower is frozen --------------------------------------------

    def _encode_caption_fields(self, region_mask: torch.Tensor | None, inputs: dict) -> dict:
        """The normalised embeddings of the summary, region and hard-negative captions, each placed where its rows
        belong (one per image, per ROI slot, per negative slot), from one deduplicated pass of the text tower.

        They are computed in `forward`, so that under DDP the text tower runs inside the forward DDP wraps, and
        distributed training gathers them like the image features."""
        fields, slots = {}, {}
        if "summary_input_ids" in inputs:
            ids = inputs["summary_input_ids"]
            mask = inputs.get("summary_attention_mask", torch.ones_like(ids))
            fields["summary_embeds"], slots["summary_embeds"] = (ids, mask), None
        region_ids, negative_ids = inputs.get("region_input_ids"), inputs.get("negative_input_ids")
        term_ids = inputs.get("term_input_ids")
        if (
            region_ids is not None or negative_ids is not None or term_ids is not None
        ) and region_mask is None:
            raise ValueError(
                "region captions, terms or negatives were given without ROIs; pass roi_boxes too."
            )
        for field, name, ids in (
            ("region_text_embeds", "region", region_ids),
            ("term_embeds", "term", term_ids),
        ):
            if ids is not None:
                rows = self._region_caption_rows(name, ids, inputs.get(f"{name}_attention_mask"), region_mask)
                fields[field], slots[field] = rows, region_mask
        negative_mask = None
        if negative_ids is not None:
            mask = inputs.get("negative_attention_mask", torch.ones_like(negative_ids))
            if negative_ids.shape[:2] != region_mask.shape:
                raise ValueError(
                    f"negative_input_ids has (batch, slots) {tuple(negative_ids.shape[:2])}, expected "
                    f"{tuple(region_mask.shape)}."
                )
            negative_mask = (mask.sum(-1) > 0) & region_mask[..., None]
            fields["negative_text_embeds"] = (negative_ids[negative_mask], mask[negative_mask])
            slots["negative_text_embeds"] = negative_mask
        encoded = (
            dict(zip(fields, self._encode_captions(list(fields.values())), strict=True)) if fields else {}
        )
        placed = {
            name: rows if slots[name] is None else _scatter(rows, slots[name])
            for name, rows in encoded.items()
        }
        return {**placed, "negative_mask": negative_mask}

    def _region_caption_rows(
        self, name: str, input_ids, attention_mask, region_mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `(N, L)` texts (`name`: region captions or terms) of the real ROIs, checked: one per slot, and
        (outside training) none empty."""
        if input_ids.shape[:2] != region_mask.shape:
            raise ValueError(
                f"{name}_input_ids has (batch, slots) {tuple(input_ids.shape[:2])}, expected "
                f"{tuple(region_mask.shape)} (one per ROI slot)."
            )
        ids = input_ids[region_mask]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[region_mask]
        # Reading the check back would make every training step wait for the device, so training skips it: there
        # the captions come from the processor, which gives every box its caption's special tokens at least.
        if not self.training and not bool((mask.sum(-1) > 0).all()):
            raise ValueError(f"A real ROI has an empty {name} text; every box needs one.")
        return ids, mask

    def _encode_captions(self, fields: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Embeddings of several `(N_i, L_i)` caption batches, all in one deduplicated pass of the text tower, so
        a caption that is one ROI's region caption and another's hard negative is encoded once.

        A batch with no caption at all (no ROI in it) still makes the pass, on one placeholder token whose
        embedding is cut away: each process then runs the towers the same number of times whatever its batch
        holds, which a sharded tower (FSDP gathers its weights in every forward and backward) requires, and the
        empty embeddings stay in the autograd graph.
        """
        length = max(ids.shape[1] for ids, _ in fields)
        pad_id = self.config.text_config.pad_token_id or 0
        ids = torch.cat([F.pad(ids, (0, length - ids.shape[1]), value=pad_id) for ids, _ in fields])
        masks = torch.cat([F.pad(mask, (0, length - mask.shape[1])) for _, mask in fields])
        if ids.shape[0] == 0:
            placeholder = ids.new_full((1, 1), pad_id)
            pooled = self._tower_pooled(placeholder, torch.ones_like(placeholder))
            empty = F.normalize(self.model.text_projection(pooled), dim=-1)[:0]
            return [empty for _ in fields]
        return list(self._encode_text_rows(ids, masks).split([len(ids) for ids, _ in fields]))

    def _encode_text_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected, normalised embeddings of a `(N, L)` batch of captions.

        Identical rows go through the text tower once and share the result (`index_select`, whose backward adds
        the gradients of every copy).
        """
        first, inverse = distinct_captions(input_ids, attention_mask)
        pooled = self._pooled_captions(input_ids[first], attention_mask[first])
        embeds = F.normalize(self.model.text_projection(pooled), dim=-1)
        return embeds.index_select(0, inverse)

    def _tower_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask
        ).tower_pooler_output

    def _caption_cache_usable(self) -> bool:
        text_model = self.model.text_model
        return (
            self.caption_cache is not None
            and not text_model.training
            and not any(parameter.requires_grad for parameter in text_model.parameters())
        )

    def _pooled_captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled outputs of distinct captions `(N, L)`, from the cache where it is usable."""
        if not self._caption_cache_usable():
            return self._tower_pooled(input_ids, attention_mask)
        # The cache is keyed on the host: every caption's tokens come back in one transfer (one wait for the
        # device per call, where reading each caption's would be one per caption).
        ids_rows, mask_rows = torch.stack((input_ids, attention_mask.to(input_ids.dtype))).tolist()
        keys = [
            tuple(token for token, kept in zip(ids, mask, strict=True) if kept)
            for ids, mask in zip(ids_rows, mask_rows, strict=True)
        ]
        rows = [self.caption_cache.get(key) for key in keys]
        missing = [index for index, row in enumerate(rows) if row is None]
        if missing:
            with torch.no_grad():
                encoded = self._tower_pooled(input_ids[missing], attention_mask[missing])
            for index, row in zip(missing, encoded, strict=True):
                rows[index] = row
                self.caption_cache.put(keys[index], row)
        return torch.stack(rows)


def _scatter(rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """`rows` `(N, P)` placed where `where` (any shape, N true entries) is true; zeros elsewhere."""
    placed = rows.new_zeros((*where.shape, rows.shape[-1]))
    placed[where] = rows
    return placed


__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "CaptionEmbeddingCache",
    "RegionMedCLIPForPreTraining",
    "RegionMedCLIPForPreTrainingOutput",
]
