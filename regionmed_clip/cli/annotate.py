"""`regionmed-clip annotate`: `calibrate` (threshold from a hand-labelled set) and `run` (annotate a folder).

Options come from the typed fields of `CalibrationSet`, `AnnotateConfig`, `ProposalConfig` and `ReportConfig`.
"""

from .options import CommandParser


def register(commands: CommandParser) -> CommandParser:
    """Add the `annotate` command with its `calibrate` and `run` sub-commands."""
    from ..annotation.calibration import CalibrationSet, calibrate_folder
    from ..annotation.pipeline import AnnotateConfig, annotate
    from ..annotation.proposals import ProposalConfig
    from ..annotation.reports import ReportConfig

    parser = commands.add_command(
        "annotate",
        help="build a MedRegion dataset from unlabelled images (ROI proposals + VLM reports)",
        description="Build a MedRegion dataset folder from unlabelled images: `calibrate` the proposal threshold on "
        "a few hand-labelled images, then `run`.",
    )

    def run_calibrate(labelled: CalibrationSet, proposals: ProposalConfig) -> int:
        print(calibrate_folder(labelled, proposals).describe())
        print(f"wrote {labelled.out}")
        return 0

    parser.add_command(
        "calibrate",
        (CalibrationSet, ProposalConfig),
        run_calibrate,
        help="choose the proposal score threshold on a small hand-labelled set (max F1 at IoU 0.5)",
        description="Run the proposer on the labelled images and save the calibrated threshold (JSON) to --out; "
        "--score-threshold is what it chooses, so it is not read.",
    )

    def run_annotate(config: AnnotateConfig, proposals: ProposalConfig, reports: ReportConfig) -> int:
        print(annotate(config, proposals, reports).describe())
        return 0

    parser.add_command(
        "run",
        (AnnotateConfig, ProposalConfig, ReportConfig),
        run_annotate,
        help="annotate a folder of images into a dataset folder (resumable)",
        description="Annotate a folder of images into a MedRegion dataset folder; running it again with the same "
        "--out resumes where it stopped.",
    )
    return parser


__all__ = ["register"]
