"""`regionmed-clip finetune`: one training stage on top of a trained RegionMed-CLIP, with LoRA or in full.

A fine-tuning run is an ordinary training config with a single stage, so it goes through the same Accelerate
entry point, data pipeline, checkpoints and resume as pre-training (`regionmed-clip train`): this module only
writes that config. The tasks:

- `contrastive`: the joint objective of the last pre-training stage (global, summary, ROI and hard-negative terms,
  each where the data has it) on a new image–report dataset.
- `classification`: `class_loss` on a labelled dataset (see `ClassificationSpec`); the model stays a CLIP.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from .config import (
    ClassificationSpec,
    DataSpec,
    LoraSpec,
    MixedPrecision,
    ModelSpec,
    StageSpec,
    TrainConfig,
)

Method = Literal["lora", "full"]
Task = Literal["contrastive", "classification"]
METHODS, TASKS = get_args(Method), get_args(Task)
CONTRASTIVE_WEIGHTS = {"global_loss": 1.0, "summary_loss": 0.5, "roi_loss": 1.0, "neg_loss": 1.0}


@dataclass
class FinetuneArgs:
    """Options of `regionmed-clip finetune` (each is a `--flag`; the help of each is in its metadata)."""

    model: str = field(metadata={"help": "RegionMed-CLIP folder or Hub id to start from."})
    data: str = field(
        metadata={
            "help": "Dataset folder or Hub id (the MedRegion layout; `classification` needs a label column)."
        }
    )
    output_dir: str = field(
        metadata={
            "help": "Where the run goes: `model/` (merged under LoRA), `adapter/` (LoRA only), checkpoints, logs."
        }
    )
    method: Method = field(
        default="lora",
        metadata={
            "help": "`lora` (PEFT adapters on the attention projections, projections trained in full) or `full`."
        },
    )
    task: Task = field(default="contrastive", metadata={"help": "`contrastive` or `classification`."})
    steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps; without it, `epochs` passes over the data (1 when neither is given)."
        },
    )
    epochs: float | None = field(default=None, metadata={"help": "Passes over the training split."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (linear warm-up, cosine decay)."})
    batch_size: int = field(default=32, metadata={"help": "Images per process and step."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the run spent warming up."})
    frozen: list[str] = field(
        default_factory=list,
        metadata={"help": "Module-name prefixes kept frozen (`full` only), e.g. `text_model`."},
    )
    lora_r: int = field(default=LoraSpec.r, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(
        default=LoraSpec.alpha,
        metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."},
    )
    lora_dropout: float = field(default=LoraSpec.dropout, metadata={"help": "Dropout on the LoRA input."})
    template: str = field(
        default=ClassificationSpec.template,
        metadata={"help": "Classification prompt for each class name (`{}` is the name)."},
    )
    labels: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Classification classes in order (default: the sorted labels of the training split)."
        },
    )
    max_length: int = field(default=DataSpec.max_length, metadata={"help": "Token limit of every text."})
    max_negatives: int | None = field(default=None, metadata={"help": "Hard negatives used per region."})
    mixed_precision: MixedPrecision = field(
        default=TrainConfig.mixed_precision,
        metadata={"help": "`auto` (bf16 where the hardware has it), `bf16`, `fp16` or `no`."},
    )
    seed: int = field(
        default=TrainConfig.seed, metadata={"help": "Seed of the data order and of the LoRA initialisation."}
    )
    checkpoint_every: int = field(
        default=TrainConfig.checkpoint_every,
        metadata={"help": "Optimizer steps between checkpoints (0: at the end only)."},
    )
    report_to: str = field(
        default=TrainConfig.report_to, metadata={"help": "An Accelerate tracker name, or `none`."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the run in `output_dir` from its latest complete checkpoint."},
    )

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
