"""Image decoding, resizing and ROI boxes / crops, including the inputs that go wrong in practice."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend

from regionmed_clip import RegionMedCLIPImageProcessor, decode_image

from .conftest import random_image

SIZE = {"height": 16, "width": 16}


def processor(**kwargs):
    return RegionMedCLIPImageProcessor(size=SIZE, image_mean=[0.0] * 3, image_std=[1.0] * 3, **kwargs)


def test_whole_images_are_resized_and_normalised():
    image = random_image(40, 30, 0)
    pixels = RegionMedCLIPImageProcessor(size=SIZE)(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.float32
    raw = processor()(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, (raw - 0.5) / 0.5)
    assert raw.min() >= 0.0 and raw.max() <= 1.0


def test_same_size_image_is_only_scaled():
    image = random_image(16, 16, 1)
    pixels = processor()(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixels, np.asarray(image).transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_grayscale_rgba_palette_and_cmyk_give_the_right_rgb():
    gray = random_image(16, 16, 2, mode="L")
    expected_gray = np.repeat(np.asarray(gray)[None] / 255.0, 3, axis=0)
    np.testing.assert_allclose(decode_image(gray).transpose(2, 0, 1), expected_gray, atol=1e-6)

    rgb = random_image(16, 16, 3)
    np.testing.assert_allclose(
        decode_image(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)),
        np.asarray(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).convert("RGB")) / 255.0,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        decode_image(rgb.convert("CMYK")), np.asarray(rgb.convert("CMYK").convert("RGB")) / 255.0, atol=1e-6
    )

    rgba = rgb.copy()
    alpha = np.full((16, 16), 255, dtype=np.uint8)
    alpha[:, :8] = 0
    rgba.putalpha(Image.fromarray(alpha))
    decoded = decode_image(rgba)
    assert decoded[:, :8].max() == 0.0
    np.testing.assert_allclose(decoded[:, 8:], np.asarray(rgb)[:, 8:] / 255.0, atol=1e-6)


def test_16_bit_images_keep_their_full_range():
    values = np.linspace(0, 4095, 16 * 16).reshape(16, 16).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode.startswith("I")
    decoded = decode_image(image)
    np.testing.assert_allclose(decoded[..., 0], values / 4095.0, atol=1e-6)
    assert len(np.unique(decoded[..., 0])) == 256  # PIL's own convert("RGB") would clip everything above 255
    np.testing.assert_allclose(decode_image(values), decoded, atol=1e-6)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 4), 51, dtype=np.uint8), 0.2),
        (np.full((4, 4, 3), 0.25, dtype=np.float32), 0.25),
        (torch.full((3, 4, 4), 0.75), 0.75),
        (np.full((4, 4, 1), 200, dtype=np.uint8), 200 / 255),
    ],
)
def test_arrays_and_tensors(array, expected):
    decoded = decode_image(array)
    assert decoded.shape == (4, 4, 3)
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_ambiguous_layouts_follow_the_documented_rule():
    assert decode_image(np.zeros((1, 5, 6), dtype=np.uint8)).shape == (5, 6, 3)  # only axis 0 can be channels
    assert decode_image(np.zeros((3, 4, 4), dtype=np.uint8)).shape == (3, 4, 3)  # NumPy: channels last
    assert decode_image(torch.zeros(3, 4, 4)).shape == (4, 4, 3)  # torch: channels first


def test_float_arrays_outside_unit_range_are_min_max_scaled():
    hounsfield = np.array([[-1000.0, 0.0], [1000.0, 3000.0]])
    np.testing.assert_allclose(decode_image(hounsfield)[..., 0], [[0.0, 0.25], [0.5, 1.0]])


def test_encoded_bytes_and_paths(tmp_path):
    image = random_image(20, 10, 4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(buffer.getvalue())
    expected = np.asarray(image) / 255.0
    np.testing.assert_allclose(decode_image(buffer.getvalue()), expected, atol=1e-6)
    np.testing.assert_allclose(decode_image(str(path)), expected, atol=1e-6)


def test_corrupt_and_truncated_images_name_the_image(tmp_path):
    with pytest.raises(ValueError, match=r"image 1: bytes are not a recognised image format"):
        processor()([random_image(8, 8, 0), b"\x89PNG not really"])
    buffer = io.BytesIO()
    random_image(64, 64, 5).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ValueError, match=r"image 0 \(.*truncated.png\): cannot decode image data"):
        processor()(str(truncated))
    with pytest.raises(ValueError, match="no such file"):
        processor()(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor()(np.full((4, 4), np.nan, dtype=np.float32))


def test_boxes_become_normalised_roi_boxes_with_mask_padded_to_max_regions():
    images = [random_image(40, 20, 6), random_image(10, 10, 7)]
    out = processor(max_regions=3)(images, boxes=[[(4, 2, 20, 10), (0, 0, 40, 20)], []], return_tensors="pt")
    assert out["roi_boxes"].shape == (2, 3, 4) and out["roi_mask"].shape == (2, 3)
    torch.testing.assert_close(
        out["roi_boxes"][0, :2], torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    )
    assert out["roi_mask"].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert "roi_pixel_values" not in out


def test_crop_mode_crops_from_the_original_image():
    image = random_image(50, 40, 8)
    box = (5, 7, 29, 33)
    out = processor(roi_mode="crop", max_regions=2)(image, boxes=[[box]], return_tensors="pt")
    assert out["roi_pixel_values"].shape == (1, 2, 3, 16, 16)
    expected = processor()(image.crop(box), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out["roi_pixel_values"][0, 0], expected)
    assert out["roi_pixel_values"][0, 1].abs().sum() == 0


def test_boxes_past_the_border_are_clipped_and_counted(caplog):
    image = random_image(20, 20, 9)
    with caplog.at_level(logging.WARNING):
        out = processor()(image, boxes=[[(-5, 10, 10, 30), (2, 2, 8, 8)]], return_tensors="pt")
    torch.testing.assert_close(out["roi_boxes"][0, 0], torch.tensor([0.0, 0.5, 0.5, 1.0]))
    assert "1 box(es) extended past their image" in caplog.text


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((5, 5, 5, 10), r"image 0 box 0 \(5.0, 5.0, 5.0, 10.0\): zero-area box"),
        ((float("nan"), 1, 4, 4), r"image 0 box 0 .*must be finite"),
        ((10, 10, 2, 12), r"image 0 box 0 .*inverted box"),
        ((30, 30, 40, 40), r"image 0 box 0 .*lies outside the 20x20 image"),
    ],
)
def test_bad_boxes_raise_naming_image_and_box(box, message):
    with pytest.raises(ValueError, match=message):
        processor()(random_image(20, 20, 10), boxes=[[box]])


def test_too_many_boxes_and_mismatched_box_lists():
    with pytest.raises(ValueError, match="image 1 has 3 boxes but max_regions=2"):
        processor(max_regions=2)(
            [random_image(20, 20, 0), random_image(20, 20, 1)], boxes=[[(0, 0, 5, 5)], [(0, 0, 5, 5)] * 3]
        )
    with pytest.raises(ValueError, match="boxes for 1 images but 2 images"):
        processor()([random_image(20, 20, 0), random_image(20, 20, 1)], boxes=[[(0, 0, 5, 5)]])


def test_unknown_call_arguments_are_rejected():
    with pytest.raises(TypeError):
        processor()(random_image(8, 8, 0), bogus=1)


def test_round_trip_keeps_roi_settings(tmp_path):
    from transformers import AutoImageProcessor

    import regionmed_clip  # noqa: F401  (registration)

    original = processor(roi_mode="crop", max_regions=5)
    original.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RegionMedCLIPImageProcessor
    # transformers' torchvision backend needs torchvision, which this package does not require.
    assert isinstance(loaded, PilBackend) and loaded.backend == "pil"
    assert (loaded.roi_mode, loaded.max_regions, dict(loaded.size)) == ("crop", 5, SIZE)


pydicom = pytest.importorskip("pydicom")


def _dicom(name):
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file(name, download=False))


def test_dicom_grayscale_applies_modality_and_voi_lut():
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = _dicom("MR_small.dcm")
    expected = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset).astype(np.float64)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    decoded = decode_image(dataset)
    assert decoded.shape == (64, 64, 3)
    np.testing.assert_allclose(decoded[..., 0], expected, atol=1e-6)
    np.testing.assert_allclose(decode_image(dataset.filename), decoded)


def test_dicom_monochrome1_is_inverted():
    dataset = _dicom("MR_small.dcm")
    normal = decode_image(dataset)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(decode_image(dataset), 1.0 - normal, atol=1e-6)


def test_dicom_multi_frame_uses_the_first_frame(caplog):
    dataset = _dicom("SC_rgb_rle_2frame.dcm")
    with caplog.at_level(logging.WARNING):
        decoded = decode_image(dataset)
    assert "using the first frame" in caplog.text
    np.testing.assert_allclose(decoded, dataset.pixel_array[0].astype(np.float32) / 255.0, atol=1e-6)


def test_dicom_through_the_processor_with_boxes():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    out = processor(roi_mode="crop")(path, boxes=[[(10, 10, 60, 70)]], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 16, 16)
    assert out["roi_mask"][0].tolist() == [1] + [0] * 7


def test_settings_that_would_move_boxes_are_refused():
    for setting in ("do_center_crop", "do_pad", "do_rescale"):
        with pytest.raises(ValueError, match=f"{setting} is not supported"):
            processor()(random_image(8, 8, 0), **{setting: True})


def test_image_processor_from_model_config():
    from .conftest import tiny_config

    config = tiny_config("crop", max_regions=5)
    image_processor = RegionMedCLIPImageProcessor.from_model_config(config, image_mean=[0.1] * 3)
    assert dict(image_processor.size) == {"height": 32, "width": 32}
    assert (image_processor.roi_mode, image_processor.max_regions) == ("crop", 5)
    assert tuple(image_processor.image_mean) == (0.1, 0.1, 0.1)
