"""Hub-style dataset folders: `data/<split>-XXXXX-of-YYYYY.parquet` shards plus a `README.md` dataset card, written
(`ShardedParquetWriter`, `write_dataset_card`), read (`load_rows`, `shuffled_stream`) and checked
(`validate_folder`).

Rows are written in batches as they come, so a corpus of any size is converted with flat memory; the card's YAML
carries `configs` (the file patterns per split), `dataset_info` (schema and counts), so `datasets.load_dataset(dir)`
and the Hub read the folder as it is.
"""

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import DatasetInfo, Features, SplitDict, SplitInfo, load_dataset
from datasets.info import DatasetInfosDict
from huggingface_hub import metadata_load

from .schema import FEATURES, SPLITS, InvalidRowsError, ValidationReport, validate_rows

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


def local_data_files(folder: Path, config: str, split: str) -> str:
    """The parquet pattern of `split` of `config` in a local dataset folder, from its card's `configs` YAML."""
    card = folder / "README.md"
    directory = "data" if config == "default" else config
    metadata = (metadata_load(card) if card.is_file() else None) or {}
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
        files = local_data_files(folder, config, split)
        return load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming)
    return load_dataset(str(path), config, split=split, streaming=streaming)


@dataclass
class FolderCheck:
    """Which dataset folder `validate_folder` checks, and which of its splits."""

    path: str = field(metadata={"help": "Dataset folder or Hub id", "positional": True})
    split: list[str] = field(
        default_factory=list, metadata={"help": "The splits to check; with none given, every split present"}
    )


def validate_folder(check: FolderCheck) -> dict:
    """Check every row of a dataset folder (or Hub id), streaming it split by split.

    Returns `{split: ValidationReport}`; a split with invalid rows has them listed in its report.
    """
    from datasets import get_dataset_split_names

    reports = {}
    for name in check.split or get_dataset_split_names(check.path):
        reports[name] = ValidationReport()
        rows = load_rows(check.path, name, streaming=True)
        try:
            for _ in validate_rows(rows, report=reports[name]):
                pass
        except InvalidRowsError:
            pass  # the report holds the invalid rows, which the caller lists
        finally:
            # A streamed parquet split can leave pyarrow scanner threads behind. Collected now, while Arrow is
            # alive, they end cleanly; left to interpreter shutdown they abort the process after its work is done
            # ("terminate called without an active exception": huggingface/datasets#7566, apache/arrow#45214;
            # datasets collects them itself only for pyarrow <= 24).
            del rows
            gc.collect()
    return reports


def shuffled_stream(rows, seed: int, buffer_size: int = 1000):
    """A streaming dataset shuffled through a `buffer_size` buffer fed from one shard at a time (in shuffled order).

    `datasets`' default feeds the buffer from up to 10 shards at once through a thread pool whose shutdown sleeps
    5 s (its workaround for apache/arrow#45214) whenever an iteration ends or stops early: at every epoch end,
    every stage end and every resume, and 8× the cost of 20 batches of map-style data.
    """
    return rows.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=1)
