"""`regionmed-clip eval` (every figure of the paper from one harness), `explain` (a patch-to-text heatmap) and
`locate` (the best boxes for a text, without boxes given)."""

import argparse
import inspect
from pathlib import Path

from .options import add_options


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    from ..evaluation.harness import TASKS, run_evaluation

    parser = subparsers.add_parser(
        "eval",
        help=f"evaluate a model on a dataset: {', '.join(TASKS)} (or all)",
        description=inspect.getdoc(run_evaluation).split("\n\nArgs:")[0],
    )
    options = add_options(
        parser, run_evaluation, aliases={"model_path": "--model", "data_path": "--data", "out_dir": "--out"}
    )

    def run(args) -> int:
        metrics = options.build(args)
        out_dir = Path(options.values(args)["out_dir"])
        print((out_dir / "metrics.md").read_text(encoding="utf-8"))
        print(
            f"wrote {out_dir}: metrics.json, metrics.md"
            + (", roc_curves.png" if "zero_shot" in metrics else "")
        )
        return 0

    parser.set_defaults(run=run)
    return parser


def add_explain_command(subparsers) -> argparse.ArgumentParser:
    from ..evaluation.grounding import explain

    parser = subparsers.add_parser(
        "explain",
        help="heatmap of where a text matches an image (patch-to-text cosine similarity)",
        description=inspect.getdoc(explain).split("\n\n")[0],
    )
    options = add_options(parser, explain, aliases={"model_path": "--model"})

    def run(args) -> int:
        print(options.build(args))
        return 0

    parser.set_defaults(run=run)
    return parser


def add_locate_command(subparsers) -> argparse.ArgumentParser:
    import json

    from ..evaluation.grounding import locate

    parser = subparsers.add_parser(
        "locate",
        help="find a text in an image without boxes: the best boxes over the heatmap",
        description=inspect.getdoc(locate).split("\n\n")[0],
    )
    options = add_options(parser, locate, aliases={"model_path": "--model"})

    def run(args) -> int:
        print(json.dumps(options.build(args), indent=2))
        return 0

    parser.set_defaults(run=run)
    return parser


def register(subparsers) -> None:
    add_eval_command(subparsers)
    add_explain_command(subparsers)
    add_locate_command(subparsers)


__all__ = ["add_eval_command", "add_explain_command", "add_locate_command", "register"]
