"""ROI proposals: a text-prompted detector proposes lesion boxes, a box-prompted segmenter refines each into a mask,
the mask's tight box replaces the detector's, and a joint score ranks them.

The paper's pipeline is Grounding DINO + MedSAM with "joint scoring" left unspecified. Ours, per candidate `i`:

    score_i = s_det(i) × q_mask(i) × IoU(b_det(i), b_mask(i))

- `s_det`: the detector's confidence for the text prompt (a lesion term of the vocabulary, e.g. "nodule.").
- `q_mask`: the segmenter's own mask quality, either its predicted IoU (SAM's IoU head; the best of the three
  masks with `multimask=True`) or the mask's stability score (the IoU between the mask thresholded at +1 and at
  -1 logit, as in SAM's automatic mask generator). MedSAM was fine-tuned with a single mask output and without an
  IoU loss, so its IoU head is uncalibrated: stability is the default because it is meaningful for both.
- `IoU(b_det, b_mask)`: how much the detector and the segmenter agree on the extent of the finding. A box prompt
  that makes the segmenter flood a whole organ, or collapse to a speck, disagrees with its own prompt and is
  demoted; this is the "consistency" the paper asks of its joint score.

A product is used so that any one failing signal vetoes the candidate; each factor is in [0, 1], so the score is
too, and a single threshold (`score_threshold`, chosen by `calibration.calibrate_folder`) applies. Duplicates are
removed by class-agnostic NMS on the refined boxes (a "nodule" and a "mass" at the same place are one finding),
then the `top_k` best are kept. Thresholding commutes with NMS + top-k (a box's NMS fate depends only on
higher-scored boxes), so the threshold calibrated on unthresholded proposals is exactly the one applied here.

Box prompts need the segmenter's model and processor directly: transformers' `mask-generation` pipeline only does
automatic (point-grid) generation. The detector runs through the `zero-shot-object-detection` pipeline.
"""

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
from PIL import Image

from ..data.vocabulary import TERMS
from ..image_processing_regionmed_clip import box_iou, nms

MaskQuality = Literal["stability", "predicted_iou"]
MASK_QUALITIES = get_args(MaskQuality)


@dataclass
class ProposalConfig:
    """How ROI proposals are made; the defaults are the paper's models."""

    detector: str = field(
        default="IDEA-Research/grounding-dino-base",
        metadata={"help": "Zero-shot-object-detection checkpoint (id or folder)"},
    )
    segmenter: str = field(
        default="wanglab/medsam-vit-base",
        metadata={"help": "SAM-family checkpoint taking box prompts (MedSAM, SAM, ...)"},
    )
    terms: list[str] = field(
        default_factory=lambda: list(TERMS),
        metadata={"help": "Lesion terms used as text prompts (the vocabulary's)"},
    )
    prompt_template: str = field(
        default="{term}.",
        metadata={
            "help": "Detector prompt per term; Grounding DINO expects lower-case phrases ending with a period"
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": 'Device of both models: "cuda", "cuda:1", "cpu"; "auto" = cuda when available'},
    )
    detection_threshold: float = field(
        default=0.1, metadata={"help": "Detector confidence below which a box is not even a candidate"}
    )
    candidates_per_image: int = field(
        default=16, metadata={"help": "Best detections (after NMS) sent to the segmenter"}
    )
    mask_quality: MaskQuality = field(
        default="stability",
        metadata={"help": '"stability" (any SAM-family model) or "predicted_iou" (SAM\'s IoU head)'},
    )
    multimask: bool = field(
        default=False,
        metadata={"help": "Three masks per box, best by predicted IoU (SAM); MedSAM was trained with one"},
    )
    score_threshold: float = field(
        default=0.3,
        metadata={"help": "Joint score needed to keep a region (calibrate it on labelled images)"},
    )
    nms_iou: float = field(
        default=0.5, metadata={"help": "Boxes overlapping more than this with a better one are duplicates"}
    )
    top_k: int = field(default=3, metadata={"help": "Regions kept per image"})

    def __post_init__(self):
        self.terms = tuple(self.terms)
        if not self.terms:
            raise ValueError("terms must name at least one lesion term to prompt the detector with")
        if "{term}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{term}}', got {self.prompt_template!r}")
        if self.mask_quality not in MASK_QUALITIES:
            raise ValueError(f"mask_quality must be one of {MASK_QUALITIES}, got {self.mask_quality!r}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if self.top_k < 1 or self.candidates_per_image < 1:
            raise ValueError("top_k and candidates_per_image must be at least 1")

    def scoring_settings(self) -> dict:
        """The settings a calibrated threshold depends on (everything but the threshold and the device)."""
        settings = asdict(self)
        for name in ("device", "score_threshold"):
            settings.pop(name)
        settings["terms"] = list(settings["terms"])
        return settings


@dataclass
class Proposal:
    """One refined region: `box` is the tight box of the segmenter's mask, in pixels [x0, y0, x1, y1]."""

    box: list[float]
    term: str  # the vocabulary term whose prompt found it
    score: float  # the joint score
    detection_score: float
    mask_quality: float
    box_agreement: float  # IoU(detector box, mask box)
    detection_box: list[float] = field(default_factory=list)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def mask_to_box(mask: torch.Tensor) -> list[float] | None:
    """The tight pixel box [x0, y0, x1, y1] of a boolean mask `(H, W)` (x1, y1 exclusive), None when empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if not rows.numel():
        return None
    columns = torch.nonzero(mask.any(dim=0)).flatten()
    return [float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)]


def stability_score(logits: torch.Tensor, threshold: float = 0.0, offset: float = 1.0) -> float:
    """IoU between the mask at `threshold + offset` and at `threshold - offset` (SAM's stability score): near 1
    when the mask edge is sharp, near 0 when small logit changes move it."""
    union = int((logits > threshold - offset).sum())
    if union == 0:
        return 0.0
    return int((logits > threshold + offset).sum()) / union


def joint_score(detection_score: float, mask_quality: float, box_agreement: float) -> float:
    """s_det × q_mask × IoU(b_det, b_mask), each clamped to [0, 1] (see the module docstring for why)."""
    return float(
        min(max(detection_score, 0.0), 1.0)
        * min(max(mask_quality, 0.0), 1.0)
        * min(max(box_agreement, 0.0), 1.0)
    )


def select_proposals(
    proposals: list[Proposal], score_threshold: float, nms_iou: float, top_k: int
) -> list[Proposal]:
    """Proposals with score >= `score_threshold`, de-duplicated by class-agnostic NMS on their boxes, best `top_k`,
    best first."""
    kept = [proposal for proposal in proposals if proposal.score >= score_threshold]
    if not kept:
        return []
    boxes = torch.tensor([proposal.box for proposal in kept], dtype=torch.float32)
    scores = torch.tensor([proposal.score for proposal in kept], dtype=torch.float32)
    return [kept[int(index)] for index in nms(boxes, scores, nms_iou)[:top_k]]


class RoiProposer:
    """Detector + segmenter + joint score, loaded from `ProposalConfig` model ids (Hub ids or local folders).

    Args:
        config: Models and thresholds.

    Example:
        ```python
        proposer = RoiProposer(ProposalConfig(device="cuda"))
        regions = proposer.propose([Image.open("chest.png").convert("RGB")])[0]
        ```
    """

    def __init__(self, config: ProposalConfig):
        from transformers import AutoModelForMaskGeneration, AutoProcessor, pipeline

        self.config = config
        self.device = resolve_device(config.device)
        # float32: both models are small, and box regression / mask logits are what the scores are made of.
        self.detector = pipeline(
            "zero-shot-object-detection", model=config.detector, device=self.device, dtype=torch.float32
        )
        self.segmenter_processor = AutoProcessor.from_pretrained(config.segmenter)
        self.segmenter = AutoModelForMaskGeneration.from_pretrained(config.segmenter, dtype=torch.float32)
        self.segmenter.to(self.device).eval()
        self._prompts = {config.prompt_template.format(term=term): term for term in config.terms}

    def detect(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Candidate boxes `(N, 4)`, detector scores `(N,)` and terms, after NMS, at most `candidates_per_image`."""
        found = self.detector(
            image, candidate_labels=list(self._prompts), threshold=self.config.detection_threshold
        )
        if not found:
            return torch.zeros(0, 4), torch.zeros(0), []
        boxes = torch.tensor(
            [[item["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")] for item in found],
            dtype=torch.float32,
        )
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        scores = torch.tensor([item["score"] for item in found], dtype=torch.float32)
        keep = nms(boxes, scores, self.config.nms_iou)[: self.config.candidates_per_image]
        return (
            boxes[keep],
            scores[keep],
            [self._prompts.get(found[int(i)]["label"], found[int(i)]["label"]) for i in keep],
        )

    @torch.inference_mode()
    def refine(
        self, image: Image.Image, boxes: torch.Tensor, scores: torch.Tensor, terms: list[str]
    ) -> list[Proposal]:
        """Segment every candidate box (one image-encoder pass for all of them) and score it; empty masks are
        dropped."""
        if not len(boxes):
            return []
        inputs = self.segmenter_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        inputs = inputs.to(self.device)
        outputs = self.segmenter(**inputs, multimask_output=self.config.multimask)
        predicted_iou = outputs.iou_scores[0].float().cpu()  # (N, masks per box)
        low_res = outputs.pred_masks[0].float().cpu()  # (N, masks per box, h, w)
        chosen = predicted_iou.argmax(dim=-1)
        proposals = []
        for index in range(len(boxes)):
            # One full-resolution mask at a time keeps memory flat (36 MB of logits each for a 3000 px image).
            logits = self.segmenter_processor.post_process_masks(
                [low_res[index, chosen[index]][None, None]],
                inputs["original_sizes"].cpu(),
                inputs["reshaped_input_sizes"].cpu(),
                binarize=False,
            )[0][0, 0]
            box = mask_to_box(logits > 0.0)
            if box is None:
                continue
            if self.config.mask_quality == "stability":
                quality = stability_score(logits)
            else:
                quality = float(predicted_iou[index, chosen[index]])
            agreement = float(box_iou(boxes[index][None], torch.tensor([box]))[0, 0])
            proposals.append(
                Proposal(
                    box=box,
                    term=terms[index],
                    score=joint_score(float(scores[index]), quality, agreement),
                    detection_score=float(scores[index]),
                    mask_quality=min(max(quality, 0.0), 1.0),
                    box_agreement=agreement,
                    detection_box=boxes[index].tolist(),
                )
            )
        return proposals

    def propose(
        self, images: list[Image.Image], score_threshold: float | None = None
    ) -> list[list[Proposal]]:
        """The kept regions of each image (RGB PIL images), best first; `score_threshold` overrides the config's
        (calibration passes 0 to see every candidate)."""
        threshold = self.config.score_threshold if score_threshold is None else score_threshold
        results = []
        for image in images:
            candidates = self.refine(image, *self.detect(image))
            results.append(select_proposals(candidates, threshold, self.config.nms_iou, self.config.top_k))
        return results


__all__ = [
    "MASK_QUALITIES",
    "Proposal",
    "ProposalConfig",
    "RoiProposer",
    "box_iou",
    "joint_score",
    "mask_to_box",
    "nms",
    "resolve_device",
    "select_proposals",
    "stability_score",
]
