"""Batches of MedRegion rows → model inputs, from in-memory or streaming datasets.

The collator runs in DataLoader workers: it holds only the processor (which pickles) and decodes each image from the
row itself, so it works the same with `num_workers > 0`, with a map-style `Dataset`, and with
`load_dataset(..., streaming=True)`, where rows are read shard by shard and never all held in memory.
"""

import os
from pathlib import Path

import torch
from datasets import load_dataset

from .folder import card_front_matter
from .schema import SPLITS, InvalidRowsError, ValidationReport, validate_rows


def image_input(image):
    """A row's image as the image processor takes it: PIL as is; encoded `{"bytes", "path"}` as bytes or a path."""
    if isinstance(image, dict):
        return image.get("bytes") or image["path"]
    return image


class MedRegionCollator:
    r"""
    Turns a list of MedRegion rows into one batch for [`RegionMedCLIPModel`]: `pixel_values`; the detailed report
    as `input_ids` / `attention_mask`; the summary caption as `summary_input_ids` / `summary_attention_mask`; and,
    when any row of the batch has regions, `roi_boxes`, `roi_mask`, `roi_pixel_values` (crop mode), region captions
    and hard negatives as the processor returns them.

    An image with more regions than the processor's `max_regions` keeps its highest-scoring ones; how many were
    dropped is counted in `dropped_regions`.

    Args:
        processor ([`RegionMedCLIPProcessor`]): Tokenizer and image processor.
        max_length (`int`, *optional*): Token limit for every text (default: the tokenizer's).
        max_negatives (`int`, *optional*): Keep at most this many hard negatives per region.
        with_regions (`bool`, defaults to `True`): Set `False` for global-only batches (no ROI inputs at all).
        class_prompts (`list[str]`, *optional*): For classification: the text side of every batch is these
            prompts (one per class) instead of the reports, and `labels` holds each row's class index.
        label_index (`dict[str, int]`, *optional*): Class index of each label (with `class_prompts`).
        label_column (`str`, defaults to `"label"`): The row field holding the label.
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
    ):
        if (class_prompts is None) != (label_index is None):
            raise ValueError("class_prompts and label_index go together")
        self.processor = processor
        self.max_length = max_length
        self.max_negatives = max_negatives
        self.with_regions = with_regions
        self.class_prompts = class_prompts
        self.label_index = label_index
        self.label_column = label_column
        self.dropped_regions = 0

    def kept_regions(self, row: dict) -> list[dict]:
        """The regions of `row` that go into a batch, in batch order: all, or the `max_regions` best-scoring."""
        regions = list(row.get("regions") or [])
        limit = self.processor.image_processor.max_regions
        if len(regions) > limit:
            regions = sorted(regions, key=lambda region: -(region.get("score") or 0.0))[:limit]
        return regions

    def _regions(self, row: dict) -> list[dict]:
        self.dropped_regions += max(
            0, len(row.get("regions") or []) - self.processor.image_processor.max_regions
        )
        return self.kept_regions(row)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        text_kwargs = {"padding": True, "truncation": True, "max_length": self.max_length}
        regions = [self._regions(row) for row in rows] if self.with_regions else [[] for _ in rows]
        region_inputs = {}
        if any(regions):
            region_inputs = {
                "boxes": [[region["bbox"] for region in image_regions] for image_regions in regions],
                "region_text": [[region["caption"] for region in image_regions] for image_regions in regions],
                "negative_text": [
                    [list(region["negatives"] or [])[: self.max_negatives] for region in image_regions]
                    for image_regions in regions
                ],
            }
        texts = self.class_prompts or [row["detailed_report"] for row in rows]
        batch = self.processor(
            text=texts,
            images=[image_input(row["image"]) for row in rows],
            summary_text=[row["summary_caption"] for row in rows],
            return_tensors="pt",
            **region_inputs,
            **text_kwargs,
        )
        batch = dict(batch)
        if self.label_index is not None:
            batch["labels"] = torch.tensor([self._label(row) for row in rows])
        return batch

    def _label(self, row: dict) -> int:
        label = row.get(self.label_column)
        if label not in self.label_index:
            raise ValueError(
                f"row {row.get('id')!r}: label {label!r} is not one of the classes {sorted(self.label_index)}"
            )
        return self.label_index[label]


def _local_data_files(folder: Path, config: str, split: str) -> str:
    """The parquet pattern of `split` of `config` in a local dataset folder, from its card's `configs` YAML."""
    card = folder / "README.md"
    directory = "data" if config == "default" else config
    metadata = (card_front_matter(card) if card.is_file() else None) or {}
    for entry in metadata.get("configs", []):
        if entry.get("config_name") == config:
            for files in entry.get("data_files", []):
                if files.get("split") == split:
                    return str(folder / files["path"])
    return str(folder / directory / f"{split}-*.parquet")


def load_rows(
    path: str | os.PathLike, split: str = "train", streaming: bool = False, config: str = "default"
):
    """A split of a dataset folder (or Hub id): a `Dataset`, or with `streaming=True` an `IterableDataset` that
    reads parquet shards lazily.

    A local folder is read through the parquet builder with explicit data files: `datasets` 5.2 keys its cache
    for a folder loaded by path on the file patterns only, so a folder regenerated in place would come back stale
    from `load_dataset(folder)`; explicit files are keyed on their modification times. The schema comes from the
    parquet files' own metadata.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(path)
    if folder.is_dir():
        files = _local_data_files(folder, config, split)
        return load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming)
    return load_dataset(str(path), config, split=split, streaming=streaming)


def validate_folder(path: str | os.PathLike, split: tuple[str, ...] = ()) -> dict:
    """Check every row of a dataset folder (or Hub id), streaming it split by split.

    Args:
        path: Dataset folder or Hub id.
        split: The splits to check; with none given, every split present.

    Returns `{split: ValidationReport}`; a split with invalid rows has them listed in its report.
    """
    from datasets import get_dataset_split_names

    reports = {}
    for name in split or get_dataset_split_names(str(path)):
        reports[name] = ValidationReport()
        try:
            for _ in validate_rows(load_rows(path, name, streaming=True), report=reports[name]):
                pass
        except InvalidRowsError:
            pass  # the report holds the invalid rows, which the caller lists
    return reports


def make_dataloader(
    rows,
    collator: MedRegionCollator,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a `Dataset` or a streaming `IterableDataset` (shuffled through a buffer when streaming)."""
    from datasets import IterableDataset

    if isinstance(rows, IterableDataset):
        if shuffle:
            rows = rows.shuffle(seed=seed, buffer_size=shuffle_buffer)
        return torch.utils.data.DataLoader(
            rows, batch_size=batch_size, collate_fn=collator, num_workers=num_workers, drop_last=drop_last
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collator,
        num_workers=num_workers,
        drop_last=drop_last,
    )
