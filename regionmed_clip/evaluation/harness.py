"""One evaluation harness for every task of the paper: features are extracted once per model and split and every
task reads them. `regionmed-clip eval` is a thin wrapper around `run_evaluation`, which takes one [`EvalSettings`].

Each task is one function in `TASKS` that reads the shared [`EvalContext`] (the settings, the model, the features)
and returns its section of metrics.json, changing nothing. Image-level sections (`zero_shot`, `few_shot`,
`retrieval`) are split by what the image embedding needs at test time:

- `box_free`: from the image alone, as `get_image_features` without boxes (`global`: z_global; `self-proposed`:
  the region-aware embedding with regions the model proposes itself, for a model whose proposer and ROI branch
  were trained). Reported first: it is what a user without boxes gets.
- `gt_boxes`: with the split's ground-truth boxes as input (`region-aware`: z_fused). Labelled "GT boxes at test".

Region-level sections (`region`, `grounding`) need boxes by definition; each carries `controls`, the same metric
measured by a model that sees no image (see `controls.py`), trained on `support_split`. `localization` (phrase
grounding: each image asked about the findings it holds) and `detection` (every image asked every query) find a
finding from its text and the image alone (box-free), each beside its measured controls.
"""

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.vocabulary import without_position_words
from ..processing_regionmed_clip import caption_key
from .classification import class_prototypes, few_shot, load_templates, zero_shot, zero_shot_scores
from .controls import BoxOnlyControl, TextPrior
from .device import resolve_device
from .features import (
    SplitFeatures,
    extract_features,
    read_training_config,
    roi_branch_status,
    text_embeddings,
    tokenizer_limit,
)
from .metrics import caption_targets, hard_negative_accuracy, recall_at_k, retrieval_ranks, text_groups
from .report import dataset_hash, provenance, write_outputs
from .settings import EvalSettings

FEATURES_FORMAT = 2  # bumped whenever SplitFeatures changes, so an old cache is never read as a new one


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What every task reads, and only reads: the run's settings, the model and the split's features."""

    settings: EvalSettings
    model: torch.nn.Module
    processor: object
    rows: object
    features: SplitFeatures
    feature_settings: dict  # the `extract_features` settings `features` came from; other splits reuse them
    fingerprint: dict

    @functools.cached_property
    def classes(self) -> dict | None:
        """The labelled images, their classes and the class text prototypes; None when no image has a label."""
        labelled = [i for i, label in enumerate(self.features.labels) if label]
        names = sorted({self.features.labels[i] for i in labelled})
        if not names:
            return None
        template_set, display = load_templates(self.settings.templates)
        return {
            "names": names,
            "rows": labelled,
            "labels": np.array([names.index(self.features.labels[i]) for i in labelled]),
            "prototypes": class_prototypes(
                self.model,
                self.processor,
                [display.get(c, c) for c in names],
                template_set,
                self.features.max_length,
            ),
        }

    @functools.cached_property
    def training_regions(self) -> dict:
        """The support split's regions, which the no-image controls are fitted on."""
        return split_regions(self.settings.data_path, self.settings.support_split)

    @functools.cached_property
    def detector(self) -> torch.nn.Module:
        """The model folder loaded as its detector ([`RegionMedCLIPForZeroShotObjectDetection`], its own saved head
        included), on the model's device and in its dtype."""
        from ..modeling_regionmed_clip import RegionMedCLIPForZeroShotObjectDetection

        detector = RegionMedCLIPForZeroShotObjectDetection.from_pretrained(
            self.settings.model_path, dtype=self.model.dtype
        )
        return detector.to(self.model.device).eval()

    @functools.cached_property
    def query_runs(self) -> dict:
        """One detector pass per query kind the `localization` and `detection` tasks read (`run_queries`): every
        image asked every query for the kinds of `detection`, else each image about its own findings; a kind the
        split has no query of is absent."""
        from .localization import DETECTION_KINDS, QUERY_KINDS, run_queries

        tasks = parse_tasks(self.settings.tasks)
        detect = "detection" in tasks
        kinds = [
            kind for kind in QUERY_KINDS if "localization" in tasks or (detect and kind in DETECTION_KINDS)
        ]
        runs = {
            kind: run_queries(
                self.detector,
                self.processor,
                self.rows,
                self.training_regions,
                kind=kind,
                every_image=detect and kind in DETECTION_KINDS,
                batch_size=self.settings.batch_size,
                max_length=self.features.max_length,
                nms_threshold=self.settings.nms_threshold,
            )
            for kind in kinds
        }
        return {kind: run for kind, run in runs.items() if run is not None}

    def embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """The image embeddings of the split, box-free ones first."""
        return {"box_free": self.features.box_free, "gt_boxes": self.features.gt_boxes}


def split_regions(data_path: str | Path, split: str) -> dict:
    """Every region of a split without decoding its pixels, in evaluation order: `boxes` `(N, 4)` as fractions
    of the image, `captions`, `terms` (empty where a region names none), `negatives`, `image` (the row index of
    each region) and `num_images` (the split's rows, with regions or without)."""
    from datasets import Image

    from ..data.collator import image_input, region_passes
    from ..data.folder import load_rows

    rows = load_rows(data_path, split).cast_column("image", Image(decode=False))
    boxes, captions, terms, negatives, images = [], [], [], [], []
    for index, row in enumerate(rows):
        regions = [region for part in region_passes(row, 1) for region in part["regions"]]
        if not regions:
            continue
        width, height = _image_size(image_input(row["image"]))
        for region in regions:
            x0, y0, x1, y1 = region["bbox"]
            boxes.append((x0 / width, y0 / height, x1 / width, y1 / height))
            captions.append(region["caption"])
            terms.append(region.get("term") or "")
            negatives.append(list(region["negatives"] or []))
            images.append(index)
    return {
        "boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4),
        "captions": captions,
        "terms": terms,
        "negatives": negatives,
        "image": torch.tensor(images, dtype=torch.long),
        "num_images": len(rows),
    }


def _image_size(image) -> tuple[int, int]:
    """(width, height) from the file header where PIL reads it, else (DICOM) from the decoded pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ..image_processing_regionmed_clip import decode_image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            return opened.size
    except UnidentifiedImageError:
        height, width = decode_image(image).shape[:2]
        return width, height


def region_metrics(features: SplitFeatures) -> dict:
    """ROI → caption retrieval among the split's distinct captions, and hard-negative accuracy."""
    if len(features.region_embeds) == 0:
        return {}
    rows, targets = caption_targets(features.region_captions)
    ranks = retrieval_ranks(features.region_embeds, features.region_text_embeds[rows], targets)
    return {
        "region_to_caption": {
            **recall_at_k(ranks),
            "num_regions": len(targets),
            "num_captions": len(rows),
        },
        "hard_negative_accuracy": hard_negative_accuracy(
            features.region_embeds,
            features.region_text_embeds,
            features.negative_text_embeds,
            features.negative_mask,
        ),
    }


def retrieval_metrics(image_embeds: torch.Tensor, report_embeds: torch.Tensor, reports: list[str]) -> dict:
    """Image ↔ report retrieval where identical report texts are one target: an image whose report is word for
    word another image's retrieves either as a hit, and a report retrieves any image it describes."""
    groups = text_groups(reports)
    return {
        "image_to_text": recall_at_k(
            retrieval_ranks(image_embeds, report_embeds, groups, gallery_groups=groups)
        ),
        "text_to_image": recall_at_k(
            retrieval_ranks(report_embeds, image_embeds, groups, gallery_groups=groups)
        ),
    }


def task_zero_shot(ctx: EvalContext) -> dict | None:
    """Zero-shot AUC and accuracy of every image embedding (Table 1)."""
    classes = ctx.classes
    if classes is None:
        return None
    section: dict = {}
    for group, embeddings in ctx.embeddings().items():
        section[group] = {}
        for name, embeds in embeddings.items():
            result = zero_shot(
                embeds[classes["rows"]],
                classes["labels"],
                classes["prototypes"],
                ctx.settings.bootstrap,
                ctx.settings.seed,
            )
            result.pop("scores")
            result["per_class_auc"] = {classes["names"][i]: v for i, v in result["per_class_auc"].items()}
            section[group][name] = result
    return section


def zero_shot_roc(ctx: EvalContext) -> dict | None:
    """What roc_curves.png draws: the zero-shot scores of the first box-free embedding (the figure a user without
    boxes gets), with the labels and class names; None when no image has a label."""
    classes = ctx.classes
    if classes is None:
        return None
    name, embeds = next(item for group in ctx.embeddings().values() for item in group.items())
    return {
        "scores": zero_shot_scores(embeds[classes["rows"]], classes["prototypes"]),
        "labels": classes["labels"],
        "classes": classes["names"],
        "name": name,
    }


def task_few_shot(ctx: EvalContext) -> dict | None:
    """k-shot AUC of every image embedding, support drawn from `support_split` (Tables 5–6)."""
    from ..data.folder import load_rows

    classes = ctx.classes
    if classes is None:
        return None
    support_rows = _support_rows(
        load_rows(ctx.settings.data_path, ctx.settings.support_split),
        classes["names"],
        5 * max(ctx.settings.shots),
        ctx.settings.seed,
    )
    key = {
        **ctx.fingerprint,
        "format": FEATURES_FORMAT,
        "split": ctx.settings.support_split,
        "rows": support_rows["id"],
    }
    support = cached_features(
        ctx.model,
        ctx.processor,
        support_rows,
        key,
        ctx.settings.cache_dir,
        ctx.settings.batch_size,
        **ctx.feature_settings,
    )
    support_labels = np.array([classes["names"].index(label) for label in support.labels])
    support_embeddings = {"box_free": support.box_free, "gt_boxes": support.gt_boxes}
    section: dict = {}
    for group, embeddings in ctx.embeddings().items():
        section[group] = {}
        for name, embeds in embeddings.items():
            section[group][name] = {}
            for k in ctx.settings.shots:
                try:
                    section[group][name][f"{k}-shot"] = few_shot(
                        support_embeddings[group][name],
                        support_labels,
                        embeds[classes["rows"]],
                        classes["labels"],
                        classes["prototypes"],
                        k,
                        ctx.settings.episodes,
                        ctx.settings.seed,
                    )
                except ValueError as error:  # a class with fewer than k support images: reported, not fatal
                    section[group][name][f"{k}-shot"] = {"skipped": str(error)}
    return section


def task_retrieval(ctx: EvalContext) -> dict:
    """Image ↔ report Recall@K of every image embedding (Table 3)."""
    section: dict = {
        group: {
            name: retrieval_metrics(embeds, ctx.features.report_embeds, ctx.features.reports)
            for name, embeds in embeddings.items()
        }
        for group, embeddings in ctx.embeddings().items()
    }
    section["num_distinct_reports"] = len(set(map(caption_key, ctx.features.reports)))
    return section


def task_region(ctx: EvalContext) -> dict | None:
    """Region → caption retrieval and hard-negative accuracy over every region of the split, with the box-only and
    text-only controls."""
    features = ctx.features
    if len(features.region_embeds) == 0:
        return None
    section = region_metrics(features)
    section["num_regions"] = len(features.region_embeds)
    section["split_regions"] = sum(len(regions or []) for regions in ctx.rows["regions"])
    train = ctx.training_regions
    controls: dict = {}
    if train["captions"]:
        box_only = BoxOnlyControl(train["boxes"], train["captions"])
        controls["box_only"] = {
            "region_to_caption": box_only.region_retrieval(
                features.region_boxes.numpy(), features.region_captions
            )
        }
    else:
        controls["box_only"] = {
            "skipped": f"the {ctx.settings.support_split} split has no regions to fit it on"
        }
    if any(train["negatives"]) and features.negative_mask.any():
        prior = TextPrior(train["captions"], train["negatives"], seed=ctx.settings.seed)
        controls["text_only_prior"] = {
            "hard_negative_accuracy": prior.hard_negative_accuracy(
                features.region_captions, features.region_negatives
            )
        }
    else:
        controls["text_only_prior"] = {
            "skipped": f"no hard negatives in the {ctx.settings.support_split} split or in the evaluated one"
        }
    section["controls"] = controls
    return section


def task_grounding(ctx: EvalContext) -> dict | None:
    """The pointing game over the split's images with 2 or more regions, with the box-only control, and again with
    the position words taken out of every caption (`position_free`).

    The box sees where a region is, so where the captions of one image differ only in their position words the
    box-only control solves the full game and bounds what it can show of the image. Without those words
    ("round nodule left upper" → "round nodule") the captions say only what each region is, which the box gives at
    most through its shape; the control is fitted and scored on the same position-free captions. Regions whose
    caption is all position words are left out of that game, and `ceiling` is the best any scorer can reach on it
    (regions of one image that share their position-free caption tie, and a tie is a miss). The section is skipped
    when no caption of the split has a position word (the game would be the full one again).
    """
    from .grounding import pointing_from_features

    features = ctx.features
    if len(features.region_embeds) == 0:
        return None
    section = pointing_from_features(features)
    train = ctx.training_regions
    section["controls"] = _box_only_pointing(
        train["boxes"],
        train["captions"],
        (features.region_boxes.numpy(), features.region_captions, features.region_image),
        ctx.settings.support_split,
    )
    section["position_free"] = _position_free_pointing(ctx)
    return section


def _position_free_pointing(ctx: EvalContext) -> dict:
    """[`task_grounding`]'s `position_free` section: the game on the captions without their position words."""
    from .grounding import pointing_ceiling, pointing_from_regions

    features = ctx.features
    captions = [without_position_words(caption) for caption in features.region_captions]
    changed = sum(
        new != " ".join(old.split()) for new, old in zip(captions, features.region_captions, strict=True)
    )
    if not changed:
        return {"skipped": "no region caption of the split has a position word"}
    keep = torch.tensor([bool(caption) for caption in captions], dtype=torch.bool)
    kept = [caption for caption in captions if caption]
    distinct = list(dict.fromkeys(kept))
    embeds = text_embeddings(ctx.model, ctx.processor, distinct, features.max_length, ctx.settings.batch_size)
    index = {caption: row for row, caption in enumerate(distinct)}
    region_image = features.region_image[keep]
    section = pointing_from_regions(
        features.region_embeds[keep], embeds[[index[caption] for caption in kept]], region_image
    )
    section["num_captions_changed"] = changed
    section["num_captions_emptied"] = int((~keep).sum())
    section["ceiling"] = pointing_ceiling(kept, region_image)
    train_captions = [without_position_words(caption) for caption in ctx.training_regions["captions"]]
    fitted = np.array([bool(caption) for caption in train_captions], dtype=bool)
    section["controls"] = _box_only_pointing(
        ctx.training_regions["boxes"][fitted],
        [caption for caption in train_captions if caption],
        (features.region_boxes.numpy()[keep.numpy()], kept, region_image),
        ctx.settings.support_split,
    )
    return section


def _box_only_pointing(
    train_boxes: np.ndarray, train_captions: list[str], scored: tuple, support_split: str
) -> dict:
    """The box-only control of a pointing game over `scored` (boxes, captions, region_image), fitted on the
    training regions given."""
    if not train_captions:
        return {"box_only": {"skipped": f"the {support_split} split has no regions to fit it on"}}
    result = BoxOnlyControl(train_boxes, train_captions).pointing(*scored)
    return {"box_only": {"pointing_accuracy": result["pointing_accuracy"]}}


def task_vqa(ctx: EvalContext) -> dict:
    """Closed-set VQA accuracy with frozen embeddings (Table 2): MedRegion-synth's VQA config when the data folder
    has one, plus VQA-RAD and SLAKE when given."""
    from .vqa import evaluate_vqa, load_slake, load_synth_vqa, load_vqa_rad

    sets = {}
    folder = Path(ctx.settings.data_path)
    if folder.is_dir() and (folder / "vqa").is_dir():
        sets["MedRegion-synth"] = load_synth_vqa(folder)
    if ctx.settings.vqa_rad is not None:
        sets["VQA-RAD"] = load_vqa_rad(*ctx.settings.vqa_rad)
    if ctx.settings.slake is not None:
        sets["SLAKE"] = load_slake(ctx.settings.slake)
    return {
        name: evaluate_vqa(
            ctx.model,
            ctx.processor,
            examples,
            seed=ctx.settings.seed,
            embed_batch_size=ctx.settings.batch_size,
            max_length=ctx.features.max_length,
        )
        for name, examples in sets.items()
    }


def task_localization(ctx: EvalContext) -> dict | None:
    """Phrase grounding from the image alone (see `localization.py`): each image asked about the findings it
    holds, by each finding's caption, by the caption without its position words and (where the data names them)
    by its term; the top detection's pointing, IoU and AP50 and the heatmap's pointing, beside the objectness-only
    and box-prior controls."""
    from .localization import phrase_grounding

    return {kind: phrase_grounding(run) for kind, run in ctx.query_runs.items()} or None


def task_detection(ctx: EvalContext) -> dict | None:
    """Detection from the image alone (see `localization.py`): every image asked every position-free caption and
    term of the split; COCO AP, AP50 and AR@100 and the presence AUC, beside the objectness-only, box-prior and
    heatmap-peak controls."""
    from .localization import DETECTION_KINDS, detection

    runs = ctx.query_runs
    return {kind: detection(runs[kind]) for kind in DETECTION_KINDS if kind in runs} or None


TASKS: dict[str, Callable[[EvalContext], dict | None]] = {
    "zero_shot": task_zero_shot,
    "few_shot": task_few_shot,
    "retrieval": task_retrieval,
    "region": task_region,
    "grounding": task_grounding,
    "localization": task_localization,
    "detection": task_detection,
    "vqa": task_vqa,
}


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 of a model folder's weight and config files (a Hub id is returned as is)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}"
    digest = hashlib.sha256()
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.json"), *folder.glob("*.yaml")]):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _trains_proposer(training_config: dict | None) -> bool:
    """Whether some stage of a saved training config weights `proposal_loss` (the proposer is trained)."""
    stages = (training_config or {}).get("stages") or []
    return any((stage.get("loss_weights") or {}).get("proposal_loss", 0) > 0 for stage in stages)


def cached_features(
    model,
    processor,
    rows,
    key: dict,
    cache_dir: str | Path | None,
    batch_size: int,
    num_workers: int = 0,
    **settings,
) -> SplitFeatures:
    """`extract_features` with `settings`, stored in `cache_dir` under a hash of `key` (model and data
    fingerprints, split) and the settings, and read back on the next run; no cache when `cache_dir` is None.
    `batch_size` and `num_workers` change how, not what, is computed, so they are not part of the key."""

    def extract():
        return extract_features(
            model, processor, rows, batch_size=batch_size, num_workers=num_workers, **settings
        )

    if cache_dir is None:
        return extract()
    name = hashlib.sha256(json.dumps({**key, **settings}, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"features-{name}.pt"
    if path.is_file():
        return SplitFeatures(**torch.load(path, weights_only=True))
    features = extract()
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
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {tuple(TASKS)} or 'all'")
    return names


def _support_rows(rows, classes: list[str], per_class: int, seed: int):
    """Up to `per_class` labelled rows of each class, drawn with a seed (the k-shot support pool)."""
    rng = np.random.default_rng(seed)
    labels = np.array(rows["label"], dtype=object)
    chosen = []
    for name in classes:
        pool = np.flatnonzero(labels == name)
        chosen.extend(rng.choice(pool, min(per_class, len(pool)), replace=False).tolist())
    return rows.select(sorted(chosen))


def resolve_max_length(
    max_length: int | None, training_config: dict | None, processor, model
) -> tuple[int, str]:
    """The token limit for evaluation and where it came from: as given, else the training config's
    `data.max_length`, else the tokenizer's limit."""
    if max_length is not None:
        return max_length, "given"
    trained = ((training_config or {}).get("data") or {}).get("max_length")
    if trained is not None:
        return int(trained), "training_config.yaml"
    return tokenizer_limit(processor, model), "tokenizer"


def run_evaluation(settings: EvalSettings) -> dict:
    """Evaluate a saved model on a dataset folder (or Hub id) and write metrics.json, metrics.md, roc_curves.png.

    Image-level figures come first without boxes (`box_free`), then with the data's boxes (`gt_boxes`); region
    figures cover every region of the split and stand next to measured no-image controls fitted on
    `settings.support_split`. Texts are cut at `max_length` and the cuts are counted. `vqa_rad` and `slake` add
    those public VQA sets to the synthetic one. With `cache_dir`, the features of each (model, data, split,
    settings) are stored there and reused by later runs. metrics.json records the settings the run used, its
    automatic choices resolved. From Python: `run_evaluation(EvalSettings(model, data, out_dir, tasks="retrieval"))`.
    """
    from transformers import AutoModel, AutoProcessor

    import regionmed_clip  # noqa: F401  (registers the Auto classes)

    from ..data.folder import load_rows

    names = parse_tasks(settings.tasks)
    target = resolve_device(settings.device)
    model = AutoModel.from_pretrained(settings.model_path).to(target).eval()
    processor = AutoProcessor.from_pretrained(settings.model_path)
    training_config = read_training_config(settings.model_path)
    trained, reason = roi_branch_status(model, training_config)
    length, length_source = resolve_max_length(settings.max_length, training_config, processor, model)
    self_proposed = settings.self_proposed
    if self_proposed is None:
        self_proposed = model.config.max_regions if trained and _trains_proposer(training_config) else 0
    region_path = settings.region_path
    if region_path == "auto":
        region_path = "roi_processor" if trained else "global_on_crops"
    settings = dataclasses.replace(
        settings,
        tasks=",".join(names),
        device=str(target),
        max_length=length,
        region_path=region_path,
        self_proposed=self_proposed,
    )
    rows = load_rows(settings.data_path, settings.split)
    fingerprint = {"model": model_fingerprint(settings.model_path), "data": dataset_hash(settings.data_path)}
    feature_settings = {"max_length": length, "region_path": region_path, "self_proposed": self_proposed}
    key = {**fingerprint, "format": FEATURES_FORMAT, "split": settings.split}
    features = cached_features(
        model,
        processor,
        rows,
        key,
        settings.cache_dir,
        settings.batch_size,
        settings.num_workers,
        **feature_settings,
    )
    ctx = EvalContext(settings, model, processor, rows, features, feature_settings, fingerprint)
    metrics: dict = {
        "provenance": provenance(settings, fingerprint),
        "num_images": len(features.report_embeds),
        "embeddings": {
            "box_free": list(features.box_free),
            "gt_boxes": list(features.gt_boxes),
            "region_path": features.region_path,
            "self_proposed_regions": self_proposed,
            "roi_branch_trained": trained,
            "roi_branch_reason": reason,
        },
        "text": {
            "max_length": features.max_length,
            "max_length_source": length_source,
            "truncated": features.truncated,
            "num_texts": features.num_texts,
        },
    }
    if {"zero_shot", "few_shot"} & set(names) and ctx.classes is not None:
        metrics["classes"] = ctx.classes["names"]
    for name in names:
        section = TASKS[name](ctx)
        if section is not None:
            metrics[name] = section
    write_outputs(metrics, settings.out_dir, zero_shot_roc(ctx) if "zero_shot" in names else None)
    return metrics
