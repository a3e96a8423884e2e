"""Run under `accelerate launch` by test_training.py: the loss and gradients of one ROI-stage step on the first
global batch, saved by the main process.

Usage: python ddp_gradients.py CONFIG OUT.pt [--no-regions-after N]
With `--no-regions-after N`, the rows of the first global batch from position N on lose their regions, so with 2
processes of batch N the second process's micro-batch has no ROI at all."""

import argparse

import torch

from regionmed_clip.data.collator import MedRegionCollator
from regionmed_clip.training import Trainer, load_config
from regionmed_clip.training.data import GlobalBatchSampler, epoch_seed, stage_dataloader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--no-regions-after", type=int)
    args = parser.parse_args()
    trainer = Trainer(load_config(args.config))
    index, stage = 2, trainer.config.stages[2]
    accelerator = trainer.accelerator
    seed = epoch_seed(trainer.config.seed, index, 0)
    if args.no_regions_after is not None:
        # The global batch as one process of the whole global batch sees it.
        global_size = stage.batch_size * accelerator.num_processes
        first = next(iter(GlobalBatchSampler(len(trainer.rows), global_size, 0, 1, seed)))
        cleared = set(first[args.no_regions_after :])
        trainer.rows = trainer.rows.map(
            lambda row, i: {"regions": [] if i in cleared else row["regions"]}, with_indices=True
        )
    trainer.state.global_step = trainer.callback.start_of(index)
    trainer.step_begins()
    collator = MedRegionCollator(trainer.processor, trainer.config.data.max_length, with_regions=True)
    loader = stage_dataloader(
        trainer.rows, collator, stage.batch_size, accelerator.process_index, accelerator.num_processes, seed
    )
    batch = trainer._stage_batch(next(iter(loader)), stage)
    outputs = trainer.model(**batch)
    loss, terms = outputs.loss, outputs.loss_terms
    accelerator.backward(loss)
    rois = accelerator.gather(batch["roi_mask"].sum().reshape(1)).tolist()  # real ROIs of each process
    if accelerator.is_main_process:
        # The base model's parameters by their own names, and the detector's head under its full name.
        parameters = [*trainer.unwrapped.model.named_parameters()]
        parameters += [
            (f"detector.class_head.{n}", p)
            for n, p in trainer.unwrapped.detector.class_head.named_parameters()
        ]
        gradients = {n: p.grad.detach().clone() for n, p in parameters if p.grad is not None}
        torch.save(
            {
                "processes": accelerator.num_processes,
                "rois": rois,
                "loss": loss.detach(),
                "terms": {name: term.detach() for name, term in terms.items()},
                "gradients": gradients,
            },
            args.out,
        )
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
