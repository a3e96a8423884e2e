"""One training process (what `accelerate launch` starts for `regionmed-clip train`, `train_accelerate.py`, the
demo and the ablation), and a helper that runs one in a subprocess."""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import load_config
from .trainer import training_function

# The module `accelerate launch -m` runs for one training process: the command line of `TrainingRun`, which the
# `cli` package reads.
PROCESS_MODULE = "regionmed_clip.cli.train"


@dataclass
class TrainingRun:
    """One training run: its config file, where it goes, and whether it continues a run that stopped."""

    config: str = field(metadata={"help": "Training YAML (configs/demo.yaml, configs/paper.yaml)"})
    output_dir: str | None = field(default=None, metadata={"help": "Overrides the config's output_dir"})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest complete checkpoint"})


def run_training(run: TrainingRun) -> Path:
    """Train RegionMed-CLIP through the progressive stages of a YAML config; returns the saved model folder."""
    folder = training_function(load_config(run.config, output_dir=run.output_dir, resume=run.resume or None))
    # An explicit teardown: leaving the gloo / NCCL group to interpreter exit can abort the process there.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return folder


def train_in_subprocess(config) -> Path:
    """Train `config` in a fresh process through the training entry point (what `make demo` and the ablation do):
    the config is saved as `run_config.yaml` in its output folder and the output goes to `train.log` there.
    Returns the model folder; a failed run stops the caller, naming the log."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "run_config.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", PROCESS_MODULE, "--config", str(folder / "run_config.yaml")]
    with open(folder / "train.log", "w", encoding="utf-8") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"training failed (exit {result.returncode}); see {folder / 'train.log'}")
    return folder / "model"
