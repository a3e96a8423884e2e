"""Progressive stages: freezing helpers, the optimizer, each stage's learning rate, and the stage-aware callback.

Stages are data (`StageSpec`). [`StageCallback`] is a `transformers.TrainerCallback`: it receives the model, the
optimizer and the step state, and holds no trainer, so the package's Accelerate loop and transformers' `Trainer`
both drive it. At each optimizer step it applies the stage the step belongs to (frozen modules, loss weights,
caption cache) and sets the step's learning rate; at a stage's end it clears the Adam state and asks for a
checkpoint.

Freezing sets `requires_grad` on every parameter explicitly, so applying a stage is idempotent and a later stage
never inherits a freeze by accident. Under DDP the model is wrapped while everything is trainable and stages
freeze afterwards: a parameter that was frozen at wrap time would never have its gradient synchronised when a
later stage unfreezes it; one frozen after wrapping is simply unused (`find_unused_parameters=True`).

One AdamW serves the whole run (built before any stage freezes, so it holds every parameter some stage trains), as
in accelerate's examples and as transformers' `Trainer` builds it. A stage still starts as if with a fresh optimizer:
its Adam state is cleared at the boundary and its schedule restarts, so no optimizer state crosses a stage, and none
is left in memory or in the checkpoint at a boundary.
"""

import logging
import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from .config import StageSpec

logger = logging.getLogger(__name__)


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


def set_train_modes(model: torch.nn.Module, base: torch.nn.Module):
    """Train mode, except for each top-level module of `base` none of whose parameters trains in this stage:
    dropout in a tower that does not learn only adds noise to its outputs (and a frozen text tower in eval mode
    gives the same caption embedding at every step, which the caption cache relies on)."""
    model.train()
    for module in base.children():
        parameters = list(module.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            module.eval()


def stage_learning_rate(stage: StageSpec, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (from 0) of a stage of `total_steps`: transformers'
    `get_cosine_with_min_lr_schedule_with_warmup`, operation for operation (linear warm-up over `warmup_ratio` of
    the stage, cosine decay to `lr * min_lr_ratio`)."""
    warmup = int(round(total_steps * stage.warmup_ratio))
    if step < warmup:
        return stage.lr * (float(step) / float(max(1, warmup)))
    progress = float(step - warmup) / float(max(1, total_steps - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return stage.lr * max(0.0, factor * (1.0 - stage.min_lr_ratio) + stage.min_lr_ratio)


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    """The run's AdamW over every parameter trainable when it is built: call it before any stage freezes, so that
    it holds every parameter some stage trains (all of them, or the adapter's under LoRA). A parameter a stage
    freezes gets no gradient and AdamW leaves it, and its decay, alone. Its learning rate is set at every step by
    [`StageCallback`]."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=0.0,
        betas=config.adam_betas,
        eps=config.adam_eps,
        fused=config.fused_adamw or None,
    )


class StageCallback(TrainerCallback):
    r"""
    Runs progressive stages inside any loop that calls `transformers.TrainerCallback` hooks: transformers' `Trainer`
    or the package's Accelerate trainer. It holds no trainer; it reads `state.global_step` and acts on the `model`
    (a `RegionMedCLIPForPreTraining`) and the `optimizer` it is handed:

    - `on_step_begin`: the stage the step belongs to is applied when it changes (its frozen modules, the train /
      eval modes, its loss weights, the caption cache while the text tower is frozen; a stage entered at its first
      step starts with no Adam state, one resumed mid-way keeps the state its checkpoint restored), and every
      parameter group gets the step's learning rate ([`stage_learning_rate`]).
    - `on_step_end`: after a stage's last step, the Adam state is cleared and `control.should_save` asks for a
      checkpoint.

    With transformers' `Trainer`, one batch size serves every stage (the `TrainingArguments`' own), so give the
    stages' lengths in optimizer steps; pass `lr_scheduler_type="constant"` so that the Trainer's scheduler leaves
    the rate this callback sets alone (the `learning_rate` the Trainer logs is then its constant, not the stage's
    rate the optimizer applies), `max_steps=sum(total_steps)` and `remove_unused_columns=False` (the collator reads
    the dataset's own columns).

    Args:
        stages (`list[StageSpec]`): The stages, in order.
        total_steps (`list[int]`): Each stage's length in optimizer steps.
        lora (`bool`, *optional*): The model trains a PEFT adapter, whose trainable set stays as PEFT made it
            (stages then freeze nothing).
        cache_captions (`bool`, *optional*, defaults to `True`): Cache caption embeddings while the text tower is
            frozen (off under FSDP, whose towers must run on every process at every step).
        report (`Callable[[str], None]`, *optional*): Where a stage's start is announced (default: the log).

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> callback = StageCallback(config.stages, total_steps=[30, 60, 200, 150])
    >>> args = TrainingArguments("out", max_steps=440, lr_scheduler_type="constant", remove_unused_columns=False)
    >>> Trainer(model=pretraining, args=args, train_dataset=rows, data_collator=collator, callbacks=[callback]).train()
    ```
    """

    def __init__(
        self,
        stages: list[StageSpec],
        total_steps: list[int],
        lora: bool = False,
        cache_captions: bool = True,
        report: Callable[[str], None] | None = None,
    ):
        if len(stages) != len(total_steps):
            raise ValueError(f"{len(stages)} stages but {len(total_steps)} step counts")
        self.stages = list(stages)
        self.total_steps = [int(steps) for steps in total_steps]
        self.ends = [sum(self.total_steps[: index + 1]) for index in range(len(stages))]
        self.lora = lora
        self.cache_captions = cache_captions
        self.report = report or logger.info
        self.active: int | None = None  # the stage whose settings are applied

    def stage_at(self, global_step: int) -> int:
        """The stage that optimizer step `global_step` (from 0) belongs to."""
        for index, end in enumerate(self.ends):
            if global_step < end:
                return index
        raise ValueError(f"step {global_step} is past the last stage (which ends at step {self.ends[-1]})")

    def start_of(self, index: int) -> int:
        return self.ends[index] - self.total_steps[index]

    def learning_rate(self, global_step: int) -> float:
        index = self.stage_at(global_step)
        return stage_learning_rate(
            self.stages[index], global_step - self.start_of(index), self.total_steps[index]
        )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        index = self.stage_at(state.global_step)
        if index != self.active:
            self.apply_stage(index, model, optimizer, resumed=state.global_step > self.start_of(index))
        else:
            # A loop may switch every module back to training mode between steps (transformers' `Trainer` does).
            set_train_modes(model, model.model)
        rate = self.learning_rate(state.global_step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.ends:
            # The next stage starts without this one's Adam state; the checkpoint at the boundary has none either.
            optimizer.state.clear()
            control.should_save = True
        return control

    def apply_stage(self, index: int, model, optimizer, resumed: bool = False) -> dict[str, int]:
        """Apply stage `index` to `model` (a `RegionMedCLIPForPreTraining`); returns the parameter counts."""
        stage = self.stages[index]
        base = model.model
        if self.lora:
            trainable = sum(parameter.numel() for parameter in base.parameters() if parameter.requires_grad)
            counts = {"trainable": trainable, "frozen": sum(p.numel() for p in base.parameters()) - trainable}
        else:
            counts = set_trainable(base, stage.frozen)
        set_train_modes(model, base)
        model.loss_weights = stage.loss_weights
        # Cached caption embeddings are valid while the text tower cannot change: a fresh cache per stage.
        if self.cache_captions and not base.text_model.training:
            model.enable_caption_cache()
        else:
            model.disable_caption_cache()
        if not resumed:
            optimizer.state.clear()
        self.active = index
        self.report(
            f"stage {index + 1}/{len(self.stages)} '{stage.name}': {self.total_steps[index]} steps, lr {stage.lr:g}, "
            f"trainable {counts['trainable']:,} params, frozen {counts['frozen']:,}, losses {stage.loss_weights}"
            + (" (resumed)" if resumed else "")
        )
        return counts
