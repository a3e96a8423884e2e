"""RegionMed-CLIP model configuration."""

import dataclasses
import math

from transformers import AutoConfig, PretrainedConfig

ROI_MODES = ("crop", "pool")
LOSS_OBJECTIVES = ("infonce", "sigmoid")
GLOBAL_POOLS = ("cls", "cls_proposer")


def is_objective_setting(name: str) -> bool:
    """Whether `name` is a setting of the pretraining objective that configs saved by earlier releases carry (each
    term's `<term>_weight`, L_neg's scale and bias)."""
    return name.endswith("_loss_weight") or name in ("neg_logit_scale", "neg_logit_bias")


# ---------------------------------------------------------------------------------------------------------------------
# Compatibility with transformers 4.57 to 5.x, by feature checks. Configs are plain classes with an `__init__` in 4.x
# and early 5.x, dataclasses later (`SubConfigSpec` sub-config specs later still). The class below declares its
# fields once, as annotations; `_config_class` gives it an `__init__` where configs are plain classes, and the
# sub-configs are built in `__post_init__` rather than by `SubConfigSpec`, so one class body serves every version.
# ---------------------------------------------------------------------------------------------------------------------

MIN_TRANSFORMERS = "4.57"


def require_supported_transformers():
    """Raise an `ImportError` naming the minimum version on a transformers older than the oldest supported one.

    Every remote-code file calls it on import, so a folder fails at once with this message whichever Auto class or
    pipeline loads it first.
    """
    # The generic `ProcessorMixin.__call__` arrived in 4.57, the oldest release these files are tested on.
    import transformers
    from transformers.processing_utils import ProcessorMixin

    if "__call__" not in ProcessorMixin.__dict__:
        raise ImportError(
            f"RegionMed-CLIP needs transformers>={MIN_TRANSFORMERS}; found {transformers.__version__}. "
            f"Upgrade with: pip install 'transformers>={MIN_TRANSFORMERS}'"
        )


require_supported_transformers()

DATACLASS_CONFIGS = dataclasses.is_dataclass(PretrainedConfig)


def _annotated_fields(cls) -> dict:
    """The fields a config class declares itself, with their class defaults."""
    return {name: getattr(cls, name) for name in cls.__dict__.get("__annotations__", {})}


def _config_class(cls):
    """Make `cls` a config on this transformers: type-checked with huggingface_hub's `strict` where configs are
    dataclasses, else given an `__init__` that sets the annotated fields (defaults from the class) and passes the
    rest to `__post_init__`, as the dataclass `__init__` does."""
    if DATACLASS_CONFIGS:
        from huggingface_hub.dataclasses import strict

        return strict(cls)
    fields = _annotated_fields(cls)

    def __init__(self, **kwargs):
        for name, default in fields.items():
            setattr(self, name, kwargs.pop(name, default))
        self.__post_init__(**kwargs)

    cls.__init__ = __init__
    return cls


def _finish_base_init(config, **kwargs):
    """The base class's share of construction: its `__post_init__` on dataclass configs, its `__init__` before."""
    if DATACLASS_CONFIGS:
        PretrainedConfig.__post_init__(config, **kwargs)
        return
    own = {name: getattr(config, name) for name in _annotated_fields(type(config))}
    PretrainedConfig.__init__(config, **kwargs)
    # The 4.x base sets the attributes it knows to its own defaults, among them `temperature` (a generation
    # setting there), so the config's own fields are put back.
    for name, value in own.items():
        setattr(config, name, value)


def _sub_config(value, default_model_type: str) -> PretrainedConfig:
    """A sub-config from a config object, a dict carrying its `model_type` (default `default_model_type`), or None."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(default_model_type)
    if not isinstance(value, dict):
        raise TypeError(
            f"A sub-config must be a dict, a PretrainedConfig or None, got {type(value).__name__}."
        )
    settings = dict(value)
    return AutoConfig.for_model(settings.pop("model_type", default_model_type), **settings)


@_config_class
class RegionMedCLIPConfig(PretrainedConfig):
    r"""
    Configuration of a [`RegionMedCLIPModel`]: a vision tower, a text tower, bias-free projections into a shared
    space, and the region branch (ROI features, ROI processor, region-level losses).

    Like `VisionTextDualEncoderConfig`, the towers may be of any transformers vision / text model type. Each
    sub-config is given as a config object or as a dict carrying its `model_type`; by default the vision tower is
    ViT-B/16 at 224 px and the text tower a BERT-base config shaped like PubMedBERT (the paper's backbones).

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the vision tower. A dict needs a `model_type` key (default `"vit"`).
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the text tower. A dict needs a `model_type` key (default `"bert"`).
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the shared embedding space.
        temperature (`float`, *optional*, defaults to 0.07):
            Contrastive temperature τ. Logits are `cos / τ`; the model stores `logit_scale = log(1 / τ)` as CLIP does.
        learnable_temperature (`bool`, *optional*, defaults to `False`):
            The paper fixes τ; set this to learn `logit_scale` as a parameter instead of keeping it as a buffer.
        roi_mode (`str`, *optional*, defaults to `"pool"`):
            How ROI features are made. `"crop"` (the paper): every ROI crop is resized to the input size and encoded
            by the vision tower, all crops of a batch in one forward. `"pool"`: RoIAlign on the patch-token grid of
            the global forward, so one vision forward per image. `pool` is the default because it costs almost
            nothing over a plain CLIP; `crop` sees each lesion at full input resolution.
        roi_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the ROI processor; must divide the vision hidden size.
        roi_intermediate_size (`int`, *optional*):
            Hidden size of the ROI processor's MLP (default: 4 × the vision hidden size).
        roi_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the ROI processor's attention weights and MLP output.
        max_regions (`int`, *optional*, defaults to 8):
            Number of ROI slots per image. Processors pad to it and reject images with more boxes.
        roi_align_size (`int`, *optional*, defaults to 7):
            `pool` mode: RoIAlign output grid (S × S bins) that is averaged into one ROI feature.
        roi_sampling_ratio (`int`, *optional*, defaults to 2):
            `pool` mode: bilinear samples per bin along each axis (as torchvision's `sampling_ratio`).
        loss_objective (`str`, *optional*, defaults to `"infonce"`):
            The contrastive form the model is trained with, which decides how its logits become scores:
            `"infonce"` (the paper's symmetric softmax loss; scores are softmaxes over the candidates) or
            `"sigmoid"` (SigLIP's pairwise sigmoid loss with the learnable `logit_bias`; each score is its own
            sigmoid). `return_loss=True` computes this form, and so do the pretraining objective's contrastive
            terms. The terms' weights are not model settings: they belong to the training stages.
        logit_bias_init_value (`float`, *optional*, defaults to -10.0):
            Initial value of the learnable `logit_bias` of the sigmoid objective (SigLIP's); unused with `"infonce"`.
        text_pad_length (`int`, *optional*):
            Right-pad shorter text inputs to this many tokens inside the model (pad id `text_config.pad_token_id`,
            mask 0), as a tokenizer called with `padding="max_length"` would. For text towers trained on one fixed
            length whose pooled output reads a fixed position (SigLIP reads the last of 64 tokens): callers that pad
            per batch, such as the zero-shot pipeline, then get the embeddings the tower was trained to give.
        auto_regions (`int`, *optional*, defaults to 0):
            Number of regions the model proposes itself when an image comes without boxes. With 0, an image without
            boxes gets the global embedding z_global (a plain CLIP). With K > 0, the region proposer picks the K
            best-scoring local maxima of its patch objectness map and their predicted boxes go through the ROI
            branch, so `pipeline("zero-shot-image-classification")` and `get_image_features` return the region-aware
            embedding from nothing but an image. Needs a patch-token vision tower (`image_size` and `patch_size`).
        global_pool (`str`, *optional*, defaults to `"cls"`):
            What the global image feature is before `visual_projection`. `"cls"`: the vision tower's pooled output
            (CLS where it has no pooler), as CLIP. `"cls_proposer"`: that plus the patch tokens averaged with the
            softmax of the region proposer's objectness as weights, so the box-free embedding z_global reads the
            patches the proposer (trained on ground-truth boxes by L_proposal) marks as findings. Needs a patch-token
            vision tower.
        detection_top_k (`int`, *optional*, defaults to 16):
            How many boxes per image (those of highest objectness) [`RegionMedCLIPForZeroShotObjectDetection`] reads
            again through the region path (crop or RoIAlign, then the ROI processor) to tell one finding from
            another; 0 scores boxes by the class head alone. In crop mode each costs one vision forward of the
            crop. On seed 0 of the demo recipe (term queries; its region class head then trained with the focal
            loss) 16 gave detection AP50 0.58 and presence AUC 0.90 against 0.54 and 0.89 with 8.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the ROI processor's layer norms.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Multiplier on the init std of the projections and the ROI processor.

    Example:

    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel

    >>> config = RegionMedCLIPConfig(
    ...     vision_config=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64, image_size=32, patch_size=8),
    ...     text_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 4, "intermediate_size": 64},
    ...     projection_dim=16, roi_num_heads=4, roi_mode="crop",
    ... )
    >>> model = RegionMedCLIPModel(config)
    ```
    """

    model_type = "regionmed-clip"
    # Read by transformers to pass attention and dtype settings down to the towers.
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: PretrainedConfig | dict | None = None
    text_config: PretrainedConfig | dict | None = None
    projection_dim: int = 512
    temperature: int | float = 0.07
    learnable_temperature: bool = False
    roi_mode: str = "pool"
    roi_num_heads: int = 8
    roi_intermediate_size: int | None = None
    roi_dropout: int | float = 0.0
    max_regions: int = 8
    roi_align_size: int = 7
    roi_sampling_ratio: int = 2
    loss_objective: str = "infonce"
    logit_bias_init_value: int | float = -10.0
    text_pad_length: int | None = None
    auto_regions: int = 0
    global_pool: str = "cls"
    detection_top_k: int = 16
    layer_norm_eps: int | float = 1e-6
    initializer_factor: int | float = 1.0

    def __post_init__(self, **kwargs):
        # Settings of the pretraining objective that folders saved by earlier releases carry: the objective now
        # lives in the training code and takes them from the training config, so they are dropped on load.
        for name in [name for name in kwargs if is_objective_setting(name)]:
            del kwargs[name]
        self.vision_config = _sub_config(self.vision_config, "vit")
        self.text_config = _sub_config(self.text_config, "bert")
        _finish_base_init(self, **kwargs)
        if self.roi_intermediate_size is None:
            self.roi_intermediate_size = 4 * self.vision_config.hidden_size
        # A class carries one auto class in `auto_map`, and a folder is saved by one class (the base model, or the
        # detector that holds it); the Auto classes and the zero-shot pipelines look the model up under the others,
        # so a config exported for remote code names the base model and the detector under every one of them.
        if self._auto_class is not None:
            auto_map = dict(getattr(self, "auto_map", None) or {})
            model_class = auto_map.setdefault("AutoModel", "modeling_regionmed_clip.RegionMedCLIPModel")
            auto_map.setdefault("AutoModelForZeroShotImageClassification", model_class)
            auto_map.setdefault(
                "AutoModelForZeroShotObjectDetection",
                "modeling_regionmed_clip.RegionMedCLIPForZeroShotObjectDetection",
            )
            self.auto_map = auto_map
            # The pipelines travel with the model file (a relative import of it); naming them here lets
            # `pipeline("zero-shot-region-classification" or "zero-shot-region-detection", model=folder,
            # trust_remote_code=True)` find them. Neither is named `zero-shot-object-detection`: a folder naming a
            # built-in task makes transformers refuse that task without `trust_remote_code=True`.
            pipelines = dict(getattr(self, "custom_pipelines", None) or {})
            for task, (name, model_class) in {
                "zero-shot-region-classification": ("ZeroShotRegionClassificationPipeline", "AutoModel"),
                "zero-shot-region-detection": (
                    "ZeroShotRegionDetectionPipeline",
                    "AutoModelForZeroShotObjectDetection",
                ),
            }.items():
                pipelines.setdefault(
                    task,
                    {
                        "impl": f"pipeline_regionmed_clip.{name}",
                        "pt": [model_class],
                        "tf": [],
                        "type": "multimodal",
                    },
                )
            self.custom_pipelines = pipelines
        self._check_combinations()

    @property
    def logit_scale_init_value(self) -> float:
        """`log(1 / temperature)`, the value `logit_scale` starts from (CLIP's parametrisation)."""
        return math.log(1.0 / self.temperature)

    def _check_combinations(self):
        # Raised from `__post_init__` rather than as a `@strict` class validator, so callers get a plain
        # `ValueError` (strict wraps validator errors in its own exception type).
        if self.roi_mode not in ROI_MODES:
            raise ValueError(f"roi_mode={self.roi_mode!r} is not supported; use one of {ROI_MODES}.")
        if self.loss_objective not in LOSS_OBJECTIVES:
            raise ValueError(
                f"loss_objective={self.loss_objective!r} is not supported; use one of {LOSS_OBJECTIVES}."
            )
        positive = {
            "projection_dim": self.projection_dim,
            "temperature": self.temperature,
            "roi_num_heads": self.roi_num_heads,
            "max_regions": self.max_regions,
            "roi_align_size": self.roi_align_size,
            "roi_sampling_ratio": self.roi_sampling_ratio,
            "layer_norm_eps": self.layer_norm_eps,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        if self.text_pad_length is not None and self.text_pad_length <= 0:
            raise ValueError(f"text_pad_length must be > 0 or None, got {self.text_pad_length}.")
        if not 0.0 <= self.roi_dropout < 1.0:
            raise ValueError(f"roi_dropout must be in [0, 1), got {self.roi_dropout}.")
        vision_hidden = getattr(self.vision_config, "hidden_size", None)
        if vision_hidden is None:
            raise ValueError(
                f"vision_config ({self.vision_config.model_type}) has no `hidden_size`; RegionMed-CLIP needs a tower "
                "that reports its feature size (ViT, CLIP vision, SigLIP vision, DeiT, ...)."
            )
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError(f"text_config ({self.text_config.model_type}) has no `hidden_size`.")
        if vision_hidden % self.roi_num_heads:
            raise ValueError(
                f"roi_num_heads={self.roi_num_heads} must divide the vision hidden size {vision_hidden}; "
                f"pick a divisor of {vision_hidden} (the paper uses 8 heads with ViT-B's 768)."
            )
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={self.global_pool!r} is not supported; use one of {GLOBAL_POOLS}.")
        if self.auto_regions < 0:
            raise ValueError(
                f"auto_regions must be >= 0 (0 switches self-proposed regions off), got {self.auto_regions}."
            )
        if self.detection_top_k < 0:
            raise ValueError(
                f"detection_top_k must be >= 0 (0: the class head's scores alone), got {self.detection_top_k}."
            )
        if self.roi_mode == "pool" or self.auto_regions > 0 or self.global_pool != "cls":
            image_size = getattr(self.vision_config, "image_size", None)
            patch_size = getattr(self.vision_config, "patch_size", None)
            if image_size is None or patch_size is None:
                raise ValueError(
                    f"roi_mode='pool', auto_regions > 0 and global_pool='cls_proposer' need a patch-token vision "
                    f"tower with `image_size` and `patch_size` in its config; {self.vision_config.model_type} has none. Use roi_mode='crop', "
                    "auto_regions=0 and global_pool='cls' for this tower."
                )


__all__ = [
    "MIN_TRANSFORMERS",
    "RegionMedCLIPConfig",
    "is_objective_setting",
    "require_supported_transformers",
]
