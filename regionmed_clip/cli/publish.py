"""`regionmed-clip publish`: a model folder (and its dataset) to the Hugging Face Hub."""

import argparse
import inspect
import sys

from .options import add_options


def register(subparsers) -> argparse.ArgumentParser:
    """Add `regionmed-clip publish` (options from `publish`'s signature; the token is never an option, so it
    stays out of shell histories)."""
    from ..hub.publish import PublishError, publish

    parser = subparsers.add_parser(
        "publish",
        help="upload a model folder (and its dataset) to the Hugging Face Hub",
        description=inspect.getdoc(publish).split("\n\nArgs:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options = add_options(parser, publish, skip=("token",))

    def run(args) -> int:
        try:
            results = options.build(args)
        except PublishError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for result in results:
            print(result.describe())
        return 0

    parser.set_defaults(run=run)
    return parser


__all__ = ["register"]
