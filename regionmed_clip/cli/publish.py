"""`regionmed-clip publish`: a model folder (and its dataset) to the Hugging Face Hub."""

import inspect
import sys

from .options import CommandParser


def register(commands: CommandParser) -> None:
    """Add `regionmed-clip publish` (options from `PublishArgs`; the token is never an option, so it stays out of
    shell histories)."""
    from ..hub.publish import PublishArgs, PublishError, publish

    def run(args: PublishArgs) -> int:
        try:
            results = publish(args)
        except PublishError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for result in results:
            print(result.describe())
        return 0

    commands.add_command(
        "publish",
        (PublishArgs,),
        run,
        help="upload a model folder (and its dataset) to the Hugging Face Hub",
        description=inspect.getdoc(publish),
    )


__all__ = ["register"]
