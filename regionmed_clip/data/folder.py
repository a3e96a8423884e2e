"""Hub-style dataset folders: `data/<split>-XXXXX-of-YYYYY.parquet` shards plus a `README.md` dataset card.

Rows are written in batches as they come, so a corpus of any size is converted with flat memory; the card's YAML
carries `configs` (the file patterns per split), `dataset_info` (schema and counts), so `datasets.load_dataset(dir)`
and the Hub read the folder as it is.
"""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import DatasetInfo, Features, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict

from .schema import FEATURES

DEFAULT_CONFIG = "default"


class ShardedParquetWriter:
    """Writes rows of one config into per-split parquet shards of at most `rows_per_shard` rows.

    Rows may arrive in any split order (`add`); each split keeps its own open shard, and `close` gives the shards
    their final `<split>-XXXXX-of-YYYYY.parquet` names and returns the row count per split.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        features: Features = FEATURES,
        directory: str = "data",
        rows_per_shard: int = 1000,
        rows_per_group: int = 100,
    ):
        self.directory = Path(out_dir) / directory
        self.features = features
        self.rows_per_shard = rows_per_shard
        self.rows_per_group = rows_per_group
        self.counts: dict[str, int] = {}
        self._shards: dict[str, list[Path]] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._batches: dict[str, list[dict]] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.parquet"):
            stale.unlink()

    def _flush(self, split: str):
        if self._batches.get(split):
            table = pa.Table.from_pylist(self._batches[split], schema=self.features.arrow_schema)
            self._writers[split].write_table(table)
            self._batches[split] = []

    def _close_shard(self, split: str):
        self._flush(split)
        self._writers.pop(split).close()

    def add(self, split: str, row: dict):
        count = self.counts.get(split, 0)
        if count % self.rows_per_shard == 0:
            if split in self._writers:
                self._close_shard(split)
            shards = self._shards.setdefault(split, [])
            shards.append(self.directory / f".{split}-{len(shards):05d}.parquet.partial")
            self._writers[split] = pq.ParquetWriter(shards[-1], self.features.arrow_schema)
        self._batches.setdefault(split, []).append(self.features.encode_example(row))
        self.counts[split] = count + 1
        if len(self._batches[split]) == self.rows_per_group:
            self._flush(split)

    def abort(self):
        """Drop everything written so far (the import failed): no half-written folder is left behind."""
        for writer in self._writers.values():
            writer.close()
        for shards in self._shards.values():
            for partial in shards:
                partial.unlink(missing_ok=True)
        self._writers.clear()
        self._shards.clear()

    def close(self) -> dict[str, int]:
        for split in list(self._writers):
            self._close_shard(split)
        for split, shards in self._shards.items():
            for index, partial in enumerate(shards):
                partial.rename(self.directory / f"{split}-{index:05d}-of-{len(shards):05d}.parquet")
        return dict(self.counts)


def write_dataset_card(
    out_dir: str | os.PathLike,
    configs: dict[str, tuple[str, Features, dict[str, int]]],
    pretty_name: str,
    description: str,
    tags: tuple[str, ...] = ("medical", "region-of-interest", "clip"),
    license: str = "other",
    task_categories: tuple[str, ...] = ("zero-shot-image-classification", "image-to-text"),
    metadata: dict | None = None,
) -> Path:
    """Write `README.md` with YAML metadata for `configs` ({name: (directory, features, {split: count})});
    `metadata` adds keys of the data's own (e.g. `hard_negatives`: the negative strategy and what it made)."""
    card_metadata = {
        "pretty_name": pretty_name,
        "license": license,
        "task_categories": list(task_categories),
        "tags": list(tags),
        **(metadata or {}),
        "configs": [],
    }
    infos = DatasetInfosDict()
    for name, (directory, features, counts) in configs.items():
        splits = [split for split in counts if counts[split] > 0]
        entry = {
            "config_name": name,
            "data_files": [{"split": split, "path": f"{directory}/{split}-*.parquet"} for split in splits],
        }
        if name == DEFAULT_CONFIG:
            entry["default"] = True
        card_metadata["configs"].append(entry)
        infos[name] = DatasetInfo(
            features=features,
            config_name=name,
            splits=SplitDict({split: SplitInfo(split, num_examples=counts[split]) for split in splits}),
        )
    # `datasets` writes its own `dataset_info` (one mapping for a single config, else a list by config name).
    infos.to_dataset_card_data(card_metadata)
    written = card_metadata["dataset_info"]
    schemas = {
        info.get("config_name", DEFAULT_CONFIG): info["features"]
        for info in (written if isinstance(written, list) else [written])
    }
    body = [f"# {pretty_name}", "", description.strip(), ""]
    for name, (_, _, counts) in configs.items():
        body += [f"## Config `{name}`", "", "| split | rows |", "|---|---|"]
        body += [f"| {split} | {counts[split]} |" for split in counts if counts[split] > 0]
        body += ["", "Schema:", "", "```yaml", yaml.safe_dump(schemas[name], sort_keys=False), "```", ""]
    body += [
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        'rows = load_dataset("path/or/hub-id", split="train")',
        "```",
        "",
    ]
    card = "---\n" + yaml.safe_dump(card_metadata, sort_keys=False) + "---\n\n" + "\n".join(body)
    path = Path(out_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
