"""Finding a finding from its text and the image alone (no boxes at test), in two protocols, each beside its
controls.

A split's queries are its findings' texts, of three kinds: the `caption`; the caption without its position words
(`position_free`: "round nodule left upper" → "round nodule"), since a caption that names where the finding is
gives the box prior below its answer without the image; and the `term` alone, where the data names terms. Every
image goes once through the model folder's [`RegionMedCLIPForZeroShotObjectDetection`] (its own head included)
with every query of a kind, and each (image, query) gets what the image processor's
`post_process_object_detection` returns for that query alone, as transformers' `zero-shot-object-detection`
pipeline asks one label at a time: scores and boxes, the boxes as fractions of the model's input view (where the
processor also puts the ground-truth boxes), best first, at most `MAX_DETECTIONS`.

- **Phrase grounding** (the `localization` task): each image is asked only about the findings it holds, and its
  best detection is scored against the finding's boxes: `pointing_accuracy` (its centre inside one of them),
  `mean_iou` (its best IoU with them) and `ap50` (COCO's AP at IoU 0.5, each (image, finding) one COCO image of
  one category with its `GROUNDING_DETECTIONS` best detections, so one ranking pools all queries). Beside them the
  model's patch–text heatmap (what `explain` draws), upsampled to the input size: `heatmap_pointing_accuracy` (its
  peak inside one of the boxes) and `cnr` (|μ_in − μ_out| / √(σ_in² + σ_out²) inside against outside the boxes,
  as BioViL and MS-CXR report it).
- **Detection** (the `detection` task, the kinds of `DETECTION_KINDS`): every image is asked every query of the
  split, images without the finding included, and each query is a COCO category: `ap` (AP@[.5:.95]), `ap50` and
  `ar@100` (AR with at most 100 detections per image and query) by pycocotools, COCO's own evaluation; and
  `presence_auc`, per query the ROC AUC of an image's best score against whether the image holds the finding,
  macro over the queries. A query that every image holds, or none, has no AUC and is left out
  (`num_presence_queries` counts the queries scored). What a pipeline `threshold` does with the model's scores:
  `box_rate`, per threshold of `PRESENCE_THRESHOLDS`, the share of (image, query) pairs whose best score reaches
  it among those where the image holds the finding (`holds`: found) and those where it does not (`lacks`: false
  alarms). The controls' scores are not probabilities (a cosine, an objectness, a share), so they get none.

Controls, scored by the same figures on the same queries:

- `objectness_only`: the same boxes scored by the proposer's objectness alone (the text ignored), through the
  same post-processing;
- `box_prior`: no image: the training split's mean box of the query text (the mean of all its regions for a
  text it lacks) as the one detection, scored by the share of training images that hold the text;
- `heatmap_peak` (detection; phrase grounding has the heatmap's own pointing): the box proposed at the patch
  where the model's heatmap for the query peaks, scored by that peak cosine.

The global-only baseline is a detector of its own: `make demo` and `make learning-check` evaluate it with the same
tasks.
"""

import contextlib
import dataclasses
import io

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.image_transforms import center_to_corners_format

from ..data.vocabulary import without_position_words
from .features import model_inputs, text_embeddings
from .metrics import macro_auc

QUERY_KINDS = ("caption", "position_free", "term")
#: The kinds the detection protocol asks of every image. A whole caption names where its finding is and is close
#: to unique to its image, so it stays a phrase-grounding query.
DETECTION_KINDS = ("position_free", "term")
MAX_DETECTIONS = 100  # kept per (image, query): COCO's largest maxDets, so `ar@100` is COCO's AR
GROUNDING_DETECTIONS = 10  # a phrase-grounding query's best detections in its AP50
#: The pipeline thresholds at which detection reports its `box_rate` (0.1: the threshold of the pipeline example).
PRESENCE_THRESHOLDS = (0.1, 0.2, 0.3)
GROUNDING_METHODS = ("model", "objectness_only", "box_prior")
DETECTION_METHODS = ("model", "objectness_only", "box_prior", "heatmap_peak")


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU `(N, M)` of `(N, 4)` and `(M, 4)` boxes as x0, y0, x1, y1."""
    low = np.maximum(boxes[:, None, :2], others[None, :, :2])
    high = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(high - low, 0.0, None).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    other_area = (others[:, 2:] - others[:, :2]).prod(-1)
    return inter / np.maximum(area[:, None] + other_area[None, :] - inter, 1e-12)


def coco_box_metrics(truths: dict, detections: dict, num_images: int) -> dict:
    """COCO's box AP@[.5:.95], AP50 and AR@100 of `detections` against `truths`, by pycocotools' `COCOeval` over one
    area range (all boxes: the size bins are in pixels, these boxes in fractions).

    Args:
        truths: `(image, category)` → `(G, 4)` ground-truth boxes as x0, y0, x1, y1.
        detections: `(image, category)` → `(scores (N,), boxes (N, 4))`; COCO reads the 100 best of each.
        num_images: the images are `0 … num_images - 1`; every detection on one without a truth of its category is
            a false positive.

    Returns:
        `{"ap", "ap50", "ar@100"}`, COCO's means over the categories that have a ground-truth box; NaN when none
        has, 0 when there is no detection.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box) -> list[float]:
        x0, y0, x1, y1 = (float(value) for value in box)
        return [x0, y0, x1 - x0, y1 - y0]

    annotations = [
        {"image_id": image, "category_id": category, "bbox": xywh(box), "iscrowd": 0}
        for (image, category), boxes in truths.items()
        for box in boxes
    ]
    if not annotations:
        return {"ap": float("nan"), "ap50": float("nan"), "ar@100": float("nan")}
    results = [
        [image, *xywh(box), float(score), category]
        for (image, category), (scores, boxes) in detections.items()
        for score, box in zip(scores, boxes, strict=True)
    ]
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ar@100": 0.0}
    for number, annotation in enumerate(annotations, start=1):  # COCOeval reads id 0 as "unmatched"
        annotation.update(id=number, area=annotation["bbox"][2] * annotation["bbox"][3])
    ground = COCO()
    ground.dataset = {
        "info": {},  # pycocotools before 2.0.11 copies it into the results
        "images": [{"id": image} for image in range(num_images)],
        "categories": [{"id": category} for category in sorted({key[1] for key in truths})],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its progress on stdout
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(np.asarray(results, dtype=np.float64)), "bbox")
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0.0, float("inf")]], ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # summarize's stats: 0 AP@[.5:.95], 1 AP50, 8 AR at maxDets[2] (100), each over all areas
    return {
        "ap": float(evaluation.stats[0]),
        "ap50": float(evaluation.stats[1]),
        "ar@100": float(evaluation.stats[8]),
    }


def contrast_to_noise(heatmap: np.ndarray, inside: np.ndarray) -> float:
    """|μ_in − μ_out| / √(σ_in² + σ_out²) of `heatmap` over the `inside` mask and its complement (NaN when either
    is empty)."""
    if inside.all() or not inside.any():
        return float("nan")
    values_in, values_out = heatmap[inside], heatmap[~inside]
    spread = np.sqrt(values_in.var() + values_out.var())
    return float(abs(values_in.mean() - values_out.mean()) / max(spread, 1e-12))


def query_text(kind: str, caption: str, term: str | None) -> str:
    """The query of `kind` for a region with this caption and term (empty: the region has none)."""
    if kind == "position_free":
        return without_position_words(caption or "")
    return " ".join(str((caption if kind == "caption" else term) or "").split())


def _queries(rows, kind: str) -> list[list[tuple[str, list]]]:
    """Per row: (query text, its regions' pixel boxes) for each distinct query of `kind` among its regions."""
    per_row = []
    for row in rows:
        groups: dict[str, list] = {}
        for region in row.get("regions") or []:
            text = query_text(kind, region.get("caption"), region.get("term"))
            if text:
                groups.setdefault(text, []).append(region["bbox"])
        per_row.append(list(groups.items()))
    return per_row


def split_queries(rows, kind: str) -> list[str]:
    """The distinct queries of `kind` of a split, in the order they first occur."""
    return list(dict.fromkeys(text for groups in _queries(rows, kind) for text, _ in groups))


@dataclasses.dataclass
class QueryRun:
    """What one detector pass over a split gives for the queries of one kind: the figures of both protocols read
    it. Boxes are x0, y0, x1, y1 fractions of the model's input view; `(image, query)` indexes the split's rows and
    `texts`."""

    texts: list[str]
    num_images: int
    every_image: bool  # every image asked every query (detection), or only about the findings it holds
    truths: dict  # (image, query) → (G, 4) the finding's boxes, for the pairs whose image holds the finding
    detections: (
        dict  # method → (image, query) → (scores (N,), boxes (N, 4)), best first, for every pair asked
    )
    heatmap_hits: list  # per pair of `truths`: the upsampled heatmap peaks inside the finding's boxes
    cnrs: list  # per pair of `truths`: the heatmap's contrast-to-noise ratio over the finding's boxes


def post_processed(processor, outputs, logits: torch.Tensor, nms_threshold: float | None = None) -> list:
    """What a user gets for one query: the image processor's `post_process_object_detection` of the detector's
    `outputs` with `logits` `(batch, num_patches, 1)` in place of theirs, boxes in the model's view
    (`target_sizes=None`), every score above 0, best first, at most `MAX_DETECTIONS`. `nms_threshold` None leaves
    the processor's default, which the pipeline applies. Returns per image `(scores (N,), boxes (N, 4))` arrays."""
    view = type(outputs)(**{**outputs, "logits": logits})
    options = {} if nms_threshold is None else {"nms_threshold": nms_threshold}
    results = processor.image_processor.post_process_object_detection(
        view, threshold=0.0, target_sizes=None, **options
    )
    ranked = []
    for result in results:
        scores = result["scores"].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[:MAX_DETECTIONS]
        ranked.append((scores[order], result["boxes"].float().cpu().numpy()[order]))
    return ranked


def _objectness_logits(outputs) -> torch.Tensor:
    """`(batch, num_patches, 1)`: each box's objectness logit as its one query logit, the text ignored; a box the
    detector gives no score (a logit at the dtype's lowest value or −inf) gets none here either, so both rank
    the same boxes."""
    logits = outputs.logits
    dropped = (logits <= torch.finfo(logits.dtype).min).all(-1, keepdim=True)
    return outputs.objectness_logits[..., None].to(logits.dtype).masked_fill(dropped, float("-inf"))


@torch.no_grad()
def run_queries(
    detector,
    processor,
    rows,
    support_regions: dict,
    kind: str = "caption",
    every_image: bool = False,
    batch_size: int = 32,
    max_length: int | None = None,
    nms_threshold: float | None = None,
    progress: bool = True,
) -> QueryRun | None:
    """Ask `detector` ([`RegionMedCLIPForZeroShotObjectDetection`]) the queries of `kind` on every row of `rows`:
    every query of the split with `every_image` (detection), else each row's own findings (phrase grounding); rows
    without a finding are then skipped. Every method of `DETECTION_METHODS` answers each pair asked. None when no
    region of `rows` gives a query of that kind. `support_regions` is `split_regions` of the split the box prior
    is fitted on."""
    from ..data.collator import image_input

    per_row = _queries(rows, kind)
    texts = list(dict.fromkeys(text for groups in per_row for text, _ in groups))
    if not texts:
        return None
    index = {text: number for number, text in enumerate(texts)}
    text_embeds = text_embeddings(detector.base_model, processor, texts, max_length, batch_size)
    prior = _box_prior(support_regions, kind)
    run = QueryRun(texts, len(rows), every_image, {}, {method: {} for method in DETECTION_METHODS}, [], [])
    found = run.detections
    for start in tqdm(
        range(0, len(rows), batch_size), desc=f"{kind} queries", leave=False, disable=not progress
    ):
        members = [i for i in range(start, min(start + batch_size, len(rows))) if every_image or per_row[i]]
        if not members:
            continue
        held = [[index[text] for text, _ in per_row[i]] for i in members]
        asked = [range(len(texts)) if every_image else queries for queries in held]
        # The processor maps each finding's pixel boxes into the model's view, as for training inputs.
        boxes = [[box for _, group in per_row[i] for box in group] for i in members]
        inputs = processor.image_processor(
            [image_input(rows[i]["image"]) for i in members],
            boxes=boxes,
            max_regions=max(map(len, boxes)),
            return_tensors="pt",
        )
        pixels = model_inputs({"pixel_values": inputs["pixel_values"]}, detector)["pixel_values"]
        outputs = detector(pixel_values=pixels, query_embeds=text_embeds.to(pixels.device))
        for query in sorted({query for queries in asked for query in queries}):
            ranked = post_processed(processor, outputs, outputs.logits[..., query : query + 1], nms_threshold)
            for slot, row in enumerate(members):
                if query in asked[slot]:
                    found["model"][row, query] = ranked[slot]
        objectness = post_processed(processor, outputs, _objectness_logits(outputs), nms_threshold)
        peak_scores, peak_patches = outputs.similarity.float().flatten(2).max(-1)  # (batch, queries)
        corners = center_to_corners_format(outputs.pred_boxes.float())
        peak_boxes = corners.gather(1, peak_patches[..., None].expand(-1, -1, 4)).cpu().numpy()
        peak_scores = peak_scores.cpu().numpy()
        roi_boxes = inputs["roi_boxes"].numpy()
        for slot, row in enumerate(members):
            for query in asked[slot]:
                found["objectness_only"][row, query] = objectness[slot]
                mean_box, frequency = prior.get(texts[query], prior[None])
                found["box_prior"][row, query] = (np.array([frequency]), mean_box[None])
                found["heatmap_peak"][row, query] = (
                    peak_scores[slot, query, None],
                    peak_boxes[slot, query, None],
                )
            used = 0
            for query, (_, group) in zip(held[slot], per_row[row], strict=True):
                run.truths[row, query] = roi_boxes[slot, used : used + len(group)]
                used += len(group)
            _add_heatmap_figures(
                run, outputs.similarity[slot, held[slot]], roi_boxes[slot], per_row[row], pixels.shape[-2:]
            )
    return run


def _add_heatmap_figures(run: QueryRun, similarity: torch.Tensor, roi_boxes: np.ndarray, groups: list, size):
    """The heatmap's pointing hit and CNR of one image's findings (`similarity` `(F, grid_h, grid_w)` in the order
    of `groups`, whose boxes fill `roi_boxes` in turn), upsampled to the model's input `size` `(H, W)`."""
    if not groups:
        return
    heatmaps = F.interpolate(similarity[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    heatmaps = heatmaps.cpu().numpy()
    used = 0
    for heatmap, (_, group) in zip(heatmaps, groups, strict=True):
        inside = _box_mask(roi_boxes[used : used + len(group)], size)
        used += len(group)
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        run.heatmap_hits.append(bool(inside[peak]))
        run.cnrs.append(contrast_to_noise(heatmap, inside))


def phrase_grounding(run: QueryRun) -> dict:
    """The phrase-grounding figures of the module's docstring, the model's beside each control's."""
    figures = {method: _grounding_figures(run.truths, run.detections[method]) for method in GROUNDING_METHODS}
    cnrs = np.asarray(run.cnrs, dtype=float)
    return {
        **figures.pop("model"),
        "heatmap_pointing_accuracy": float(np.mean(run.heatmap_hits)),
        "cnr": float(np.nanmean(cnrs)) if not np.isnan(cnrs).all() else float("nan"),
        "num_queries": len(run.truths),
        "num_distinct_texts": len(run.texts),
        "controls": figures,
    }


def _grounding_figures(truths: dict, detections: dict) -> dict:
    """Pointing, mean IoU and AP50 of one method's detections over the (image, finding) pairs of `truths`."""
    points, ious, pooled_truths, pooled = [], [], {}, {}
    for number, (pair, truth) in enumerate(truths.items()):
        scores, boxes = detections[pair]
        if len(boxes):
            centre = (boxes[0, :2] + boxes[0, 2:]) / 2
            points.append(bool(((truth[:, :2] <= centre) & (centre <= truth[:, 2:])).all(-1).any()))
            ious.append(float(box_iou(boxes[:1], truth).max()))
        else:  # nothing scored above 0: a miss
            points.append(False)
            ious.append(0.0)
        pooled_truths[number, 0] = truth
        pooled[number, 0] = (scores[:GROUNDING_DETECTIONS], boxes[:GROUNDING_DETECTIONS])
    return {
        "pointing_accuracy": float(np.mean(points)),
        "mean_iou": float(np.mean(ious)),
        "ap50": coco_box_metrics(pooled_truths, pooled, len(truths))["ap50"],
    }


def presence_auc(best_scores: np.ndarray, holds: np.ndarray) -> dict:
    """Per query (column), the ROC AUC of the images' best scores `(images, queries)` against whether each image
    holds the finding (`holds`, bool), and their macro mean; a query that every image holds, or none, is left out.
    Returns `{"presence_auc", "num_presence_queries"}`."""
    result = macro_auc(best_scores, holds)
    return {"presence_auc": result["macro_auc"], "num_presence_queries": len(result["per_class"])}


def box_rates(best_scores: np.ndarray, holds: np.ndarray, thresholds=None) -> dict:
    """Per threshold (default `PRESENCE_THRESHOLDS`), the share of (image, query) pairs whose best score
    `(images, queries)` reaches it, among the pairs where the image holds the finding (`holds`, bool) and among
    those where it does not: `{"0.3": {"holds": ..., "lacks": ...}, ...}` (NaN where a group is empty)."""

    def share(scores: np.ndarray, threshold: float) -> float:
        return float(np.mean(scores >= threshold)) if scores.size else float("nan")

    return {
        f"{threshold:g}": {
            "holds": share(best_scores[holds], threshold),
            "lacks": share(best_scores[~holds], threshold),
        }
        for threshold in (PRESENCE_THRESHOLDS if thresholds is None else thresholds)
    }


def detection(run: QueryRun) -> dict:
    """The detection figures of the module's docstring, the model's beside each control's."""
    if not run.every_image:
        raise ValueError("detection figures need a run that asked every image every query (every_image=True)")
    holds = np.zeros((run.num_images, len(run.texts)), dtype=bool)
    holds[tuple(np.array(list(run.truths)).T)] = True
    figures = {}
    for method in DETECTION_METHODS:
        best = np.zeros(holds.shape)
        for (image, query), (scores, _) in run.detections[method].items():
            best[image, query] = scores[0] if len(scores) else 0.0
        presence = presence_auc(best, holds)
        figures[method] = {
            **coco_box_metrics(run.truths, run.detections[method], run.num_images),
            "presence_auc": presence["presence_auc"],
        }
        if method == "model":
            figures[method]["box_rate"] = box_rates(best, holds)
    return {
        **figures.pop("model"),
        "num_images": run.num_images,
        "num_queries": len(run.texts),
        "num_presence_queries": presence["num_presence_queries"],
        "controls": figures,
    }


def _box_prior(support_regions: dict, kind: str) -> dict:
    """Per text of `kind` in the support split: its regions' mean box (fractions) and the share of the split's
    images that hold it; key None: the mean box of all regions, with share 0 (a text the split lacks)."""
    texts = [
        query_text(kind, caption, term)
        for caption, term in zip(support_regions["captions"], support_regions["terms"], strict=True)
    ]
    boxes = np.asarray(support_regions["boxes"], dtype=np.float64).reshape(-1, 4)
    images = np.asarray(support_regions["image"])
    prior: dict = {None: (boxes.mean(0) if len(boxes) else np.array([0.25, 0.25, 0.75, 0.75]), 0.0)}
    groups: dict[str, list] = {}
    for number, key in enumerate(texts):
        if key:
            groups.setdefault(key, []).append(number)
    for text, members in groups.items():
        share = len(set(images[members].tolist())) / max(support_regions["num_images"], 1)
        prior[text] = (boxes[members].mean(0), share)
    return prior


def _box_mask(boxes: np.ndarray, size) -> np.ndarray:
    """`(H, W)` bool: pixels (centres) of the model's input inside any of the fractional `boxes`."""
    height, width = int(size[0]), int(size[1])
    ys = (np.arange(height) + 0.5)[:, None] / height
    xs = (np.arange(width) + 0.5)[None, :] / width
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return mask


__all__ = [
    "DETECTION_KINDS",
    "QUERY_KINDS",
    "QueryRun",
    "box_iou",
    "box_rates",
    "coco_box_metrics",
    "contrast_to_noise",
    "detection",
    "phrase_grounding",
    "post_processed",
    "presence_auc",
    "run_queries",
    "split_queries",
]
