"""`make learning-check`: the demo's comparison (4-stage model against the same model trained global-only for the
same steps) over several seeds, with mean ± std of every evaluation figure.

Each seed is one [`train_and_compare`] of `regionmed_clip.demo` (the same training processes and evaluation harness
as `make demo`, nothing re-implemented) with the config's `seed` replaced; the data split is the config's and is
shared by all seeds. Written to the output folder: `learning_check.json` (every figure of every seed, and per model
its mean, sample standard deviation (ddof = 1) and values), `learning_check.md` (the headline table, box-free
figures first, then every figure) and `learning_check.png` (the headline figures with ±1 std error bars).

The verdict on each headline figure: the 4-stage model beats the baseline when its mean exceeds the baseline's by
more than `margin_std` (2) times the larger of the two standard deviations.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from .demo import HEADLINE, flat_figures, train_and_compare
from .training.config import load_config


def aggregate(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of one figure over seeds."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def verdict(summary: dict, margin_std: float = 2.0) -> dict[str, dict]:
    """Per headline figure: the margin of the 4-stage mean over the baseline's, the bar it must clear
    (`margin_std` × the larger std) and whether it does."""
    aware, plain = summary["4-stage (region-aware)"], summary["global-only"]
    result = {}
    for label, key in HEADLINE:
        if key not in aware or key not in plain:
            continue
        margin = aware[key]["mean"] - plain[key]["mean"]
        bar = margin_std * max(aware[key]["std"], plain[key]["std"])
        result[label] = {"margin": margin, "bar": bar, "beats": bool(margin > bar)}
    return result


def scale_steps(config, factor: float):
    """`config` with every stage's `steps` multiplied by `factor` (at least 1): a cheaper budget for screening.
    The learning rate schedules keep their shape."""
    if any(stage.steps is None for stage in config.stages):
        raise ValueError("--steps-scale needs stages given in `steps`")
    stages = [
        dataclasses.replace(stage, steps=max(1, round(stage.steps * factor))) for stage in config.stages
    ]
    return dataclasses.replace(config, stages=stages)


def run_learning_check(
    config, out: Path, seeds: list[int], bootstrap: int = 1000, reuse_trained: bool = False
) -> dict:
    """Train and evaluate both models for every seed (folders `out/seed-N/`), aggregate, and write the outputs."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        seed_config = dataclasses.replace(config, seed=seed, output_dir=str(out / f"seed-{seed}"))
        comparison = train_and_compare(
            seed_config,
            tasks="zero_shot,retrieval,region,grounding",
            bootstrap=bootstrap,
            reuse_trained=reuse_trained,
        )
        per_seed[seed] = {name: flat_figures(metrics) for name, metrics in comparison.results.items()}
    models = list(next(iter(per_seed.values())))
    summary = {}
    for model in models:
        keys = sorted(set.intersection(*(set(per_seed[seed][model]) for seed in seeds)))
        summary[model] = {key: aggregate([per_seed[seed][model][key] for seed in seeds]) for key in keys}
    result = {
        "seeds": list(seeds),
        "steps": {stage.name: stage.steps for stage in config.stages},
        "config": config.to_dict(),
        "summary": summary,
        "per_seed": {str(seed): figures for seed, figures in per_seed.items()},
        "verdict": verdict(summary),
        "seconds": time.perf_counter() - started,
    }
    (out / "learning_check.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "learning_check.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "learning_check.png")
    return result


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    if math.isnan(entry["mean"]):
        return "nan"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def markdown(result: dict) -> str:
    aware, plain = result["summary"]["4-stage (region-aware)"], result["summary"]["global-only"]
    seeds = ", ".join(str(seed) for seed in result["seeds"])
    lines = [
        "# Learning check",
        "",
        f"4-stage model against the global-only baseline (same steps: {result['steps']}), seeds {seeds}: mean ± std",
        f"(ddof = 1) on the MedRegion-synth test split; {result['seconds'] / 60:.0f} min in all.",
        "",
        "| figure | 4-stage | global-only | margin | 2 std bar | beats |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in HEADLINE:
        if key in aware and key in plain:
            check = result["verdict"][label]
            lines.append(
                f"| {label} | {_cell(aware[key])} | {_cell(plain[key])} | {check['margin']:+.3f} | "
                f"{check['bar']:.3f} | {'yes' if check['beats'] else 'no'} |"
            )
    lines += ["", "## Every figure", "", "| figure | 4-stage | global-only |", "|---|---|---|"]
    for key in sorted(set(aware) | set(plain)):
        lines.append(f"| {key} | {_cell(aware.get(key))} | {_cell(plain.get(key))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, key) for label, key in HEADLINE if key in result["summary"]["global-only"]]
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.38
    for offset, (model, figures) in zip((-width / 2, width / 2), result["summary"].items(), strict=True):
        means = [figures[key]["mean"] for _, key in rows]
        stds = [figures[key]["std"] for _, key in rows]
        axis.bar([i + offset for i in range(len(rows))], means, width, yerr=stds, capsize=3, label=model)
    axis.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=7, rotation=15)
    axis.set_ylim(0, 1)
    axis.set_title(f"MedRegion-synth test split, mean ± std over seeds {result['seeds']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def learning_check(
    config: str = "configs/demo.yaml",
    output_dir: str = "outputs/learning-check",
    seeds: tuple[int, ...] = (0, 1, 2),
    bootstrap: int = 1000,
    steps_scale: float = 1.0,
    reuse_trained: bool = False,
) -> dict:
    """The demo's comparison over several seeds; writes `learning_check.json`, `.md` and `.png` and returns the
    result.

    Args:
        config: The training YAML of the four-stage model (the demo's by default).
        output_dir: Folder of the outputs, with one `seed-N/` folder of trainings per seed.
        seeds: The seeds to train and evaluate both models with.
        bootstrap: Bootstrap resamples of the zero-shot confidence interval (0: none).
        steps_scale: Multiplies every stage's steps (1: the config's budget; less for a cheaper screening).
        reuse_trained: Evaluate the models a finished run of the same config left in the output folder instead of
            retraining them.
    """
    run_config = load_config(config)
    if steps_scale != 1.0:
        run_config = scale_steps(run_config, steps_scale)
    return run_learning_check(run_config, Path(output_dir), list(seeds), bootstrap, reuse_trained)
