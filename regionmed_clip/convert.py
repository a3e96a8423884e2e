"""RegionMed-CLIP models from other checkpoints: two pretrained towers (`from_vision_text_pretrained`), or a
whole trained dual encoder (CLIP, SigLIP, VisionTextDualEncoder) converted with its alignment kept
(`from_dual_encoder_pretrained`, and `convert`, which writes a complete folder).

The converted model keeps the source's towers, projections and temperature; the processor keeps its image
preprocessing and its tokenizer, so the converted folder scores images and texts as the source does until region
training changes it.
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import metadata_load
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .configuration_regionmed_clip import RegionMedCLIPConfig
from .image_processing_regionmed_clip import RegionMedCLIPImageProcessor
from .modeling_regionmed_clip import RegionMedCLIPModel, tower_from_config
from .processing_regionmed_clip import RegionMedCLIPProcessor

UNKNOWN_LICENSE = "unknown — check the source"


def from_vision_text_pretrained(
    vision_model_name_or_path: str,
    text_model_name_or_path: str,
    **kwargs,
) -> RegionMedCLIPModel:
    r"""
    Build a RegionMed-CLIP from a pretrained vision checkpoint and a pretrained text checkpoint (Hub ids or local
    folders). Projections and the ROI processor start from their init.

    Keyword arguments prefixed `vision_` / `text_` go to the tower's `from_pretrained` (e.g. `vision_revision`,
    `text_attn_implementation`); the rest set fields of [`RegionMedCLIPConfig`] (e.g. `projection_dim=512`,
    `roi_mode="crop"`). A full CLIP checkpoint as the vision path contributes its vision tower.

    Example:

    ```python
    >>> from regionmed_clip.convert import from_vision_text_pretrained
    >>> model = from_vision_text_pretrained(
    ...     "google/vit-base-patch16-224-in21k",
    ...     "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
    ...     projection_dim=512,
    ... )
    ```
    """
    tower_kwargs = {"vision": {}, "text": {}}
    for key in list(kwargs):
        for tower, bucket in tower_kwargs.items():
            if key.startswith(f"{tower}_"):
                bucket[key[len(tower) + 1 :]] = kwargs.pop(key)

    vision_config = tower_kwargs["vision"].pop("config", None) or AutoConfig.from_pretrained(
        vision_model_name_or_path, **_hub_kwargs(tower_kwargs["vision"])
    )
    if hasattr(vision_config, "vision_config"):  # a two-tower checkpoint such as CLIP or SigLIP
        tower_class = AutoModel.from_config(vision_config.vision_config).__class__
        vision_model = tower_class.from_pretrained(
            vision_model_name_or_path, config=vision_config.vision_config, **tower_kwargs["vision"]
        )
    else:
        vision_model = AutoModel.from_pretrained(
            vision_model_name_or_path, config=vision_config, **tower_kwargs["vision"]
        )
    text_model = AutoModel.from_pretrained(text_model_name_or_path, **tower_kwargs["text"])
    config = RegionMedCLIPConfig(
        vision_config=vision_model.config.to_dict(), text_config=text_model.config.to_dict(), **kwargs
    )
    return RegionMedCLIPModel(config, vision_model=vision_model, text_model=text_model)


def from_dual_encoder_pretrained(model_name_or_path: str, **kwargs) -> RegionMedCLIPModel:
    r"""
    Build a RegionMed-CLIP from a whole trained dual encoder — a `CLIPModel`, `SiglipModel` or
    `VisionTextDualEncoderModel` checkpoint (Hub id or local folder), or another CLIP-style one with
    `vision_model` / `text_model` / `visual_projection` / `text_projection` / `logit_scale` (OWL-ViT's) — keeping
    its image–text alignment: the towers, the projections and the learned temperature are the source's, so with
    no ROIs `logits_per_image` equals the source's (SigLIP: up to the constant `logit_bias` SigLIP adds to its
    logits). The ROI processor starts from its init with its gate at 0, so outputs do not move until region
    training opens it.

    SigLIP keeps its heads inside the towers (the vision attention-pool head, the text head) and compares their
    outputs directly; here its `visual_projection` / `text_projection` are square `nn.Linear` layers initialised
    to the identity, so the checkpoint layout and the training code are those of every other RegionMed-CLIP and
    the projections may be trained like any other. `projection_dim` is then the vision hidden size. The source's
    `logit_bias` is carried as `logit_bias_init_value` (and into a `logit_bias` parameter where the model has
    one), `loss_objective="sigmoid"`, and `text_pad_length` is the text tower's trained length (SigLIP pools the
    last of its 64 positions).

    The source loads through `AutoModel.from_pretrained`, so the usual loading kwargs (`revision`, `token`,
    `cache_dir`, `dtype`, `attn_implementation`, ...) are passed on; the other kwargs set or override fields of
    [`RegionMedCLIPConfig`] (e.g. `roi_mode="crop"`, `max_regions=16`). `learnable_temperature` defaults to
    `True`, as the source learned its temperature.

    Example:

    ```python
    >>> from regionmed_clip.convert import from_dual_encoder_pretrained
    >>> model = from_dual_encoder_pretrained("google/medsiglip-448", roi_mode="pool")
    ```
    """
    load_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in _LOAD_KWARGS}
    source = AutoModel.from_pretrained(model_name_or_path, **load_kwargs)
    kind = _dual_encoder_kind(source, model_name_or_path)
    vision_model = _as_tower(source.vision_model, source.config.vision_config, model_name_or_path)
    text_model = _as_tower(source.text_model, source.config.text_config, model_name_or_path)
    logit_scale = float(source.logit_scale.detach().reshape(()))
    settings = {"temperature": math.exp(-logit_scale), "learnable_temperature": True}
    if kind == "siglip":
        vision_dim = vision_model.config.hidden_size
        text_dim = getattr(text_model.config, "projection_size", None) or text_model.config.hidden_size
        if not vision_dim == text_dim == text_model.config.hidden_size:
            raise ValueError(
                f"{model_name_or_path}: SigLIP towers of widths vision {vision_dim}, text hidden "
                f"{text_model.config.hidden_size} / head {text_dim} cannot share identity projections."
            )
        settings.update(
            projection_dim=vision_dim,
            text_pad_length=text_model.config.max_position_embeddings,
            loss_objective="sigmoid",
            logit_bias_init_value=float(source.logit_bias.detach().reshape(())),
        )
    else:
        settings["projection_dim"] = source.visual_projection.out_features
    config = RegionMedCLIPConfig(
        vision_config=vision_model.config.to_dict(),
        text_config=text_model.config.to_dict(),
        **{**settings, **kwargs},
    )
    # The new layers (ROI processor, SigLIP's identity projections) take the dtype the source was loaded in.
    model = RegionMedCLIPModel(config, vision_model=vision_model, text_model=text_model).to(source.dtype)
    with torch.no_grad():
        if kind == "siglip":
            for projection in (model.visual_projection, model.text_projection):
                projection.weight.copy_(torch.eye(*projection.weight.shape))
            if model.logit_bias is not None:
                model.logit_bias.copy_(source.logit_bias.detach().reshape(model.logit_bias.shape))
        else:
            model.visual_projection.load_state_dict(source.visual_projection.state_dict())
            model.text_projection.load_state_dict(source.text_projection.state_dict())
        model.logit_scale.copy_(source.logit_scale.detach().reshape(()))
    return model


def _dual_encoder_kind(source: PreTrainedModel, where: str) -> str:
    """`"siglip"` for a SigLIP-family source (towers compared directly, a logit bias), `"projected"` for
    CLIP-style sources with `visual_projection` / `text_projection`."""
    model_type = source.config.model_type
    if model_type in ("siglip", "siglip2"):
        if model_type == "siglip2":
            raise ValueError(
                f"{where} is a Siglip2Model, whose NaFlex vision tower takes patchified inputs with "
                "`pixel_attention_mask` / `spatial_shapes` rather than an image grid; RegionMed-CLIP's ROI pooling "
                "and image processor need a fixed-resolution tower. Convert a SiglipModel checkpoint instead."
            )
        return "siglip"
    if all(
        hasattr(source, name)
        for name in ("vision_model", "text_model", "visual_projection", "text_projection")
    ):
        return "projected"
    raise ValueError(
        f"{where} is a {type(source).__name__} ({model_type}); from_dual_encoder_pretrained reads CLIPModel, "
        "SiglipModel and VisionTextDualEncoderModel checkpoints. For two separate towers use "
        "from_vision_text_pretrained."
    )


def _as_tower(module: nn.Module, config, where: str) -> PreTrainedModel:
    """A dual encoder's tower as the class RegionMed-CLIP builds from its sub-config (so that a saved model
    reloads with the same weight names).

    transformers 4.x (and OWL-ViT still) keep the bare transformer (`CLIPVisionTransformer`) inside the dual encoder;
    its tower class (`CLIPVisionModel`) holds exactly that module under one attribute, with the same weight names
    below it. The tower is built around the loaded module on the meta device, so nothing is initialised twice.
    """
    with torch.device("meta"):
        tower = tower_from_config(config)
    if type(tower) is type(module):
        return module
    slots = [name for name, child in tower.named_children() if type(child) is type(module)]
    if len(slots) != 1:
        raise ValueError(
            f"{where}: cannot place the bare {type(module).__name__} in {type(tower).__name__}, whose children "
            f"are {[type(child).__name__ for child in tower.children()]}."
        )
    setattr(tower, slots[0], module)
    unloaded = [
        name for name, tensor in [*tower.named_parameters(), *tower.named_buffers()] if tensor.is_meta
    ]
    if unloaded:
        raise ValueError(f"{where}: {type(tower).__name__} has weights outside {slots[0]}: {unloaded}.")
    return tower


# `from_pretrained` kwargs that also apply to loading a config.
_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
)
# `from_pretrained` kwargs of a whole source checkpoint in `from_dual_encoder_pretrained`; the others are config.
_LOAD_KWARGS = (*_HUB_KWARGS, "dtype", "attn_implementation", "device_map")


def _hub_kwargs(kwargs: dict) -> dict:
    """The subset of `from_pretrained` kwargs that also apply to loading a config."""
    return {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}


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
    source_config = AutoConfig.from_pretrained(config.source, **hub_kwargs)
    source_type = (source_config.architectures or [source_config.model_type])[0]
    model = from_dual_encoder_pretrained(config.source, **hub_kwargs, **overrides)
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
    "from_dual_encoder_pretrained",
    "from_vision_text_pretrained",
    "model_card",
    "source_license",
]
