"""`regionmed-clip train` and `finetune`, and the command line of one training process
(`accelerate launch -m regionmed_clip.cli.train --config X`, what both commands and `train_accelerate.py` run)."""

import argparse
import dataclasses
import inspect
import subprocess
import sys

from .options import add_options


@dataclasses.dataclass
class LaunchOptions:
    """How `train` and `finetune` start their processes (through `accelerate launch`)."""

    resume: bool = dataclasses.field(
        default=False, metadata={"help": "Continue from the latest complete checkpoint"}
    )
    num_processes: int = dataclasses.field(
        default=1, metadata={"help": "Processes on this machine (GPUs, or CPU processes in a gloo group)"}
    )
    accelerate_config: str | None = dataclasses.field(
        default=None,
        metadata={"help": "An Accelerate config file (configs/accelerate/*.yaml); replaces --num-processes"},
    )


def launch_command(config: str, launch: LaunchOptions, output_dir: str | None = None) -> list[str]:
    """The `accelerate launch` command line that runs one training process per `launch.num_processes`."""
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
    command += ["-m", PROCESS_MODULE, "--config", config]
    if output_dir:
        command += ["--output-dir", output_dir]
    if launch.resume:
        command.append("--resume")
    return command


def register(subparsers) -> None:
    from ..training.finetune import FinetuneArgs, write_finetune_config
    from ..training.run import run_training

    train = subparsers.add_parser(
        "train",
        help="train through the progressive stages (the same as accelerate launch train_accelerate.py)",
        description="Runs `accelerate launch -m regionmed_clip.cli.train --config CONFIG`; mixed precision "
        "comes from the training config.",
    )
    run_options = add_options(train, run_training, skip=("resume",))
    train_launch = add_options(train, LaunchOptions)

    def run_train(args) -> int:
        values = run_options.values(args)
        return subprocess.run(
            launch_command(values["config"], train_launch.build(args), values["output_dir"])
        ).returncode

    train.set_defaults(run=run_train)

    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a trained model with LoRA or in full (contrastive, or classification on labels)",
        description=inspect.getdoc(sys.modules[FinetuneArgs.__module__]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune_options = add_options(finetune, FinetuneArgs)
    finetune_launch = add_options(finetune, LaunchOptions)

    def run_finetune(args) -> int:
        config = write_finetune_config(finetune_options.build(args))
        return subprocess.run(launch_command(str(config), finetune_launch.build(args))).returncode

    finetune.set_defaults(run=run_finetune)


def main(argv: list[str] | None = None) -> int:
    """One training process: `--config X [--output-dir D] [--resume]`."""
    from ..training.run import run_training

    parser = argparse.ArgumentParser(
        prog="python -m regionmed_clip.cli.train", description=run_training.__doc__.splitlines()[0]
    )
    folder = add_options(parser, run_training).build(parser.parse_args(argv))
    print(f"model saved to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
