"""Per-stage data loading: the same global batches whatever the number of processes, and resumable mid-epoch."""

import math

import torch
from torch.utils.data import DataLoader, Sampler


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


def batches_per_epoch(size: int, batch_size: int, world: int) -> int:
    return size // (batch_size * world)


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
) -> DataLoader:
    """This process's batches of one epoch. Map-style rows use `GlobalBatchSampler`; streaming rows are shuffled
    through a buffer, split between processes by `datasets`, and skip whole batches when resuming."""
    if not streaming:
        sampler = GlobalBatchSampler(len(rows), batch_size, rank, world, seed, skip)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)
    from datasets.distributed import split_dataset_by_node

    from ..data.collator import shuffled_stream

    shard = split_dataset_by_node(shuffled_stream(rows, seed), rank=rank, world_size=world)
    if skip:
        shard = shard.skip(skip * batch_size)
    return DataLoader(
        shard, batch_size=batch_size, collate_fn=collator, num_workers=num_workers, drop_last=True
    )


def stage_total_steps(stage, size: int | None, world: int, accumulation: int) -> int:
    """Optimizer steps of a stage: its `steps`, or `epochs` passes over `size` rows."""
    if stage.steps is not None:
        return stage.steps
    if size is None:
        raise ValueError(f"stage {stage.name}: a streaming dataset has no length; give the stage `steps`")
    return max(1, math.ceil(stage.epochs * batches_per_epoch(size, stage.batch_size, world) / accumulation))
