"""MedRegion data: the row schema on `datasets`, importers, hard negatives, MedRegion-synth, dataset folders
(written, read and checked) and the collator.

Needs the `train` extra (`datasets`, `pyarrow`); the model package itself does not import this.
"""

from .folder import ShardedParquetWriter, write_dataset_card
from .importers import (
    AnnotationSource,
    CocoSource,
    DetectionCsvSource,
    GroundingCsvSource,
    ImageCsvSource,
    ImportOptions,
    ImportSummary,
    import_annotations,
    import_coco,
    import_detection_csv,
    import_image_csv,
    import_phrase_grounding,
    read_box_file,
)
from .negatives import NO_FINDING, NegativeStrategy, RegionTriple, generate_negatives, negative_caption
from .schema import (
    FEATURES,
    VQA_FEATURES,
    InvalidRowsError,
    ValidationReport,
    make_region,
    make_row,
    row_problems,
    validate_rows,
)

__all__ = [
    "AnnotationSource",
    "CocoSource",
    "DetectionCsvSource",
    "FEATURES",
    "GroundingCsvSource",
    "ImageCsvSource",
    "VQA_FEATURES",
    "ImportOptions",
    "ImportSummary",
    "InvalidRowsError",
    "NO_FINDING",
    "NegativeStrategy",
    "RegionTriple",
    "ShardedParquetWriter",
    "ValidationReport",
    "generate_negatives",
    "import_annotations",
    "import_coco",
    "import_detection_csv",
    "import_image_csv",
    "import_phrase_grounding",
    "make_region",
    "make_row",
    "negative_caption",
    "read_box_file",
    "row_problems",
    "validate_rows",
    "write_dataset_card",
]
