"""Region grounding: does each ROI pick out its own caption among its image's captions (pointing accuracy), and
where in an image does a text match (patch-to-text similarity heatmaps, in the style of the paper's Figure 7).

The pointing game is the within-image counterpart of `region_to_caption` retrieval: the gallery of an ROI is only
the captions of the other ROIs of the same image, so it measures whether the model tells apart the regions of one
image rather than whether it recognises a finding at all. Where the captions of one image differ in their position
words, the box alone tells them apart; the harness therefore plays the game a second time with those words taken
out of every caption ([`pointing_ceiling`] bounds that game), where only what a region shows can decide.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..processing_regionmed_clip import caption_key
from .device import resolve_device
from .features import extract_features, model_inputs

# ---------------------------------------------------------------------------------------------------------------------
# Pointing accuracy
# ---------------------------------------------------------------------------------------------------------------------


def _pointing_hits(
    region_embeds: torch.Tensor, region_text_embeds: torch.Tensor, region_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ROI hits and per-image ROI counts of the pointing game.

    Returns:
        `hits` `(N,)` bool, one per real ROI of the images with at least 2 real ROIs (image-major, slot order), and
        `counts` `(M,)` the number of real ROIs of each of those M images.
    """
    if region_embeds.shape != region_text_embeds.shape or region_embeds.shape[:2] != region_mask.shape:
        raise ValueError(
            f"Expected region_embeds and region_text_embeds (B, K, P) and region_mask (B, K); got "
            f"{tuple(region_embeds.shape)}, {tuple(region_text_embeds.shape)} and {tuple(region_mask.shape)}."
        )
    # Normalised again so that the function is a cosine whatever it is given; padded zeros stay zero.
    regions = F.normalize(region_embeds.float(), dim=-1)
    captions = F.normalize(region_text_embeds.float(), dim=-1)
    scores = torch.einsum("bkp,bjp->bkj", regions, captions)  # ROI k of image b against caption j of image b
    return _hits_from_scores(scores, region_mask)


def _hits_from_scores(scores: torch.Tensor, region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[`_pointing_hits`] from `(B, K, K)` scores of ROI k against caption j of the same image."""
    mask = region_mask.bool()
    own = scores.diagonal(dim1=1, dim2=2)  # (B, K)
    # A competitor is another real caption of the same image; everything else cannot win.
    competitor = mask[:, None, :] & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    best_other = scores.masked_fill(~competitor, float("-inf")).amax(-1)
    counts = mask.sum(-1)
    # With one real ROI there is nothing to point against (the hit would be free), so such images are left out.
    eligible = mask & (counts >= 2)[:, None]
    # Strictly greater: a tie with another caption (e.g. two ROIs of one image with the same caption) is a miss.
    hits = (own > best_other)[eligible]
    return hits, counts[counts >= 2]


def pointing_accuracy_from_scores(scores: torch.Tensor, region_mask: torch.Tensor) -> dict:
    """[`pointing_accuracy`] from any scorer's `(B, K, K)` scores of ROI k against caption j of image b (used by
    the measured controls, which score without embeddings)."""
    hits, counts = _hits_from_scores(scores, region_mask)
    return _summary(int(hits.sum()), len(hits), float((1.0 / counts.double()).sum()), len(counts))


def pointing_accuracy(
    region_embeds: torch.Tensor, region_text_embeds: torch.Tensor, region_mask: torch.Tensor
) -> dict:
    """Pointing game over ROIs: the share of ROIs whose own caption scores highest among the captions of the real
    ROIs of the same image.

    Only images with at least 2 real ROIs take part (with one, every ROI would trivially hit). Scores are cosine
    similarities; a tie between the own caption and another counts as a miss, so an image whose ROIs share a
    caption cannot score on them, and constant embeddings score 0 rather than chance.

    Args:
        region_embeds: `(B, K, P)` ROI embeddings (padded slots are ignored whatever they hold).
        region_text_embeds: `(B, K, P)` region-caption embeddings aligned with `region_embeds`.
        region_mask: `(B, K)` true for real ROIs.

    Returns:
        `{"pointing_accuracy", "num_regions", "num_images", "chance"}`: the hit fraction over all counted ROIs (each
        ROI weighs the same, so images with more ROIs weigh more), how many ROIs and images were counted, and the
        mean over those images of `1 / K_i`, the expected score of a random pointer. Accuracy and chance are NaN when
        no image has 2 real ROIs.
    """
    hits, counts = _pointing_hits(region_embeds, region_text_embeds, region_mask)
    return _summary(int(hits.sum()), len(hits), float((1.0 / counts.double()).sum()), len(counts))


def _summary(num_hits: int, num_regions: int, inverse_counts: float, num_images: int) -> dict:
    return {
        "pointing_accuracy": num_hits / num_regions if num_regions else float("nan"),
        "num_regions": num_regions,
        "num_images": num_images,
        "chance": inverse_counts / num_images if num_images else float("nan"),
    }


@torch.no_grad()
def pointing_from_features(features) -> dict:
    """[`pointing_accuracy`] from a split's extracted features."""
    return pointing_from_regions(features.region_embeds, features.region_text_embeds, features.region_image)


def pointing_from_regions(
    region_embeds: torch.Tensor, region_text_embeds: torch.Tensor, region_image: torch.Tensor
) -> dict:
    """[`pointing_accuracy`] of regions listed flat over a split, `(N, P)` each: they are put back into per-image
    `(B, K, P)` slots by their `region_image` index (non-decreasing)."""
    if len(region_image) == 0:
        return _summary(0, 0, 0.0, 0)
    (order, slots), mask = region_slots(region_image)
    regions = region_embeds.new_zeros((*mask.shape, region_embeds.shape[-1]))
    captions = torch.zeros_like(regions)
    regions[order, slots] = region_embeds
    captions[order, slots] = region_text_embeds
    return pointing_accuracy(regions, captions, mask)


def pointing_ceiling(captions: Sequence[str], region_image: torch.Tensor) -> float:
    """The best pointing accuracy any scorer can reach on these regions: that of an oracle which knows each
    region's caption. It misses only regions whose caption another region of the same image shares (a tie; captions
    compare as the model sees them, by `caption_key`)."""
    if len(region_image) == 0:
        return float("nan")
    (order, slots), mask = region_slots(region_image)
    names = [[None] * mask.shape[1] for _ in range(mask.shape[0])]
    for image, slot, caption in zip(order.tolist(), slots.tolist(), captions, strict=True):
        names[image][slot] = caption_key(caption)
    same = torch.tensor(
        [[[float(a is not None and a == b) for b in row] for a in row] for row in names], dtype=torch.float64
    )
    return pointing_accuracy_from_scores(same, mask)["pointing_accuracy"]


def region_slots(region_image: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Regions listed image by image (`region_image` is each one's image index, non-decreasing) put back into
    per-image slots: their `(image, slot)` positions and the `(B, K)` mask of filled slots (B images with regions,
    K the most regions of one image)."""
    _, counts = torch.unique_consecutive(region_image, return_counts=True)
    order = torch.unique_consecutive(region_image, return_inverse=True)[1]
    slots = torch.cat([torch.arange(int(count)) for count in counts])
    mask = torch.zeros((len(counts), int(counts.max())), dtype=torch.bool)
    mask[order, slots] = True
    return (order, slots), mask


def grounding_metrics(model, processor, rows, batch_size: int = 16) -> dict:
    """[`pointing_accuracy`] of `model` over a dataset split (`image` and `regions` with `bbox` and `caption`).

    The ROIs are those the training collator keeps (the `max_regions` highest-scoring), as in every other
    evaluation; images with fewer than 2 of them do not take part.
    """
    return pointing_from_features(extract_features(model, processor, rows, batch_size=batch_size))


# ---------------------------------------------------------------------------------------------------------------------
# Patch-to-text heatmaps
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_text_similarity(model, processor, image, text: str) -> np.ndarray:
    """Cosine similarity `(H', W')` between each patch token of `image` and the embedding of `text`.

    `image` is anything the processor decodes (PIL, array, path, bytes, DICOM). The map covers the whole image
    resized to the model's input size (the processor stretches without cropping), so cell `(i, j)` lies over the
    `i`-th of `H'` equal rows and `j`-th of `W'` equal columns of the original image. The text goes through the
    processor, so it is lower-cased and stripped of punctuation as in training. The model is used as it is
    (call `.eval()` first if it is training: dropout would make the map random).
    """
    inputs = model_inputs(processor(text=[text], images=[image], return_tensors="pt"), model)
    patches = F.normalize(model.get_patch_features(inputs["pixel_values"]).patch_embeds.float(), dim=-1)[0]
    text_features = model.get_text_features(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).pooler_output
    text_embed = F.normalize(text_features.float(), dim=-1)[0]
    return (patches @ text_embed).clamp(-1.0, 1.0).cpu().numpy()


def save_heatmap_overlay(
    image,
    similarity: np.ndarray,
    out_path: str | os.PathLike,
    title: str | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    box_labels: Sequence[str] | None = None,
) -> Path:
    """Draw `similarity` (a `(H', W')` patch map) over `image` and save it as a PNG; returns the path.

    The map is upsampled bilinearly to the image's own size, so it lines up with the original pixels whatever the
    model's input size. Colours span the map's own minimum to maximum (patch cosines of one text often vary over a
    narrow band, and a fixed [-1, 1] scale would show a flat colour); the colour bar gives the cosine values.
    `boxes` are `(x0, y0, x1, y1)` in original pixels, drawn as outlines; pixel coordinates are edges, as the
    processor reads them, so a box `(0, 0, W, H)` frames the whole image; `box_labels` (one per box) are written at
    their upper left corners. The figure follows the image's aspect ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..image_processing_regionmed_clip import decode_image

    pixels = decode_image(image)
    height, width = pixels.shape[:2]
    similarity = np.asarray(similarity, dtype=np.float32)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be a (H', W') map, got shape {similarity.shape}.")
    # align_corners=False treats each cell as covering an equal share of the image, as the patches do.
    upsampled = F.interpolate(
        torch.from_numpy(similarity)[None, None], size=(height, width), mode="bilinear", align_corners=False
    )[0, 0].numpy()

    scale = 6.0 / max(height, width)
    figure, axis = plt.subplots(figsize=(width * scale + 1.2, height * scale + (0.5 if title else 0.1)))
    extent = (0, width, height, 0)  # pixel edges, so box coordinates land where the processor puts them
    axis.imshow(pixels, extent=extent, interpolation="nearest")
    overlay = axis.imshow(upsampled, cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear")
    boxes = list(boxes or ())
    for (x0, y0, x1, y1), label in zip(boxes, box_labels or [None] * len(boxes), strict=True):
        axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
        if label is not None:
            axis.text(x0, y0, label, color="black", fontsize=8, va="top", backgroundcolor="white")
    axis.set_xlim(0, width)
    axis.set_ylim(height, 0)
    axis.set_axis_off()
    if title:
        axis.set_title(title, fontsize=9)
    # The bar gets its own opaque mappable: drawn from the overlay it would inherit the overlay's transparency.
    opaque = matplotlib.cm.ScalarMappable(norm=overlay.norm, cmap=overlay.cmap)
    figure.colorbar(opaque, ax=axis, fraction=0.046, pad=0.03, label="cosine similarity")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return out_path


@dataclass
class ExplainArgs:
    """What `explain` maps: a model, an image and a text, and where the overlay goes."""

    model_path: str = field(metadata={"help": "Model folder or Hub id", "aliases": ["--model"]})
    image: str = field(metadata={"help": "Image file (PNG, JPEG, DICOM, ...)"})
    text: str = field(metadata={"help": "The text to locate, e.g. a region caption"})
    out: str = field(default="heatmap.png", metadata={"help": "The PNG to write"})
    device: str = field(
        default="auto",
        metadata={"help": "`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`"},
    )


@dataclass
class LocateArgs(ExplainArgs):
    """What `locate` finds: `explain`'s model, image and text, and how many boxes it draws."""

    out: str = field(default="locate.png", metadata={"help": "The PNG to write"})
    top_k: int = field(default=3, metadata={"help": "Boxes to return and draw"})


def explain(args: ExplainArgs) -> Path:
    """Load a saved model folder (or Hub id), map where the text matches the image, and save the overlay to
    `args.out`.

    Runs in float32 on `args.device`; float32 keeps the map the same on every machine up to the device's rounding.
    One image and one text go through at a time.
    """
    model_path, image, text = args.model_path, args.image, args.text
    from transformers import AutoModel, AutoProcessor

    import regionmed_clip  # noqa: F401  (registers the Auto classes)

    # dtype pinned: transformers 5 otherwise loads a checkpoint in the dtype it was saved in (e.g. bf16).
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).to(resolve_device(args.device)).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    similarity = patch_text_similarity(model, processor, image, text)
    return save_heatmap_overlay(image, similarity, args.out, title=text)


def locate(args: LocateArgs) -> dict:
    """Find the text in the image without boxes: the `top_k` best boxes of the `zero-shot-object-detection`
    pipeline, each drawn with its presence score over the heatmap `explain` draws, into `args.out`.

    Runs in float32 on `args.device`. Returns `{"detections": [{"score", "label", "box"}, ...], "out": path}`,
    boxes in the image's pixels. A box's score is the detector's for that box and query (see
    [`RegionMedCLIPForZeroShotObjectDetection`]), as the pipeline returns it.
    """
    model_path, image, text = args.model_path, args.image, args.text
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    import regionmed_clip  # noqa: F401  (registers the Auto classes)

    from ..image_processing_regionmed_clip import decode_image

    target = resolve_device(args.device)
    # transformers' pipeline reads images with its own loader, which knows no DICOM: it gets the decoded pixels.
    picture = Image.fromarray((decode_image(image) * 255).round().astype(np.uint8))
    detector = pipeline(
        "zero-shot-object-detection", model=str(model_path), dtype=torch.float32, device=target
    )
    detections = detector(picture, candidate_labels=[text], threshold=0.0, top_k=args.top_k)
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).to(target).eval()
    similarity = patch_text_similarity(model, AutoProcessor.from_pretrained(model_path), image, text)
    boxes = [tuple(result["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")) for result in detections]
    scores = [f"{result['score']:.2f}" for result in detections]
    path = save_heatmap_overlay(
        image,
        similarity,
        args.out,
        title=f"{text} (presence score of each box: {', '.join(scores)})",
        boxes=boxes,
        box_labels=scores,
    )
    return {"detections": detections, "out": str(path)}


__all__ = [
    "ExplainArgs",
    "LocateArgs",
    "explain",
    "locate",
    "grounding_metrics",
    "patch_text_similarity",
    "pointing_accuracy",
    "pointing_ceiling",
    "pointing_from_regions",
    "save_heatmap_overlay",
]
