"""The annotation driver: raw images in, a MedRegion dataset folder out (proposals → report → row), resumable.

Images are processed in batches of `batch_size`: proposals for the batch, then one report per image, then the
batch's rows are validated with the data schema and written (see `store.AnnotationStore`). Stopping the run in
any way (Ctrl-C, a crash, SIGKILL) loses at most the batch in progress; starting it again with the same `out`
skips every image already written, and the images earlier runs rejected or could not read (`retry_failed` tries
those again). A row's split comes from a hash of its id, so an image keeps its split across resumed and extended
runs whatever else is in the folder.
"""

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..data.schema import SPLITS, make_region, make_row, row_problems
from .calibration import CalibrationResult
from .images import DecodeError, list_images, read_image
from .proposals import Proposal, ProposalConfig
from .reports import Generate, Report, ReportConfig, write_report
from .store import JOURNAL, AnnotationStore

SOURCE = "auto"  # the `source` of a region whose box came from the proposer


@dataclass
class AnnotateConfig:
    """What to annotate and where to write it."""

    images: str = field(
        metadata={
            "help": "Folder of raw images, searched recursively; ids are paths relative to it, without suffix"
        }
    )
    out: str = field(metadata={"help": "The dataset folder to write, or to resume"})
    modality: str = field(default="unknown", metadata={"help": "The `modality` column of every row"})
    batch_size: int = field(
        default=16, metadata={"help": "Images per written batch: the most a crash can lose"}
    )
    calibration: str | None = field(
        default=None,
        metadata={
            "help": "calibration.json from `annotate calibrate`: its threshold replaces score_threshold"
        },
    )
    ratios: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1], metadata={"help": "Train / validation / test shares"}
    )
    seed: int = field(default=0, metadata={"help": "Split hash and negative-generator seed"})
    retry_failed: bool = field(
        default=False, metadata={"help": "Try again the images earlier runs rejected or could not read"}
    )

    def __post_init__(self):
        self.ratios = tuple(float(r) for r in self.ratios)
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {self.ratios}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class AnnotateSummary:
    """What a run did (this run's numbers) and what the folder now holds (`counts`, rows per split)."""

    out_dir: Path
    images: int = 0
    already_done: int = 0
    annotated: int = 0
    rejected: int = 0
    unreadable: int = 0
    regions: int = 0
    negatives_generated: int = 0
    extra_attempts: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def describe(self, limit: int = 10) -> str:
        counts = ", ".join(f"{split} {count}" for split, count in self.counts.items()) or "no rows"
        lines = [
            f"wrote {self.out_dir}: {counts}",
            f"this run: {self.annotated} annotated ({self.regions} regions, {self.negatives_generated} with "
            f"generated negatives, {self.extra_attempts} retries), {self.rejected} rejected, {self.unreadable} "
            f"unreadable; {self.already_done} of {self.images} images were done before",
        ]
        for image_id, reason in list(self.failures.items())[:limit]:
            lines.append(f"  {image_id}: {reason}")
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more (see {JOURNAL})")
        return "\n".join(lines)


def split_of(image_id: str, ratios: tuple[float, float, float], seed: int = 0) -> str:
    """The split of an image from a hash of (seed, id): stable whatever other images exist."""
    digest = hashlib.sha256(f"{seed}|{image_id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    if fraction < ratios[0]:
        return SPLITS[0]
    return SPLITS[1] if fraction < ratios[0] + ratios[1] else SPLITS[2]


def apply_calibration(proposals: ProposalConfig, path: str) -> ProposalConfig:
    """`proposals` with the calibrated threshold of `path`.

    Raises:
        ValueError: the calibration was made with different proposal settings, for which its threshold means
            nothing.
    """
    result = CalibrationResult.load(path)
    current = proposals.scoring_settings()
    differing = sorted(key for key in result.settings if result.settings[key] != current.get(key))
    if differing:
        details = ", ".join(f"{key}={result.settings[key]!r} (now {current.get(key)!r})" for key in differing)
        raise ValueError(f"{path} was calibrated with other proposal settings: {details}")
    return dataclasses.replace(proposals, score_threshold=result.threshold)


def build_row(image_id: str, image: dict, modality: str, report: Report, proposals: list[Proposal]) -> dict:
    """The dataset row of one image: its regions are the proposals the report did not reject."""
    regions = [
        make_region(
            bbox=proposal.box,
            caption=region.caption,
            negatives=region.negatives,
            adjective=region.adjective,
            term=region.term,
            position=region.position,
            score=proposal.score,
            source=SOURCE,
        )
        for proposal, region in zip(proposals, report.regions, strict=True)
        if region is not None
    ]
    return make_row(
        id=image_id,
        image=image,
        modality=modality,
        summary_caption=report.summary_caption,
        detailed_report=report.detailed_report,
        regions=regions,
    )


def _annotate_batch(batch, proposer, generate, config: AnnotateConfig, reports: ReportConfig, summary):
    loaded, unreadable = [], {}
    for image_id, path in batch:
        try:
            image, stored = read_image(path)
        except (DecodeError, OSError) as error:
            unreadable[image_id] = str(error)
            continue
        loaded.append((image_id, path, image, stored))
    found = proposer.propose([image for _, _, image, _ in loaded]) if loaded else []
    rows_by_split: dict[str, list[dict]] = {}
    rejected, annotated, regions, generated = {}, [], 0, 0
    for (image_id, path, image, stored), proposals in zip(loaded, found, strict=True):
        outcome = write_report(
            generate,
            image,
            path.name,
            [(p.box, p.term) for p in proposals],
            reports.max_attempts,
            config.seed,
        )
        summary.extra_attempts += outcome.attempts - 1
        if outcome.report is None:
            rejected[image_id] = {
                "attempts": outcome.attempts,
                "problems": outcome.problems,
                "output": outcome.last_output[-2000:],
            }
            continue
        row = build_row(image_id, stored, config.modality, outcome.report, proposals)
        problems = row_problems(row)
        if problems:
            rejected[image_id] = {"attempts": outcome.attempts, "problems": problems, "output": ""}
            continue
        rows_by_split.setdefault(split_of(image_id, config.ratios, config.seed), []).append(row)
        annotated.append(image_id)
        regions += len(row["regions"])
        generated += outcome.report.negatives_generated
    record = {
        "annotated": annotated,
        "rejected": rejected,
        "unreadable": unreadable,
        "regions": regions,
        "negatives_generated": generated,
    }
    return rows_by_split, record


def annotate(
    config: AnnotateConfig,
    proposals: ProposalConfig | None = None,
    reports: ReportConfig | None = None,
    proposer=None,
    generate: Generate | None = None,
    progress: bool = True,
) -> AnnotateSummary:
    """Annotate the images of `config.images` into the dataset folder `config.out`, resuming what is there.

    Args:
        config: Input, output, batching and split.
        proposals: Detector / segmenter settings (`ProposalConfig` defaults: Grounding DINO + MedSAM).
        reports: Report-model settings (`ReportConfig` defaults: Qwen2.5-VL).
        proposer: Anything with `propose(images) -> list[list[Proposal]]`; default `RoiProposer(proposals)`.
        generate: Any `generate(image, messages) -> str`; default `PipelineGenerator(reports)`.
        progress: Show a tqdm bar.

    Models are loaded only when there is something left to annotate.
    """
    from tqdm.auto import tqdm

    proposals = proposals or ProposalConfig()
    reports = reports or ReportConfig()
    if config.calibration:
        proposals = apply_calibration(proposals, config.calibration)
    images = list_images(config.images)
    summary = AnnotateSummary(Path(config.out), images=len(images))
    with AnnotationStore(config.out) as store:
        done = store.written_ids()
        failed = {} if config.retry_failed else store.failed_ids()
        todo = [
            (image_id, path) for image_id, path in images if image_id not in done and image_id not in failed
        ]
        summary.already_done = len(images) - len(todo)
        description = (
            f"Annotated by `regionmed-clip annotate` (RegionMed-CLIP's MedRegion pipeline): regions proposed by "
            f"{proposals.detector} and refined by {proposals.segmenter} (joint score >= "
            f"{proposals.score_threshold:.4g}, at most {proposals.top_k} per image), summary, report and region "
            f"descriptions by {reports.vlm} with the paper's structured prompt. Images that were rejected or "
            f"unreadable are listed in {JOURNAL}."
        )
        try:
            if todo:
                if proposer is None:
                    from .proposals import RoiProposer

                    proposer = RoiProposer(proposals)
                if generate is None:
                    from .reports import PipelineGenerator

                    generate = PipelineGenerator(reports)
            bar = tqdm(
                total=len(images),
                initial=summary.already_done,
                desc="annotate",
                unit="img",
                disable=not progress,
            )
            with bar:
                for start in range(0, len(todo), config.batch_size):
                    batch = todo[start : start + config.batch_size]
                    rows_by_split, record = _annotate_batch(
                        batch, proposer, generate, config, reports, summary
                    )
                    store.write_batch(rows_by_split, record)
                    summary.annotated += len(record["annotated"])
                    summary.rejected += len(record["rejected"])
                    summary.unreadable += len(record["unreadable"])
                    summary.regions += record["regions"]
                    summary.negatives_generated += record["negatives_generated"]
                    summary.failures.update(record["unreadable"])
                    summary.failures.update(
                        {key: "; ".join(value["problems"]) for key, value in record["rejected"].items()}
                    )
                    bar.update(len(batch))
                    bar.set_postfix(rejected=summary.rejected, unreadable=summary.unreadable)
        finally:
            summary.counts = store.finalize(Path(config.out).name, description)
    return summary


__all__ = ["AnnotateConfig", "AnnotateSummary", "annotate", "apply_calibration", "build_row", "split_of"]
