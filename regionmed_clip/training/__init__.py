"""Training: typed config, the pretraining objective, progressive stages, distributed losses, checkpointing (needs
the `train` extra)."""

from .config import DataSpec, ModelSpec, ObjectiveSpec, StageSpec, TrainConfig, load_config
from .losses import LOSS_TERMS
from .pretraining import RegionMedCLIPForPreTraining, RegionMedCLIPForPreTrainingOutput
from .stages import StageCallback, set_trainable
from .trainer import Trainer, build_model, training_function

__all__ = [
    "LOSS_TERMS",
    "DataSpec",
    "ModelSpec",
    "ObjectiveSpec",
    "RegionMedCLIPForPreTraining",
    "RegionMedCLIPForPreTrainingOutput",
    "StageCallback",
    "StageSpec",
    "TrainConfig",
    "Trainer",
    "build_model",
    "load_config",
    "set_trainable",
    "training_function",
]
