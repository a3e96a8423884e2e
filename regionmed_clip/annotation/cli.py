"""`regionmed-clip annotate`: `calibrate` (threshold from a hand-labelled set) and `run` (annotate a folder).

Options come from the typed fields of `AnnotateConfig`, `ProposalConfig` and `ReportConfig` (and the signature of
`calibrate_folder`), so each option is defined, documented and defaulted in one place.
"""

import argparse
import inspect

from ..cli import _call_with, add_signature_arguments


def add_annotate_command(subparsers) -> argparse.ArgumentParser:
    """Add the `annotate` command with its `calibrate` and `run` sub-commands to an argparse `subparsers`; each
    runs through `args.run(args)`."""
    from .calibration import calibrate_folder
    from .pipeline import AnnotateConfig, annotate
    from .proposals import ProposalConfig
    from .reports import ReportConfig

    parser = subparsers.add_parser(
        "annotate",
        help="build a MedRegion dataset from unlabelled images (ROI proposals + VLM reports)",
        description="Build a MedRegion dataset folder from unlabelled images: `calibrate` the proposal threshold on "
        "a few hand-labelled images, then `run`.",
    )
    commands = parser.add_subparsers(dest="annotate_command", required=True)

    calibrate = commands.add_parser(
        "calibrate",
        help="choose the proposal score threshold on a small hand-labelled set (max F1 at IoU 0.5)",
        description=inspect.getdoc(calibrate_folder).split("\n\n")[0],
    )
    add_signature_arguments(calibrate, calibrate_folder, skip=("proposals", "proposer", "progress"))
    add_signature_arguments(calibrate, ProposalConfig, skip=("score_threshold",))

    def run_calibrate(args: argparse.Namespace) -> int:
        proposals = _call_with(ProposalConfig, args)
        result = calibrate_folder(args.images, args.boxes, args.out, args.iou_threshold, proposals=proposals)
        print(result.describe())
        print(f"wrote {args.out}")
        return 0

    calibrate.set_defaults(run=run_calibrate)

    run = commands.add_parser(
        "run",
        help="annotate a folder of images into a dataset folder (resumable)",
        description="Annotate a folder of images into a MedRegion dataset folder; running it again with the same "
        "--out resumes where it stopped.",
    )
    add_signature_arguments(run, AnnotateConfig)
    add_signature_arguments(run, ProposalConfig)
    add_signature_arguments(run, ReportConfig)

    def run_annotate(args: argparse.Namespace) -> int:
        summary = annotate(
            _call_with(AnnotateConfig, args), _call_with(ProposalConfig, args), _call_with(ReportConfig, args)
        )
        print(summary.describe())
        return 0

    run.set_defaults(run=run_annotate)
    return parser


__all__ = ["add_annotate_command"]
