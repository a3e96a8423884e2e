"""`regionmed-clip annotate`: `calibrate` (threshold from a hand-labelled set) and `run` (annotate a folder).

Options come from the typed fields of `AnnotateConfig`, `ProposalConfig` and `ReportConfig` and the signature of
`calibrate_folder`.
"""

import argparse
import inspect

from .options import add_options


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `annotate` command with its `calibrate` and `run` sub-commands to an argparse `subparsers`; each
    runs through `args.run(args)`."""
    from ..annotation.calibration import calibrate_folder
    from ..annotation.pipeline import AnnotateConfig, annotate
    from ..annotation.proposals import ProposalConfig
    from ..annotation.reports import ReportConfig

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
    calibrate_options = add_options(calibrate, calibrate_folder, skip=("proposals", "proposer", "progress"))
    calibrate_proposals = add_options(calibrate, ProposalConfig, skip=("score_threshold",))

    def run_calibrate(args: argparse.Namespace) -> int:
        result = calibrate_options.build(args, proposals=calibrate_proposals.build(args))
        print(result.describe())
        print(f"wrote {calibrate_options.values(args)['out']}")
        return 0

    calibrate.set_defaults(run=run_calibrate)

    run = commands.add_parser(
        "run",
        help="annotate a folder of images into a dataset folder (resumable)",
        description="Annotate a folder of images into a MedRegion dataset folder; running it again with the same "
        "--out resumes where it stopped.",
    )
    run_options = [add_options(run, config) for config in (AnnotateConfig, ProposalConfig, ReportConfig)]

    def run_annotate(args: argparse.Namespace) -> int:
        print(annotate(*(options.build(args) for options in run_options)).describe())
        return 0

    run.set_defaults(run=run_annotate)
    return parser


__all__ = ["register"]
