"""Evaluation outputs: `metrics.json` (with provenance), `metrics.md` (tables in the paper's layout), ROC curves."""

import hashlib
import json
import platform
from dataclasses import dataclass
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


def provenance(model_path, data_path, settings: dict, fingerprint: dict) -> dict:
    """Where the figures come from: model and data with their sha256 (`fingerprint`), settings, versions."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "model": str(model_path),
        "model_sha256": fingerprint["model"],
        "data": str(data_path),
        "data_sha256": fingerprint["data"],
        "settings": settings,
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


def markdown_tables(metrics: dict) -> str:
    """The paper's tables for whatever tasks ran: zero-shot AUC (Table 1), VQA (Table 2), retrieval (Table 3),
    1/5-shot AUC (Tables 5–6), region-level figures."""
    lines = [
        f"# Evaluation of `{metrics['provenance']['model']}`",
        "",
        f"Data: `{metrics['provenance']['data']}`",
        "",
    ]
    if "zero_shot" in metrics:
        lines += [
            "## Zero-shot classification (AUC %, Table 1 layout)",
            "",
            "| image embedding | macro AUC | 95 % CI | accuracy |",
            "|---|---|---|---|",
        ]
        for name, result in metrics["zero_shot"].items():
            low, high = result["macro_auc_ci95"] or (None, None)
            lines.append(
                f"| {name} | {_pct(result['macro_auc'])} | {_pct(low)}–{_pct(high)} | "
                f"{_pct(result['accuracy'])} |"
            )
        lines += [""]
    if "few_shot" in metrics:
        lines += [
            "## Few-shot classification (macro AUC %, Tables 5–6 layout)",
            "",
            "| shots | prototype rule | logistic probe |",
            "|---|---|---|",
        ]
        for shots, result in metrics["few_shot"].items():
            if "skipped" in result:
                lines.append(f"| {shots} | skipped: {result['skipped']} | |")
                continue
            proto, probe = result["prototype"], result["linear_probe"]
            lines.append(
                f"| {shots} | {_pct(proto['mean'])} ± {_pct(proto['std'])} | "
                f"{_pct(probe['mean'])} ± {_pct(probe['std'])} |"
            )
        lines += [""]
    if "retrieval" in metrics:
        lines += [
            "## Image–text retrieval (%, Table 3 layout)",
            "",
            "| image embedding | T2I R@1 | T2I R@5 | T2I R@10 | I2T R@1 | I2T R@5 | I2T R@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, result in metrics["retrieval"].items():
            t2i, i2t = result["text_to_image"], result["image_to_text"]
            lines.append(
                f"| {name} | " + " | ".join(_pct(r[f"R@{k}"]) for r in (t2i, i2t) for k in (1, 5, 10)) + " |"
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
    if "region" in metrics:
        region = metrics["region"]
        lines += ["## Region level (%)", "", "| metric | value |", "|---|---|"]
        for k in (1, 5, 10):
            lines.append(f"| region → caption R@{k} | {_pct(region['region_to_caption'][f'R@{k}'])} |")
        lines.append(f"| hard-negative accuracy | {_pct(region['hard_negative_accuracy'])} |")
        if "grounding" in metrics:
            lines.append(f"| pointing accuracy | {_pct(metrics['grounding']['pointing_accuracy'])} |")
        lines += [""]
    return "\n".join(lines)


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
    """Write metrics.json, metrics.md and, when given (`roc = {"scores", "labels", "classes"}`), roc_curves.png."""
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
                "Zero-shot ROC (region-aware embedding)",
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


# How each task of metrics.json appears in a model-index: (task type, task name) and, per figure, (metric type,
# metric name, key path inside the task's result). A `{entry}` in a name or path is each key of the task's
# mapping (the embedding, the shot count, the VQA set); tasks without it hold one result. The retrieval and
# region task types are not pipeline tags, which the model-index allows (as MTEB's cards do).
MODEL_INDEX_FIGURES: dict[str, tuple[tuple[str, str], tuple[tuple[str, str, tuple[str, ...]], ...]]] = {
    "zero_shot": (
        ("zero-shot-image-classification", "Zero-shot classification"),
        (
            ("roc_auc", "macro AUC ({entry} embedding)", ("{entry}", "macro_auc")),
            ("accuracy", "accuracy ({entry} embedding)", ("{entry}", "accuracy")),
        ),
    ),
    "few_shot": (
        ("image-classification", "Few-shot classification"),
        (
            ("roc_auc", "{entry} macro AUC (prototype rule)", ("{entry}", "prototype", "mean")),
            ("roc_auc", "{entry} macro AUC (logistic probe)", ("{entry}", "linear_probe", "mean")),
        ),
    ),
    "retrieval": (
        ("image-text-retrieval", "Image–text retrieval"),
        tuple(
            ("recall", f"{arrow} R@{k} ({{entry}})", ("{entry}", direction, f"R@{k}"))
            for direction, arrow in (("image_to_text", "image → text"), ("text_to_image", "text → image"))
            for k in (1, 5, 10)
        ),
    ),
    "region": (
        ("region-text-retrieval", "Region–caption retrieval"),
        tuple(("recall", f"region → caption R@{k}", ("region_to_caption", f"R@{k}")) for k in (1, 5, 10))
        + (("accuracy", "hard-negative accuracy", ("hard_negative_accuracy",)),),
    ),
    "grounding": (
        ("region-grounding", "Region grounding"),
        (("accuracy", "pointing accuracy", ("pointing_accuracy",)),),
    ),
    "vqa": (
        ("visual-question-answering", "Visual question answering"),
        tuple(
            (("accuracy", f"{part} accuracy", ("{entry}", part))) for part in ("open", "closed", "overall")
        ),
    ),
}


def _measured(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if np.isnan(value) else value


def model_index_figures(metrics: dict) -> list[CardFigure]:
    """The figures of a `metrics.json` (as `write_outputs` writes it) for a model card's `model-index`, in
    `MODEL_INDEX_FIGURES` order; tasks that did not run, skipped entries and NaN figures are left out."""
    figures = []
    for task, ((task_type, task_name), specs) in MODEL_INDEX_FIGURES.items():
        result = metrics.get(task)
        if not isinstance(result, dict):
            continue
        per_entry = any("{entry}" in spec[2] for spec in specs)
        for entry in result if per_entry else [None]:
            for metric_type, name, path in specs:
                value = result
                for key in path:
                    value = value.get(entry if key == "{entry}" else key) if isinstance(value, dict) else None
                value = _measured(value)
                if value is not None:
                    figures.append(
                        CardFigure(
                            task_type,
                            task_name,
                            metric_type,
                            name.format(entry=entry),
                            value,
                            dataset=entry if task == "vqa" else None,
                        )
                    )
    return figures
