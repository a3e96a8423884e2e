"""`regionmed-clip train` and `finetune`, and the command line of one training process
(`accelerate launch -m regionmed_clip.cli.train --config X`, what both commands and `train_accelerate.py` run)."""

import dataclasses
import inspect
import subprocess
import sys

from .options import CommandParser


@dataclasses.dataclass
class LaunchOptions:
    """How `train` and `finetune` start their processes (through `accelerate launch`)."""

    num_processes: int = dataclasses.field(
        default=1, metadata={"help": "Processes on this machine (GPUs, or CPU processes in a gloo group)"}
    )
    accelerate_config: str | None = dataclasses.field(
        default=None,
        metadata={"help": "An Accelerate config file (configs/accelerate/*.yaml); replaces --num-processes"},
    )


def launch_command(run, launch: LaunchOptions) -> list[str]:
    """The `accelerate launch` command line that runs the `TrainingRun` `run` in `launch.num_processes`
    processes."""
    from ..training.run import PROCESS_MODULE

    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config:
        command += ["--config_file", launch.accelerate_config]
    else:
        # --multi_gpu is the launcher that starts N processes; with no GPU the trainer's Accelerator(cpu=True)
        # makes them a gloo (MULTI_CPU) group. `--cpu` would start one process only.
        command += ["--multi_gpu"] if launch.num_processes > 1 else []
        command += ["--num_processes", str(launch.num_processes), "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", PROCESS_MODULE, "--config", run.config]
    if run.output_dir:
        command += ["--output-dir", run.output_dir]
    if run.resume:
        command.append("--resume")
    return command


def register(commands: CommandParser) -> None:
    from ..training import finetune
    from ..training.run import TrainingRun

    def run_train(run: TrainingRun, launch: LaunchOptions) -> int:
        return subprocess.run(launch_command(run, launch)).returncode

    commands.add_command(
        "train",
        (TrainingRun, LaunchOptions),
        run_train,
        help="train through the progressive stages (the same as accelerate launch train_accelerate.py)",
        description="Runs `accelerate launch -m regionmed_clip.cli.train --config CONFIG`; mixed precision "
        "comes from the training config.",
    )

    def run_finetune(args: finetune.FinetuneArgs, launch: LaunchOptions) -> int:
        run = TrainingRun(config=str(finetune.write_finetune_config(args)), resume=args.resume)
        return subprocess.run(launch_command(run, launch)).returncode

    commands.add_command(
        "finetune",
        (finetune.FinetuneArgs, LaunchOptions),
        run_finetune,
        help="fine-tune a trained model with LoRA or in full (contrastive, or classification on labels)",
        description=inspect.getdoc(finetune),
    )


def main(argv: list[str] | None = None) -> int:
    """One training process: `--config X [--output-dir D] [--resume]`."""
    from ..training.run import TrainingRun, run_training

    parser = CommandParser(
        [TrainingRun], prog="python -m regionmed_clip.cli.train", description=inspect.getdoc(run_training)
    )
    (run,) = parser.parse_namespace(parser.parse_args(argv))
    print(f"model saved to {run_training(run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
