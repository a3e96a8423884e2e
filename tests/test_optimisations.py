"""Every optimisation of the performance issue against the unoptimised path it replaced (see benchmarks/RESULTS.md)."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from regionmed_clip import RegionMedCLIPImageProcessor, decode_image

from .conftest import random_image, tiny_model
from .test_modeling import MODES, model_inputs


def reference_pixel_values(image, size=(24, 20), resample="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3):
    """The processor before the optimisation: every image decoded to float32 RGB (grayscale repeated to three
    channels), then one `F.interpolate` per image, then the normalisation."""
    pixels = torch.from_numpy(decode_image(image)).permute(2, 0, 1)[None]
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode=resample, antialias=True, align_corners=False)
        if resample == "bicubic":
            pixels = pixels.clamp(0.0, 1.0)
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((pixels - mean) / std)[0]


def sixteen_bit(width, height):
    buffer = io.BytesIO()
    values = np.random.default_rng(3).integers(0, 4096, (height, width)).astype(np.uint16)
    Image.fromarray(values).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


IMAGES = {
    "grayscale": lambda: random_image(61, 47, 0, mode="L"),
    "rgb": lambda: random_image(33, 70, 1),
    "rgba": lambda: random_image(40, 30, 2).convert("RGBA"),
    "16-bit": lambda: sixteen_bit(50, 45),
    "uint8 array": lambda: np.random.default_rng(4).integers(0, 256, (31, 29), dtype=np.uint8),
    "float array": lambda: np.random.default_rng(5).random((26, 38, 3)) * 7.0,
}


def test_8_bit_decoding_equals_the_float_conversion_it_replaced():
    for image in (random_image(9, 7, 0, mode="L"), random_image(9, 7, 1)):
        old = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
        assert np.array_equal(decode_image(image), old)


@pytest.mark.parametrize("resample", [2, 3])  # bilinear, bicubic
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_processor_equals_the_per_image_float_rgb_path_exactly(kind, resample):
    # Grayscale stays one channel and 8-bit data uint8 until torch divides by 255; interpolation works per
    # channel and both divisions are IEEE float32, so the values are bitwise those of the old path.
    image = IMAGES[kind]()
    processor = RegionMedCLIPImageProcessor(size={"height": 24, "width": 20}, resample=resample)
    pixels = processor([image, image], return_tensors="pt")["pixel_values"]
    expected = reference_pixel_values(image, resample={2: "bilinear", 3: "bicubic"}[resample])
    assert torch.equal(pixels[0], expected) and torch.equal(pixels[1], expected)


def test_crops_equal_the_reference_on_the_cropped_region():
    image = random_image(64, 48, 6, mode="L")
    box = (5.5, 7.2, 29.0, 33.9)
    processor = RegionMedCLIPImageProcessor(size={"height": 24, "width": 20}, roi_mode="crop", max_regions=2)
    crops = processor(image, boxes=[[box]], return_tensors="pt")["roi_pixel_values"]
    # Integer bounds enclosing the box, as documented.
    assert torch.equal(crops[0, 0], reference_pixel_values(image.crop((5, 7, 29, 34))))


def test_roi_processor_layers_get_their_documented_init():
    # transformers skips `_init_weights` on remote-code modules without parameters of their own; the ROI
    # attention and MLP then kept nn.Linear's std = initializer_factor = 1, which saturated the pool softmax and
    # made its (gate-scaled) gradients subnormal: the pool K=4 train step ran 1.25× VTDE instead of 1.06×.
    model = tiny_model("pool")
    processor = model.roi_processor
    hidden = model.config.vision_config.hidden_size
    layers = [processor.attention.q_proj, processor.attention.k_proj, processor.attention.v_proj]
    layers += [processor.attention.out_proj, processor.mlp.fc1, processor.mlp.fc2, processor.pool_score]
    for layer in layers:
        std = layer.in_features**-0.5
        assert layer.weight.std().item() == pytest.approx(std, rel=0.3), layer
        assert (layer.bias == 0).all()
    assert processor.box_embedding.weight.std().item() == pytest.approx(hidden**-0.5, rel=0.3)


@pytest.mark.parametrize("roi_mode", MODES)
def test_bf16_weights_stay_close_to_fp32(tokenizer, sample_batch, roi_mode):
    # The bf16 inference path of the benchmark: weights and activations in bf16 (no autocast casts).
    model = tiny_model(roi_mode)
    half = tiny_model(roi_mode).to(torch.bfloat16)
    inputs = model_inputs(tokenizer, sample_batch, roi_mode)
    with torch.no_grad():
        reference, lowered = model(**inputs), half(**inputs)
    for field in ("image_embeds", "text_embeds"):
        cosine = F.cosine_similarity(getattr(lowered, field).float(), getattr(reference, field), dim=-1)
        assert (cosine > 0.99).all(), field
    mask = reference.region_mask
    cosine = F.cosine_similarity(lowered.region_embeds[mask].float(), reference.region_embeds[mask], dim=-1)
    assert (cosine > 0.99).all()
