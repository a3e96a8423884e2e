"""`regionmed-clip data`: build, import and check MedRegion dataset folders."""

import dataclasses
import inspect

from .options import CommandParser


@dataclasses.dataclass
class SynthCheck:
    check: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Also print the region-level check (adjective accuracy from whole images vs ROI crops)"
        },
    )


def register(commands: CommandParser) -> None:
    from ..data import importers, synth
    from ..data.folder import FolderCheck, validate_folder

    data = commands.add_command("data", help="build, import and check MedRegion dataset folders")

    def run_synth(config: synth.SynthConfig, check: SynthCheck) -> int:
        counts = synth.generate_synth(config)
        print(f"wrote {config.out}: " + ", ".join(f"{name} {dict(c)}" for name, c in counts.items()))
        if check.check:
            rows = (row for row, _ in synth.iter_synth(config, "train"))
            print("adjective accuracy (whole image vs ROI crop):", synth.region_level_check(rows))
        return 0

    data.add_command(
        "synth", (synth.SynthConfig, SynthCheck), run_synth, help="generate MedRegion-synth (no download)"
    )

    for name, function, source, help_text in (
        (
            "import-annotations",
            importers.import_annotations,
            importers.AnnotationSource,
            "the paper's annotation JSON/JSONL plus boxes",
        ),
        ("import-coco", importers.import_coco, importers.CocoSource, "COCO-style detection JSON"),
        (
            "import-detection",
            importers.import_detection_csv,
            importers.DetectionCsvSource,
            "a VinDr-CXR-style detection CSV (several readers)",
        ),
        (
            "import-grounding",
            importers.import_phrase_grounding,
            importers.GroundingCsvSource,
            "an MS-CXR-style phrase-grounding CSV",
        ),
        (
            "import-csv",
            importers.import_image_csv,
            importers.ImageCsvSource,
            "an image folder with a CSV of path, report[, label]",
        ),
    ):

        def run_import(source, options: importers.ImportOptions, function=function) -> int:
            summary = function(source, options)
            print(summary.describe())
            if summary.report.invalid:
                print(summary.report.describe())
            return 0

        data.add_command(
            name,
            (source, importers.ImportOptions),
            run_import,
            help=help_text,
            description=inspect.getdoc(function),
        )

    def run_validate(check: FolderCheck) -> int:
        reports = validate_folder(check)
        for split, report in reports.items():
            print(
                f"{split}: {report.describe()}"
                if report.invalid
                else f"{split}: {report.checked} rows, all valid"
            )
        return 1 if any(report.invalid for report in reports.values()) else 0

    data.add_command("validate", (FolderCheck,), run_validate, help="check every row of a dataset folder")


__all__ = ["register"]
