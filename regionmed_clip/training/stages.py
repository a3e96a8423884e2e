"""Progressive stages: freezing helpers, optimiser and schedule per stage, and the stage-aware callback.

Freezing sets `requires_grad` on every parameter explicitly, so applying a stage is idempotent and a later stage
never inherits a freeze by accident. Under DDP the model is wrapped while everything is trainable and stages
freeze afterwards: a parameter that was frozen at wrap time would never have its gradient synchronised when a
later stage unfreezes it; one frozen after wrapping is simply unused (`find_unused_parameters=True`).

One AdamW and one schedule serve the whole run and go through `accelerator.prepare` once, as in accelerate's
examples: the prepared optimizer steps through the gradient scaler under fp16 (skipping inf steps),
`clip_grad_norm_` unscales first, and `save_state` / `load_state` cover both. A stage still starts as if with a
fresh optimizer: its Adam state is cleared at the boundary and its schedule restarts (`StageSchedule`), so no
optimizer state crosses a stage, and none is left in memory or in the checkpoint at a boundary. Accelerate has no
public call to release one prepared optimizer (its lists of prepared objects only grow), which is why the run
keeps one instead of preparing a new one per stage.
"""

import math

import torch

from ..loss_regionmed_clip import RegionMedCLIPLoss
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


class StageSchedule:
    """The learning rate of the stage in progress as a function of the prepared scheduler's step count: transformers'
    `get_cosine_with_min_lr_schedule_with_warmup` (linear warm-up over `warmup_ratio` of the stage, cosine decay to
    `lr * min_lr_ratio`), restarted by `begin` at every stage boundary.

    It is the `lr_lambda` of the run's one `LambdaLR`, whose base learning rate is 1, so the value it returns is the
    learning rate itself. Its fields are plain numbers: `LambdaLR.state_dict` saves a callable object's
    `__dict__`, so a checkpoint carries the schedule of the stage in progress. Accelerate's prepared scheduler
    steps once per process at every optimizer step (it assumes a schedule laid out for one process's share of the
    data), so the stage is laid out over `total_steps × num_processes` scheduler steps: the learning rate at each
    optimizer step is the same whatever the number of processes. Before the first stage begins the rate is 0.
    """

    def __init__(self, num_processes: int = 1):
        self.num_processes = num_processes
        self.lr = 0.0
        self.warmup_steps = 0
        self.total_steps = 1
        self.min_lr_ratio = 0.0
        self.start = 0  # the scheduler step at which the stage began

    def begin(self, stage: StageSpec, total_steps: int, start: int):
        """Lay out `stage` over its `total_steps` optimizer steps from scheduler step `start` on."""
        self.lr = float(stage.lr)
        self.warmup_steps = int(round(total_steps * stage.warmup_ratio))
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(stage.min_lr_ratio)
        self.start = int(start)

    def __call__(self, scheduler_step: int) -> float:
        # transformers' arithmetic, operation for operation, over `steps × processes`, so the rates are its own.
        step = scheduler_step - self.start
        warmup, total = self.warmup_steps * self.num_processes, self.total_steps * self.num_processes
        if step < warmup:
            return self.lr * (float(step) / float(max(1, warmup)))
        progress = float(step - warmup) / float(max(1, total - warmup))
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * max(0.0, factor * (1.0 - self.min_lr_ratio) + self.min_lr_ratio)


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    """The run's AdamW over every parameter trainable when it is built: call it before any stage freezes, so that
    it holds every parameter some stage trains (all of them, or the adapter's under LoRA). A parameter a stage
    freezes gets no gradient and AdamW leaves it, and its decay, alone. The base learning rate is 1: the schedule
    (`StageSchedule`) returns the rate itself."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=1.0,
        betas=config.adam_betas,
        eps=config.adam_eps,
        fused=config.fused_adamw or None,
    )


class StageCallback:
    """Applies stages as data: `on_stage_begin` freezes / unfreezes, sets the loss weights and restarts the optimizer
    and schedule for the stage; `on_step_end` logs (on the steps `Trainer.logs_at` picks) and checkpoints every
    `checkpoint_every` steps; `on_stage_end` checkpoints and plots."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_stage_begin(self, index: int, stage: StageSpec, total_steps: int, resumed: bool = False):
        """Apply `stage`. A stage resumed mid-way keeps the Adam state and schedule its checkpoint restored."""
        trainer = self.trainer
        counts = trainer.apply_trainable(stage)
        if not resumed:
            trainer.restart_optimizer(stage, total_steps)
        trainer.print(
            f"stage {index + 1}/{len(trainer.config.stages)} '{stage.name}': {total_steps} steps, lr {stage.lr:g}, "
            f"batch {stage.batch_size}x{trainer.accelerator.num_processes}, trainable {counts['trainable']:,} "
            f"params, frozen {counts['frozen']:,}, losses {stage.loss_weights}"
            + (" (resumed)" if resumed else "")
        )

    def on_step_end(self, metrics: dict | None):
        """`metrics`: the record to log (the means since the previous log), or None on a step that does not log."""
        trainer = self.trainer
        if metrics is not None:
            trainer.log(metrics)
        if trainer.checkpoints_at():
            trainer.save_checkpoint()

    def on_stage_end(self, index: int, stage: StageSpec):
        self.trainer.save_checkpoint()
        self.trainer.plot()
