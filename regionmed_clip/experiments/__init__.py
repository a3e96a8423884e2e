"""Experiments run on top of training and evaluation, each one module with one `regionmed-clip` command: `demo`
(`make demo`), `learning_check` (`make learning-check`), `ablation` (`make ablation`) and `recipe_stability`
(`regionmed-clip recipe-stability`). They live in the package, not beside it, so the installed console command can
run them; each trains through the real entry point in its own process and scores with the evaluation harness.

Needs the `train` and `eval` extras.
"""
