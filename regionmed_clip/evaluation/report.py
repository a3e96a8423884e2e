"""Evaluation outputs: `metrics.json` (with provenance), `metrics.md` (tables in the paper's layout), ROC curves."""

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGES = ("regionmed-clip", "torch", "transformers", "datasets", "accelerate", "scikit-learn", "numpy")


def dataset_hash(path: str | Path) -> str:
    """sha256 over the names and bytes of a local dataset folder's parquet files (a Hub id is returned as is)."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*.parquet")):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def provenance(settings, fingerprint: dict) -> dict:
    """Where the figures come from: model and data with their sha256 (`fingerprint`), the run's `EvalSettings`,
    versions."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "model": settings.model_path,
        "model_sha256": fingerprint["model"],
        "data": settings.data_path,
        "data_sha256": fingerprint["data"],
        "settings": asdict(settings),
        "versions": versions,
        "python": platform.python_version(),
    }


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.2f}"


BOXES_AT_TEST = {"box_free": "none (box-free)", "gt_boxes": "GT boxes at test"}
BOX_ONLY = "box-only control (nearest training boxes, no image)"
TEXT_ONLY = "text-only prior (unigram logistic on the training split, no image)"


def _embedding_rows(section: dict):
    """(boxes at test, embedding name, result) for an image-level section, box-free rows first."""
    for group in ("box_free", "gt_boxes"):
        for name, result in (section.get(group) or {}).items():
            yield BOXES_AT_TEST[group], name, result


def markdown_tables(metrics: dict) -> str:
    """The paper's tables for whatever tasks ran: zero-shot AUC (Table 1), VQA (Table 2), retrieval (Table 3),
    1/5-shot AUC (Tables 5–6), region-level figures. Image-level tables lead with the box-free embeddings; rows
    that take the data's boxes say "GT boxes at test". Region figures stand next to their measured controls."""
    lines = [
        f"# Evaluation of `{metrics['provenance']['model']}`",
        "",
        f"Data: `{metrics['provenance']['data']}`",
        "",
    ]
    text = metrics.get("text")
    if text:
        cut = ", ".join(
            f"{name} {count} of {text['num_texts'][name]}" for name, count in text["truncated"].items()
        )
        lines += [
            f"Texts cut at {text['max_length']} tokens (from {text['max_length_source']}); longer: {cut}.",
            "",
        ]
    if "zero_shot" in metrics:
        lines += [
            "## Zero-shot classification (AUC %, Table 1 layout)",
            "",
            "| boxes at test | image embedding | macro AUC | 95 % CI | accuracy |",
            "|---|---|---|---|---|",
        ]
        for boxes, name, result in _embedding_rows(metrics["zero_shot"]):
            low, high = result["macro_auc_ci95"] or (None, None)
            lines.append(
                f"| {boxes} | {name} | {_pct(result['macro_auc'])} | {_pct(low)}–{_pct(high)} | "
                f"{_pct(result['accuracy'])} |"
            )
        lines += [""]
    if "few_shot" in metrics:
        lines += [
            "## Few-shot classification (macro AUC %, Tables 5–6 layout)",
            "",
            "| boxes at test | image embedding | shots | prototype rule | logistic probe |",
            "|---|---|---|---|---|",
        ]
        for boxes, name, per_shots in _embedding_rows(metrics["few_shot"]):
            for shots, result in per_shots.items():
                if "skipped" in result:
                    lines.append(f"| {boxes} | {name} | {shots} | skipped: {result['skipped']} | |")
                    continue
                proto, probe = result["prototype"], result["linear_probe"]
                lines.append(
                    f"| {boxes} | {name} | {shots} | {_pct(proto['mean'])} ± {_pct(proto['std'])} | "
                    f"{_pct(probe['mean'])} ± {_pct(probe['std'])} |"
                )
        lines += [""]
    if "retrieval" in metrics:
        lines += [
            "## Image–text retrieval (%, Table 3 layout)",
            "",
            f"Identical report texts are one target ({metrics['retrieval']['num_distinct_reports']} distinct "
            f"reports for {metrics['num_images']} images).",
            "",
            "| boxes at test | image embedding | T2I R@1 | T2I R@5 | T2I R@10 | I2T R@1 | I2T R@5 | I2T R@10 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for boxes, name, result in _embedding_rows(metrics["retrieval"]):
            t2i, i2t = result["text_to_image"], result["image_to_text"]
            lines.append(
                f"| {boxes} | {name} | "
                + " | ".join(_pct(r[f"R@{k}"]) for r in (t2i, i2t) for k in (1, 5, 10))
                + " |"
            )
        lines += [""]
    if "vqa" in metrics:
        lines += [
            "## VQA (accuracy %, Table 2 layout)",
            "",
            "| data | Open | Closed | Overall | Avg |",
            "|---|---|---|---|---|",
        ]
        for name, result in metrics["vqa"].items():
            lines.append(
                f"| {name} | {_pct(result['open'])} | {_pct(result['closed'])} | "
                f"{_pct(result['overall'])} | {_pct(result['avg'])} |"
            )
        lines += [""]
    if "region" in metrics or "grounding" in metrics:
        lines += _region_table(metrics)
    if "localization" in metrics:
        lines += _localization_table(metrics["localization"])
    if "detection" in metrics:
        lines += _detection_table(metrics["detection"])
    return "\n".join(lines)


def _localization_table(section: dict) -> list[str]:
    lines = [
        "## Phrase grounding without boxes (each image asked about the findings it holds, %)",
        "",
        "The top detection of each (image, finding) query, and the peak of the model's patch–text heatmap "
        "(`explain`) beside it; AP50 over the split. Controls: the same boxes scored by objectness alone (text "
        "ignored), and the training split's mean box of the text (no image). A global-only model's own rows are "
        "its control.",
        "",
        "| query | metric | top box | heatmap peak | objectness only | box prior |",
        "|---|---|---|---|---|---|",
    ]
    for kind, figures in section.items():
        controls = figures["controls"]
        for key, name in (("pointing_accuracy", "pointing"), ("mean_iou", "mean IoU"), ("ap50", "AP50")):
            heatmap = _pct(figures["heatmap_pointing_accuracy"]) if key == "pointing_accuracy" else ""
            lines.append(
                f"| {kind} ({figures['num_queries']} queries) | {name} | {_pct(figures[key])} | {heatmap} | "
                f"{_pct(controls['objectness_only'][key])} | {_pct(controls['box_prior'][key])} |"
            )
        lines.append(f"| {kind} | heatmap CNR (ratio) | | {figures['cnr']:.2f} | | |")
    return lines + [""]


#: The detection figures of `metrics.json`'s `detection` section and their names in tables.
DETECTION_FIGURES = {"ap": "AP", "ap50": "AP50", "ar@100": "AR@100", "presence_auc": "presence AUC"}
#: Its controls and their names in tables.
DETECTION_CONTROLS = {
    "objectness_only": "objectness only",
    "box_prior": "box prior",
    "heatmap_peak": "heatmap peak",
}


def _detection_table(section: dict) -> list[str]:
    lines = [
        "## Detection without boxes (every image asked every query, %)",
        "",
        "Each query a COCO category, images without the finding included; AP@[.5:.95], AP50 and AR@100 by "
        "pycocotools, presence AUC (an image's best score against whether it holds the finding) macro over the "
        "queries. Controls: the same boxes scored by objectness alone (text ignored), the training split's mean "
        "box of the text scored by its share of training images (no image), and the box at the peak of the "
        "model's own heatmap scored by the peak cosine.",
        "",
        "| query | metric | model | " + " | ".join(DETECTION_CONTROLS.values()) + " |",
        "|---|---|---|" + "---|" * len(DETECTION_CONTROLS),
    ]
    for kind, figures in section.items():
        label = f"{kind} ({figures['num_queries']} queries, {figures['num_images']} images)"
        for key, name in DETECTION_FIGURES.items():
            controls = " | ".join(_pct(figures["controls"][control][key]) for control in DETECTION_CONTROLS)
            lines.append(f"| {label} | {name} | {_pct(figures[key])} | {controls} |")
            label = kind
    thresholds = list(next(iter(section.values()))["box_rate"])
    lines += [
        "",
        "What a pipeline `threshold` keeps: the share of (image, query) pairs where the model's best box reaches it, "
        "when the image holds the finding / when it does not (%).",
        "",
        "| query | " + " | ".join(f"threshold {threshold}" for threshold in thresholds) + " |",
        "|---|" + "---|" * len(thresholds),
    ]
    for kind, figures in section.items():
        rates = " | ".join(
            f"{_pct(rate['holds'])} / {_pct(rate['lacks'])}" for rate in figures["box_rate"].values()
        )
        lines.append(f"| {kind} | {rates} |")
    return lines + [""]


def _control(result: dict | None, *path: str) -> str:
    """A control's figure for a table cell, or why it was not measured."""
    if not result:
        return "–"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    for key in path:
        result = result.get(key, {}) if isinstance(result, dict) else None
    return _pct(result if isinstance(result, float) else None)


def _region_table(metrics: dict) -> list[str]:
    region, embeddings = metrics.get("region"), metrics.get("embeddings", {})
    path = {
        "roi_processor": "the ROI processor",
        "global_on_crops": "the global path applied to each box's crop (crop → vision tower → projection)",
    }.get(embeddings.get("region_path"), embeddings.get("region_path"))
    scored = (
        f"{region['num_regions']} of the split's {region['split_regions']} regions scored; regions"
        if region
        else "Regions"
    )
    lines = [
        "## Region level (GT boxes at test, %)",
        "",
        f"{scored} embedded through {path} ({embeddings.get('roi_branch_reason', '')}).",
        "",
        "| metric | value | measured control | control value |",
        "|---|---|---|---|",
    ]
    if region:
        controls = region.get("controls", {})
        for k in (1, 5, 10):
            value = _pct(region["region_to_caption"][f"R@{k}"])
            control = _control(controls.get("box_only"), "region_to_caption", f"R@{k}")
            lines.append(f"| region → caption R@{k} | {value} | {BOX_ONLY} | {control} |")
        control = _control(controls.get("text_only_prior"), "hard_negative_accuracy")
        lines.append(
            f"| hard-negative accuracy | {_pct(region['hard_negative_accuracy'])} | {TEXT_ONLY} | {control} |"
        )
    if "grounding" in metrics:
        grounding = metrics["grounding"]
        control = _control(grounding.get("controls", {}).get("box_only"), "pointing_accuracy")
        lines.append(
            f"| pointing accuracy | {_pct(grounding['pointing_accuracy'])} | {BOX_ONLY} | {control} |"
        )
        position_free = grounding.get("position_free") or {}
        if "skipped" in position_free:
            lines.append(
                f"| pointing accuracy, position words removed | skipped: {position_free['skipped']} | | |"
            )
        elif position_free:
            control = _control(position_free.get("controls", {}).get("box_only"), "pointing_accuracy")
            lines.append(
                f"| pointing accuracy, position words removed (ceiling {_pct(position_free['ceiling'])}) | "
                f"{_pct(position_free['pointing_accuracy'])} | {BOX_ONLY} | {control} |"
            )
    return lines + [""]


def roc_plot(scores: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, title: str) -> Path:
    """One-vs-rest ROC curve per class (scikit-learn `roc_curve`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for index, name in enumerate(class_names):
        positive = labels == index
        if 0 < positive.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positive, scores[:, index])
            axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, scores[:, index]):.2f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(metrics: dict, out_dir: str | Path, roc: dict | None = None) -> list[Path]:
    """Write metrics.json, metrics.md and, when given (`roc = {"scores", "labels", "classes", "name"}`), roc_curves.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "metrics.md"]
    written[0].write_text(json.dumps(_json_ready(metrics), indent=2), encoding="utf-8")
    written[1].write_text(markdown_tables(metrics), encoding="utf-8")
    if roc is not None:
        written.append(
            roc_plot(
                roc["scores"],
                roc["labels"],
                roc["classes"],
                out / "roc_curves.png",
                f"Zero-shot ROC ({roc.get('name', 'global')} embedding, no boxes)",
            )
        )
    return written


@dataclass(frozen=True)
class CardFigure:
    """One figure of a model card's `model-index`: the task and metric types of the Hub's model-index, a
    readable metric name, the value as measured, and the dataset when it is not the evaluated one (VQA sets)."""

    task_type: str
    task_name: str
    metric_type: str
    metric_name: str
    value: float
    dataset: str | None = None


# The card's names of the image-embedding groups of metrics.json, box-free first (the order figures are listed in).
BOX_LABELS = {"box_free": "box-free", "gt_boxes": "GT boxes at test"}

# How each task of metrics.json appears in a model-index: (task type, task name) and, per figure, (metric type,
# metric name, key path inside the task's result). A `{placeholder}` in a path takes every key at that level (its
# value named in the metric name): `{group}` the image-embedding groups of `BOX_LABELS`, shown as their label,
# `{entry}` the embedding or the VQA set, `{shots}` the shot count. The no-image controls are not the model's
# figures and are left out. The retrieval and region task types are not pipeline tags, which the model-index
# allows (as MTEB's cards do).
MODEL_INDEX_FIGURES: dict[str, tuple[tuple[str, str], tuple[tuple[str, str, tuple[str, ...]], ...]]] = {
    "zero_shot": (
        ("zero-shot-image-classification", "Zero-shot classification"),
        (
            ("roc_auc", "macro AUC ({entry} embedding, {group})", ("{group}", "{entry}", "macro_auc")),
            ("accuracy", "accuracy ({entry} embedding, {group})", ("{group}", "{entry}", "accuracy")),
        ),
    ),
    "few_shot": (
        ("image-classification", "Few-shot classification"),
        tuple(
            (
                "roc_auc",
                f"{{shots}} macro AUC ({name}, {{entry}}, {{group}})",
                ("{group}", "{entry}", "{shots}", rule, "mean"),
            )
            for rule, name in (("prototype", "prototype rule"), ("linear_probe", "logistic probe"))
        ),
    ),
    "retrieval": (
        ("image-text-retrieval", "Image–text retrieval"),
        tuple(
            ("recall", f"{arrow} R@{k} ({{entry}}, {{group}})", ("{group}", "{entry}", direction, f"R@{k}"))
            for direction, arrow in (("image_to_text", "image → text"), ("text_to_image", "text → image"))
            for k in (1, 5, 10)
        ),
    ),
    "region": (
        ("region-text-retrieval", "Region–caption retrieval"),
        tuple(
            ("recall", f"region → caption R@{k} (GT boxes at test)", ("region_to_caption", f"R@{k}"))
            for k in (1, 5, 10)
        )
        + (("accuracy", "hard-negative accuracy (GT boxes at test)", ("hard_negative_accuracy",)),),
    ),
    "grounding": (
        ("region-grounding", "Region grounding"),
        (
            ("accuracy", "pointing accuracy (GT boxes at test)", ("pointing_accuracy",)),
            (
                "accuracy",
                "pointing accuracy, position words removed (GT boxes at test)",
                ("position_free", "pointing_accuracy"),
            ),
        ),
    ),
    "vqa": (
        ("visual-question-answering", "Visual question answering"),
        tuple(
            (("accuracy", f"{part} accuracy", ("{entry}", part))) for part in ("open", "closed", "overall")
        ),
    ),
}


def _expand(node, path: tuple[str, ...], bindings: dict):
    """(bindings, value) for every way the placeholders of `path` match keys of `node`."""
    if not path:
        yield bindings, node
        return
    key, rest = path[0], path[1:]
    if not isinstance(node, dict):
        return
    if not (key.startswith("{") and key.endswith("}")):
        yield from _expand(node.get(key), rest, bindings)
        return
    name = key[1:-1]
    keys = [group for group in BOX_LABELS if group in node] if name == "group" else list(node)
    for value in keys:
        yield from _expand(node[value], rest, {**bindings, name: value})


def _measured(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if np.isnan(value) else value


def model_index_figures(metrics: dict) -> list[CardFigure]:
    """The figures of a `metrics.json` (as `write_outputs` writes it) for a model card's `model-index`, task by
    task in `MODEL_INDEX_FIGURES` order, box-free figures before those with ground-truth boxes; tasks that did not
    run, skipped entries and NaN figures are left out."""
    figures = []
    for task, ((task_type, task_name), specs) in MODEL_INDEX_FIGURES.items():
        result = metrics.get(task)
        if not isinstance(result, dict):
            continue
        found = []
        for metric_type, name, path in specs:
            for bindings, value in _expand(result, path, {}):
                value = _measured(value)
                if value is None:
                    continue
                labels = {**bindings, "group": BOX_LABELS.get(bindings.get("group"), "")}
                figure = CardFigure(
                    task_type,
                    task_name,
                    metric_type,
                    name.format(**labels),
                    value,
                    dataset=bindings.get("entry") if task == "vqa" else None,
                )
                found.append(
                    (list(BOX_LABELS).index(bindings["group"]) if "group" in bindings else 0, figure)
                )
        figures += [figure for _, figure in sorted(found, key=lambda pair: pair[0])]
    return figures
