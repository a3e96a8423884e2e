"""The pipelines of a RegionMed-CLIP folder: `zero-shot-region-classification` ranks candidate labels for every box
of an image and for the region-aware whole image; `zero-shot-region-detection` finds the labels in images without
boxes. Both encode the labels once per call and read images with the model's own decoder."""

import torch
import torch.nn.functional as F
from transformers import Pipeline

from .configuration_regionmed_clip import require_supported_transformers
from .image_processing_regionmed_clip import decode_image

require_supported_transformers()

DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."
DEFAULT_BATCH_SIZE = 8
TASK = "zero-shot-region-classification"


class _LabelsOncePipeline(Pipeline):
    """What both pipelines share: the processor as their one pre-processing component, the candidate labels through
    the text tower once per call, and `batch_size` whole images per forward."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, batch_size: int | None = None, **kwargs):
        self.images_per_forward = batch_size or DEFAULT_BATCH_SIZE
        super().__init__(*args, **kwargs)

    def label_embeddings(self, texts: list[str]) -> torch.Tensor:
        """The normalised text embeddings `(len(texts), projection_dim)` of `texts`, each distinct text through the
        text tower once, padded as the processor pads (a SigLIP-converted one to its fixed length). The text tower is
        `base_model`'s: the model itself, or the detector's base model."""
        distinct = list(dict.fromkeys(texts))
        inputs = self.processor(text=distinct, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.no_grad():
            embeds = F.normalize(self.model.base_model.get_text_features(**inputs).pooler_output, dim=-1)
        return embeds[torch.tensor([distinct.index(text) for text in texts], device=embeds.device)]

    def run_in_groups(self, columns: dict[str, list], batch_size: int | None, **params) -> list:
        """Per image, the pipeline's result for `columns` (equal-length per-image lists, such as `images` and
        `boxes`), `batch_size` images (default: the pipeline's) per forward."""
        size = batch_size or self.images_per_forward
        count = len(columns["images"])
        groups = [
            {name: values[start : start + size] for name, values in columns.items()}
            for start in range(0, count, size)
        ]
        # Each group is one forward; transformers' own batching would collate per-image tensors instead.
        results = super().__call__(groups, batch_size=1, **params)
        return [result for group in results for result in group]

    def to_model_dtype(self, inputs) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        return {
            key: value.to(dtype) if torch.is_floating_point(value) else value for key, value in inputs.items()
        }


class ZeroShotRegionClassificationPipeline(_LabelsOncePipeline):
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
        template = hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATE
        results = self.run_in_groups(
            {"images": images, "boxes": boxes},
            batch_size,
            candidate_labels=list(candidate_labels),
            label_embeds=self.label_embeddings([template.format(label) for label in candidate_labels]),
        )
        return results[0] if single else results

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
        return {"inputs": self.to_model_dtype(inputs), "candidate_labels": candidate_labels, "boxes": boxes}

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


class ZeroShotRegionDetectionPipeline(_LabelsOncePipeline):
    r"""
    Zero-shot detection with a RegionMed-CLIP model: where in each image is each candidate label, as transformers'
    `zero-shot-object-detection` pipeline answers it for OWL-ViT, with the same arguments and results.

    Every saved RegionMed-CLIP folder names this pipeline under `custom_pipelines` in `config.json` as
    `zero-shot-region-detection`, so it loads with `pipeline("zero-shot-region-detection", model=folder,
    trust_remote_code=True)` where the package is not installed; in a process that imports the package, pass
    `pipeline_class=ZeroShotRegionDetectionPipeline` (with either task name). The folder does not claim
    `zero-shot-object-detection` itself: transformers would then refuse that task for the folder without
    `trust_remote_code=True`, even where the package is installed. `pipeline("zero-shot-object-detection",
    model=folder)` stays transformers' own pipeline (the same scores and boxes, but one forward per image and label,
    and images read by `load_image`, which knows no DICOM).

    Against that pipeline, this one takes a list of images with one label list for all of them, encodes each
    distinct label once per call (the text tower's cost does not grow with the number of images), runs `batch_size`
    images per forward (default `DEFAULT_BATCH_SIZE`, 8), and decodes images with the model's own decoder: PIL
    images, file paths (PNG, JPEG, 16-bit, DICOM), URLs, encoded bytes, NumPy arrays and torch tensors.

    A score is the detector's sigmoid score of one box for one label: a probability-like score that the box holds the
    finding, low on an image without it, so `threshold` (default 0.1) drops findings that are not there. Per label,
    non-maximum suppression keeps one box of each group overlapping by more than `nms_threshold` (default 0.3), and a
    box can be reported for several labels, each with its own score. See the image processor's
    `post_process_object_detection`, which computes them.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> detector = pipeline("zero-shot-region-detection", model="path/to/regionmed-clip", trust_remote_code=True)
    >>> detector(["scan.dcm", "follow-up.png"], candidate_labels="round nodule, pleural effusion", threshold=0.1)
    ```

    Returns, per image, a list of `{"score", "label", "box"}` dicts, best score first, `box` as the image's pixel
    `{"xmin", "ymin", "xmax", "ymax"}` (integers, as transformers' pipeline gives them); for a list of images, a list of
    such lists.
    """

    def __call__(self, images, candidate_labels=None, batch_size=None, **kwargs):
        """
        Args:
            images: An image or a list of images (any input the image processor decodes).
            candidate_labels (`str` or `list[str]`): What to find in every image; a string is split at its commas.
            threshold (`float`, *optional*): Keep boxes scoring above this (default of `post_process_object_detection`).
            top_k (`int`, *optional*): At most this many results per image.
            nms_threshold (`float`, *optional*): IoU above which a box of a label is suppressed by a better one of the
                same label (default of `post_process_object_detection`).
            batch_size (`int`, *optional*): Images per forward.
        """
        if isinstance(candidate_labels, str):
            candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
        if not candidate_labels or not all(isinstance(label, str) for label in candidate_labels):
            raise ValueError(
                "candidate_labels must be a non-empty list of label strings, or a comma-separated string."
            )
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        results = self.run_in_groups(
            {"images": images},
            batch_size,
            candidate_labels=list(candidate_labels),
            label_embeds=self.label_embeddings(list(candidate_labels)),
            **kwargs,
        )
        return results[0] if single else results

    def _sanitize_parameters(
        self, candidate_labels=None, label_embeds=None, threshold=None, top_k=None, nms_threshold=None
    ):
        forward_params = {} if label_embeds is None else {"label_embeds": label_embeds}
        # Only what the caller gave: the defaults are post-processing's own.
        postprocess_params = {
            name: value
            for name, value in (
                ("candidate_labels", candidate_labels),
                ("threshold", threshold),
                ("top_k", top_k),
                ("nms_threshold", nms_threshold),
            )
            if value is not None
        }
        return {}, forward_params, postprocess_params

    def preprocess(self, group):
        arrays = [decode_image(image) for image in group["images"]]
        inputs = self.image_processor(arrays, return_tensors="pt")
        sizes = torch.tensor([array.shape[:2] for array in arrays])
        return {"inputs": self.to_model_dtype(inputs), "target_sizes": sizes}

    def _forward(self, model_inputs, label_embeds):
        outputs = self.model(**model_inputs["inputs"], query_embeds=label_embeds)
        return {
            "logits": outputs.logits,
            "pred_boxes": outputs.pred_boxes,
            "target_sizes": model_inputs["target_sizes"],
        }

    def postprocess(self, model_outputs, candidate_labels, top_k=None, **post_processing):
        detections = self.image_processor.post_process_object_detection(
            model_outputs, target_sizes=model_outputs["target_sizes"], **post_processing
        )
        results = []
        for found in detections:
            image_results = [
                {
                    "score": score,
                    "label": candidate_labels[label],
                    "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)),
                }
                for score, label, box in zip(
                    found["scores"].tolist(),
                    found["labels"].tolist(),
                    found["boxes"].int().tolist(),
                    strict=True,
                )
            ]
            results.append(image_results[:top_k] if top_k else image_results)
        return results


__all__ = [
    "TASK",
    "ZeroShotRegionClassificationPipeline",
    "ZeroShotRegionDetectionPipeline",
]
