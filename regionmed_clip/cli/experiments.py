"""`regionmed-clip demo`, `learning-check`, `ablation` and `recipe-stability`: the experiments of
`regionmed_clip.experiments`, one command each (`make demo`, `make learning-check`, `make ablation` and
`make recipe-stability` run them)."""

import inspect

from .options import CommandParser


def register(commands: CommandParser) -> None:
    from ..experiments import ablation, demo, learning_check, recipe_stability

    # (command, module, options, what runs, what prints its result (None: it prints as it goes), help)
    for name, module, options, function, report, help_text in (
        (
            "demo",
            demo,
            demo.DemoArgs,
            demo.run_demo,
            None,
            "train the demo model and its global-only baseline on MedRegion-synth, evaluate and compare them",
        ),
        (
            "learning-check",
            learning_check,
            learning_check.LearningCheckArgs,
            learning_check.learning_check,
            learning_check.markdown,
            "the demo's comparison with its global-only baseline over several seeds: mean ± std of every figure",
        ),
        (
            "ablation",
            ablation,
            ablation.AblationArgs,
            ablation.run_ablation,
            None,
            "the B / W / W+G / W+G+R / W+G+R+F ablation on the demo's data and step budget",
        ),
        (
            "recipe-stability",
            recipe_stability,
            recipe_stability.RecipeStabilityArgs,
            recipe_stability.run_recipe_stability,
            recipe_stability.markdown,
            "does a training recipe train random towers of the paper's size, or does its loss sit at ln(batch)?",
        ),
    ):

        def run(args, function=function, report=report) -> int:
            result = function(args)
            if report is not None:
                print(report(result))
            return 0

        commands.add_command(name, (options,), run, help=help_text, description=inspect.getdoc(module))


__all__ = ["register"]
