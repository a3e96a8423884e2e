"""Image decoding, resizing and ROI boxes / crops, including the inputs that go wrong in practice."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend

from regionmed_clip import RegionMedCLIPImageProcessor, decode_image
from regionmed_clip.image_processing_regionmed_clip import batched_nms
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPObjectDetectionOutput

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


def detections(logits, corners):
    """The detector's outputs for given logits `(B, P, Q)` and boxes `(B, P, 4)` as x0, y0, x1, y1 of the view."""
    corners = torch.as_tensor(corners, dtype=torch.float32)
    centre, extent = (corners[..., :2] + corners[..., 2:]) / 2, corners[..., 2:] - corners[..., :2]
    return RegionMedCLIPObjectDetectionOutput(
        logits=torch.as_tensor(logits, dtype=torch.float32), pred_boxes=torch.cat((centre, extent), dim=-1)
    )


def test_post_processing_scores_every_box_for_every_query_by_its_sigmoid():
    lowest = torch.finfo(torch.float32).min
    outputs = detections(
        [[[2.0, -1.0], [0.5, 3.0], [lowest, float("-inf")]]],
        [[[0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]],
    )
    (found,) = processor().post_process_object_detection(outputs, threshold=0.0)
    # Best first; the box of patch 1 is reported for both queries, each with its own score; patch 2 scores 0.
    torch.testing.assert_close(found["scores"], torch.tensor([3.0, 2.0, 0.5, -1.0]).sigmoid())
    assert found["labels"].tolist() == [1, 0, 0, 1]
    torch.testing.assert_close(
        found["boxes"],
        torch.tensor(
            [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.25, 0.5]]
        ),
    )
    (kept,) = processor().post_process_object_detection(outputs, threshold=float(torch.tensor(0.5).sigmoid()))
    assert kept["labels"].tolist() == [1, 0]


def test_post_processing_suppresses_overlapping_boxes_within_each_query_only():
    # IoU of boxes 0 and 1: 0.6; of 1 and 2: 0.23; of 0 and 2: 0.07; box 3 overlaps none (exact binary fractions).
    boxes = [
        [0.0, 0.0, 0.5, 0.5],
        [0.0, 0.125, 0.5, 0.625],
        [0.0, 0.4375, 0.5, 0.9375],
        [0.625, 0.625, 1.0, 1.0],
    ]
    outputs = detections([[[3.0, 1.0], [2.0, 2.0], [1.0, 3.0], [0.0, 0.0]]], [boxes])

    def kept(nms_threshold):
        (found,) = processor().post_process_object_detection(
            outputs, threshold=0.0, nms_threshold=nms_threshold
        )
        pairs = zip(found["labels"].tolist(), found["boxes"].tolist(), strict=True)
        return sorted((query, boxes.index(box)) for query, box in pairs)

    # Query 0: box 0 suppresses box 1. Query 1: box 2 does not suppress box 1 (0.23 < 0.3), which suppresses box 0.
    assert kept(0.3) == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    # At 0.2, box 2 suppresses box 1 for query 1, so box 0 stays.
    assert kept(0.2) == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert kept(1.0) == [(query, box) for query in (0, 1) for box in range(4)]


def test_batched_nms_is_nms_within_each_group():
    from .test_annotation_units import naive_nms

    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(40, 2, generator=generator)
    boxes = torch.cat((corner, corner + 0.05 + 0.3 * torch.rand(40, 2, generator=generator)), dim=-1)
    scores = torch.rand(40, generator=generator)
    groups = torch.randint(0, 3, (40,), generator=generator)
    kept = batched_nms(boxes, scores, groups, 0.3)
    assert scores[kept].tolist() == sorted(scores[kept].tolist(), reverse=True)
    for group in range(3):
        members = torch.nonzero(groups == group).flatten()
        expected = naive_nms(boxes[members].tolist(), scores[members].tolist(), 0.3)
        assert sorted(kept[groups[kept] == group].tolist()) == sorted(members[expected].tolist())


def clip_view(width: int, height: int, shortest_edge: int, crop: int) -> tuple[float, ...]:
    """The part of an image that CLIP's preprocessing shows, in its pixels: the shorter side resized to
    `shortest_edge` (the longer one rounded down), then the center `crop` square (its offset rounded down)."""
    if width <= height:
        resized_width, resized_height = shortest_edge, int(shortest_edge * height / width)
    else:
        resized_width, resized_height = int(shortest_edge * width / height), shortest_edge
    left, top = (resized_width - crop) // 2, (resized_height - crop) // 2
    x_scale, y_scale = width / resized_width, height / resized_height
    return (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)


@pytest.mark.parametrize("shortest_edge", [None, 24], ids=["resize", "shortest-edge-and-center-crop"])
@pytest.mark.parametrize(("width", "height"), [(200, 100), (90, 150)])
def test_boxes_given_to_the_processor_come_back_from_post_processing_where_they_were(
    shortest_edge, width, height
):
    """Every box the processor maps into the model's view, read back by post-processing as a predicted box, is
    where it was in the original image, clipped to the part of the image the view shows."""
    image_processor = processor(shortest_edge=shortest_edge, max_regions=3)
    inside = (0.3 * width, 0.35 * height, 0.6 * width, 0.55 * height)
    across_the_crop = (0.02 * width, 0.25 * height, 0.55 * width, 0.97 * height)
    boxes = [inside, across_the_crop, (0, 0, width, height)]
    inputs = image_processor(random_image(width, height, 10), boxes=[boxes], return_tensors="pt")
    outputs = detections((torch.eye(3) * 20 - 10)[None], inputs["roi_boxes"])
    (found,) = image_processor.post_process_object_detection(
        outputs, threshold=0.5, target_sizes=[(height, width)]
    )
    view = (0, 0, width, height) if shortest_edge is None else clip_view(width, height, shortest_edge, 16)
    expected = [
        (max(x0, view[0]), max(y0, view[1]), min(x1, view[2]), min(y1, view[3])) for x0, y0, x1, y1 in boxes
    ]
    if shortest_edge is not None:
        assert expected[1] != across_the_crop and expected[2] != boxes[2]
    by_label = found["boxes"][torch.argsort(found["labels"])]
    np.testing.assert_allclose(by_label.numpy(), np.array(expected), rtol=0, atol=1e-3)


def test_a_box_at_the_left_quarter_of_a_center_crop_comes_back_inside_the_crop():
    outputs = detections([[[5.0]]], [[[0.0, 0.0, 0.25, 1.0]]])
    (found,) = processor(shortest_edge=16).post_process_object_detection(outputs, target_sizes=[(100, 200)])
    torch.testing.assert_close(found["boxes"], torch.tensor([[50.0, 0.0, 75.0, 100.0]]))
