"""Training: typed config, progressive stages, distributed losses, checkpointing (needs the `train` extra)."""

from .config import DataSpec, ModelSpec, StageSpec, TrainConfig, load_config
from .stages import StageCallback, set_trainable
from .trainer import Trainer, build_model, training_function

__all__ = [
    "DataSpec",
    "ModelSpec",
    "StageCallback",
    "StageSpec",
    "TrainConfig",
    "Trainer",
    "build_model",
    "load_config",
    "set_trainable",
    "training_function",
]
