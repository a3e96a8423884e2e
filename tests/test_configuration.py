import math

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, BertConfig, CLIPVisionConfig, ViTConfig

from regionmed_clip import RegionMedCLIPConfig

from .conftest import tiny_config, tiny_text_config, tiny_vision_config


def test_defaults_are_the_papers_backbones():
    config = RegionMedCLIPConfig()
    assert isinstance(config.vision_config, ViTConfig)
    assert (
        config.vision_config.hidden_size,
        config.vision_config.patch_size,
        config.vision_config.image_size,
    ) == (
        768,
        16,
        224,
    )
    assert isinstance(config.text_config, BertConfig)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (768, 12)
    assert config.projection_dim == 512
    assert config.temperature == 0.07 and config.learnable_temperature is False
    assert config.roi_num_heads == 8
    assert config.logit_scale_init_value == pytest.approx(math.log(1 / 0.07))
    assert config.roi_intermediate_size == 4 * 768


def test_sub_configs_from_objects_dicts_and_other_model_types():
    from_objects = RegionMedCLIPConfig(
        vision_config=ViTConfig(**{k: v for k, v in tiny_vision_config().items() if k != "model_type"}),
        text_config=BertConfig(**{k: v for k, v in tiny_text_config().items() if k != "model_type"}),
        roi_num_heads=4,
    )
    from_dicts = tiny_config()
    assert from_objects.vision_config.to_dict() == from_dicts.vision_config.to_dict()
    assert from_objects.text_config.hidden_size == from_dicts.text_config.hidden_size == 32

    clip_vision = RegionMedCLIPConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 4},
        text_config=tiny_text_config(),
        roi_num_heads=4,
    )
    assert isinstance(clip_vision.vision_config, CLIPVisionConfig)


def test_round_trip_through_json(tmp_path):
    config = tiny_config("crop", temperature=0.05, learnable_temperature=True, auto_regions=2)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RegionMedCLIPConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert (loaded.temperature, loaded.learnable_temperature, loaded.roi_mode) == (0.05, True, "crop")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"roi_mode": "grid"}, "roi_mode='grid' is not supported"),
        ({"roi_num_heads": 5}, "must divide the vision hidden size 32"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"projection_dim": 0}, "projection_dim must be > 0"),
        ({"max_regions": 0}, "max_regions must be > 0"),
        ({"roi_dropout": 1.0}, "roi_dropout must be in [0, 1)"),
        ({"detection_top_k": -1}, "detection_top_k must be >= 0"),
    ],
)
def test_invalid_combinations_raise_value_error_saying_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**overrides)


def test_pool_mode_needs_a_patch_grid_tower():
    text = tiny_text_config()
    with pytest.raises(ValueError, match="roi_mode='crop'"):
        RegionMedCLIPConfig(
            vision_config={"model_type": "resnet", "hidden_sizes": [8, 16, 32, 64], "hidden_size": 64},
            text_config=text,
            roi_mode="pool",
        )


def test_fields_are_type_checked():
    with pytest.raises(StrictDataclassFieldValidationError):
        tiny_config(projection_dim="512")
