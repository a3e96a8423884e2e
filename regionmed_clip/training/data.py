"""Per-stage data loading: the same global batches whatever the number of processes, and resumable mid-epoch."""

import math
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.collator import EPOCH_FIELD


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return seed * 1_000_003 + stage * 10_007 + epoch


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of this process's rows for one epoch.

    The epoch's shuffled order (seeded by seed, stage, epoch) is cut into global batches of `batch_size × world`
    rows; process `rank` takes its contiguous slice of each. One process with batch 8 and two with batch 4 therefore
    see exactly the same global batches, and the incomplete last global batch is dropped. `skip` leaves out the
    first batches (resuming mid-epoch) without loading them.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, skip: int = 0):
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.skip = seed, skip
        if size < batch_size * world:
            raise ValueError(
                f"{size} rows cannot fill one global batch of {batch_size} x {world} processes; lower batch_size"
            )

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world) - self.skip

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        global_batch = self.batch_size * self.world
        for index in range(self.skip, self.size // global_batch):
            offset = index * global_batch + self.rank * self.batch_size
            yield order[offset : offset + self.batch_size]


class StageBatchSampler(Sampler[list[tuple[int, int]]]):
    """Every epoch's [`GlobalBatchSampler`] batches one after another, from epoch `epoch` with its first `skip`
    batches left out, without end (the stage stops after its steps). Each row index comes as `(epoch, index)`, so
    the epoch travels with the batch to the collator: one loader, whose workers live for the whole stage, serves
    every epoch, and a resumed run draws exactly the batches it would have drawn.

    Args:
        seed_of_epoch: The shuffling seed of each epoch (`epoch_seed` of the run's seed and the stage).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        rank: int,
        world: int,
        seed_of_epoch: Callable[[int], int],
        epoch: int = 0,
        skip: int = 0,
    ):
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed_of_epoch, self.epoch, self.skip = seed_of_epoch, epoch, skip

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        while True:
            sampler = GlobalBatchSampler(
                self.size, self.batch_size, self.rank, self.world, self.seed_of_epoch(epoch), skip
            )
            for batch in sampler:
                yield [(epoch, index) for index in batch]
            epoch, skip = epoch + 1, 0


class EpochRows(Dataset):
    """`rows` addressed by `(epoch, index)`: each row comes with its epoch in `EPOCH_FIELD`."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        indices = [index for _, index in keys]
        # A `datasets.Dataset` reads a batch of rows in one Arrow call.
        fetch = getattr(self.rows, "__getitems__", None)
        rows = fetch(indices) if fetch is not None else [self.rows[index] for index in indices]
        return [{**row, EPOCH_FIELD: epoch} for row, (epoch, _) in zip(rows, keys, strict=True)]


def batches_per_epoch(size: int, batch_size: int, world: int) -> int:
    return size // (batch_size * world)


def loader_options(num_workers: int, prefetch_factor: int, pin_memory: bool) -> dict:
    """DataLoader keyword arguments of the workers, their prefetch and pinned memory (`pin_memory` on a CUDA
    device: the trainer then copies batches with `non_blocking=True`)."""
    options = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options["prefetch_factor"] = prefetch_factor
    return options


def stage_dataloader(
    rows,
    collator,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    skip: int = 0,
    num_workers: int = 0,
    streaming: bool = False,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """This process's batches of one epoch. Map-style rows use `GlobalBatchSampler`; streaming rows are shuffled
    through a buffer, split between processes by `datasets`, and skip whole batches when resuming. (A training
    stage over map-style rows reads every epoch through one [`stage_loader`].)"""
    options = loader_options(num_workers, prefetch_factor, pin_memory)
    if not streaming:
        sampler = GlobalBatchSampler(len(rows), batch_size, rank, world, seed, skip)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collator, **options)
    from datasets.distributed import split_dataset_by_node

    from ..data.folder import shuffled_stream

    shard = split_dataset_by_node(shuffled_stream(rows, seed), rank=rank, world_size=world)
    if skip:
        shard = shard.skip(skip * batch_size)
    return DataLoader(shard, batch_size=batch_size, collate_fn=collator, drop_last=True, **options)


def stage_loader(
    rows,
    collator,
    batch_size: int,
    rank: int,
    world: int,
    seed_of_epoch: Callable[[int], int],
    epoch: int = 0,
    skip: int = 0,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """This process's batches of a whole stage over map-style rows, from `epoch` (its first `skip` batches left
    out) on, without end: one loader and one set of workers for every epoch ([`StageBatchSampler`]), so an epoch
    boundary neither restarts the workers nor drains their prefetch. Batch `i` of epoch `e` is the batch
    [`stage_dataloader`] gives for that epoch."""
    if len(rows) < batch_size * world:
        raise ValueError(
            f"{len(rows)} rows cannot fill one global batch of {batch_size} x {world} processes; lower batch_size"
        )
    sampler = StageBatchSampler(len(rows), batch_size, rank, world, seed_of_epoch, epoch, skip)
    return DataLoader(
        EpochRows(rows),
        batch_sampler=sampler,
        collate_fn=collator,
        **loader_options(num_workers, prefetch_factor, pin_memory),
    )


def stage_total_steps(stage, size: int | None, world: int, accumulation: int) -> int:
    """Optimizer steps of a stage: its `steps`, or `epochs` passes over `size` rows."""
    if stage.steps is not None:
        return stage.steps
    if size is None:
        raise ValueError(f"stage {stage.name}: a streaming dataset has no length; give the stage `steps`")
    return max(1, math.ceil(stage.epochs * batches_per_epoch(size, stage.batch_size, world) / accumulation))
