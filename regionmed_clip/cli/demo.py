"""`regionmed-clip demo` (what `make demo` runs): MedRegion-synth → four-stage training → evaluation → a model
folder with its card, against a global-only baseline of the same length."""

import inspect

from .options import add_options


def register(subparsers) -> None:
    from ..demo import run_demo

    parser = subparsers.add_parser(
        "demo",
        help="train the demo model and its global-only baseline on MedRegion-synth, evaluate and compare them",
        description=inspect.getdoc(run_demo).split("\n\nArgs:")[0],
    )
    options = add_options(parser, run_demo)

    def run(args) -> int:
        options.build(args)
        return 0

    parser.set_defaults(run=run)


__all__ = ["register"]
