"""`make demo` (`regionmed-clip demo`): MedRegion-synth → four-stage training → evaluation → a model folder with a
report.

Also trains the same model global-only for the same number of steps and compares the two on the held-out split,
box-free figures first (the global embedding, what a user without boxes gets), then the figures that take the
split's ground-truth boxes as input, each region figure beside its measured no-image control. The global-only
model's ROI branch is never trained, so its region figures come from its global path applied to each box's crop.
One seed (`seed` of the config): a difference of a few points is within the seed-to-seed spread, which
`make learning-check` (`regionmed-clip learning-check`, the same comparison over three seeds) measures.
Each training runs in its own process through the real entry point (`train_in_subprocess`).
The model folder gets its model card (`README.md`, from `model_card.md`) with the evaluation's figures, ready
for `regionmed-clip publish`.
"""

import dataclasses
import json
import time
from pathlib import Path

from ..evaluation.localization import DETECTION_KINDS, query_text, split_queries
from ..evaluation.report import DETECTION_FIGURES
from ..training.config import load_config
from ..training.run import train_in_subprocess

#: The names of the compared models in every result, table and plot.
AWARE, PLAIN = "4-stage (region-aware)", "global-only"
#: The evaluation tasks both models are compared on (the baseline's in `make demo`, both in the learning check).
COMPARED_TASKS = "zero_shot,retrieval,region,grounding,localization,detection"


def global_only(config, output_dir: Path):
    """The same run with the region stages replaced by global-level training of the same length: the same model
    (with `global_pool="cls_proposer"` its z_global pools the patches by the region proposer, which its own global
    loss trains here, as no box reaches it), only the ROI processor frozen and unused."""
    warmup, *rest = config.stages
    if any(stage.steps is None for stage in config.stages):
        raise ValueError("the global-only comparison needs stages given in `steps`")
    steps = sum(stage.steps for stage in rest)
    global_stage = dataclasses.replace(
        rest[0],
        name="global-only",
        steps=steps,
        frozen=sorted(set(rest[0].frozen) | {"roi_processor"}),
        loss_weights={"global_loss": 1.0, "summary_loss": 0.5},
    )
    return dataclasses.replace(config, output_dir=str(output_dir), stages=[warmup, global_stage])


#: Sections of an evaluation whose figures are aggregated; within them every numeric leaf is a figure except
#: counts, per-class breakdowns, confidence intervals, chance and ceilings (their spread over seeds is not a figure of
#: the model).
SECTIONS = ("zero_shot", "retrieval", "region", "grounding", "localization", "detection", "few_shot")
SKIPPED_KEYS = ("num_", "per_class", "ci95", "scores", "chance", "ceiling", "provenance")


def flat_figures(metrics: dict) -> dict[str, float]:
    """Every figure of a `run_evaluation` result as `section/.../name` → value (NaN kept: it says a class had
    no positives, and the aggregate then shows it)."""
    figures: dict[str, float] = {}

    def walk(node, path: str):
        if isinstance(node, dict):
            for key, value in node.items():
                if not any(part in str(key) for part in SKIPPED_KEYS):
                    walk(value, f"{path}/{key}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            figures[path.lstrip("/")] = float(node)

    for section in SECTIONS:
        if section in metrics:
            walk(metrics[section], section)
    return figures


BOX_FREE = "box-free"
GT_BOXES = "GT boxes at test"


#: The figures the comparison reports, as (label, key of `flat_figures`): box-free first (the
#: global embedding z_global, what a user without boxes gets; then the region-aware embedding on regions the model
#: proposes itself, for a model whose proposer was trained; then finding a finding from its text, asked of the
#: images that hold it (phrase grounding: "finding") and of every image (detection)), then those that take the
#: split's boxes as input.
HEADLINE = (
    (f"image → report R@1 ({BOX_FREE})", "retrieval/box_free/global/image_to_text/R@1"),
    (f"report → image R@1 ({BOX_FREE})", "retrieval/box_free/global/text_to_image/R@1"),
    (f"zero-shot macro AUC ({BOX_FREE})", "zero_shot/box_free/global/macro_auc"),
    (
        f"image → report R@1 ({BOX_FREE}, self-proposed regions)",
        "retrieval/box_free/self-proposed/image_to_text/R@1",
    ),
    (
        f"report → image R@1 ({BOX_FREE}, self-proposed regions)",
        "retrieval/box_free/self-proposed/text_to_image/R@1",
    ),
    (
        f"zero-shot macro AUC ({BOX_FREE}, self-proposed regions)",
        "zero_shot/box_free/self-proposed/macro_auc",
    ),
    (
        f"finding pointing, caption without position words ({BOX_FREE})",
        "localization/position_free/pointing_accuracy",
    ),
    (
        f"finding heatmap pointing, caption without position words ({BOX_FREE})",
        "localization/position_free/heatmap_pointing_accuracy",
    ),
    (f"finding AP50, caption without position words ({BOX_FREE})", "localization/position_free/ap50"),
    (f"finding pointing, term ({BOX_FREE})", "localization/term/pointing_accuracy"),
    (f"finding heatmap pointing, term ({BOX_FREE})", "localization/term/heatmap_pointing_accuracy"),
    (f"finding AP50, term ({BOX_FREE})", "localization/term/ap50"),
    *(
        (f"detection {name}, {query} ({BOX_FREE})", f"detection/{kind}/{metric}")
        for kind, query in (("position_free", "caption without position words"), ("term", "term"))
        for metric, name in DETECTION_FIGURES.items()
    ),
    (f"image → report R@1 ({GT_BOXES})", "retrieval/gt_boxes/region-aware/image_to_text/R@1"),
    (f"report → image R@1 ({GT_BOXES})", "retrieval/gt_boxes/region-aware/text_to_image/R@1"),
    (f"zero-shot macro AUC ({GT_BOXES})", "zero_shot/gt_boxes/region-aware/macro_auc"),
    (f"region → caption R@1 ({GT_BOXES})", "region/region_to_caption/R@1"),
    (f"region → caption R@5 ({GT_BOXES})", "region/region_to_caption/R@5"),
    (f"hard-negative accuracy ({GT_BOXES})", "region/hard_negative_accuracy"),
    (f"pointing accuracy ({GT_BOXES})", "grounding/pointing_accuracy"),
    (f"pointing accuracy, position words removed ({GT_BOXES})", "grounding/position_free/pointing_accuracy"),
)


def _headline(metrics: dict) -> dict[str, float]:
    """The figures the demo compares, from a `run_evaluation` result (those the evaluation has)."""
    figures = flat_figures(metrics)
    return {label: figures[key] for label, key in HEADLINE if key in figures}


def _controls(metrics: dict) -> dict[str, dict]:
    """The measured control of each region figure: `{figure: {"control", "value"}}`, scored without the image (they
    depend on the data only, fitted on the training split, so one evaluation's serve both models), and for the
    box-free phrase-grounding and detection figures without the text (the 4-stage model's own boxes scored by
    objectness)."""
    region, grounding = metrics["region"]["controls"], metrics["grounding"].get("controls", {})
    position_free = metrics["grounding"].get("position_free", {}).get("controls", {}).get("box_only", {})
    box_only = "box-only (nearest training boxes)"
    controls = {
        f"region → caption R@1 ({GT_BOXES})": {
            "control": box_only,
            "value": region["box_only"]["region_to_caption"]["R@1"],
        },
        f"region → caption R@5 ({GT_BOXES})": {
            "control": box_only,
            "value": region["box_only"]["region_to_caption"]["R@5"],
        },
        f"hard-negative accuracy ({GT_BOXES})": {
            "control": "text-only prior (unigram logistic on training captions)",
            "value": region["text_only_prior"]["hard_negative_accuracy"],
        },
        f"pointing accuracy ({GT_BOXES})": {
            "control": box_only,
            "value": grounding["box_only"]["pointing_accuracy"],
        },
    }
    for label, key in HEADLINE:
        section, _, rest = key.partition("/")
        kind, _, metric = rest.partition("/")
        if section not in ("localization", "detection"):
            continue
        objectness = (metrics.get(section) or {}).get(kind, {}).get("controls", {}).get("objectness_only", {})
        if metric in objectness:
            # The other controls stand in their own tables (the detection table below, learning_check.md).
            controls[label] = {"control": "objectness only (text ignored)", "value": objectness[metric]}
    if "pointing_accuracy" in position_free:
        controls[f"pointing accuracy, position words removed ({GT_BOXES})"] = {
            "control": f"{box_only}, position words removed",
            "value": position_free["pointing_accuracy"],
        }
    return controls


#: The detection protocol's columns, the model's figure and then each control's: (label, the model whose evaluation
#: holds the figure, its `flat_figures` key with `{kind}` and `{metric}`).
DETECTION_COLUMNS = (
    (AWARE, AWARE, "detection/{kind}/{metric}"),
    (
        "objectness only (same boxes, text ignored)",
        AWARE,
        "detection/{kind}/controls/objectness_only/{metric}",
    ),
    (
        "box prior (training split's mean box of the text, no image)",
        AWARE,
        "detection/{kind}/controls/box_prior/{metric}",
    ),
    ("the model's heatmap peak (its box there)", AWARE, "detection/{kind}/controls/heatmap_peak/{metric}"),
    ("global-only model, its own detector", PLAIN, "detection/{kind}/{metric}"),
)


def detection_table(cell) -> list[str]:
    """The detection figures (`DETECTION_FIGURES`) of each query kind as a Markdown table, the 4-stage model and
    each of its controls a column (`DETECTION_COLUMNS`); `cell(model, key)` writes one figure."""
    lines = [
        "| query (box-free) | metric | " + " | ".join(label for label, _, _ in DETECTION_COLUMNS) + " |",
        "|---|---|" + "---|" * len(DETECTION_COLUMNS),
    ]
    for kind in DETECTION_KINDS:
        for metric, name in DETECTION_FIGURES.items():
            cells = [cell(model, key.format(kind=kind, metric=metric)) for _, model, key in DETECTION_COLUMNS]
            lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    return lines


def evaluated_on(data) -> str:
    """What a report calls the data it evaluates on (the test split of the config's `data`): the folder or Hub id,
    named MedRegion-synth only when the config generates MedRegion-synth there."""
    source = f"MedRegion-synth ({data.path})" if data.synth is not None else data.path
    return f"the test split of {source}"


def _bar_chart(headlines: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(headlines.values())))
    figure, axis = plt.subplots(figsize=(13, 4.5))
    width = 0.38
    for offset, (model, values) in zip((-width / 2, width / 2), headlines.items(), strict=True):
        axis.bar(
            [i + offset for i in range(len(names))],
            [values.get(n, float("nan")) for n in names],
            width,
            label=model,
        )
    axis.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=6)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _report(
    comparison: "Comparison",
    controls: dict,
    region_paths: dict,
    presence: dict | None,
    out: Path,
    dataset: str,
) -> str:
    headlines, timings = comparison.headlines, comparison.timings
    aware, plain = headlines[AWARE], headlines[PLAIN]
    lines = [
        "# RegionMed-CLIP demo",
        "",
        f"Trained on the training split of the config's data; evaluated on {dataset}. One seed.",
        "",
        "One seed: differences of a few points are within the seed-to-seed spread; `make learning-check` gives the",
        "mean ± std over three seeds.",
        "",
        "## Learning check: the 4-stage model against the same model trained global-only for the same steps",
        "",
        f"Box-free rows use the global embedding and no boxes; rows marked {GT_BOXES} take the split's",
        "ground-truth boxes as input. Each region figure stands beside its measured control, the same metric scored",
        "without the image. Regions are embedded through: "
        + "; ".join(f"{name}: {path}" for name, path in region_paths.items())
        + ".",
        "",
        "| metric | 4-stage (region-aware) | global-only, same steps | measured control (no image) |",
        "|---|---|---|---|",
    ]
    for name in aware:
        control = controls.get(name)
        bound = f"{control['control']}: {control['value']:.3f}" if control else "–"
        baseline = f"{plain[name]:.3f}" if name in plain else "– (no trained proposer)"
        lines.append(f"| {name} | {aware[name]:.3f} | {baseline} | {bound} |")
    figures = {name: flat_figures(metrics) for name, metrics in comparison.results.items()}
    if any(key.startswith("detection/") for key in figures[AWARE]):
        lines += [
            "",
            "## Detection: every test image asked every query, without boxes",
            "",
            "Each query a COCO category, images without the finding included (AP@[.5:.95], AP50, AR@100 by "
            "pycocotools); presence AUC: an image's best score against whether it holds the finding. The 4-stage "
            "model beside each control and the global-only model's own detector.",
            "",
            *detection_table(lambda model, key: _figure(figures[model].get(key))),
        ]
    if presence:
        lines += [
            "",
            f"## Presence scores on test image {presence['row']}",
            "",
            'What `pipeline("zero-shot-object-detection")` gives each term of the split on one test image: the '
            "score of its best box, which says whether the finding is there.",
            "",
            "| term | presence score (best box) | in the image |",
            "|---|---|---|",
            *(
                f"| {entry['label']} | {entry['score']:.3f} | {'yes' if entry['in_image'] else 'no'} |"
                for entry in presence["scores"]
            ),
        ]
    lines += ["", "## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines += [
        "",
        "Plots: `loss_curves.png` (per-term losses, stage boundaries dashed), `comparison.png`,",
        "`eval/4-stage/roc_curves.png`. The full evaluation of the 4-stage model follows.",
        "",
        (out / "eval" / "4-stage" / "metrics.md").read_text(encoding="utf-8").split("\n", 1)[1],
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def presence_example(model_folder: Path, row: dict, terms: list[str]) -> list[dict]:
    """Per term, the score of the best box the `zero-shot-object-detection` pipeline finds for it on `row`'s image
    (0 without one) and whether the image holds the term: presence scores as a user gets them."""
    from transformers import pipeline

    detector = pipeline("zero-shot-object-detection", model=str(model_folder))
    found = detector(row["image"], candidate_labels=terms, threshold=0.0)
    held = {query_text("term", region["caption"], region.get("term")) for region in row["regions"] or []}
    return [
        {
            "label": term,
            "score": max((entry["score"] for entry in found if entry["label"] == term), default=0.0),
            "in_image": term in held,
        }
        for term in terms
    ]


@dataclasses.dataclass
class Comparison:
    """What one seed of the comparison leaves: each model's folder and full evaluation, and the time per step."""

    folders: dict[str, Path]
    results: dict[str, dict]
    timings: dict[str, float]

    @property
    def headlines(self) -> dict[str, dict[str, float]]:
        return {name: _headline(metrics) for name, metrics in self.results.items()}


def _trained(config) -> Path | None:
    """The model folder a finished run of exactly `config` left in its output folder, or None."""
    folder = Path(config.output_dir)
    if not (folder / "model" / "config.json").is_file() or not (folder / "run_config.yaml").is_file():
        return None
    if load_config(folder / "run_config.yaml").to_dict() != config.to_dict():
        raise ValueError(
            f"{folder} holds a model trained with another config; remove it or drop the reuse option"
        )
    return folder / "model"


def train_or_reuse(config, reuse_trained: bool) -> Path:
    """`config`'s model folder: trained in its own process, or with `reuse_trained` the folder a finished run of
    exactly `config` left in its output folder when there is one."""
    return (_trained(config) if reuse_trained else None) or train_in_subprocess(config)


def train_and_compare(
    config, tasks: str = "all", bootstrap: int = 1000, reuse_trained: bool = False
) -> Comparison:
    """One seed of the comparison (`config.seed`): trains the 4-stage model into `config.output_dir` and the
    global-only baseline into its `global-only/` folder, each in its own process, and evaluates both on the test
    split into `eval/4-stage/` and `eval/global-only/`. `make demo` runs it once; `make learning-check` once per
    seed. With `reuse_trained`, a model a finished run of the same config left there is evaluated again instead of
    retrained (a changed evaluation on the same trainings)."""
    out = Path(config.output_dir)
    baseline_config = global_only(config, out / "global-only")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model_folder = train_or_reuse(config, reuse_trained)
    timings["train 4-stage model (incl. data generation)"] = time.perf_counter() - start
    timings.update({f"  {k}": v for k, v in json.loads((out / "timings.json").read_text()).items()})

    start = time.perf_counter()
    baseline_folder = train_or_reuse(baseline_config, reuse_trained)
    timings["train global-only baseline"] = time.perf_counter() - start

    start = time.perf_counter()
    from ..evaluation import EvalSettings, run_evaluation

    folders = {AWARE: model_folder, PLAIN: baseline_folder}
    baseline_tasks = tasks if tasks != "all" else COMPARED_TASKS
    results = {}
    for (name, folder), slug, model_tasks in zip(
        folders.items(), ("4-stage", "global-only"), (tasks, baseline_tasks), strict=True
    ):
        results[name] = run_evaluation(
            EvalSettings(
                folder,
                config.data.path,
                out / "eval" / slug,
                tasks=model_tasks,
                seed=config.seed,
                bootstrap=bootstrap,
            )
        )
    timings["evaluate both models"] = time.perf_counter() - start
    return Comparison(folders=folders, results=results, timings=timings)


@dataclasses.dataclass
class DemoArgs:
    """The options of `regionmed-clip demo` (`make demo`)."""

    config: str = dataclasses.field(
        default="configs/demo.yaml",
        metadata={
            "help": "The training YAML of the four-stage model (its data section makes MedRegion-synth)"
        },
    )
    output_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Overrides the config's output_dir"}
    )


def run_demo(args: DemoArgs) -> Path:
    """Data (MedRegion-synth unless the config names another dataset), four-stage training, evaluation and the model
    card; returns the model folder."""
    config = load_config(args.config, output_dir=args.output_dir)
    out = Path(config.output_dir)
    started = time.perf_counter()
    comparison = train_and_compare(config)
    results, headlines, timings = comparison.results, comparison.headlines, comparison.timings
    model_folder = comparison.folders[AWARE]
    controls = _controls(results[AWARE])
    region_paths = {name: result["embeddings"]["region_path"] for name, result in results.items()}

    from transformers import pipeline

    from ..data.folder import load_rows
    from ..hub import render_model_card

    card = render_model_card(model_folder, metrics=out / "eval" / "4-stage" / "metrics.json")
    (Path(model_folder) / "README.md").write_text(card, encoding="utf-8")

    test_rows = load_rows(config.data.path, "test")
    example = test_rows[0]
    classifier = pipeline("zero-shot-image-classification", model=str(model_folder))
    scores = classifier(
        example["image"], candidate_labels=results[PLAIN]["classes"], hypothesis_template="{}"
    )
    terms = split_queries(test_rows, "term")
    presence = {"row": 0, "scores": presence_example(model_folder, example, terms)} if terms else None
    timings["total"] = time.perf_counter() - started

    (out / "metrics.json").write_text(
        json.dumps(
            {
                "learning_check": headlines,
                "controls": controls,
                "region_paths": region_paths,
                "pipeline_example": {"label": example["label"], "scores": scores},
                "presence_example": presence,
                "timings_seconds": timings,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    dataset = evaluated_on(config.data)
    _bar_chart(headlines, out / "comparison.png", dataset[0].upper() + dataset[1:])
    print(_report(comparison, controls, region_paths, presence, out, dataset))
    print(f"model folder: {model_folder} (AutoModel.from_pretrained / pipeline ready; model card README.md)")
    print(f"pipeline on one test image (label {example['label']!r}): {scores[:3]}")
    return Path(model_folder)
