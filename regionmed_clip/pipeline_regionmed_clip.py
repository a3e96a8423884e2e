"""The `zero-shot-region-classification` pipeline: rank candidate labels for every box of an image, and for the
region-aware whole image."""

import torch
from transformers import Pipeline

from .configuration_regionmed_clip import require_supported_transformers

require_supported_transformers()

DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."
DEFAULT_BATCH_SIZE = 8
TASK = "zero-shot-region-classification"


class ZeroShotRegionClassificationPipeline(Pipeline):
    r"""
    Zero-shot classification of image regions with a RegionMed-CLIP model.

    Every saved RegionMed-CLIP folder ships this file and names it under `custom_pipelines` in `config.json`, so it
    loads with `pipeline("zero-shot-region-classification", model=folder, trust_remote_code=True)` where the package
    is not installed.

    Images are decoded by the model's own image processor, so besides PIL images it takes file paths (PNG, JPEG,
    16-bit, DICOM), URLs, encoded bytes, NumPy arrays and torch tensors. A list of images is encoded `batch_size` images
    per forward (default `DEFAULT_BATCH_SIZE`, 8); `boxes` then holds one list of boxes per image.

    Scores are softmaxes over the candidate labels, as in the `zero-shot-image-classification` pipeline: per box of
    `logit_scale · region_embedsᵀ text_embeds`, and for the whole image of the model's `logits_per_image`, which uses
    the region-aware image embedding when the image has boxes (the global one when it has none).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("zero-shot-region-classification", model="path/to/regionmed-clip", trust_remote_code=True)
    >>> result = classifier("scan.dcm", boxes=[(30, 40, 90, 100)], candidate_labels=["nodule", "cyst", "normal"],
    ...                     hypothesis_template="a chest CT showing {}")
    >>> result["regions"][0]["scores"][0]["label"], result["image"][0]["label"]
    ```

    Returns, per image, a dict with `regions` (per box, in input order: `box` as given and `scores`, the labels ranked
    by score) and `image` (the labels ranked for the whole image); for a list of images, a list of such dicts.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, images, boxes=None, candidate_labels=None, hypothesis_template=None, batch_size=None):
        if not candidate_labels:
            raise ValueError("candidate_labels must be a non-empty list of label strings.")
        if isinstance(candidate_labels, str):
            candidate_labels = [candidate_labels]
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if boxes is None:
            boxes = [None] * len(images)
        elif single:
            boxes = [boxes]
        if len(boxes) != len(images):
            raise ValueError(
                f"Got {len(images)} images but boxes for {len(boxes)}; give one list of boxes per image."
            )
        size = batch_size or getattr(self, "_batch_size", None) or DEFAULT_BATCH_SIZE
        groups = [
            {"images": images[start : start + size], "boxes": boxes[start : start + size]}
            for start in range(0, len(images), size)
        ]
        template = hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATE
        # Each group is one forward; transformers' own batching would collate per-image tensors instead.
        results = super().__call__(
            groups, candidate_labels=list(candidate_labels), hypothesis_template=template, batch_size=1
        )
        flat = [result for group in results for result in group]
        return flat[0] if single else flat

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, **kwargs):
        preprocess_params = {}
        if candidate_labels is not None:
            preprocess_params["candidate_labels"] = candidate_labels
        if hypothesis_template is not None:
            preprocess_params["hypothesis_template"] = hypothesis_template
        return preprocess_params, {}, {}

    def preprocess(self, group, candidate_labels=None, hypothesis_template=DEFAULT_HYPOTHESIS_TEMPLATE):
        boxes = [[] if image_boxes is None else image_boxes for image_boxes in group["boxes"]]
        inputs = self.processor(
            text=[hypothesis_template.format(label) for label in candidate_labels],
            images=group["images"],
            boxes=boxes if any(len(image_boxes) for image_boxes in boxes) else None,
            padding=True,
            return_tensors="pt",
        )
        dtype = self.model.dtype
        inputs = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
        return {"inputs": inputs, "candidate_labels": candidate_labels, "boxes": boxes}

    def _forward(self, model_inputs):
        outputs = self.model(**model_inputs["inputs"])
        region_logits = None
        if outputs.region_embeds is not None:
            region_logits = outputs.logit_scale * outputs.region_embeds @ outputs.text_embeds.t()
        return {
            "logits_per_image": outputs.logits_per_image,
            "region_logits": region_logits,
            "candidate_labels": model_inputs["candidate_labels"],
            "boxes": model_inputs["boxes"],
        }

    def postprocess(self, model_outputs):
        labels = model_outputs["candidate_labels"]

        def ranked(logits):
            scores = logits.float().softmax(-1).tolist()
            return sorted(
                ({"label": label, "score": score} for label, score in zip(labels, scores, strict=True)),
                key=lambda item: -item["score"],
            )

        results = []
        for index, image_boxes in enumerate(model_outputs["boxes"]):
            regions = [
                {
                    "box": [float(value) for value in box],
                    "scores": ranked(model_outputs["region_logits"][index, slot]),
                }
                for slot, box in enumerate(image_boxes)
            ]
            results.append({"regions": regions, "image": ranked(model_outputs["logits_per_image"][index])})
        return results


__all__ = ["TASK", "ZeroShotRegionClassificationPipeline"]
