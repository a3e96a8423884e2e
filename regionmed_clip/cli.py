"""The `regionmed-clip` command.

Each sub-command's options are read from the typed signature of the function (or dataclass) it runs, so the
signature is the one place an option is defined, documented and defaulted.
"""

import argparse
import dataclasses
import inspect
import os
import subprocess
import sys
import types
import typing
from pathlib import Path


def _option_type(annotation):
    """(argparse type, nargs) for a parameter annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _option_type(str if os.PathLike in options or str in options else options[0])
    if origin is tuple:
        args = typing.get_args(annotation)
        return args[0], "+" if Ellipsis in args else len(args)
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def add_signature_arguments(
    parser: argparse.ArgumentParser, target, skip: tuple[str, ...] = (), aliases: dict[str, str] | None = None
) -> None:
    """Add `--name` options for the parameters of `target` (a function or a dataclass); `aliases` adds short
    spellings (`{"validation": "--val"}`)."""
    aliases = aliases or {}
    hints = typing.get_type_hints(target if dataclasses.is_dataclass(target) else target)
    for name, parameter in inspect.signature(target).parameters.items():
        if name in skip or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        flags = ["--" + name.replace("_", "-")] + ([aliases[name]] if name in aliases else [])
        annotation = hints.get(name, str)
        required = parameter.default is inspect.Parameter.empty
        if annotation is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=parameter.default)
            continue
        kind, nargs = _option_type(annotation)
        default = None if required else parameter.default
        parser.add_argument(*flags, type=kind, nargs=nargs, required=required, default=default, dest=name)


def _call_with(target, namespace: argparse.Namespace, skip: tuple[str, ...] = ()):
    names = [name for name in inspect.signature(target).parameters if name not in skip]
    values = {name: getattr(namespace, name) for name in names if hasattr(namespace, name)}
    return target(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _data_commands(subparsers) -> None:
    from .data import importers, synth

    data = subparsers.add_parser("data", help="build, import and check MedRegion dataset folders")
    commands = data.add_subparsers(dest="data_command", required=True)

    synth_parser = commands.add_parser("synth", help="generate MedRegion-synth (no download)")
    add_signature_arguments(synth_parser, synth.SynthConfig, aliases={"validation": "--val"})
    synth_parser.add_argument("--check", action="store_true", help="also print the region-level check")

    def run_synth(args):
        config = _call_with(synth.SynthConfig, args)
        counts = synth.generate_synth(config)
        print(f"wrote {config.out}: " + ", ".join(f"{name} {dict(c)}" for name, c in counts.items()))
        if args.check:
            rows = (row for row, _ in synth.iter_synth(config, "train"))
            print("adjective accuracy (whole image vs ROI crop):", synth.region_level_check(rows))
        return 0

    synth_parser.set_defaults(run=run_synth)

    for name, function, help_text in (
        ("import-annotations", importers.import_annotations, "the paper's annotation JSON/JSONL plus boxes"),
        ("import-coco", importers.import_coco, "COCO-style detection JSON"),
        ("import-csv", importers.import_image_csv, "an image folder with a CSV of path, report[, label]"),
    ):
        parser = commands.add_parser(name, help=help_text, description=inspect.getdoc(function))
        add_signature_arguments(parser, function)

        def run_import(args, function=function):
            summary = _call_with(function, args)
            print(summary.describe())
            if summary.report.invalid:
                print(summary.report.describe())
            return 0

        parser.set_defaults(run=run_import)

    validate = commands.add_parser("validate", help="check every row of a dataset folder")
    validate.add_argument("path", help="dataset folder or Hub id")
    validate.add_argument("--split", action="append", help="split(s) to check (default: all present)")

    def run_validate(args):
        from datasets import get_dataset_split_names

        from .data.collator import load_rows
        from .data.schema import InvalidRowsError, ValidationReport, validate_rows

        failed = False
        for split in args.split or get_dataset_split_names(args.path):
            report = ValidationReport()
            try:
                for _ in validate_rows(load_rows(args.path, split, streaming=True), report=report):
                    pass
                print(f"{split}: {report.checked} rows, all valid")
            except InvalidRowsError:
                failed = True
                print(f"{split}: {report.describe()}")
        return 1 if failed else 0

    validate.set_defaults(run=run_validate)


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    """The options `launch_command` reads besides the config, shared by `train` and `finetune`."""
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument(
        "--num-processes", type=int, default=1, help="processes on this machine (GPUs, or CPU)"
    )
    parser.add_argument("--accelerate-config", help="an Accelerate config file (configs/accelerate/*.yaml)")


def launch_command(args: argparse.Namespace) -> list[str]:
    """The `accelerate launch` command line that `regionmed-clip train` runs."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        command += ["--config_file", args.accelerate_config]
    else:
        # --multi_gpu is the launcher that starts N processes; with no GPU the trainer's Accelerator(cpu=True)
        # makes them a gloo (MULTI_CPU) group. `--cpu` would start one process only.
        command += ["--multi_gpu"] if args.num_processes > 1 else []
        command += ["--num_processes", str(args.num_processes), "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "regionmed_clip.training.run", "--config", args.config]
    if args.output_dir:
        command += ["--output-dir", args.output_dir]
    if args.resume:
        command.append("--resume")
    return command


def _train_command(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train through the progressive stages (the same as accelerate launch train_accelerate.py)",
        description="Runs `accelerate launch -m regionmed_clip.training.run --config CONFIG`; mixed precision "
        "comes from the training config.",
    )
    train.add_argument(
        "--config", required=True, help="training YAML (configs/demo.yaml, configs/paper.yaml)"
    )
    train.add_argument("--output-dir", help="override the config's output_dir")
    _add_launch_options(train)
    train.set_defaults(run=lambda args: subprocess.run(launch_command(args)).returncode)


def _finetune_command(subparsers) -> None:
    from .training.finetune import FinetuneArgs, write_finetune_config

    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a trained model with LoRA or in full (contrastive, or classification on labels)",
        description=inspect.getdoc(FinetuneArgs),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_signature_arguments(parser, FinetuneArgs)
    _add_launch_options(parser)

    def run(args):
        config = write_finetune_config(_call_with(FinetuneArgs, args))
        args.config, args.output_dir = str(config), None
        return subprocess.run(launch_command(args)).returncode

    parser.set_defaults(run=run)


def _eval_command(subparsers) -> None:
    from .evaluation.harness import TASKS, run_evaluation

    parser = subparsers.add_parser(
        "eval",
        help=f"evaluate a model on a dataset: {', '.join(TASKS)} (or all)",
        description=inspect.getdoc(run_evaluation),
    )
    add_signature_arguments(
        parser, run_evaluation, aliases={"model_path": "--model", "data_path": "--data", "out_dir": "--out"}
    )

    def run(args):
        metrics = _call_with(run_evaluation, args)
        print((Path(args.out_dir) / "metrics.md").read_text(encoding="utf-8"))
        print(
            f"wrote {args.out_dir}: metrics.json, metrics.md"
            + (", roc_curves.png" if "zero_shot" in metrics else "")
        )
        return 0

    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-clip", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _data_commands(subparsers)
    _train_command(subparsers)
    _finetune_command(subparsers)
    _eval_command(subparsers)
    from .annotation.cli import add_annotate_command
    from .evaluation.grounding import add_explain_command
    from .hub import add_publish_command

    add_explain_command(subparsers)
    add_annotate_command(subparsers)
    add_publish_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
