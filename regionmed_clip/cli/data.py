"""`regionmed-clip data`: build, import and check MedRegion dataset folders."""

import dataclasses
import inspect

from .options import add_options


@dataclasses.dataclass
class SynthCheck:
    check: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Also print the region-level check (adjective accuracy from whole images vs ROI crops)"
        },
    )


def register(subparsers) -> None:
    from ..data import importers, synth
    from ..data.collator import validate_folder

    data = subparsers.add_parser("data", help="build, import and check MedRegion dataset folders")
    commands = data.add_subparsers(dest="data_command", required=True)

    synth_parser = commands.add_parser("synth", help="generate MedRegion-synth (no download)")
    synth_options = add_options(synth_parser, synth.SynthConfig, aliases={"validation": "--val"})
    check_options = add_options(synth_parser, SynthCheck)

    def run_synth(args) -> int:
        config = synth_options.build(args)
        counts = synth.generate_synth(config)
        print(f"wrote {config.out}: " + ", ".join(f"{name} {dict(c)}" for name, c in counts.items()))
        if check_options.build(args).check:
            rows = (row for row, _ in synth.iter_synth(config, "train"))
            print("adjective accuracy (whole image vs ROI crop):", synth.region_level_check(rows))
        return 0

    synth_parser.set_defaults(run=run_synth)

    for name, function, help_text in (
        ("import-annotations", importers.import_annotations, "the paper's annotation JSON/JSONL plus boxes"),
        ("import-coco", importers.import_coco, "COCO-style detection JSON"),
        (
            "import-detection",
            importers.import_detection_csv,
            "a VinDr-CXR-style detection CSV (several readers)",
        ),
        ("import-grounding", importers.import_phrase_grounding, "an MS-CXR-style phrase-grounding CSV"),
        ("import-csv", importers.import_image_csv, "an image folder with a CSV of path, report[, label]"),
    ):
        parser = commands.add_parser(
            name, help=help_text, description=inspect.getdoc(function).split("\n\nArgs:")[0]
        )
        shared = add_options(parser, importers.ImportOptions)
        options = add_options(parser, function, skip=("options",))

        def run_import(args, options=options, shared=shared) -> int:
            summary = options.build(args, options=shared.build(args))
            print(summary.describe())
            if summary.report.invalid:
                print(summary.report.describe())
            return 0

        parser.set_defaults(run=run_import)

    validate = commands.add_parser("validate", help="check every row of a dataset folder")
    validate_options = add_options(validate, validate_folder, positional=("path",))

    def run_validate(args) -> int:
        reports = validate_options.build(args)
        for split, report in reports.items():
            print(
                f"{split}: {report.describe()}"
                if report.invalid
                else f"{split}: {report.checked} rows, all valid"
            )
        return 1 if any(report.invalid for report in reports.values()) else 0

    validate.set_defaults(run=run_validate)


__all__ = ["register"]
