"""The `regionmed-clip` command. Commands are registered here and only here, one module per group; their
options are generated from the typed configs and functions of the domain modules (`options.add_options`), so a
field or parameter is the one place an option is defined, documented and defaulted."""

import argparse
import importlib
import sys

# One module per command group, each with `register(subparsers)`. They are imported when the parser is built, not
# here: `python -m regionmed_clip.cli.train` (the training process) must not find itself already imported.
COMMAND_MODULES = ("data", "train", "evaluate", "annotate", "publish", "convert", "demo", "learning_check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regionmed-clip",
        description="RegionMed-CLIP: build datasets, train, fine-tune, evaluate, annotate, publish and convert.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
