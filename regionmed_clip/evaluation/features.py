"""Feature extraction: one batched pass of a model over a dataset split, reused by every metric.

Decisions:
- Image embeddings come in two groups. `box_free` holds those computed from the image alone, as a user without
  boxes gets them (`global`: z_global, what `get_image_features` returns with no boxes). `gt_boxes` holds those
  that take the split's ground-truth boxes as input (`region-aware`: z_fused over an image's first `max_regions`
  regions). An embedding the model makes from regions it proposes itself belongs in `box_free`, under its own name.
- Every region of the split is scored: an image with more regions than the processor's `max_regions` slots is run
  again with the next slots' worth, as many passes as it needs (`region_passes`: descending `score`, ties in file
  order), so the first pass is the highest-scoring `max_regions`, the ones the region-aware image embedding
  uses. The collator gets each pass's region subset explicitly, so no sampling of its own takes part.
- Regions are embedded through the ROI processor (`region_path="roi_processor"`), or, for a model whose ROI branch
  was never trained, through the global path applied to the region: the box is cropped from the original image,
  resized, and sent through the vision tower and `visual_projection` (`"global_on_crops"`). See
  [`roi_branch_status`] for how "never trained" is decided.
- Texts are tokenised at `max_length`; how many reports, region captions and negatives were longer (and so cut)
  is counted.
"""

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.captions import distinct_captions
from ..data.collator import MedRegionCollator, region_passes

REGION_PATHS = ("roi_processor", "global_on_crops")
TRAINING_CONFIG = "training_config.yaml"  # what the trainer saves beside a model folder
# The loss terms computed on the ROI processor's output: a stage that weights one of them trains the processor.
# They are the terms the training registry marks `trains_roi_processor` (tests/test_losses.py holds the two equal);
# evaluation reads training configs as plain YAML and does not import the training package.
REGION_TERMS = ("fused_global_loss", "roi_loss", "neg_loss", "class_loss")
CAPTION_FIELDS = (
    "region_input_ids",
    "region_attention_mask",
    "term_input_ids",
    "term_attention_mask",
    "negative_input_ids",
    "negative_attention_mask",
)


@dataclass
class SplitFeatures:
    """Normalised embeddings of one split: images (box-free and with ground-truth boxes), reports, and every
    region with its caption, hard negatives and box."""

    box_free: dict[str, torch.Tensor]
    gt_boxes: dict[str, torch.Tensor]
    report_embeds: torch.Tensor
    reports: list[str]
    labels: list
    region_embeds: torch.Tensor
    region_text_embeds: torch.Tensor
    region_captions: list[str]
    region_negatives: list[list[str]]
    negative_text_embeds: torch.Tensor
    negative_mask: torch.Tensor
    region_image: torch.Tensor  # (N,) index of the image each region belongs to, non-decreasing
    region_boxes: torch.Tensor  # (N, 4) x0, y0, x1, y1 as fractions of the image
    region_path: str = "roi_processor"
    max_length: int = 0
    truncated: dict[str, int] = field(default_factory=dict)
    num_texts: dict[str, int] = field(default_factory=dict)


def roi_branch_status(model, training_config: dict | None) -> tuple[bool, str]:
    """Whether the model's ROI branch was trained, and why that was decided.

    With the `training_config.yaml` the trainer saves beside the model, the branch is trained when some stage
    weights above 0 a loss term computed on the ROI processor's output (`REGION_TERMS`) and does not freeze
    `roi_processor`.
    Without it, the gate decides: it is initialised to exactly 0 and any update through the region-aware
    embedding moves it, so a gate of exactly 0 means untrained. (The gate alone is not enough when the config
    exists: the region losses train the ROI processor's region features without touching the gate.) The file is
    read as plain YAML, as the model card reads it: evaluation does not depend on the training package.
    """
    if training_config is not None:
        for index, stage in enumerate(training_config.get("stages") or []):
            if not isinstance(stage, dict) or not isinstance(stage.get("loss_weights"), dict):
                raise ValueError(f"{TRAINING_CONFIG}: stage {index} has no loss_weights mapping")
            weights, frozen = stage["loss_weights"], stage.get("frozen") or []
            if any((weights.get(term) or 0) > 0 for term in REGION_TERMS) and "roi_processor" not in frozen:
                return True, f"stage {stage.get('name')!r} trained it on regions"
        return False, f"{TRAINING_CONFIG}: no stage trained the ROI processor on regions"
    gate = float(model.roi_processor.gate.detach().float().cpu())
    if gate == 0.0:
        return False, f"no {TRAINING_CONFIG} and the ROI gate is exactly 0 (its initial value)"
    return True, f"no {TRAINING_CONFIG}; the ROI gate is {gate:.4g}, moved from its initial 0"


def tokenizer_limit(processor, model) -> int:
    """The longest text the model can read: the tokenizer's `model_max_length`, or, when that is unset (a huge
    sentinel), the text tower's position table."""
    limit = getattr(processor.tokenizer, "model_max_length", None)
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is None or limit > 1_000_000:
        if positions is None:
            raise ValueError(
                "neither the tokenizer nor the text config states a token limit; pass max_length"
            )
        return int(positions)
    return int(min(limit, positions)) if positions else int(limit)


def model_inputs(inputs, model) -> dict[str, torch.Tensor]:
    """Tensors on the model's device, floating ones in its dtype (the processor returns float32); copied without
    waiting where they come from pinned memory."""
    parameter = next(model.parameters())
    return {
        key: value.to(
            parameter.device, parameter.dtype if value.is_floating_point() else None, non_blocking=True
        )
        for key, value in inputs.items()
    }


@torch.no_grad()
def batched_embeddings(
    encode, inputs: list, batch_size: int, desc: str, progress: bool = False
) -> torch.Tensor:
    """Normalised float32 embeddings of `inputs` on the CPU: `encode` applied `batch_size` inputs at a time."""
    parts = []
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, leave=False, disable=not progress):
        parts.append(
            torch.nn.functional.normalize(encode(inputs[start : start + batch_size]).float(), dim=-1)
        )
    return torch.cat(parts).cpu()


def text_embeddings(
    model,
    processor,
    texts: list[str],
    max_length: int | None = None,
    batch_size: int = 64,
    desc: str = "texts",
    progress: bool = False,
) -> torch.Tensor:
    """Normalised float32 embeddings `(N, P)` of `texts` on the CPU, `batch_size` at a time, each text cut at
    `max_length` tokens (by default the tokenizer's limit)."""
    if not texts:
        return torch.zeros(0, model.config.projection_dim)
    device = next(model.parameters()).device

    def encode(batch: list[str]) -> torch.Tensor:
        inputs = processor(text=batch, max_length=max_length, return_tensors="pt")
        return model.get_text_features(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
        ).pooler_output

    return batched_embeddings(encode, texts, batch_size, desc, progress)


def caption_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised float32 embeddings `(N, P)` of `(N, L)` tokenised captions (N may be 0); region captions and
    hard negatives repeat heavily, so each distinct caption goes through the text tower once."""
    if input_ids.shape[0] == 0:
        return torch.zeros(0, model.config.projection_dim, device=input_ids.device)
    first, inverse = distinct_captions(input_ids, attention_mask)
    encoded = model.get_text_features(input_ids=input_ids[first], attention_mask=attention_mask[first])
    return torch.nn.functional.normalize(encoded.pooler_output.float(), dim=-1)[inverse]


def _crop_processor(processor):
    """A copy of `processor` whose image processor also returns the ROI crops."""
    processor = copy.copy(processor)
    processor.image_processor = copy.deepcopy(processor.image_processor)
    processor.image_processor.roi_mode = "crop"
    return processor


def _count_longer(tokenizer, texts: list[str], max_length: int) -> int:
    if not texts:
        return 0
    lengths = tokenizer(texts, truncation=False, return_attention_mask=False)["input_ids"]
    return sum(len(ids) > max_length for ids in lengths)


class FeatureBatches(torch.utils.data.Dataset):
    """Item `b`: the `b`-th batch of `batch_size` rows, collated pass by pass ([`region_passes`]: each pass holds
    at most `max_regions` regions of each row, so every region is embedded). An item is `start` (the first row),
    `reports` and `labels` of its rows, and per pass its `members` (row offsets), the `chosen` regions of each
    member in slot order, and the collated `batch`. A `DataLoader` runs it in worker processes, so decoding and
    preprocessing overlap the model's forwards."""

    def __init__(self, rows, collator: MedRegionCollator, batch_size: int, crops_on_the_side: bool):
        self.rows, self.collator, self.batch_size = rows, collator, batch_size
        self.crops_on_the_side = crops_on_the_side

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, index: int) -> dict:
        start = index * self.batch_size
        batch_rows = [self.rows[i] for i in range(start, min(start + self.batch_size, len(self.rows)))]
        slots = self.collator.processor.image_processor.max_regions
        passes = [region_passes(row, slots) for row in batch_rows]
        collated = []
        for number in range(max(len(row_passes) for row_passes in passes)):
            members = [i for i, row_passes in enumerate(passes) if len(row_passes) > number]
            pass_rows = [passes[i][number] for i in members]
            batch = self.collator(pass_rows)
            for unused in ("summary_input_ids", "summary_attention_mask", "labels"):
                batch.pop(unused, None)
            crops = batch.pop("roi_pixel_values", None) if self.crops_on_the_side else None
            if number > 0:  # later passes only add regions; the reports are in already
                batch.pop("input_ids", None), batch.pop("attention_mask", None)
            chosen = [row.get("regions") or [] for row in pass_rows]
            collated.append({"members": members, "chosen": chosen, "batch": batch, "crops": crops})
        return {
            "start": start,
            "reports": [row["detailed_report"] for row in batch_rows],
            "labels": [row["label"] for row in batch_rows],
            "passes": collated,
        }


@torch.no_grad()
def extract_features(
    model,
    processor,
    rows,
    batch_size: int = 32,
    max_length: int | None = None,
    max_negatives: int | None = None,
    region_path: str = "roi_processor",
    self_proposed: int = 0,
    progress: bool = True,
    num_workers: int = 0,
) -> SplitFeatures:
    """Run `model` over `rows` (a `Dataset` or a list) on the device its parameters are on; every region of every
    row is embedded (see the module's decisions). With `self_proposed = K > 0`, `box_free` also holds
    `self-proposed`: the region-aware embedding of the image alone with K regions from the model's own proposer
    (what `get_image_features` returns for `auto_regions=K`). Batches are collated by a `DataLoader` with
    `num_workers` worker processes (0: in this process), into pinned memory for a CUDA model. The model runs in
    eval mode and is put back in the mode it was in."""
    if region_path not in REGION_PATHS:
        raise ValueError(f"region_path must be one of {REGION_PATHS}, got {region_path!r}")
    if len(rows) == 0:
        raise ValueError("there are no rows to evaluate: the split is empty")
    max_length = max_length or tokenizer_limit(processor, model)
    was_training = model.training
    model.eval()
    crops = region_path == "global_on_crops"
    collator = MedRegionCollator(
        _crop_processor(processor) if crops else processor, max_length=max_length, max_negatives=max_negatives
    )
    loader = torch.utils.data.DataLoader(
        FeatureBatches(
            rows, collator, batch_size, crops_on_the_side=crops and model.config.roi_mode != "crop"
        ),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=next(model.parameters()).device.type == "cuda",
    )
    parts: dict[str, list] = defaultdict(list)
    for item in tqdm(loader, desc="features", leave=False, disable=not progress):
        start = item["start"]
        for number, collated in enumerate(item["passes"]):
            batch, members, chosen = collated["batch"], collated["members"], collated["chosen"]
            roi_crops = batch.get("roi_pixel_values") if collated["crops"] is None else collated["crops"]
            inputs = model_inputs(batch, model)
            captions = {name: inputs.pop(name) for name in CAPTION_FIELDS if name in inputs}
            outputs = model(**inputs)
            if number == 0:
                parts["global"].append(outputs.global_image_embeds.float().cpu())
                if self_proposed > 0:
                    parts["self-proposed"].append(_self_proposed(model, batch["pixel_values"], self_proposed))
                parts["region-aware"].append(outputs.image_embeds.float().cpu())
                parts["report_embeds"].append(outputs.text_embeds.float().cpu())
                parts["reports"].extend(item["reports"])
                parts["labels"].extend(item["labels"])
            if outputs.region_embeds is None:
                continue
            mask = outputs.region_mask
            if crops:
                # The collator's crops are flat: those of the real ROIs, in `region_mask` order.
                pixels = model_inputs({"crops": roi_crops}, model)["crops"]
                embeds = model.get_image_features(pixel_values=pixels).pooler_output
                parts["region_embeds"].append(torch.nn.functional.normalize(embeds.float(), dim=-1).cpu())
            else:
                parts["region_embeds"].append(outputs.region_embeds[mask].float().cpu())
            region_ids, region_mask = (
                captions["region_input_ids"][mask],
                captions["region_attention_mask"][mask],
            )
            parts["region_text_embeds"].append(caption_embeddings(model, region_ids, region_mask).cpu())
            negative_ids = captions["negative_input_ids"][mask]
            negative_mask = captions["negative_attention_mask"][mask]
            present = negative_mask.sum(-1) > 0  # (N, M): real negatives of real ROIs
            negatives = torch.zeros((*present.shape, model.config.projection_dim))
            negatives[present.cpu()] = caption_embeddings(
                model, negative_ids[present], negative_mask[present]
            ).cpu()
            parts["negative_text_embeds"].append(negatives)
            parts["negative_mask"].append(present.cpu())
            parts["region_image"].append(torch.tensor(members)[mask.nonzero()[:, 0].cpu()] + start)
            parts["region_boxes"].append(batch["roi_boxes"][mask.cpu()].float())
            for image_regions in chosen:
                parts["region_captions"].extend(region["caption"] for region in image_regions)
                parts["region_negatives"].extend(
                    list(region["negatives"] or [])[:max_negatives] for region in image_regions
                )
    model.train(was_training)
    tokenizer = processor.tokenizer
    negatives_flat = [text for per_region in parts["region_negatives"] for text in per_region]
    truncated = {
        "reports": _count_longer(tokenizer, parts["reports"], max_length),
        "region_captions": _count_longer(tokenizer, parts["region_captions"], max_length),
        "negatives": _count_longer(tokenizer, negatives_flat, max_length),
    }
    num_texts = {
        "reports": len(parts["reports"]),
        "region_captions": len(parts["region_captions"]),
        "negatives": len(negatives_flat),
    }
    return _assemble(parts, region_path, max_length, truncated, num_texts)


def _self_proposed(model, pixel_values: torch.Tensor, regions: int) -> torch.Tensor:
    """Normalised box-free region-aware embeddings `(B, P)` with `regions` self-proposed regions per image."""
    pixels = model_inputs({"pixel_values": pixel_values}, model)["pixel_values"]
    embeds = model.get_image_features(pixel_values=pixels, auto_regions=regions).pooler_output
    return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()


def _assemble(
    parts: dict, region_path: str, max_length: int, truncated: dict, num_texts: dict
) -> SplitFeatures:
    """Concatenate the batches and order the regions image by image (each image's passes in slot order)."""
    dim = parts["global"][0].shape[-1]
    width = max((n.shape[1] for n in parts["negative_text_embeds"]), default=0)
    negatives = [
        torch.nn.functional.pad(n, (0, 0, 0, width - n.shape[1])) for n in parts["negative_text_embeds"]
    ]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in parts["negative_mask"]]

    def cat(tensors: list, empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors) if tensors else empty

    region_image = cat(parts["region_image"], torch.zeros(0, dtype=torch.long))
    order = torch.sort(region_image, stable=True).indices
    return SplitFeatures(
        box_free={
            "global": torch.cat(parts["global"]),
            **({"self-proposed": torch.cat(parts["self-proposed"])} if parts.get("self-proposed") else {}),
        },
        gt_boxes={"region-aware": torch.cat(parts["region-aware"])},
        report_embeds=torch.cat(parts["report_embeds"]),
        reports=parts["reports"],
        labels=parts["labels"],
        region_embeds=cat(parts["region_embeds"], torch.zeros(0, dim))[order],
        region_text_embeds=cat(parts["region_text_embeds"], torch.zeros(0, dim))[order],
        region_captions=[parts["region_captions"][i] for i in order.tolist()],
        region_negatives=[parts["region_negatives"][i] for i in order.tolist()],
        negative_text_embeds=cat(negatives, torch.zeros(0, 0, dim))[order],
        negative_mask=cat(masks, torch.zeros(0, 0, dtype=torch.bool))[order],
        region_image=region_image[order],
        region_boxes=cat(parts["region_boxes"], torch.zeros(0, 4))[order],
        region_path=region_path,
        max_length=max_length,
        truncated=truncated,
        num_texts=num_texts,
    )


def read_training_config(model_path: str | Path) -> dict | None:
    """The `training_config.yaml` saved beside a model folder, or None (a Hub id, or a model from elsewhere)."""
    import yaml

    path = Path(model_path) / TRAINING_CONFIG
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
