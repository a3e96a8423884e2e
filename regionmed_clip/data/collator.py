"""Batches of MedRegion rows → model inputs, from in-memory or streaming datasets.

The collator runs in DataLoader workers: it holds only the processor (which pickles) and decodes each image from the
row itself, so it works the same with `num_workers > 0`, with a map-style `Dataset`, and with
`load_dataset(..., streaming=True)`, where rows are read shard by shard and never all held in memory.
"""

import logging
import math
import random
from collections.abc import Collection

import torch

logger = logging.getLogger(__name__)
REGION_SAMPLING = ("top", "cycle")


def image_input(image):
    """A row's image as the image processor takes it: PIL as is; encoded `{"bytes", "path"}` as bytes or a path."""
    if isinstance(image, dict):
        return image.get("bytes") or image["path"]
    return image


def _weighted_order(scores: list[float], rng: random.Random) -> list[int]:
    """A random order of indices drawn without replacement with probability ∝ score (Efraimidis–Spirakis keys
    u^(1/w)); scores ≤ 0 come last, in random order."""
    keys = []
    for score in scores:
        u = rng.random()
        keys.append((1, u ** (1.0 / score)) if score > 0 else (0, u))
    return sorted(range(len(scores)), key=lambda index: keys[index], reverse=True)


def visit_region_indices(scores: list[float], limit: int, visit: int, key: str) -> list[int]:
    """Which regions (indices) of a row a training visit draws: `limit` of them, cycling through seeded
    permutations.

    The row's visits are grouped into cycles of `ceil(n / limit)` visits. Cycle `c` draws a permutation of the
    regions weighted by score (seeded by `key` and `c` only, never by global RNG state) and its visits take the
    consecutive slices of `limit`; the last slice of a cycle is filled up with the permutation's first regions. So
    within every cycle each region is drawn at least once, higher scores earlier, and the same (key, visit) always
    draws the same regions, which makes a resumed run draw what the uninterrupted one would.
    """
    count = len(scores)
    if count <= limit:
        return list(range(count))
    visits_per_cycle = math.ceil(count / limit)
    cycle, step = divmod(visit, visits_per_cycle)
    order = _weighted_order(scores, random.Random(f"{key}|{cycle}"))
    chosen = order[step * limit : (step + 1) * limit]
    return chosen + [index for index in order if index not in chosen][: limit - len(chosen)]


def region_passes(row: dict, max_regions: int) -> list[dict]:
    """Copies of `row` whose regions together are all of the row's, at most `max_regions` each, best score first:
    for scoring every region of a split (a collator in `"top"` mode keeps all regions of each pass). A row without
    regions gives itself."""
    regions = sorted(row.get("regions") or [], key=lambda region: -(region.get("score") or 0.0))
    if not regions:
        return [row]
    return [
        {**row, "regions": regions[start : start + max_regions]}
        for start in range(0, len(regions), max_regions)
    ]


#: The row field a loader spanning several epochs adds to each row: the epoch it is drawn for, so loader workers
#: that live across epochs collate each batch with its own epoch, with no state shared between processes.
EPOCH_FIELD = "_epoch"


class MedRegionCollator:
    r"""
    Turns a list of MedRegion rows into one batch for [`RegionMedCLIPModel`]: `pixel_values`; the detailed report
    as `input_ids` / `attention_mask`; the summary caption as `summary_input_ids` / `summary_attention_mask`; and,
    with `with_regions`, `roi_boxes`, `roi_mask`, region captions and hard negatives as the processor returns them,
    and in crop mode `roi_pixel_values` flat, `(real ROIs, 3, H, W)`: the real ROIs' crops in `roi_mask` order
    (the model takes both layouts; padded slots carry no zero image here). A batch in which no row has regions
    ("No Finding" rows) gets the same fields with zero ROI slots, so that every batch of a stage has the same
    fields: distributed training gathers region embeddings field by field, and a process whose batch lacked them
    would leave the others waiting.

    Which regions of an image with more than the processor's `max_regions` go into the batch depends on
    `region_sampling`:

    - `"top"` (the default; deterministic, for evaluation and inference): the `max_regions` highest-scoring. The
      rest are truncated: counted in `dropped_regions` and reported in a warning, never silently. To score every
      region, collate the passes of `region_passes(row, max_regions)` instead of the row (each pass holds at most
      `max_regions` regions, so nothing is truncated).
    - `"cycle"` (training): `max_regions` regions drawn afresh at each visit of the row, weighted by `score` and
      cycling through seeded permutations (`visit_region_indices`), keyed by `seed`, the `stage`, the row's `id`
      and the visit, which is the `epoch` set before each epoch's loader (`set_epoch`): each epoch visits each row
      once. "Every region over an epoch" means: a row with `n` regions is visited in cycles of
      `V = ceil(n / max_regions)` epochs (epochs 0…V−1, V…2V−1, …), and within each cycle every one of its regions
      is drawn at least once (exactly once when `max_regions` divides `n`); a resumed run draws exactly what an
      uninterrupted one would (no global RNG state is used). Nothing is dropped, so nothing is counted.

    Args:
        processor ([`RegionMedCLIPProcessor`]): Tokenizer and image processor.
        max_length (`int`, *optional*): Token limit for every text (default: the tokenizer's).
        max_negatives (`int`, *optional*): Keep at most this many hard negatives per region.
        with_regions (`bool`, defaults to `True`): Set `False` for global-only batches (no ROI inputs at all).
        class_prompts (`list[str]`, *optional*): For classification: the text side of every batch is these
            prompts (one per class) instead of the reports, and `labels` holds each row's class index.
        label_index (`dict[str, int]`, *optional*): Class index of each label (with `class_prompts`).
        label_column (`str`, defaults to `"label"`): The row field holding the label.
        region_sampling (`str`, defaults to `"top"`): `"top"` or `"cycle"` (see above).
        seed (`int`, defaults to 0): Seed of the `"cycle"` sampling.
        stage (`int`, defaults to 0): Training stage index, part of the `"cycle"` sampling key.
        fields (`Collection[str]`, *optional*): The batch fields to build (default: all). A training stage passes
            the inputs of its loss terms, so summaries, region captions and negatives a stage does not use are
            neither built nor tokenised; the fields it does build are the same as without `fields` (each text
            field is tokenised and padded on its own).
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        max_negatives: int | None = None,
        with_regions=True,
        class_prompts: list[str] | None = None,
        label_index: dict[str, int] | None = None,
        label_column: str = "label",
        region_sampling: str = "top",
        seed: int = 0,
        stage: int = 0,
        fields: Collection[str] | None = None,
    ):
        if (class_prompts is None) != (label_index is None):
            raise ValueError("class_prompts and label_index go together")
        if region_sampling not in REGION_SAMPLING:
            raise ValueError(f"region_sampling must be one of {REGION_SAMPLING}, got {region_sampling!r}")
        self.region_sampling = region_sampling
        self.seed = seed
        self.stage = stage
        self.epoch = 0
        self.processor = processor
        self.max_length = max_length
        self.max_negatives = max_negatives
        self.with_regions = with_regions
        self.class_prompts = class_prompts
        self.label_index = label_index
        self.label_column = label_column
        self.dropped_regions = 0
        self.fields = None if fields is None else frozenset(fields)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose visits the next batches are (`"cycle"` sampling); set before building its loader, which
        copies the collator into its workers. Rows that carry their own epoch (`EPOCH_FIELD`, set by a loader that
        spans epochs) override it."""
        self.epoch = epoch

    def kept_regions(self, row: dict) -> list[dict]:
        """The regions of `row` that go into a batch, in batch order: all of them when they fit, else the
        `max_regions` best-scoring (`"top"`) or this epoch's draw (`"cycle"`)."""
        regions = list(row.get("regions") or [])
        limit = self.processor.image_processor.max_regions
        if len(regions) <= limit:
            return regions
        if self.region_sampling == "top":
            return sorted(regions, key=lambda region: -(region.get("score") or 0.0))[:limit]
        scores = [float(region.get("score") or 0.0) for region in regions]
        key = f"{self.seed}|{self.stage}|{row.get('id')}"
        return [regions[index] for index in visit_region_indices(scores, limit, self.epoch, key)]

    def _regions(self, row: dict) -> list[dict]:
        kept = self.kept_regions(row)
        if self.region_sampling == "top" and len(kept) < len(row.get("regions") or []):
            dropped = len(row["regions"]) - len(kept)
            if not self.dropped_regions:
                logger.warning(
                    f"row {row.get('id')!r} has {len(row['regions'])} regions, more than max_regions "
                    f"{len(kept)}: keeping the best-scoring; truncated regions are counted in dropped_regions "
                    "(collate region_passes(row, max_regions) to use them all)"
                )
            self.dropped_regions += dropped
        return kept

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        epochs = {row[EPOCH_FIELD] for row in rows if EPOCH_FIELD in row}
        if len(epochs) > 1:
            raise ValueError(f"one batch holds rows of several epochs {sorted(epochs)}")
        if epochs:
            self.epoch = epochs.pop()
        text_kwargs = {"padding": True, "truncation": True, "max_length": self.max_length}
        regions = [self._regions(row) for row in rows] if self.with_regions else [[] for _ in rows]
        inputs = {}
        if self.with_regions:
            inputs["boxes"] = [[region["bbox"] for region in image_regions] for image_regions in regions]
            if self._builds("region_input_ids"):
                inputs["region_text"] = [
                    [region["caption"] for region in image_regions] for image_regions in regions
                ]
            if self._builds("term_input_ids"):
                # A region without a term (an anatomy or detection dataset names its regions by their caption)
                # is asked for by its caption.
                inputs["term_text"] = [
                    [region.get("term") or region["caption"] for region in image_regions]
                    for image_regions in regions
                ]
            if self._builds("negative_input_ids"):
                inputs["negative_text"] = [
                    [list(region["negatives"] or [])[: self.max_negatives] for region in image_regions]
                    for image_regions in regions
                ]
            if not any(regions):
                inputs["max_regions"] = 0
        if self._builds("summary_input_ids"):
            inputs["summary_text"] = [row["summary_caption"] for row in rows]
        texts = self.class_prompts or [row["detailed_report"] for row in rows]
        batch = self.processor(
            text=texts if self._builds("input_ids") else None,
            images=[image_input(row["image"]) for row in rows],
            return_tensors="pt",
            **inputs,
            **text_kwargs,
        )
        batch = dict(batch)
        if "roi_pixel_values" in batch:
            # Flat: only the real ROIs' crops travel on (to the main process, pinned memory and the device), not
            # a zero image for every padded slot; `roi_mask` says whose each is.
            batch["roi_pixel_values"] = batch["roi_pixel_values"][batch["roi_mask"].bool()]
        if self.label_index is not None:
            batch["labels"] = torch.tensor([self._label(row) for row in rows])
        return batch

    def _builds(self, field: str) -> bool:
        return self.fields is None or field in self.fields

    def _label(self, row: dict) -> int:
        label = row.get(self.label_column)
        if label not in self.label_index:
            raise ValueError(
                f"row {row.get('id')!r}: label {label!r} is not one of the classes {sorted(self.label_index)}"
            )
        return self.label_index[label]
