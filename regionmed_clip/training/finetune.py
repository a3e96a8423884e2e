"""`regionmed-clip finetune`: one training stage on top of a trained RegionMed-CLIP, with LoRA or in full.

A fine-tuning run is an ordinary training config with a single stage, so it goes through the same Accelerate
entry point, data pipeline, checkpoints and resume as pre-training (`regionmed-clip train`): this module only
writes that config. The tasks:

- `contrastive`: the joint objective of the last pre-training stage (global, summary, ROI and hard-negative terms,
  each where the data has it) on a new image–report dataset.
- `classification`: `class_loss` on a labelled dataset (see `ClassificationSpec`); the model stays a CLIP.
"""

from dataclasses import dataclass
from pathlib import Path

from .config import ClassificationSpec, DataSpec, LoraSpec, ModelSpec, StageSpec, TrainConfig

METHODS = ("lora", "full")
TASKS = ("contrastive", "classification")
CONTRASTIVE_WEIGHTS = {"global_loss": 1.0, "summary_loss": 0.5, "roi_loss": 1.0, "neg_loss": 1.0}


@dataclass
class FinetuneArgs:
    """Options of `regionmed-clip finetune` (each is a `--flag`).

    Args:
        model: RegionMed-CLIP folder or Hub id to start from.
        data: Dataset folder or Hub id (the MedRegion layout; `classification` needs a label column).
        output_dir: Where the run goes: `model/` (merged under LoRA), `adapter/` (LoRA only), checkpoints, logs.
        method: `lora` (PEFT adapters on the attention projections, projections trained in full) or `full`.
        task: `contrastive` or `classification`.
        steps: Optimizer steps; without it, `epochs` passes over the data (1 when neither is given).
        epochs: Passes over the training split.
        lr: Peak learning rate (linear warm-up, cosine decay).
        batch_size: Images per process and step.
        warmup_ratio: Share of the run spent warming up.
        frozen: Module-name prefixes kept frozen (`full` only), e.g. `text_model`.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA input.
        template: Classification prompt for each class name (`{}` is the name).
        labels: Classification classes in order (default: the sorted labels of the training split).
        max_length: Token limit of every text.
        max_negatives: Hard negatives used per region.
        mixed_precision: `auto` (bf16 where the hardware has it), `bf16`, `fp16` or `no`.
        seed: Seed of the data order and of the LoRA initialisation.
        checkpoint_every: Optimizer steps between checkpoints (0: at the end only).
        report_to: An Accelerate tracker name, or `none`.
    """

    model: str
    data: str
    output_dir: str
    method: str = "lora"
    task: str = "contrastive"
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    batch_size: int = 32
    warmup_ratio: float = 0.1
    frozen: tuple[str, ...] = ()
    lora_r: int = LoraSpec.r
    lora_alpha: float = LoraSpec.alpha
    lora_dropout: float = LoraSpec.dropout
    template: str = ClassificationSpec.template
    labels: tuple[str, ...] = ()
    max_length: int = DataSpec.max_length
    max_negatives: int | None = None
    mixed_precision: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0
    report_to: str = "tensorboard"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.method == "lora" and self.frozen:
            raise ValueError(
                "--frozen applies to --method full; LoRA trains only its adapters and projections"
            )
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")


def finetune_config(args: FinetuneArgs) -> TrainConfig:
    """The one-stage training config a fine-tuning run executes."""
    classification = None
    if args.task == "classification":
        classification = ClassificationSpec(labels=list(args.labels) or None, template=args.template)
        weights = {"class_loss": 1.0}
    else:
        weights = dict(CONTRASTIVE_WEIGHTS)
    stage = StageSpec(
        name=f"finetune-{args.method}-{args.task}",
        lr=args.lr,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=None if args.steps is not None else (args.epochs or 1.0),
        warmup_ratio=args.warmup_ratio,
        frozen=list(args.frozen),
        loss_weights=weights,
    )
    lora = None
    if args.method == "lora":
        lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    return TrainConfig(
        output_dir=args.output_dir,
        model=ModelSpec(pretrained=args.model),
        data=DataSpec(path=args.data, max_length=args.max_length, max_negatives=args.max_negatives),
        stages=[stage],
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
        report_to=args.report_to,
        lora=lora,
        classification=classification,
    )


def write_finetune_config(args: FinetuneArgs) -> Path:
    """Save the run's training config as `finetune_config.yaml` in its output folder (what gets launched)."""
    config = finetune_config(args)
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "finetune_config.yaml"
    config.save(path)
    return path
