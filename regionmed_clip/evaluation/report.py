"""Evaluation outputs: `metrics.json` (with provenance), `metrics.md` (tables in the paper's layout), ROC curves."""

import hashlib
import json
import platform
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
