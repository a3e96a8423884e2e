"""The `regionmed-clip` command.

Each sub-command's options are read from the typed signature of the function (or dataclass) it runs, so the
signature is the one place an option is defined, documented and defaulted.
"""

import argparse
import dataclasses
import inspect
import os
import sys
import types
import typing


def _option_type(annotation):
    """(argparse type, nargs) for a parameter annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _option_type(str if os.PathLike in options or str in options else options[0])
    if origin is tuple:
        args = typing.get_args(annotation)
        return args[0], len(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-clip", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _data_commands(subparsers)
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
