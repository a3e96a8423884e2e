"""Convert a trained dual encoder (CLIP, SigLIP, VisionTextDualEncoder) into a RegionMed-CLIP model folder.

The model keeps the source's towers, projections and temperature (see
`RegionMedCLIPModel.from_dual_encoder_pretrained`); the processor keeps its image preprocessing and its tokenizer,
so the converted folder scores images and texts as the source does until region training changes it.
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import metadata_load

from .configuration_regionmed_clip import RegionMedCLIPConfig
from .image_processing_regionmed_clip import RegionMedCLIPImageProcessor
from .modeling_regionmed_clip import RegionMedCLIPModel
from .processing_regionmed_clip import RegionMedCLIPProcessor

UNKNOWN_LICENSE = "unknown — check the source"


@dataclass
class ConvertConfig:
    """What `regionmed-clip convert` reads and writes."""

    source: str = field(
        metadata={
            "help": "CLIPModel, SiglipModel or VisionTextDualEncoderModel checkpoint: a folder or Hub id",
            "aliases": ["--from"],
        }
    )
    out: str = field(metadata={"help": "folder to write the RegionMed-CLIP model to"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the source"})
    roi_mode: str | None = field(
        default=None, metadata={"help": "RegionMedCLIPConfig.roi_mode, crop or pool (default: the config's)"}
    )
    max_regions: int | None = field(
        default=None, metadata={"help": "ROI slots per image (default: the config's)"}
    )


def convert_image_processor(
    source, config: RegionMedCLIPConfig, overrides: dict | None = None
) -> RegionMedCLIPImageProcessor:
    """A [`RegionMedCLIPImageProcessor`] giving the pixel values of the image processor `source` (a CLIP-, SigLIP-
    or ViT-style processor): its size and crop, resampling filter, mean and std; `roi_mode` and `max_regions` from
    `config`.

    SigLIP and ViT processors resize the whole image to `size`; CLIP's resizes the shorter side to
    `size["shortest_edge"]` and center-crops to `crop_size`, which becomes `shortest_edge` here. `overrides` replace
    any of the settings (e.g. `image_mean`).
    """
    name = type(source).__name__
    size = dict(source.size)
    settings = {
        "resample": source.resample,
        "do_normalize": bool(source.do_normalize),
        "image_mean": list(source.image_mean),
        "image_std": list(source.image_std),
    }
    if source.do_rescale and not math.isclose(source.rescale_factor, 1 / 255):
        raise ValueError(
            f"{name} rescales by {source.rescale_factor}; RegionMed-CLIP reads 8-bit pixels as value / 255."
        )
    if not source.do_rescale:
        raise ValueError(
            f"{name} does not rescale to [0, 1]; RegionMed-CLIP's normalisation starts from [0, 1]."
        )
    if size.get("shortest_edge"):
        crop = (
            dict(getattr(source, "crop_size", None) or {}) if getattr(source, "do_center_crop", False) else {}
        )
        if not crop.get("height"):
            raise ValueError(
                f"{name} resizes the shorter side to {size['shortest_edge']} without a center crop, so its output "
                "size varies with the image; RegionMed-CLIP needs one input size."
            )
        settings["size"] = {"height": crop["height"], "width": crop["width"]}
        settings["shortest_edge"] = size["shortest_edge"]
    elif size.get("height") and size.get("width"):
        if getattr(source, "do_center_crop", False):
            raise ValueError(
                f"{name} resizes to {size} and then center-crops; that combination is not supported."
            )
        settings["size"] = {"height": size["height"], "width": size["width"]}
    else:
        raise ValueError(f"{name} has size {size}; expected height / width or shortest_edge.")
    return RegionMedCLIPImageProcessor.from_model_config(config, **{**settings, **(overrides or {})})


def convert_processor(
    model_name_or_path: str, config: RegionMedCLIPConfig, image_processor: dict | None = None, **hub_kwargs
) -> RegionMedCLIPProcessor:
    """The processor of a converted model: the source's image preprocessing (see `convert_image_processor`) and its
    tokenizer unchanged (no paper normalizer: the text tower learned that tokenizer's ids). A SigLIP source pads
    every text to `max_length` (its text tower was trained on one length); others pad per batch. `image_processor`
    overrides image-processor settings."""
    from transformers import AutoImageProcessor, AutoTokenizer

    source = AutoImageProcessor.from_pretrained(model_name_or_path, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **hub_kwargs)
    padding = {"text_padding": True, "text_max_length": None}
    if config.text_pad_length is not None:
        padding = {"text_padding": "max_length", "text_max_length": config.text_pad_length}
    return RegionMedCLIPProcessor(
        convert_image_processor(source, config, image_processor), tokenizer, normalize_text=False, **padding
    )


def source_license(model_name_or_path: str, **hub_kwargs) -> str:
    """The `license` of the source's card (README front matter), or `UNKNOWN_LICENSE` when there is none."""
    card = Path(model_name_or_path) / "README.md"
    if not Path(model_name_or_path).is_dir():
        from huggingface_hub import hf_hub_download

        try:
            card = Path(hf_hub_download(model_name_or_path, "README.md", revision=hub_kwargs.get("revision")))
        except Exception:  # no card, or the Hub unreachable: the errors differ by cause and client version
            return UNKNOWN_LICENSE
    if not card.is_file():
        return UNKNOWN_LICENSE
    front_matter = metadata_load(card) or {}
    return str(front_matter.get("license") or UNKNOWN_LICENSE)


def model_card(source: str, source_type: str, license: str, config: RegionMedCLIPConfig) -> str:
    """README.md of a converted model: where it comes from, its licence, and what changed. `base_model` is set
    for a Hub source only (the Hub reads it as a repo id)."""
    metadata = {
        "license": license if license != UNKNOWN_LICENSE else "other",
        "library_name": "transformers",
        "pipeline_tag": "zero-shot-image-classification",
        "tags": ["regionmed-clip", "medical", "region-of-interest"],
    }
    if not Path(source).is_dir():
        metadata["base_model"] = source
    objective = getattr(config, "loss_objective", "infonce")
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---

# RegionMed-CLIP converted from `{source}`

This is the {source_type} `{source}` as a RegionMed-CLIP model: its vision and text towers, projections and
learned temperature are unchanged, so without regions it scores images and texts as the source does. The ROI
processor is new, with its gate at 0: region-aware outputs equal the global ones until region training.

- Source: `{source}` ({source_type})
- Licence of the source: {license}. The weights here are the source's and remain under its licence.
- Training objective for further training: `{objective}`; `roi_mode`: `{config.roi_mode}`.

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("path/to/this/folder", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/to/this/folder", trust_remote_code=True)
```
"""


def convert(config: ConvertConfig) -> Path:
    """Write a complete RegionMed-CLIP folder converted from `config.source`: weights, config, processor, the
    remote-code files (copied by `save_pretrained`) and `README.md`. Returns the folder."""
    hub_kwargs = {"revision": config.revision} if config.revision else {}
    overrides = {name: getattr(config, name) for name in ("roi_mode", "max_regions") if getattr(config, name)}
    from transformers import AutoConfig

    source_config = AutoConfig.from_pretrained(config.source, **hub_kwargs)
    source_type = (source_config.architectures or [source_config.model_type])[0]
    model = RegionMedCLIPModel.from_dual_encoder_pretrained(config.source, **hub_kwargs, **overrides)
    processor = convert_processor(config.source, model.config, **hub_kwargs)
    out = Path(config.out)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    license = source_license(config.source, **hub_kwargs)
    (out / "README.md").write_text(
        model_card(config.source, source_type, license, model.config), encoding="utf-8"
    )
    return out


__all__ = [
    "ConvertConfig",
    "convert",
    "convert_image_processor",
    "convert_processor",
    "model_card",
    "source_license",
]
