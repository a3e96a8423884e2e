"""`regionmed-clip convert`: a CLIP / SigLIP / VisionTextDualEncoder checkpoint → a RegionMed-CLIP model folder."""

import inspect

from .options import add_options


def register(subparsers) -> None:
    from ..convert import ConvertConfig, convert

    parser = subparsers.add_parser(
        "convert",
        help="convert a CLIP / SigLIP / VisionTextDualEncoder checkpoint into a RegionMed-CLIP model folder",
        description=inspect.getdoc(convert),
    )
    options = add_options(parser, ConvertConfig, aliases={"source": "--from"})

    def run(args) -> int:
        out = convert(options.build(args))
        print(f"wrote {out}: model, processor, remote code, README.md")
        return 0

    parser.set_defaults(run=run)


__all__ = ["register"]
