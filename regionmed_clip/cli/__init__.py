"""The `regionmed-clip` command. Commands are registered here and only here, one module per command group; each
command's options are the fields of the typed configs of the domain modules, read by `HfArgumentParser`
(`options.CommandParser`), so a field is the one place an option is defined, documented and defaulted."""

import importlib
import sys

from .options import CommandParser

# One module per command group, each with `register(commands)`. They are imported when the parser is built, not
# here: `python -m regionmed_clip.cli.train` (the training process) must not find itself already imported.
COMMAND_MODULES = ("data", "train", "evaluate", "annotate", "publish", "convert", "experiments")


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="regionmed-clip",
        description="RegionMed-CLIP: build datasets, train, fine-tune, evaluate, annotate, publish and convert; "
        "run the demo and the experiments.",
    )
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
