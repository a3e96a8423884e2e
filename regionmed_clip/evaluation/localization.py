"""Text-queried localization without boxes at test time (phrase grounding), with its controls.

For each test image and each finding it has, the model is asked where the text lies given only the image
([`RegionMedCLIPForZeroShotObjectDetection`], what the `zero-shot-object-detection` pipeline runs). A finding is its regions
grouped by query text, of three kinds: the `caption`; the caption without its position words (`position_free`:
"round nodule left upper" → "round nodule"), since a caption that names where the finding is gives the box prior
below its answer without the image; and the `term` alone, where the data names terms. Its top-scoring proposal is
scored against the finding's ground-truth boxes:

- `pointing_accuracy`: the top box's centre lies inside one of the finding's boxes;
- `mean_iou`: the top box's best IoU with the finding's boxes;
- `ap50`: average precision at IoU 0.5 over the split, every query contributing its `DETECTIONS_PER_QUERY` best
  proposals ranked by score, a proposal counting once per ground-truth box (VOC's all-point interpolation);
- `heatmap_pointing_accuracy` and `cnr`: the patch–text similarity map (what `explain` draws), upsampled to the
  model's input size: its maximum inside one of the boxes, and its contrast-to-noise ratio inside against outside
  the boxes, |μ_in − μ_out| / √(σ_in² + σ_out²), as BioViL and MS-CXR report it.

Controls, measured on the same queries:

- `objectness_only`: the same proposals ranked by the proposer's objectness alone (the text ignored);
- `box_prior`: no image, the mean box of the query's text over the support split's regions (the mean of all its
  regions for a text it lacks), one detection per query.

The third control, the global-only baseline's heatmap, is the baseline model's own `heatmap_*` figures (the
comparison of `make demo` / `make learning-check` evaluates it with the same task).
"""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.vocabulary import without_position_words
from ..modeling_regionmed_clip import RegionMedCLIPForZeroShotObjectDetection
from .features import model_inputs, text_embeddings

DETECTIONS_PER_QUERY = 10
QUERY_KINDS = ("caption", "position_free", "term")


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU `(N, M)` of `(N, 4)` and `(M, 4)` boxes as x0, y0, x1, y1."""
    low = np.maximum(boxes[:, None, :2], others[None, :, :2])
    high = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(high - low, 0.0, None).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    other_area = (others[:, 2:] - others[:, :2]).prod(-1)
    return inter / np.maximum(area[:, None] + other_area[None, :] - inter, 1e-12)


def average_precision(detections: list[tuple[float, int, np.ndarray]], truths: list[np.ndarray]) -> float:
    """AP at IoU 0.5 of `detections` (score, query index, box) against `truths[query]` `(G, 4)`: detections in
    descending score, each matched to the unmatched truth box of its query it overlaps most (IoU ≥ 0.5), precision
    made monotone and integrated over recall (VOC's all-point interpolation)."""
    total = sum(len(boxes) for boxes in truths)
    if total == 0 or not detections:
        return float("nan")
    matched = [np.zeros(len(boxes), dtype=bool) for boxes in truths]
    hits = []
    for _, query, box in sorted(detections, key=lambda item: -item[0]):
        overlaps = box_iou(box[None], truths[query])[0]
        overlaps[matched[query]] = -1.0
        best = int(overlaps.argmax()) if len(overlaps) else -1
        hit = best >= 0 and overlaps[best] >= 0.5
        if hit:
            matched[query][best] = True
        hits.append(hit)
    hits = np.asarray(hits, dtype=float)
    recall = np.cumsum(hits) / total
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate(([0.0], recall)))
    return float((steps * precision).sum())


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


def _top_and_ranked(
    logits: np.ndarray, boxes: np.ndarray
) -> tuple[np.ndarray, list[tuple[float, np.ndarray]]]:
    """The top proposal's box and the `DETECTIONS_PER_QUERY` best proposals (softmax score, box) of one query."""
    scores = torch.from_numpy(logits).softmax(0).numpy()
    order = np.argsort(-scores, kind="stable")[:DETECTIONS_PER_QUERY]
    return boxes[order[0]], [(float(scores[i]), boxes[i]) for i in order]


class _Tally:
    """Pointing, IoU and AP50 of one way of choosing boxes over every query."""

    def __init__(self):
        self.points, self.ious, self.detections, self.truths = [], [], [], []

    def add(self, top: np.ndarray, ranked: list[tuple[float, np.ndarray]], truth: np.ndarray):
        centre = (top[:2] + top[2:]) / 2
        inside = (truth[:, :2] <= centre).all(-1) & (centre <= truth[:, 2:]).all(-1)
        self.points.append(bool(inside.any()))
        self.ious.append(float(box_iou(top[None], truth).max()))
        query = len(self.truths)
        self.truths.append(truth)
        self.detections.extend((score, query, box) for score, box in ranked)

    def figures(self) -> dict:
        return {
            "pointing_accuracy": float(np.mean(self.points)),
            "mean_iou": float(np.mean(self.ious)),
            "ap50": average_precision(self.detections, self.truths),
        }


@torch.no_grad()
def localization_metrics(
    model,
    processor,
    rows,
    support_regions: dict,
    kind: str = "caption",
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = True,
) -> dict | None:
    """The figures of the module's docstring for the queries of `kind` (`caption`, `position_free` or `term`) over
    `rows`; None when no region of `rows` gives a query of that kind. `support_regions` is `split_regions` of the support split (its
    `boxes` as fractions and the texts of `kind` in `captions` or `terms`)."""
    from ..data.collator import image_input

    queries = _queries(rows, kind)
    texts = list(dict.fromkeys(text for per_row in queries for text, _ in per_row))
    if not texts:
        return None
    text_embeds = text_embeddings(model, processor, texts, max_length, batch_size)
    detector = RegionMedCLIPForZeroShotObjectDetection(model.config, model=model).eval()
    index = {text: row for row, text in enumerate(texts)}
    prior = _box_prior(support_regions, kind)
    tallies = {"model": _Tally(), "objectness_only": _Tally(), "box_prior": _Tally()}
    heat_points, cnrs = [], []
    for start in tqdm(
        range(0, len(rows), batch_size), desc="localization", leave=False, disable=not progress
    ):
        members = [i for i in range(start, min(start + batch_size, len(rows))) if queries[i]]
        if not members:
            continue
        images = [image_input(rows[i]["image"]) for i in members]
        # The processor maps each finding's pixel boxes into the model's view (as for training inputs).
        boxes = [[box for _, group in queries[i] for box in group] for i in members]
        inputs = processor.image_processor(
            images, boxes=boxes, max_regions=max(map(len, boxes)), return_tensors="pt"
        )
        pixels = model_inputs({"pixel_values": inputs["pixel_values"]}, model)["pixel_values"]
        outputs = detector(pixel_values=pixels, query_embeds=text_embeds.to(pixels.device))
        logits = outputs.logits.float().cpu().numpy()
        centres, extents = outputs.pred_boxes[..., :2].float(), outputs.pred_boxes[..., 2:].float()
        proposals = torch.cat((centres - extents / 2, centres + extents / 2), -1).cpu().numpy()
        peaks = (outputs.logits[..., 0] > torch.finfo(outputs.logits.dtype).min).cpu().numpy()
        objectness = outputs.objectness_logits.float().cpu().numpy()
        size = pixels.shape[-2:]
        heatmaps = F.interpolate(outputs.similarity.float(), size=size, mode="bilinear", align_corners=False)
        heatmaps = heatmaps.cpu().numpy()
        roi_boxes = inputs["roi_boxes"].numpy()
        for slot, row in enumerate(members):
            used = 0
            for text, group in queries[row]:
                truth = roi_boxes[slot, used : used + len(group)]
                used += len(group)
                query = index[text]
                top, ranked = _top_and_ranked(logits[slot, :, query], proposals[slot])
                tallies["model"].add(top, ranked, truth)
                top, ranked = _top_and_ranked(
                    np.where(peaks[slot], objectness[slot], -np.inf), proposals[slot]
                )
                tallies["objectness_only"].add(top, ranked, truth)
                mean_box = prior.get(text, prior[None])
                tallies["box_prior"].add(mean_box, [(1.0, mean_box)], truth)
                heatmap = heatmaps[slot, query]
                inside = _box_mask(truth, size)
                peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
                heat_points.append(bool(inside[peak]))
                cnrs.append(contrast_to_noise(heatmap, inside))
    model_figures = tallies["model"].figures()
    return {
        **model_figures,
        "heatmap_pointing_accuracy": float(np.mean(heat_points)),
        "cnr": float(np.nanmean(cnrs)) if not np.isnan(cnrs).all() else float("nan"),
        "num_queries": len(tallies["model"].points),
        "num_distinct_texts": len(texts),
        "controls": {
            "objectness_only": tallies["objectness_only"].figures(),
            "box_prior": tallies["box_prior"].figures(),
        },
    }


def _box_prior(support_regions: dict, kind: str) -> dict:
    """Mean box (fractions) per text of `kind` over the support split's regions; key None: the mean of all."""
    texts = [
        query_text(kind, caption, term)
        for caption, term in zip(support_regions["captions"], support_regions["terms"], strict=True)
    ]
    boxes = np.asarray(support_regions["boxes"], dtype=np.float64).reshape(-1, 4)
    prior: dict = {None: boxes.mean(0) if len(boxes) else np.array([0.25, 0.25, 0.75, 0.75])}
    groups: dict[str, list] = {}
    for key, box in zip(texts, boxes, strict=True):
        if key:
            groups.setdefault(key, []).append(box)
    prior.update({text: np.mean(group, axis=0) for text, group in groups.items()})
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


__all__ = ["average_precision", "box_iou", "contrast_to_noise", "localization_metrics"]
