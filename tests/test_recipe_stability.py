"""`regionmed-clip recipe-stability`: each recipe's config is a valid training config, and the collapse rule."""

import math

import pytest

from regionmed_clip.experiments import recipe_stability as script
from regionmed_clip.training.config import load_config


def test_every_recipe_writes_a_training_config_that_changes_only_its_own_settings(tmp_path):
    import yaml

    for name, (lr, betas, warmup) in script.RECIPES.items():
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(script.recipe_config(tmp_path, "data", lr, betas, warmup, 30, 16)))
        config = load_config(str(path))
        assert tuple(config.adam_betas) == betas, name
        warm, main = config.stages
        assert "text_model" in warm.frozen and "text_model" not in main.frozen
        assert (main.lr, main.warmup_ratio, main.batch_size, main.steps) == (lr, warmup, 16, 30)
        assert config.model.vision_config["hidden_size"] == 768 == config.model.text_config["hidden_size"]


def test_a_global_stage_that_never_goes_below_ln_batch_is_collapsed_and_one_that_learns_is_not():
    chance = math.log(16)
    warmup = [(1, 0, 0.5)]  # the warm-up stage's losses are not judged
    flat = warmup + [(2 + i, 1, chance + (0.04 if i % 2 else -0.03)) for i in range(20)]
    assert script.collapse(flat, 16) == {
        "ln_batch": chance,
        "tail_mean": pytest.approx(chance + 0.005),
        "collapsed": True,
    }
    learning = warmup + [(2 + i, 1, chance - 0.01 * i) for i in range(20)]
    result = script.collapse(learning, 16)
    assert result["tail_mean"] == pytest.approx(chance - 0.145) and not result["collapsed"]
    # Only the last steps count: a stage that learnt and then fell back to ln(batch) collapsed.
    assert script.collapse(learning[:-10] + flat[-10:], 16)["collapsed"]
