"""RegionMed-CLIP: a region-aware medical CLIP that loads with `AutoModel` and runs in transformers' pipelines.

Importing the package registers every class with the transformers Auto classes, and marks them for remote-code
export: `save_pretrained` then writes `auto_map` and copies the five model files next to the weights, so a saved
folder (or Hub repo) loads with `trust_remote_code=True` where this package is not installed. The pretraining
objective is `regionmed_clip.training.RegionMedCLIPForPreTraining` (the `train` extra).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from .configuration_regionmed_clip import RegionMedCLIPConfig
from .image_processing_regionmed_clip import RegionMedCLIPImageProcessor, decode_image
from .modeling_regionmed_clip import (
    RegionMedCLIPForZeroShotObjectDetection,
    RegionMedCLIPImageFeatures,
    RegionMedCLIPModel,
    RegionMedCLIPOutput,
    RegionMedCLIPPatchFeatures,
    RegionMedCLIPPreTrainedModel,
    RegionMedCLIPTextFeatures,
)
from .pipeline_regionmed_clip import ZeroShotRegionClassificationPipeline, ZeroShotRegionDetectionPipeline
from .processing_regionmed_clip import RegionMedCLIPProcessor, caption_key, with_paper_normalizer

__version__ = "0.1.0"

AutoConfig.register(RegionMedCLIPConfig.model_type, RegionMedCLIPConfig, exist_ok=True)
AutoModel.register(RegionMedCLIPConfig, RegionMedCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(RegionMedCLIPConfig, RegionMedCLIPModel, exist_ok=True)
AutoModelForZeroShotObjectDetection.register(
    RegionMedCLIPConfig, RegionMedCLIPForZeroShotObjectDetection, exist_ok=True
)
AutoImageProcessor.register(
    RegionMedCLIPConfig, image_processor_classes={"pil": RegionMedCLIPImageProcessor}, exist_ok=True
)
AutoProcessor.register(RegionMedCLIPConfig, RegionMedCLIPProcessor, exist_ok=True)

# One auto class per class is recorded; the config adds the zero-shot entry for the model itself.
RegionMedCLIPConfig.register_for_auto_class()
RegionMedCLIPModel.register_for_auto_class("AutoModel")
RegionMedCLIPForZeroShotObjectDetection.register_for_auto_class("AutoModelForZeroShotObjectDetection")
RegionMedCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
RegionMedCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "RegionMedCLIPConfig",
    "RegionMedCLIPForZeroShotObjectDetection",
    "RegionMedCLIPImageFeatures",
    "RegionMedCLIPImageProcessor",
    "RegionMedCLIPModel",
    "RegionMedCLIPOutput",
    "RegionMedCLIPPatchFeatures",
    "RegionMedCLIPPreTrainedModel",
    "RegionMedCLIPProcessor",
    "RegionMedCLIPTextFeatures",
    "ZeroShotRegionClassificationPipeline",
    "ZeroShotRegionDetectionPipeline",
    "caption_key",
    "decode_image",
    "with_paper_normalizer",
]
