"""Run under `accelerate launch` by test_training.py: the loss and gradients of one ROI-stage step on the first
global batch, saved by the main process. Usage: python ddp_gradients.py CONFIG OUT.pt"""

import sys

import torch

from regionmed_clip.data.collator import MedRegionCollator
from regionmed_clip.training import Trainer, load_config
from regionmed_clip.training.data import epoch_seed, stage_dataloader
from regionmed_clip.training.losses import training_loss_terms


def main(config_path: str, out_path: str) -> None:
    trainer = Trainer(load_config(config_path))
    index, stage = 2, trainer.config.stages[2]
    trainer.optimizer, trainer.scheduler = trainer.callback.on_stage_begin(index, stage, stage.steps)
    collator = MedRegionCollator(trainer.processor, trainer.config.data.max_length, with_regions=True)
    accelerator = trainer.accelerator
    loader = stage_dataloader(
        trainer.rows,
        collator,
        stage.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        epoch_seed(trainer.config.seed, index, 0),
    )
    batch = trainer._stage_batch(next(iter(loader)), stage)
    outputs = trainer.model(**batch)
    config = trainer.unwrapped.config
    terms = training_loss_terms(
        outputs, batch, outputs.logit_scale, config.neg_logit_scale, config.neg_logit_bias
    )
    loss = sum(stage.loss_weights[name] * term for name, term in terms.items())
    accelerator.backward(loss)
    if accelerator.is_main_process:
        gradients = {
            n: p.grad.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None
        }
        torch.save(
            {
                "processes": accelerator.num_processes,
                "loss": loss.detach(),
                "terms": terms,
                "gradients": gradients,
            },
            out_path,
        )
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
