"""The annotation pipeline that builds a MedRegion-style dataset from unlabelled images (the paper's MedRegion-500k
recipe, which was never released).

- `proposals`: Grounding DINO (text prompts from the lesion vocabulary) → box-prompted SAM / MedSAM → tight box
  from the mask → joint score → NMS → top-k.
- `calibration`: the score threshold that maximises F1 at IoU 0.5 on a small hand-labelled set.
- `reports`: the paper's structured prompt for a vision-language model (Qwen2.5-VL), a strict parser, retries
  with the errors fed back, hard-negative fallback.
- `store` / `pipeline`: batched, resumable writing of the dataset folder (`regionmed-clip annotate` runs it).

Models are loaded inside functions, so importing this package is cheap; it needs the `train` extra (`datasets`).
"""

from .calibration import CalibrationResult, CalibrationSet, calibrate, calibrate_folder, match_image
from .pipeline import AnnotateConfig, AnnotateSummary, annotate, split_of
from .proposals import Proposal, ProposalConfig, RoiProposer, box_iou, joint_score, mask_to_box, nms
from .reports import (
    PipelineGenerator,
    Report,
    ReportConfig,
    ReportError,
    build_messages,
    parse_report,
    write_report,
)
from .store import AnnotationStore

__all__ = [
    "AnnotateConfig",
    "AnnotateSummary",
    "AnnotationStore",
    "CalibrationResult",
    "CalibrationSet",
    "PipelineGenerator",
    "Proposal",
    "ProposalConfig",
    "Report",
    "ReportConfig",
    "ReportError",
    "RoiProposer",
    "annotate",
    "box_iou",
    "build_messages",
    "calibrate",
    "calibrate_folder",
    "joint_score",
    "mask_to_box",
    "match_image",
    "nms",
    "parse_report",
    "split_of",
    "write_report",
]
