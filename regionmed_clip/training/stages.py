"""Progressive stages: freezing helpers, optimiser and schedule per stage, and the stage-aware callback.

Freezing sets `requires_grad` on every parameter explicitly, so applying a stage is idempotent and a later stage
never inherits a freeze by accident. Under DDP the model is wrapped while everything is trainable and stages
freeze afterwards: a parameter that was frozen at wrap time would never have its gradient synchronised when a
later stage unfreezes it; one frozen after wrapping is simply unused (`find_unused_parameters=True`).
"""

import math

import torch

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


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear ramp over the first `warmup_ratio` of the stage, cosine decay to `min_lr_ratio` after."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


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
    """Applies stages as data: `on_stage_begin` freezes / unfreezes and builds a fresh optimizer and schedule,
    `on_step_end` logs and checkpoints every `checkpoint_every` steps, `on_stage_end` checkpoints and plots."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_stage_begin(self, index: int, stage: StageSpec, total_steps: int):
        trainer = self.trainer
        counts = trainer.apply_trainable(stage)
        optimizer = build_optimizer(trainer.unwrapped, stage, trainer.config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, stage.warmup_ratio, stage.min_lr_ratio)
        )
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
