"""One evaluation harness for every task of the paper: features are extracted once per model and split and every
task reads them. `regionmed-clip eval` and `eval/*.py` are thin wrappers around `run_evaluation`."""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .classification import class_prototypes, few_shot, load_templates, zero_shot
from .features import SplitFeatures, extract_features
from .metrics import hard_negative_accuracy, recall_at_k, retrieval_ranks
from .report import dataset_hash, provenance, write_outputs

TASKS = ("zero_shot", "few_shot", "retrieval", "region", "grounding", "vqa")


def region_metrics(features: SplitFeatures) -> dict:
    """ROI → caption retrieval among the split's distinct captions, and hard-negative accuracy."""
    if len(features.region_embeds) == 0:
        return {}
    distinct = sorted(set(features.region_captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    first = {}
    for row, caption in enumerate(features.region_captions):
        first.setdefault(caption, row)
    gallery = features.region_text_embeds[[first[caption] for caption in distinct]]
    targets = torch.tensor([index[caption] for caption in features.region_captions])
    ranks = retrieval_ranks(features.region_embeds, gallery, targets)
    return {
        "region_to_caption": {
            **recall_at_k(ranks),
            "num_regions": len(targets),
            "num_captions": len(distinct),
        },
        "hard_negative_accuracy": hard_negative_accuracy(
            features.region_embeds,
            features.region_text_embeds,
            features.negative_text_embeds,
            features.negative_mask,
        ),
    }


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 of a model folder's weight and config files (a Hub id is returned as is)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}"
    digest = hashlib.sha256()
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.json")]):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def cached_features(model, processor, rows, key: dict, cache_dir: str | Path | None, batch_size: int):
    """`extract_features`, stored in `cache_dir` under a hash of `key` (model and data fingerprints, split) and
    read back on the next run; no cache when `cache_dir` is None."""
    if cache_dir is None:
        return extract_features(model, processor, rows, batch_size=batch_size)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"features-{name}.pt"
    if path.is_file():
        return SplitFeatures(**torch.load(path, weights_only=True))
    features = extract_features(model, processor, rows, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(dataclasses.asdict(features), partial)
    os.replace(partial, path)
    return features


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    if "all" in names:
        return list(TASKS)
    unknown = set(names) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS} or 'all'")
    return names


def _embeddings(features) -> dict[str, torch.Tensor]:
    """Both image embeddings are reported: region-aware (uses the boxes of the data) and global."""
    return {"region-aware": features.image_embeds, "global": features.global_image_embeds}


def _support_rows(rows, classes: list[str], per_class: int, seed: int):
    """Up to `per_class` labelled rows of each class, drawn with a seed (the k-shot support pool)."""
    rng = np.random.default_rng(seed)
    labels = np.array(rows["label"], dtype=object)
    chosen = []
    for name in classes:
        pool = np.flatnonzero(labels == name)
        chosen.extend(rng.choice(pool, min(per_class, len(pool)), replace=False).tolist())
    return rows.select(sorted(chosen))


def run_evaluation(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    tasks: str | list[str] = "all",
    split: str = "test",
    support_split: str = "train",
    templates: str | Path | None = None,
    shots: tuple[int, ...] = (1, 5),
    episodes: int = 5,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    vqa_rad: tuple[str, str] | None = None,
    slake: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Evaluate a saved model on a dataset folder (or Hub id) and write metrics.json, metrics.md, roc_curves.png.

    `vqa_rad` = (json file, image folder) and `slake` = folder add those public VQA sets to the synthetic one.
    With `cache_dir`, the features of each (model, data, split) are stored there and reused by later runs.

    Args:
        model_path: Model folder or Hub id.
        data_path: Dataset folder or Hub id (the MedRegion layout).
        out_dir: Where metrics.json, metrics.md and roc_curves.png go.
        tasks: Comma-separated tasks (zero_shot, few_shot, retrieval, region, grounding, vqa), or `all`.
        split: The split evaluated.
        support_split: The split few-shot support images are drawn from.
        templates: A YAML file of prompt `templates` and `class_names` (default: the medical template set).
        shots: Support images per class of the few-shot episodes.
        episodes: Seeded few-shot episodes per shot count.
        bootstrap: Bootstrap resamples of the zero-shot AUC's 95 % confidence interval.
        seed: Seed of the episodes, the bootstrap and the VQA head.
        batch_size: Images per forward pass.
        vqa_rad: VQA-RAD's JSON file and image folder.
        slake: SLAKE's folder.
        cache_dir: A folder that keeps the features of each (model, data, split) for later runs.
    """
    from transformers import AutoModel, AutoProcessor

    import regionmed_clip  # noqa: F401  (registers the Auto classes)

    from ..data.collator import load_rows

    names = parse_tasks(tasks)
    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    rows = load_rows(data_path, split)
    fingerprint = {"model": model_fingerprint(model_path), "data": dataset_hash(data_path)}
    features = cached_features(model, processor, rows, {**fingerprint, "split": split}, cache_dir, batch_size)
    metrics: dict = {
        "provenance": provenance(
            model_path,
            data_path,
            {
                "split": split,
                "tasks": names,
                "seed": seed,
                "shots": list(shots),
                "episodes": episodes,
                "bootstrap": bootstrap,
                "templates": str(templates) if templates else "default",
            },
            fingerprint,
        ),
        "num_images": len(features.image_embeds),
    }
    roc = None
    labelled = [i for i, label in enumerate(features.labels) if label]
    classes = sorted({features.labels[i] for i in labelled})
    if ("zero_shot" in names or "few_shot" in names) and classes:
        template_set, display = load_templates(templates)
        prototypes = class_prototypes(model, processor, [display.get(c, c) for c in classes], template_set)
        labels = np.array([classes.index(features.labels[i]) for i in labelled])
        metrics["classes"] = classes
    if "zero_shot" in names and classes:
        metrics["zero_shot"] = {}
        for name, embeds in _embeddings(features).items():
            result = zero_shot(embeds[labelled], labels, prototypes, bootstrap, seed)
            scores = result.pop("scores")
            result["per_class_auc"] = {classes[i]: v for i, v in result["per_class_auc"].items()}
            metrics["zero_shot"][name] = result
            if name == "region-aware":
                roc = {"scores": scores, "labels": labels, "classes": classes}
    if "few_shot" in names and classes:
        support_rows = _support_rows(load_rows(data_path, support_split), classes, 5 * max(shots), seed)
        support_key = {**fingerprint, "split": support_split, "rows": support_rows["id"]}
        support = cached_features(model, processor, support_rows, support_key, cache_dir, batch_size)
        support_labels = np.array([classes.index(label) for label in support.labels])
        metrics["few_shot"] = {}
        for k in shots:
            try:
                metrics["few_shot"][f"{k}-shot"] = few_shot(
                    support.image_embeds,
                    support_labels,
                    features.image_embeds[labelled],
                    labels,
                    prototypes,
                    k,
                    episodes,
                    seed,
                )
            except ValueError as error:  # a class with fewer than k support images: reported, not fatal
                metrics["few_shot"][f"{k}-shot"] = {"skipped": str(error)}
    if "retrieval" in names:
        targets = torch.arange(len(features.image_embeds))
        metrics["retrieval"] = {
            name: {
                "image_to_text": recall_at_k(retrieval_ranks(embeds, features.report_embeds, targets)),
                "text_to_image": recall_at_k(retrieval_ranks(features.report_embeds, embeds, targets)),
            }
            for name, embeds in _embeddings(features).items()
        }
    if "region" in names and len(features.region_embeds):
        metrics["region"] = region_metrics(features)
    if "grounding" in names and len(features.region_embeds):
        from .grounding import pointing_from_features

        metrics["grounding"] = pointing_from_features(features)
    if "vqa" in names:
        metrics["vqa"] = _vqa(model, processor, data_path, vqa_rad, slake, seed)
    write_outputs(metrics, out_dir, roc)
    return metrics


def _vqa(model, processor, data_path, vqa_rad, slake, seed: int) -> dict:
    from .vqa import evaluate_vqa, load_slake, load_synth_vqa, load_vqa_rad

    sets = {}
    folder = Path(data_path)
    if folder.is_dir() and (folder / "vqa").is_dir():
        sets["MedRegion-synth"] = load_synth_vqa(folder)
    if vqa_rad is not None:
        sets["VQA-RAD"] = load_vqa_rad(*vqa_rad)
    if slake is not None:
        sets["SLAKE"] = load_slake(slake)
    return {name: evaluate_vqa(model, processor, examples, seed=seed) for name, examples in sets.items()}
