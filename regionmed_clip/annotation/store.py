"""The output dataset folder, written batch by batch so that a run can stop anywhere and resume.

Layout (the data package's folder format, plus a journal):

    out/data/<split>-batch-<k>.parquet        one file per split per finished batch, while a run is going on
    out/data/<split>-XXXXX-of-YYYYY.parquet   the same files renamed when the run ends (or is interrupted)
    out/README.md                             dataset card (`datasets.load_dataset(out)` / the Hub read it)
    out/annotation_journal.jsonl              one line per finished batch: ids written, rejected, unreadable

The parquet files are the record of what is done: a batch file is written under a hidden `.partial` name and
renamed when complete (an atomic rename), so an image is either in exactly one finished file or in none, whatever
moment the process dies at. On start, the ids in the finished files are skipped and stray `.partial` files are
deleted. The journal is written after the batch's files, so a crash in between only means its rejected images are
tried again. A lock file keeps two runs from writing one folder at once; a lock left by a killed run is taken over.
"""

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.folder import DEFAULT_CONFIG, write_dataset_card
from ..data.schema import FEATURES, SPLITS

JOURNAL = "annotation_journal.jsonl"
LOCK = ".annotate.lock"
_BATCH_FILE = re.compile(r"^(?P<split>[a-z]+)-batch-(?P<index>\d+)\.parquet$")
_FINAL_FILE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d+)-of-(?P<total>\d+)\.parquet$")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AnnotationStore:
    """Batch-wise writer and reader of one annotation output folder; use as a context manager (it holds the
    lock and tidies up what a killed run left).

    Args:
        out_dir: The dataset folder.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir)
        self.data = self.root / "data"
        self.journal = self.root / JOURNAL
        self._lock = self.root / LOCK
        self._next_batch = 0

    # ---- lifetime ------------------------------------------------------------------------------------------------

    def __enter__(self) -> "AnnotationStore":
        self.data.mkdir(parents=True, exist_ok=True)
        self._acquire()
        for partial in self.data.glob(".*.partial"):
            partial.unlink()
        indices = [int(m["index"]) for m in map(_BATCH_FILE.match, self._names()) if m]
        self._next_batch = max(indices, default=-1) + 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.unlink(missing_ok=True)

    def _acquire(self) -> None:
        for _ in range(2):
            try:
                descriptor = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self._lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _process_alive(pid):
                    raise RuntimeError(
                        f"another annotate run (pid {pid}) is writing to {self.root}; wait for it or stop it"
                    ) from None
                self._lock.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(str(os.getpid()))
            return
        raise RuntimeError(f"cannot take the lock {self._lock}")

    # ---- reading -------------------------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        return sorted(path.name for path in self.data.glob("*.parquet"))

    def written_ids(self) -> set[str]:
        """Ids of every row in a finished file."""
        ids: set[str] = set()
        for name in self._names():
            ids.update(pq.read_table(self.data / name, columns=["id"]).column("id").to_pylist())
        return ids

    def journal_entries(self) -> list[dict]:
        """The journal's batch records; a last line cut short by a crash is ignored."""
        if not self.journal.is_file():
            return []
        entries = []
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def failed_ids(self) -> dict[str, str]:
        """Images an earlier run rejected or could not read, with the reason."""
        failed = {}
        for entry in self.journal_entries():
            for image_id, reason in entry.get("unreadable", {}).items():
                failed[image_id] = reason
            for image_id, outcome in entry.get("rejected", {}).items():
                failed[image_id] = "; ".join(outcome.get("problems", []))
        return failed

    # ---- writing -------------------------------------------------------------------------------------------------

    def write_batch(self, rows_by_split: dict[str, list[dict]], record: dict) -> int:
        """Write one batch (rows as `FEATURES` dicts, by split) and its journal record; returns the batch index."""
        index = self._next_batch
        for split, rows in rows_by_split.items():
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
            if not rows:
                continue
            table = pa.Table.from_pylist(
                [FEATURES.encode_example(row) for row in rows], schema=FEATURES.arrow_schema
            )
            partial = self.data / f".{split}-batch-{index:05d}.parquet.partial"
            pq.write_table(table, partial)
            _fsync(partial)
            os.replace(partial, self.data / f"{split}-batch-{index:05d}.parquet")
        _fsync(self.data)
        record = {"batch": index, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
        with open(self.journal, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._next_batch += 1
        return index

    def finalize(self, pretty_name: str, description: str) -> dict[str, int]:
        """Give every file its `<split>-XXXXX-of-YYYYY.parquet` name (earlier runs' files first, in order) and
        write the dataset card; returns the rows per split. Safe to repeat, and to resume after a crash inside."""
        files: dict[str, list[tuple[int, int, str]]] = {}
        for name in self._names():
            if match := _FINAL_FILE.match(name):
                files.setdefault(match["split"], []).append((0, int(match["index"]), name))
            elif match := _BATCH_FILE.match(name):
                files.setdefault(match["split"], []).append((1, int(match["index"]), name))
        counts = {}
        for split in SPLITS:
            ordered = [name for *_, name in sorted(files.get(split, []))]
            rows = 0
            for position, name in enumerate(ordered):
                target = f"{split}-{position:05d}-of-{len(ordered):05d}.parquet"
                if name != target:
                    if (self.data / target).exists():
                        raise RuntimeError(
                            f"cannot rename {name} to {target} in {self.data}: the name is taken"
                        )
                    os.replace(self.data / name, self.data / target)
                rows += pq.ParquetFile(self.data / target).metadata.num_rows
            if rows:
                counts[split] = rows
        _fsync(self.data)
        if counts:
            write_dataset_card(
                self.root, {DEFAULT_CONFIG: ("data", FEATURES, counts)}, pretty_name, description
            )
        return counts


__all__ = ["JOURNAL", "AnnotationStore"]
