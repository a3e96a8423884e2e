"""`regionmed-clip learning-check` (what `make learning-check` runs): the demo's 4-stage model against its
global-only baseline over several seeds, mean ± std of every figure."""

import inspect

from .options import add_options


def register(subparsers) -> None:
    from ..learning_check import learning_check, markdown

    parser = subparsers.add_parser(
        "learning-check",
        help="the demo's comparison with its global-only baseline over several seeds: mean ± std of every figure",
        description=inspect.getdoc(learning_check).split("\n\nArgs:")[0],
    )
    options = add_options(parser, learning_check)

    def run(args) -> int:
        print(markdown(options.build(args)))
        return 0

    parser.set_defaults(run=run)


__all__ = ["register"]
