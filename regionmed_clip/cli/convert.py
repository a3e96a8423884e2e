"""`regionmed-clip convert`: a CLIP / SigLIP / VisionTextDualEncoder checkpoint → a RegionMed-CLIP model folder."""

import inspect

from .options import CommandParser


def register(commands: CommandParser) -> None:
    from ..convert import ConvertConfig, convert

    def run(config: ConvertConfig) -> int:
        out = convert(config)
        print(f"wrote {out}: model, processor, remote code, README.md")
        return 0

    commands.add_command(
        "convert",
        (ConvertConfig,),
        run,
        help="convert a CLIP / SigLIP / VisionTextDualEncoder checkpoint into a RegionMed-CLIP model folder",
        description=inspect.getdoc(convert),
    )


__all__ = ["register"]
