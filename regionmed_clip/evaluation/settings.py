"""The settings of one evaluation run, declared once: `regionmed-clip eval` reads them from the command line (each
field is an option), `run_evaluation` takes them, every task reads them, and metrics.json records them."""

import os
from dataclasses import dataclass, field
from typing import Literal

RegionPath = Literal["auto", "roi_processor", "global_on_crops"]


@dataclass
class EvalSettings:
    """What to evaluate, on what, and how. Paths may be given as `Path`s; they are kept as strings, as metrics.json
    records them. `run_evaluation` records the settings it ran with, its automatic choices (`device`, `max_length`,
    `region_path`, `self_proposed`, the `tasks` of `all`) resolved."""

    model_path: str = field(metadata={"help": "Model folder or Hub id", "aliases": ["--model"]})
    data_path: str = field(
        metadata={"help": "Dataset folder or Hub id (the MedRegion layout)", "aliases": ["--data"]}
    )
    out_dir: str = field(
        metadata={"help": "Where metrics.json, metrics.md and roc_curves.png go", "aliases": ["--out"]}
    )
    tasks: str = field(
        default="all",
        metadata={
            "help": "Comma-separated tasks (zero_shot, few_shot, retrieval, region, grounding, localization, "
            "detection, vqa), or all"
        },
    )
    split: str = field(default="test", metadata={"help": "The split evaluated"})
    support_split: str = field(
        default="train",
        metadata={
            "help": "The split few-shot support images are drawn from, and the no-image controls fitted on"
        },
    )
    templates: str | None = field(
        default=None,
        metadata={
            "help": "A YAML file of prompt `templates` and `class_names` (default: the medical template set)"
        },
    )
    shots: list[int] = field(
        default_factory=lambda: [1, 5], metadata={"help": "Support images per class of the few-shot episodes"}
    )
    episodes: int = field(default=5, metadata={"help": "Seeded few-shot episodes per shot count"})
    bootstrap: int = field(
        default=1000, metadata={"help": "Bootstrap resamples of the zero-shot AUC's 95 % confidence interval"}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the episodes, the bootstrap, the controls and the VQA head"}
    )
    batch_size: int = field(
        default=32, metadata={"help": "Images per forward pass (and texts per VQA encoder pass)"}
    )
    device: str = field(
        default="auto",
        metadata={"help": "`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`"},
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Token limit of every text (default: the model's training_config.yaml, else the tokenizer's)"
        },
    )
    region_path: RegionPath = field(
        default="auto",
        metadata={
            "help": "How regions are embedded: `auto` (the global path on crops for a model whose ROI branch was "
            "never trained, else the ROI processor), `roi_processor` or `global_on_crops`"
        },
    )
    self_proposed: int | None = field(
        default=None,
        metadata={
            "help": "Regions the model proposes itself for the box-free `self-proposed` embedding (0: none). "
            "Default: `max_regions` for a model whose training config weights `proposal_loss` and trains the "
            "ROI branch, else 0"
        },
    )
    nms_threshold: float | None = field(
        default=None,
        metadata={
            "help": "The IoU above which the detector's post-processing suppresses a query's lower-scored boxes "
            "(`localization`, `detection`); default: the image processor's own, what the pipeline applies"
        },
    )
    vqa_rad: list[str] | None = field(
        default=None, metadata={"help": "VQA-RAD's JSON file and image folder (two values)"}
    )
    slake: str | None = field(default=None, metadata={"help": "SLAKE's folder"})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder that keeps the features of each (model, data, split, settings) for later runs"
        },
    )
    num_workers: int = field(
        default=0,
        metadata={
            "help": "Processes that decode and collate the feature batches while the model runs (0: none)"
        },
    )

    def __post_init__(self):
        for name in ("model_path", "data_path", "out_dir", "templates", "slake", "cache_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, os.fspath(getattr(self, name)))
        self.shots = [int(shots) for shots in self.shots]
        if self.vqa_rad is not None:
            self.vqa_rad = [os.fspath(path) for path in self.vqa_rad]
            if len(self.vqa_rad) != 2:
                raise ValueError(f"vqa_rad takes VQA-RAD's JSON file and image folder, got {self.vqa_rad}")


__all__ = ["EvalSettings", "RegionPath"]
