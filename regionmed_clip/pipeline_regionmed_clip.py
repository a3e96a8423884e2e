"""The `zero-shot-region-classification` pipeline: rank candidate labels for every box of an image, and for the
region-aware whole image."""

import torch
import torch.nn.functional as F
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

    Scores follow the model's objective (`config.loss_objective`). An InfoNCE model's are softmaxes over the
    candidate labels, as in the `zero-shot-image-classification` pipeline. A sigmoid model's (SigLIP's objective; a
    converted SigLIP or MedSigLIP has it) are each label's own `sigmoid(logit_scale · cos + logit_bias)`, the scores
    transformers' pipeline returns for the SigLIP source; transformers' pipeline on a RegionMed-CLIP folder applies
    a softmax instead, since it keys the sigmoid on "siglip" in the model type. The logits are per box of
    `region_embeds`, and for the whole image of the image embedding, region-aware when the image has boxes (the
    global one when it has none).

    The candidate labels are encoded once per call (each distinct text once), not once per image or batch: the
    text tower's cost does not grow with the number of images.

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
        label_embeds = self.label_embeddings([template.format(label) for label in candidate_labels])
        # Each group is one forward; transformers' own batching would collate per-image tensors instead.
        results = super().__call__(
            groups, candidate_labels=list(candidate_labels), label_embeds=label_embeds, batch_size=1
        )
        flat = [result for group in results for result in group]
        return flat[0] if single else flat

    def label_embeddings(self, texts: list[str]) -> torch.Tensor:
        """The normalised text embeddings `(len(texts), projection_dim)` of `texts`, each distinct text through the
        text tower once, padded as the processor pads (a SigLIP-converted one to its fixed length)."""
        distinct = list(dict.fromkeys(texts))
        inputs = self.processor(text=distinct, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.no_grad():
            embeds = F.normalize(self.model.get_text_features(**inputs).pooler_output, dim=-1)
        return embeds[torch.tensor([distinct.index(text) for text in texts], device=embeds.device)]

    def _sanitize_parameters(self, candidate_labels=None, label_embeds=None, **kwargs):
        preprocess_params = {}
        if candidate_labels is not None:
            preprocess_params["candidate_labels"] = candidate_labels
        forward_params = {} if label_embeds is None else {"label_embeds": label_embeds}
        return preprocess_params, forward_params, {}

    def preprocess(self, group, candidate_labels=None):
        boxes = [[] if image_boxes is None else image_boxes for image_boxes in group["boxes"]]
        inputs = self.processor(
            images=group["images"],
            boxes=boxes if any(len(image_boxes) for image_boxes in boxes) else None,
            return_tensors="pt",
        )
        dtype = self.model.dtype
        inputs = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
        return {"inputs": inputs, "candidate_labels": candidate_labels, "boxes": boxes}

    def _forward(self, model_inputs, label_embeds):
        outputs = self.model(**model_inputs["inputs"])
        labels = label_embeds.to(outputs.image_embeds.dtype).t()
        logit_scale = self.model.logit_scale.exp()
        bias = None
        if self.model.config.loss_objective == "sigmoid":
            bias = self.model.logit_bias if self.model.logit_bias is not None else logit_scale.new_zeros(())
        region_logits = None
        if outputs.region_embeds is not None:
            region_logits = logit_scale * outputs.region_embeds @ labels
        return {
            "logits_per_image": logit_scale * outputs.image_embeds @ labels,
            "region_logits": region_logits,
            "logit_bias": bias,
            "candidate_labels": model_inputs["candidate_labels"],
            "boxes": model_inputs["boxes"],
        }

    def postprocess(self, model_outputs):
        labels = model_outputs["candidate_labels"]
        bias = model_outputs["logit_bias"]

        def ranked(logits):
            logits = logits.float()
            scores = (logits.softmax(-1) if bias is None else torch.sigmoid(logits + bias.float())).tolist()
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
