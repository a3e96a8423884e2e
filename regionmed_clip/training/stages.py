"""Progressive stages: freezing helpers, optimiser and schedule per stage, and the stage-aware callback.

Freezing sets `requires_grad` on every parameter explicitly, so applying a stage is idempotent and a later stage
never inherits a freeze by accident. Under DDP the model is wrapped while everything is trainable and stages
freeze afterwards: a parameter that was frozen at wrap time would never have its gradient synchronised when a
later stage unfreezes it; one frozen after wrapping is simply unused (`find_unused_parameters=True`).

Each stage's optimizer and schedule go through `accelerator.prepare`, as in accelerate's examples: the prepared
optimizer steps through the gradient scaler under fp16 (skipping inf steps), `clip_grad_norm_` unscales first,
and `save_state` / `load_state` cover both.
"""

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..modeling_regionmed_clip import RegionMedCLIPLoss
from .config import StageSpec


def set_trainable(model: torch.nn.Module, frozen: list[str]) -> dict[str, int]:
    """Freeze the parameters whose name starts with one of `frozen`, unfreeze all others; returns counts."""
    counts = {"trainable": 0, "frozen": 0}
    names = [name for name, _ in model.named_parameters()]
    for prefix in frozen:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ValueError(f"frozen prefix {prefix!r} matches no parameter of the model")
    for name, parameter in model.named_parameters():
        trainable = not any(name == prefix or name.startswith(prefix + ".") for prefix in frozen)
        parameter.requires_grad_(trainable)
        counts["trainable" if trainable else "frozen"] += parameter.numel()
    return counts


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: decay on matrices only (never on biases, norms, gates, scales)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_train_modes(model: torch.nn.Module):
    """Train mode, except for each top-level module none of whose parameters trains in this stage: dropout in a
    tower that does not learn only adds noise to its outputs (and a frozen text tower in eval mode gives the same
    caption embedding at every step, which the caption cache relies on)."""
    model.train()
    for module in model.children():
        parameters = list(module.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            module.eval()


def apply_stage_weights(config, stage: StageSpec):
    """Write the stage's weight of every model loss term into the model config (`<term>_weight`; 0 for a term the
    stage leaves out). The config is the one source of the weights the loss module applies, and a model saved
    after a stage records the weights that stage trained with."""
    for term in RegionMedCLIPLoss.term_inputs:
        setattr(config, f"{term}_weight", float(stage.loss_weights.get(term, 0.0)))


def build_scheduler(optimizer, stage: StageSpec, total_steps: int, num_processes: int):
    """transformers' cosine schedule with a linear warm-up over `warmup_ratio` of the stage, ending at
    `lr * min_lr_ratio`.

    Accelerate's prepared scheduler steps once per process at every optimizer step (it assumes a schedule laid out
    for one process's share of the data), so the schedule is laid out over `total_steps × num_processes` steps:
    the learning rate at each optimizer step is then the same whatever the number of processes.
    """
    warmup = int(round(total_steps * stage.warmup_ratio))
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup * num_processes,
        num_training_steps=total_steps * num_processes,
        min_lr_rate=stage.min_lr_ratio,
    )


def build_optimizer(model, stage: StageSpec, config):
    """A fresh AdamW and cosine schedule for `stage` (optimizer state never crosses a stage boundary)."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=stage.lr,
        betas=config.adam_betas,
        eps=config.adam_eps,
    )
    return optimizer


class StageCallback:
    """Applies stages as data: `on_stage_begin` freezes / unfreezes, sets the loss weights, and builds and prepares
    a fresh optimizer and schedule; `on_step_end` logs and checkpoints every `checkpoint_every` steps;
    `on_stage_end` checkpoints and plots."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_stage_begin(self, index: int, stage: StageSpec, total_steps: int):
        trainer = self.trainer
        counts = trainer.apply_trainable(stage)
        accelerator = trainer.accelerator
        optimizer = build_optimizer(trainer.unwrapped, stage, trainer.config)
        scheduler = build_scheduler(optimizer, stage, total_steps, accelerator.num_processes)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        trainer.print(
            f"stage {index + 1}/{len(trainer.config.stages)} '{stage.name}': {total_steps} steps, lr {stage.lr:g}, "
            f"batch {stage.batch_size}x{trainer.accelerator.num_processes}, trainable {counts['trainable']:,} "
            f"params, frozen {counts['frozen']:,}, losses {stage.loss_weights}"
        )
        return optimizer, scheduler

    def on_step_end(self, metrics: dict):
        trainer = self.trainer
        trainer.log(metrics)
        every = trainer.config.checkpoint_every
        if every and trainer.state.global_step % every == 0:
            trainer.save_checkpoint()

    def on_stage_end(self, index: int, stage: StageSpec):
        self.trainer.save_checkpoint()
        self.trainer.plot()
