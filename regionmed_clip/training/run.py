"""Entry point of a training process: `accelerate launch -m regionmed_clip.training.run --config X`
(what `train_accelerate.py` and `regionmed-clip train` run)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from .config import load_config
from .trainer import training_function


def train_in_subprocess(config) -> Path:
    """Train `config` in a fresh process through this entry point (what `make demo` and the ablation do): the
    config is saved as `run_config.yaml` in its output folder and the output goes to `train.log` there. Returns the
    model folder; a failed run stops the caller, naming the log."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / "run_config.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "regionmed_clip.training.run",
        "--config",
        str(folder / "run_config.yaml"),
    ]
    with open(folder / "train.log", "w", encoding="utf-8") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"training failed (exit {result.returncode}); see {folder / 'train.log'}")
    return folder / "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train RegionMed-CLIP through its progressive stages.")
    parser.add_argument("--config", required=True, help="training YAML (see configs/)")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    args = parser.parse_args(argv)
    config = load_config(args.config, output_dir=args.output_dir, resume=args.resume or None)
    folder = training_function(config)
    print(f"model saved to {folder}")
    # An explicit teardown: leaving the gloo / NCCL group to interpreter exit can abort the process there.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
