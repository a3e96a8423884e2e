"""`make learning-check` (`regionmed-clip learning-check`): the demo's comparison (4-stage model against the same
model trained global-only for the same steps) over several seeds, with mean ± std of every evaluation figure.

Each seed is one [`train_and_compare`] of the demo (`experiments.demo`: the same training processes and evaluation
harness as `make demo`, nothing re-implemented) with the config's `seed` replaced; the data split is the config's and is
shared by all seeds. Written to the output folder: `learning_check.json` (every figure of every seed, and per model
its mean, sample standard deviation (ddof = 1) and values), `learning_check.md` (the headline table, box-free
figures first, then every figure) and `learning_check.png` (the headline figures with ±1 std error bars).

The verdict on each headline figure: the 4-stage model beats the baseline when its mean exceeds the baseline's by
more than `margin_std` (2) times the larger of the two standard deviations. With fewer than `MIN_SEEDS` (3) seeds
the spread is not known (one seed has none, two give a standard deviation that is mostly noise), so the verdict is
"spread unknown" instead of a comparison with that bar. Every output names the dataset whose test split it scored.

With `shuffled_control`, a third model per seed measures what the region terms give when their labels carry no
information: the 4-stage recipe trained on a copy of the data whose training split has its region annotations
(caption, adjective, term, position, hard negatives) permuted across all its regions, boxes, images and reports
left as they are ([`shuffled_region_copy`]), and evaluated on the real test split. A gain of the 4-stage model
that this control shares comes from the extra terms or steps, not from what the regions say.
"""

import dataclasses
import glob
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from ..data.folder import local_data_files
from ..training.config import load_config
from .demo import (
    AWARE,
    COMPARED_TASKS,
    DETECTION_COLUMNS,
    HEADLINE,
    PLAIN,
    detection_table,
    evaluated_on,
    flat_figures,
    train_and_compare,
    train_or_reuse,
)

SHUFFLED = "4-stage, shuffled region labels"
#: The box-free phrase-grounding figures the 4-stage model must earn, by query kind and metric, and the measured
#: controls each is compared with: (control, model whose figure it is, figure key with `{kind}` and `{metric}`, the
#: metrics it has, None for all). A heatmap gives a point and no box, so it is a control of pointing only.
LOCALIZATION_KINDS = ("position_free", "term", "caption")
LOCALIZATION_METRICS = {"pointing_accuracy": "pointing", "ap50": "AP50"}
LOCALIZATION_CONTROLS = (
    (
        "objectness only (same proposals, text ignored)",
        AWARE,
        "localization/{kind}/controls/objectness_only/{metric}",
        None,
    ),
    (
        "box prior (training split's mean box of the text, no image)",
        AWARE,
        "localization/{kind}/controls/box_prior/{metric}",
        None,
    ),
    (
        "the model's own heatmap peak",
        AWARE,
        "localization/{kind}/heatmap_pointing_accuracy",
        ("pointing_accuracy",),
    ),
    ("global-only model, its own proposals", PLAIN, "localization/{kind}/{metric}", None),
    (
        "global-only heatmap's peak (no proposer)",
        PLAIN,
        "localization/{kind}/heatmap_pointing_accuracy",
        ("pointing_accuracy",),
    ),
)
#: The detection figures judged (every image asked every query), of term queries, against every control of the
#: detection table (`DETECTION_COLUMNS` after the model's own).
DETECTION_JUDGED_KINDS = ("term",)
DETECTION_JUDGED_METRICS = {"ap50": "AP50", "presence_auc": "presence AUC"}
DETECTION_CONTROLS = tuple((*column, None) for column in DETECTION_COLUMNS[1:])
MIN_SEEDS = 3  # the fewest seeds whose standard deviation the verdict compares margins with
#: The fields of a region that say what it is; the permutation of the control moves them together.
REGION_ANNOTATIONS = ("caption", "adjective", "term", "position", "negatives")


def shuffled_region_copy(source: Path, out: Path, seed: int = 0, split: str = "train") -> dict:
    """Copy the dataset folder `source` to `out` with the region annotations of `split` permuted (seeded) across all
    regions of the split; everything else (boxes, scores, images, reports, the other splits) stays. Returns
    `{"regions": N, "moved": M}`: how many regions the split has and how many got another region's annotations.
    Written to a temporary folder and renamed, so a half-written copy is never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pattern = local_data_files(Path(source), "default", split)
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"{source}: no {split} files ({pattern}) to shuffle the regions of")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    tables = [pq.read_table(file) for file in files]
    rows = [table.to_pylist() for table in tables]
    regions = [region for part in rows for row in part for region in row["regions"] or []]
    order = np.random.default_rng(seed).permutation(len(regions))
    annotations = [{key: regions[i].get(key) for key in REGION_ANNOTATIONS} for i in order]
    for region, annotation in zip(regions, annotations, strict=True):
        region.update(annotation)
    for file, table, part in zip(files, tables, rows, strict=True):
        target = partial / Path(file).relative_to(source)
        pq.write_table(pa.Table.from_pylist(part, schema=table.schema), target)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return {"regions": len(regions), "moved": int((order != np.arange(len(regions))).sum())}


def aggregate(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of one figure over seeds."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def verdict(summary: dict, seeds: int, margin_std: float = 2.0) -> dict[str, dict]:
    """Per headline figure: the margin of the 4-stage mean over the baseline's, the bar it must clear
    (`margin_std` × the larger std) and whether it does; with fewer than `MIN_SEEDS` seeds the bar and the answer
    are None (not known)."""
    aware, plain = summary[AWARE], summary[PLAIN]
    result = {}
    for label, key in HEADLINE:
        if key not in aware or key not in plain:
            continue
        margin = aware[key]["mean"] - plain[key]["mean"]
        if seeds < MIN_SEEDS:
            result[label] = {"margin": margin, "bar": None, "beats": None}
            continue
        bar = margin_std * max(aware[key]["std"], plain[key]["std"])
        result[label] = {"margin": margin, "bar": bar, "beats": bool(margin > bar)}
    return result


def control_verdict(
    summary: dict,
    seeds: int,
    figure: str,
    kinds: tuple,
    metrics: dict,
    controls: tuple,
    margin_std: float = 2.0,
) -> list[dict]:
    """The 4-stage model's figures (`figure`, a `flat_figures` key with `{kind}` and `{metric}`, for each of
    `kinds` × `metrics`) against each of their measured `controls` (label, model, key, the metrics it has or None),
    with `verdict`'s rule: beats when the margin exceeds `margin_std` × the larger std, unknown (None) with fewer
    than `MIN_SEEDS` seeds. Figures a run does not have (no terms in the data) are left out."""
    aware = summary[AWARE]
    rows = []
    for kind in kinds:
        for metric, metric_name in metrics.items():
            key = figure.format(kind=kind, metric=metric)
            if key not in aware:
                continue
            for control, model, pattern, has in controls:
                other = summary.get(model, {}).get(pattern.format(kind=kind, metric=metric))
                if other is None or (has is not None and metric not in has):
                    continue
                margin = aware[key]["mean"] - other["mean"]
                bar = margin_std * max(aware[key]["std"], other["std"]) if seeds >= MIN_SEEDS else None
                rows.append(
                    {
                        "query": kind,
                        "metric": metric_name,
                        "control": control,
                        "model": aware[key],
                        "control_figure": other,
                        "margin": margin,
                        "bar": bar,
                        "beats": None if bar is None else bool(margin > bar),
                    }
                )
    return rows


def localization_verdict(summary: dict, seeds: int, margin_std: float = 2.0) -> list[dict]:
    """The box-free phrase-grounding figures (`LOCALIZATION_KINDS` × `LOCALIZATION_METRICS`) against each of their
    controls (`LOCALIZATION_CONTROLS`), by `control_verdict`."""
    return control_verdict(
        summary,
        seeds,
        "localization/{kind}/{metric}",
        LOCALIZATION_KINDS,
        LOCALIZATION_METRICS,
        LOCALIZATION_CONTROLS,
        margin_std,
    )


def detection_verdict(summary: dict, seeds: int, margin_std: float = 2.0) -> list[dict]:
    """The detection figures of term queries (`DETECTION_JUDGED_METRICS`: AP50 and presence AUC) against every
    control of the detection table (`DETECTION_CONTROLS`), by `control_verdict`."""
    return control_verdict(
        summary,
        seeds,
        DETECTION_COLUMNS[0][2],
        DETECTION_JUDGED_KINDS,
        DETECTION_JUDGED_METRICS,
        DETECTION_CONTROLS,
        margin_std,
    )


def scale_steps(config, factor: float):
    """`config` with every stage's `steps` multiplied by `factor` (at least 1): a cheaper budget for screening.
    The learning rate schedules keep their shape."""
    if any(stage.steps is None for stage in config.stages):
        raise ValueError("--steps-scale needs stages given in `steps`")
    stages = [
        dataclasses.replace(stage, steps=max(1, round(stage.steps * factor))) for stage in config.stages
    ]
    return dataclasses.replace(config, stages=stages)


def _shuffled_control(seed_config, data: Path, bootstrap: int, reuse_trained: bool) -> dict:
    """The control model of one seed: the 4-stage recipe on the shuffled copy `data`, evaluated on the real data."""
    from ..evaluation import EvalSettings, run_evaluation

    out = Path(seed_config.output_dir)
    control = dataclasses.replace(
        seed_config,
        output_dir=str(out / "shuffled-regions"),
        data=dataclasses.replace(seed_config.data, path=str(data), synth=None),
    )
    return run_evaluation(
        EvalSettings(
            train_or_reuse(control, reuse_trained),
            seed_config.data.path,
            out / "eval" / "shuffled-regions",
            tasks=COMPARED_TASKS,
            seed=seed_config.seed,
            bootstrap=bootstrap,
        )
    )


def run_learning_check(
    config,
    out: Path,
    seeds: list[int],
    bootstrap: int = 1000,
    reuse_trained: bool = False,
    shuffled_control: bool = False,
) -> dict:
    """Train and evaluate both models (and the shuffled-label control) for every seed (folders `out/seed-N/`),
    aggregate, and write the outputs."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    shuffled = None
    for seed in seeds:
        seed_config = dataclasses.replace(config, seed=seed, output_dir=str(out / f"seed-{seed}"))
        comparison = train_and_compare(
            seed_config, tasks=COMPARED_TASKS, bootstrap=bootstrap, reuse_trained=reuse_trained
        )
        per_seed[seed] = {name: flat_figures(metrics) for name, metrics in comparison.results.items()}
        if shuffled_control:
            # After the first training, which generates MedRegion-synth when the config asks for it.
            data = out / "shuffled-regions-data"
            if shuffled is None:
                shuffled = shuffled_region_copy(
                    Path(config.data.path), data, seed=0, split=config.data.train_split
                )
            metrics = _shuffled_control(seed_config, data, bootstrap, reuse_trained)
            per_seed[seed][SHUFFLED] = flat_figures(metrics)
    models = list(next(iter(per_seed.values())))
    summary = {}
    for model in models:
        keys = sorted(set.intersection(*(set(per_seed[seed][model]) for seed in seeds)))
        summary[model] = {key: aggregate([per_seed[seed][model][key] for seed in seeds]) for key in keys}
    result = {
        "seeds": list(seeds),
        "steps": {stage.name: stage.steps for stage in config.stages},
        "config": config.to_dict(),
        "dataset": evaluated_on(config.data),
        "summary": summary,
        "per_seed": {str(seed): figures for seed, figures in per_seed.items()},
        "verdict": verdict(summary, len(seeds)),
        "localization_verdict": localization_verdict(summary, len(seeds)),
        "detection_verdict": detection_verdict(summary, len(seeds)),
        "seconds": time.perf_counter() - started,
    }
    if shuffled is not None:
        result["shuffled_regions"] = shuffled
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


def _bar_cell(check: dict, seeds: int) -> str:
    """The bar and verdict cells of one headline row."""
    if check["beats"] is None:
        return f"– | spread unknown ({seeds} seed{'s' if seeds > 1 else ''}; needs {MIN_SEEDS})"
    return f"{check['bar']:.3f} | {'yes' if check['beats'] else 'no'}"


def _verdict_lines(title: str, intro: str, rows: list[dict], seeds: int) -> list[str]:
    """A section of the 4-stage model's figures against each measured control (`control_verdict`'s rows)."""
    if not rows:
        return []
    lines = [
        "",
        f"## {title}",
        "",
        intro,
        "",
        "| query | metric | 4-stage | control | control's figure | margin | 2 std bar | beats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        check = {"beats": row["beats"], "bar": row["bar"]}
        lines.append(
            f"| {row['query']} | {row['metric']} | {_cell(row['model'])} | {row['control']} | "
            f"{_cell(row['control_figure'])} | {row['margin']:+.3f} | {_bar_cell(check, seeds)} |"
        )
    return lines


def _detection_lines(result: dict) -> list[str]:
    """The detection table (every model and control, mean ± std) and its verdict on term queries."""
    summary = result["summary"]
    if not any(key.startswith("detection/") for key in summary[AWARE]):
        return []
    lines = [
        "",
        "## Detection without boxes: the model and its controls",
        "",
        "Every test image asked every query of the split (`eval --tasks detection`), images without the finding "
        "included: COCO AP@[.5:.95], AP50 and AR@100 (pycocotools), and the presence AUC (an image's best score "
        "against whether it holds the finding, macro over queries).",
        "",
        *detection_table(lambda model, key: _cell(summary.get(model, {}).get(key))),
    ]
    return lines + _verdict_lines(
        "Detection without boxes against its controls",
        "Term queries: the 4-stage model's AP50 and presence AUC against every control.",
        result.get("detection_verdict") or [],
        len(result["seeds"]),
    )


def markdown(result: dict) -> str:
    aware, plain = result["summary"][AWARE], result["summary"][PLAIN]
    control = result["summary"].get(SHUFFLED)
    seeds = ", ".join(str(seed) for seed in result["seeds"])
    lines = [
        "# Learning check",
        "",
        f"4-stage model against the global-only baseline (same steps: {result['steps']}), seeds {seeds}: mean ± std",
        f"(ddof = 1) on {result['dataset']}; {result['seconds'] / 60:.0f} min in all.",
    ]
    if control is not None:
        moved = result["shuffled_regions"]
        lines += [
            f"Control: the 4-stage recipe with the training split's region annotations permuted across its regions "
            f"({moved['moved']} of {moved['regions']} moved; boxes, images and reports unchanged).",
        ]
    extra = " | shuffled-label control" if control is not None else ""
    lines += [
        "",
        f"| figure | 4-stage | global-only | margin | 2 std bar | beats{extra} |",
        "|---|---|---|---|---|---|" + ("---|" if control is not None else ""),
    ]
    for label, key in HEADLINE:
        if key in aware and key in plain:
            check = result["verdict"][label]
            row = (
                f"| {label} | {_cell(aware[key])} | {_cell(plain[key])} | {check['margin']:+.3f} | "
                f"{_bar_cell(check, len(result['seeds']))} |"
            )
            lines.append(row + (f" {_cell(control.get(key))} |" if control is not None else ""))
    lines += _verdict_lines(
        "Localization without boxes against its controls",
        "Phrase grounding: the 4-stage model's top detection per (test image, finding) query (`eval --tasks "
        "localization`), queried by the caption without its position words (`position_free`), by the term alone, "
        "and by the whole caption, whose position words give the box prior its answer; its pointing beside its "
        "own heatmap peak's.",
        result.get("localization_verdict") or [],
        len(result["seeds"]),
    )
    lines += _detection_lines(result)
    models = list(result["summary"])
    lines += [
        "",
        "## Every figure",
        "",
        "| figure | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for key in sorted(set().union(*(result["summary"][model] for model in models))):
        cells = " | ".join(_cell(result["summary"][model].get(key)) for model in models)
        lines.append(f"| {key} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, key) for label, key in HEADLINE if key in result["summary"][PLAIN]]
    figure, axis = plt.subplots(figsize=(10, 4))
    models = result["summary"]
    width = 0.8 / len(models)
    for index, (model, figures) in enumerate(models.items()):
        offset = (index - (len(models) - 1) / 2) * width
        means = [figures[key]["mean"] if key in figures else float("nan") for _, key in rows]
        stds = [figures[key]["std"] if key in figures else 0.0 for _, key in rows]
        axis.bar([i + offset for i in range(len(rows))], means, width, yerr=stds, capsize=3, label=model)
    axis.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=7, rotation=15)
    axis.set_ylim(0, 1)
    axis.set_title(f"{result['dataset']}, mean ± std over seeds {result['seeds']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclasses.dataclass
class LearningCheckArgs:
    """The options of `regionmed-clip learning-check` (`make learning-check`)."""

    config: str = dataclasses.field(
        default="configs/demo.yaml",
        metadata={"help": "The training YAML of the four-stage model (the demo's by default)"},
    )
    output_dir: str = dataclasses.field(
        default="outputs/learning-check",
        metadata={"help": "Folder of the outputs, with one `seed-N/` folder of trainings per seed"},
    )
    seeds: list[int] = dataclasses.field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "The seeds to train and evaluate both models with"},
    )
    bootstrap: int = dataclasses.field(
        default=1000, metadata={"help": "Bootstrap resamples of the zero-shot confidence interval (0: none)"}
    )
    steps_scale: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "Multiplies every stage's steps (1: the config's budget; less for a cheaper screening)"
        },
    )
    reuse_trained: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Evaluate the models a finished run of the same config left in the output folder instead of "
            "retraining them"
        },
    )
    shuffled_control: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Also train, per seed, the 4-stage recipe on the data with its training split's region "
            "annotations permuted across regions, and report it beside both models (one more training per seed)"
        },
    )


def learning_check(args: LearningCheckArgs) -> dict:
    """The demo's comparison over several seeds; writes `learning_check.json`, `.md` and `.png` and returns the
    result."""
    run_config = load_config(args.config)
    if args.steps_scale != 1.0:
        run_config = scale_steps(run_config, args.steps_scale)
    return run_learning_check(
        run_config,
        Path(args.output_dir),
        list(args.seeds),
        args.bootstrap,
        args.reuse_trained,
        args.shuffled_control,
    )
