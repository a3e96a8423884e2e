"""`regionmed-clip eval` (every figure of the paper from one harness), `explain` (a patch-to-text heatmap) and
`locate` (the best boxes for a text, without boxes given)."""

import inspect
import json
from pathlib import Path

from .options import CommandParser


def register(commands: CommandParser) -> None:
    from ..evaluation.grounding import ExplainArgs, LocateArgs, explain, locate
    from ..evaluation.harness import TASKS, run_evaluation
    from ..evaluation.settings import EvalSettings

    def run_eval(settings: EvalSettings) -> int:
        metrics = run_evaluation(settings)
        out_dir = Path(settings.out_dir)
        print((out_dir / "metrics.md").read_text(encoding="utf-8"))
        print(
            f"wrote {out_dir}: metrics.json, metrics.md"
            + (", roc_curves.png" if "zero_shot" in metrics else "")
        )
        return 0

    commands.add_command(
        "eval",
        (EvalSettings,),
        run_eval,
        help=f"evaluate a model on a dataset: {', '.join(TASKS)} (or all)",
        description=inspect.getdoc(run_evaluation),
    )

    def run_explain(args: ExplainArgs) -> int:
        print(explain(args))
        return 0

    commands.add_command(
        "explain",
        (ExplainArgs,),
        run_explain,
        help="heatmap of where a text matches an image (patch-to-text cosine similarity)",
        description=inspect.getdoc(explain),
    )

    def run_locate(args: LocateArgs) -> int:
        print(json.dumps(locate(args), indent=2))
        return 0

    commands.add_command(
        "locate",
        (LocateArgs,),
        run_locate,
        help="find a text in an image without boxes: the best boxes over the heatmap",
        description=inspect.getdoc(locate),
    )


__all__ = ["register"]
