"""Image processor for RegionMed-CLIP: whole images plus region-of-interest boxes and crops."""

import io
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_utils import BatchFeature, get_size_dict
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PILImageResampling,
    SizeDict,
    load_image,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .configuration_regionmed_clip import require_supported_transformers

require_supported_transformers()
logger = logging.get_logger(__name__)

try:
    # Newer transformers 5: the numpy backend of the two-backend image processors, whose `preprocess` resolves and
    # validates the call's settings before `_preprocess_image_like_inputs`.
    from transformers.image_processing_backends import PilBackend as _ImageProcessorBase

    _BASE_RESOLVES_SETTINGS = True
except ImportError:
    # Older transformers: the numpy image processor base; `preprocess` below resolves the settings itself.
    from transformers.image_processing_utils import BaseImageProcessor as _ImageProcessorBase

    _BASE_RESOLVES_SETTINGS = False

_INTERPOLATION = {
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ROI_MODES = ("crop", "pool")


class RegionMedCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    boxes (`list`, *optional*):
        Per image, a list of ROI boxes `(x0, y0, x1, y1)` in pixels of the original image (or `None` for no ROIs).
    max_regions (`int`, *optional*):
        ROI slots per image; outputs are padded to it and an image with more boxes is an error.
    roi_mode (`str`, *optional*):
        `"crop"` also returns `roi_pixel_values` (each box cropped from the original image and resized);
        `"pool"` returns boxes and mask only, as the model pools ROIs from the global forward.
    shortest_edge (`int`, *optional*):
        Resize the shorter side of each whole image to this length, keeping the aspect ratio, then take the center
        `size` crop (CLIP's preprocessing). `None` resizes the whole image to `size` (SigLIP's and ViT's).
    """

    boxes: Any
    max_regions: int | None
    roi_mode: str | None
    shortest_edge: int | None


class DecodeError(ValueError):
    """An input image could not be read; the message names the image."""


def _min_max(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _scaled(array: np.ndarray, where: str) -> np.ndarray:
    """Pixel values in [0, 1]: 8-bit stays uint8 (read as /255 when it becomes float), deeper integers and
    out-of-range floats are min–max scaled to float32."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DecodeError(f"{where}: pixel array contains NaN or infinite values.")
        if array.min() >= 0.0 and array.max() <= 1.0:
            return array.astype(np.float32)
        return _min_max(array)
    if np.issubdtype(array.dtype, np.integer):
        return _min_max(array)
    raise DecodeError(f"{where}: unsupported pixel dtype {array.dtype}.")


def _channels(array: np.ndarray, where: str, channels_first: bool = False) -> np.ndarray:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1/3/4 → `(H, W, 1)` or `(H, W, 3)`, uint8 or float32;
    alpha is composited over black.

    A 3-D array is channels-last when its last axis could be channels, unless `channels_first` (torch tensors).
    Grayscale keeps one channel: resizing it is a third of the work, and the mean / std broadcast makes the three
    equal channels at the end.
    """
    if array.ndim == 2:
        array = array[..., None]
    elif (
        array.ndim == 3
        and array.shape[0] in (1, 3, 4)
        and (channels_first or array.shape[-1] not in (1, 3, 4))
    ):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise DecodeError(
            f"{where}: expected a 2-D grayscale or 3-D image with 1, 3 or 4 channels, got {array.shape}."
        )
    if array.shape[-1] == 4:
        array = _unit_float(array)
        array = array[..., :3] * array[..., 3:]
    return array if array.dtype == np.uint8 else array.astype(np.float32, copy=False)


def _unit_float(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array


def _pydicom(where: str):
    """pydicom, imported on first use: it is the optional `dicom` extra."""
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as error:
        raise ImportError(
            f"{where} is DICOM; reading it needs pydicom: pip install 'regionmed-clip[dicom]'"
        ) from error
    return pydicom


def _dicom_to_array(dataset, where: str) -> np.ndarray:
    """Pixels of a DICOM dataset as `(H, W, C)` in [0, 1] (see `_channels`).

    Grayscale data goes through the modality LUT (rescale slope / intercept) and the VOI LUT or window stored in the
    file, is scaled by its min–max, and MONOCHROME1 (white = low) is inverted so that, as in MONOCHROME2, bright means
    dense. A multi-frame file gives its first frame, with a warning.
    """
    pixel_tools = _pydicom(where).pixels
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise DecodeError(f"{where}: cannot decode DICOM pixel data: {error}") from error
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        logger.warning(
            f"{where}: multi-frame DICOM ({dataset.NumberOfFrames} frames); using the first frame."
        )
        pixels = pixels[0]
    if int(getattr(dataset, "SamplesPerPixel", 1)) > 1:
        return _channels(_scaled(pixels, where), where)
    pixels = pixel_tools.apply_voi_lut(pixel_tools.apply_modality_lut(pixels, dataset), dataset)
    pixels = _min_max(np.asarray(pixels, dtype=np.float64))
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = 1.0 - pixels
    return _channels(pixels, where)


def _is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether a file is DICOM: by its suffix (some DICOM files lack the preamble) or its `DICM` magic."""
    if os.fspath(path).lower().endswith((".dcm", ".dicom")):
        return True
    with open(path, "rb") as handle:
        return _is_dicom_bytes(handle.read(132))


def _read_dicom(source, where: str) -> np.ndarray:
    try:
        dataset = _pydicom(where).dcmread(source)
    except Exception as error:
        raise DecodeError(f"{where}: not a readable DICOM file: {error}") from error
    return _dicom_to_array(dataset, where)


def _pil_to_array(image: Image.Image, where: str) -> np.ndarray:
    try:
        image.load()
    except Exception as error:
        raise DecodeError(f"{where}: cannot decode image data: {error}") from error
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _channels(_scaled(np.asarray(image), where), where)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "L"):
        # PIL's own conversions are the right ones for CMYK, YCbCr, LAB, P and 1.
        image = image.convert("RGB")
    return _channels(np.asarray(image), where)


def decode_image(image, where: str = "image") -> np.ndarray:
    """Any supported input → float32 RGB `(H, W, 3)` in [0, 1].

    Accepts PIL images in any mode (16-bit and float modes are min–max scaled, alpha is composited over black,
    CMYK / palette / YCbCr use PIL's conversion), NumPy arrays and torch tensors (uint8 /255; other integer types
    min–max; floats already in [0, 1] unchanged, others min–max; torch tensors are read as `(C, H, W)` like
    torchvision, NumPy arrays as `(H, W, C)` unless only the first axis can be channels), encoded bytes, file paths and URLs, and with the
    `dicom` extra DICOM files or `pydicom` datasets.
    """
    array = _decode(image, where)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(_unit_float(array), dtype=np.float32)


def _decode(image, where: str) -> np.ndarray:
    """`decode_image` without its last step: `(H, W, 1)` or `(H, W, 3)`, uint8 for 8-bit data, else float32 in
    [0, 1]. The processor converts to float in one torch pass and repeats grayscale only in the normalisation's
    broadcast, which gives the same values as `decode_image` followed by the same resize."""
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        return _channels(_scaled(array, where), where, channels_first=True)
    if isinstance(image, np.ndarray):
        if image.size == 0:
            raise DecodeError(f"{where}: empty array {image.shape}.")
        return _channels(_scaled(image, where), where)
    if isinstance(image, Image.Image):
        return _pil_to_array(image, where)
    if hasattr(image, "pixel_array") and hasattr(image, "file_meta"):
        return _dicom_to_array(image, where)
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        if _is_dicom_bytes(data[:132]):
            return _read_dicom(io.BytesIO(data), where)
        try:
            return _pil_to_array(Image.open(io.BytesIO(data)), where)
        except UnidentifiedImageError as error:
            raise DecodeError(f"{where}: bytes are not a recognised image format.") from error
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            return _pil_to_array(load_image(path), f"{where} ({path})")
        where = f"{where} ({path})"
        if not os.path.isfile(path):
            raise DecodeError(f"{where}: no such file.")
        if is_dicom_file(path):
            return _read_dicom(path, where)
        try:
            return _pil_to_array(Image.open(path), where)
        except UnidentifiedImageError as error:
            raise DecodeError(f"{where}: not a recognised image format.") from error
    raise DecodeError(f"{where}: unsupported input type {type(image).__name__}.")


def validate_boxes(boxes, height: int, width: int, where: str) -> tuple[np.ndarray, int]:
    """Check one image's pixel boxes `(K, 4)` and clip them to the image.

    Returns the clipped boxes and how many were clipped. NaN / infinite, inverted, zero-area boxes, and boxes that
    lie wholly outside the image raise a `ValueError` naming the image and the box.
    """
    array = np.asarray(boxes if boxes is not None else [], dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64), 0
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be a list of (x0, y0, x1, y1), got shape {array.shape}.")
    clipped = 0
    result = array.copy()
    for index, box in enumerate(array):
        label = f"{where} box {index} {tuple(float(v) for v in box)}"
        if not np.isfinite(box).all():
            raise ValueError(f"{label}: coordinates must be finite numbers.")
        x0, y0, x1, y1 = box
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{label}: inverted box; expected x0 <= x1 and y0 <= y1 (pixel x0, y0, x1, y1).")
        if x1 == x0 or y1 == y0:
            raise ValueError(f"{label}: zero-area box.")
        clip = np.array(
            [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height)]
        )
        if clip[2] <= clip[0] or clip[3] <= clip[1]:
            raise ValueError(f"{label}: lies outside the {width}x{height} image.")
        if not np.array_equal(clip, box):
            clipped += 1
        result[index] = clip
    return result, clipped


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU `(N, M)` of boxes `(N, 4)` and `(M, 4)` in [x0, y0, x1, y1]; a pair with no area is 0."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]).clamp(min=0) * (boxes_a[:, 3] - boxes_a[:, 1]).clamp(min=0)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]).clamp(min=0) * (boxes_b[:, 3] - boxes_b[:, 1]).clamp(min=0)
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - overlap
    return torch.where(union > 0, overlap / union.clamp(min=torch.finfo(overlap.dtype).tiny), 0.0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision's semantics, which cannot be a dependency here).

    Returns the indices of the kept boxes, best score first; a box is suppressed when its IoU with a kept,
    higher-scored box is greater than `iou_threshold`. Ties in score keep the earlier box first. Memory is O(N):
    IoUs are computed one kept box against the survivors, since detectors return thousands of candidates.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    boxes = boxes.float()
    remaining = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while remaining.numel():
        best = remaining[0]
        keep.append(best)
        rest = remaining[1:]
        if not rest.numel():
            break
        overlaps = box_iou(boxes[best][None], boxes[rest])[0]
        remaining = rest[overlaps <= iou_threshold]
    return torch.stack(keep)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """`nms` within each group (`groups` `(N,)`, e.g. the query of each box), never across groups, as torchvision's
    `batched_nms`: the indices of the kept boxes, best score first."""
    kept = [
        members[nms(boxes[members], scores[members], iou_threshold)]
        for members in (torch.nonzero(groups == group).flatten() for group in groups.unique())
    ]
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _reject_unsupported(settings: dict):
    unsupported = [name for name in ("do_rescale", "do_center_crop", "do_pad") if settings.get(name)]
    if unsupported:
        raise ValueError(
            f"{', '.join(unsupported)} is not supported: images are scaled to [0, 1] while decoding and resized "
            "to `size` whole, so that ROI boxes keep their meaning. Crop or pad the images beforehand."
        )


class RegionMedCLIPImageProcessor(_ImageProcessorBase):
    r"""
    Image processor of RegionMed-CLIP. Turns images (and optionally per-image ROI boxes) into the model's inputs:

    - `pixel_values` `(B, 3, H, W)`: each image decoded to RGB in [0, 1] (see `decode_image` for every input kind,
      including 16-bit, CMYK and DICOM), resized to `size` with antialiasing, normalised by `image_mean` / `image_std`.
    - with `boxes=`: `roi_boxes` `(B, max_regions, 4)` (x0, y0, x1, y1 as fractions of the model's view of the
      image, after clipping to it: the whole image, or with `shortest_edge` its center crop), `roi_mask`
      `(B, max_regions)`, and in `crop` mode `roi_pixel_values` `(B, max_regions, 3, H, W)`: each box cropped from
      the *original* image (integer pixel bounds enclosing the box) and resized to `size` whole. Padded slots are
      zeros with mask 0.

    With `shortest_edge` set the whole image is resized on its shorter side and center-cropped to `size`, as CLIP's
    processor does, so a checkpoint converted from CLIP sees the pixels it was trained on. Boxes are then mapped into
    the crop; a box partly outside it is clipped (and counted in the clipping warning), one wholly outside it is an
    error, since the model cannot see it.

    Scaling to [0, 1] happens while decoding, so `do_rescale` is off: 8-bit data is divided by 255, deeper data is
    min–max scaled per image. Resizing uses torch's antialiased interpolation on float data, so 16-bit images are not
    quantised to 8 bits first; the base class is transformers' numpy image processor (the PIL backend where
    transformers has backends), because the torchvision backend needs torchvision, which this package does not
    require.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`): Model input size.
        max_regions (`int`, *optional*, defaults to 8): ROI slots per image.
        roi_mode (`str`, *optional*, defaults to `"pool"`): `"crop"` to also return `roi_pixel_values`.
        shortest_edge (`int`, *optional*): Resize the shorter side to this, then center-crop to `size` (CLIP style);
            `None` (default) resizes to `size` directly.

    Example:

    ```python
    >>> from PIL import Image
    >>> from regionmed_clip import RegionMedCLIPImageProcessor
    >>> processor = RegionMedCLIPImageProcessor(size={"height": 32, "width": 32}, roi_mode="crop", max_regions=2)
    >>> inputs = processor(Image.new("L", (64, 48)), boxes=[[(4, 4, 20, 30)]], return_tensors="pt")
    >>> inputs["roi_pixel_values"].shape, inputs["roi_mask"].tolist()
    (torch.Size([1, 2, 3, 32, 32]), [[1, 0]])
    ```
    """

    valid_kwargs = RegionMedCLIPImageProcessorKwargs
    model_input_names = ["pixel_values", "roi_boxes", "roi_mask", "roi_pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = False
    do_normalize = True
    max_regions = 8
    roi_mode = "pool"
    shortest_edge = None

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "RegionMedCLIPImageProcessor":
        """The image processor matching a [`RegionMedCLIPConfig`]: input size from the vision tower, `roi_mode` and
        `max_regions` from the config; `kwargs` override (e.g. `image_mean`)."""
        image_size = getattr(config.vision_config, "image_size", cls.size["height"])
        height, width = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        settings = {"size": {"height": height, "width": width}, "roi_mode": config.roi_mode}
        settings["max_regions"] = config.max_regions
        return cls(**{**settings, **kwargs})

    def _validate_preprocess_kwargs(self, **kwargs):
        """transformers' validation hook of `preprocess` (the base class calls it with every resolved setting), kept
        so that `do_center_crop` / `do_pad` / `do_rescale` are refused whichever path resolves them
        (test_image_processing checks each)."""
        _reject_unsupported(kwargs)
        super()._validate_preprocess_kwargs(**kwargs)

    if not _BASE_RESOLVES_SETTINGS:

        def preprocess(self, images, boxes=None, return_tensors=None, **kwargs) -> BatchFeature:
            """Every setting of `valid_kwargs` from the call, else from the processor, as the backends resolve them;
            `size` becomes a `SizeDict` as they make it."""
            _reject_unsupported(kwargs)
            names = set(self.valid_kwargs.__annotations__) - {"boxes", "return_tensors"}
            unexpected = sorted(set(kwargs) - names)
            if unexpected:
                raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unexpected}.")
            settings = {
                name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name, None)
                for name in names
            }
            settings["size"] = SizeDict(**get_size_dict(settings["size"]))
            return self._preprocess_image_like_inputs(
                images, boxes=boxes, return_tensors=return_tensors, **settings
            )

    def post_process_object_detection(
        self, outputs, threshold: float = 0.1, target_sizes=None, nms_threshold: float = 0.3
    ) -> list[dict]:
        """Boxes, scores and labels of [`RegionMedCLIPForZeroShotObjectDetection`]'s outputs, in the form OWL-ViT's
        image processor returns them (what transformers' `zero-shot-object-detection` pipeline reads).

        A score is the sigmoid of the detector's logit for one box and one query: a probability-like score that the
        box holds the query's finding, low on an image without it. Each (box, query) pair is scored on its own,
        so `threshold` filters absent findings as OWL-ViT's does, and a box that matches several queries is
        reported once per query (each time with that query's score and label). A logit at `-inf` or the dtype's
        lowest value scores 0.

        Every patch proposes a box, so the patches around a finding propose overlapping boxes of it: non-maximum
        suppression, per query, keeps the best-scored of the boxes that overlap by an IoU above `nms_threshold`. The
        default, 0.3, is OWL-ViT's for its image-guided detection: transformers' pipeline passes none, and two
        findings of one kind rarely overlap more than that. `nms_threshold=1.0` keeps every box.

        Boxes are cut to the model's view and mapped back through this processor's own view of each image (its
        resize, and with `shortest_edge` its center crop): the exact inverse of how `boxes=` inputs are mapped in.

        Args:
            outputs: The model's output (`logits` `(batch_size, num_patches, num_queries)`, `pred_boxes`
                `(batch_size, num_patches, 4)` as normalised `(center_x, center_y, width, height)` of the view).
            threshold: Keep (box, query) pairs scoring above this.
            target_sizes: `(batch_size, 2)` tensor or list of `(height, width)` of the original images: boxes in
                their pixels. Without it, boxes are fractions of the model's view.
            nms_threshold: IoU above which a box is suppressed by a better-scored box of the same query.

        Returns:
            Per image, a dict with `scores` `(N,)`, `labels` `(N,)` (query index) and `boxes` `(N, 4)` as
            `(x0, y0, x1, y1)`, best score first.
        """
        logits, boxes = outputs["logits"], outputs["pred_boxes"]
        if target_sizes is not None:
            target_sizes = torch.as_tensor(target_sizes).reshape(-1, 2).tolist()
            if len(target_sizes) != len(logits):
                raise ValueError(f"Got {len(target_sizes)} target sizes for {len(logits)} images.")
        scores = logits.float().sigmoid()
        centre, extent = boxes[..., :2].float(), boxes[..., 2:].float()
        corners = torch.cat((centre - extent / 2, centre + extent / 2), dim=-1).clamp(0.0, 1.0)
        size = SizeDict(**get_size_dict(self.size))
        # Without a resize the processor keeps the whole image (see `_preprocess_image_like_inputs`).
        shortest_edge = self.shortest_edge if self.do_resize else None
        results = []
        for index, (image_scores, image_boxes) in enumerate(zip(scores, corners, strict=True)):
            patches, queries = torch.nonzero(image_scores > threshold, as_tuple=True)
            candidate_scores, candidate_boxes = image_scores[patches, queries], image_boxes[patches]
            keep = batched_nms(candidate_boxes, candidate_scores, queries, nms_threshold)
            image_boxes = candidate_boxes[keep]
            if target_sizes is not None:
                height, width = (int(value) for value in target_sizes[index])
                scale, offset = self._view_frame(height, width, size, shortest_edge)
                image_boxes = image_boxes * image_boxes.new_tensor(scale) + image_boxes.new_tensor(offset)
            results.append({"scores": candidate_scores[keep], "labels": queries[keep], "boxes": image_boxes})
        return results

    @staticmethod
    def _view(height: int, width: int, size, shortest_edge: int | None) -> tuple[int, int, int, int]:
        """`(resized_height, resized_width, top, left)`: the size a whole image is resized to and the offset of the
        `size` crop taken from it (no crop without `shortest_edge`), with transformers' rounding."""
        if shortest_edge is None:
            return size.height, size.width, 0, 0
        if height <= width:
            resized = (shortest_edge, int(shortest_edge * width / height))
        else:
            resized = (int(shortest_edge * height / width), shortest_edge)
        if resized[0] < size.height or resized[1] < size.width:
            raise ValueError(
                f"shortest_edge={shortest_edge} is smaller than the crop size {size.height}x{size.width}."
            )
        return (*resized, (resized[0] - size.height) // 2, (resized[1] - size.width) // 2)

    @classmethod
    def _view_frame(
        cls, height: int, width: int, size, shortest_edge: int | None
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`(scale, offset)`, each in box order `(x, y, x, y)`: the point at fractions `f` of the model's view (see
        `_view`) is at pixel `offset + f * scale` of the original image. Boxes go into the view by its inverse
        (`_in_view`) and predicted boxes come back by it (`post_process_object_detection`)."""
        resized_height, resized_width, top, left = cls._view(height, width, size, shortest_edge)
        # One division each, so that without a crop the scale is the image's size exactly.
        scale = (size.width * width / resized_width, size.height * height / resized_height)
        offset = (left * width / resized_width, top * height / resized_height)
        return scale * 2, offset * 2

    def _to_pixel_values(
        self,
        array: np.ndarray,
        do_resize,
        size,
        resample,
        do_normalize,
        image_mean,
        image_std,
        shortest_edge: int | None = None,
    ) -> np.ndarray:
        """An array from `_decode` → `(3, H, W)` float32 pixel values.

        One image at a time, so that its float copy stays in cache (a stacked batch of large RGB images is slower).
        """
        # PIL hands out read-only buffers, which torch will not wrap without a warning.
        pixels = torch.from_numpy(array if array.flags.writeable else array.copy()).permute(2, 0, 1)[None]
        if pixels.dtype == torch.uint8:
            pixels = pixels / 255.0
        resized_height, resized_width, top, left = self._view(*pixels.shape[-2:], size, shortest_edge)
        if do_resize and tuple(pixels.shape[-2:]) != (resized_height, resized_width):
            mode = _INTERPOLATION.get(PILImageResampling(resample), "bilinear")
            pixels = F.interpolate(
                pixels,
                size=(resized_height, resized_width),
                mode=mode,
                antialias=mode != "nearest",
                **({} if mode == "nearest" else {"align_corners": False}),
            )
            if mode == "bicubic":
                pixels = pixels.clamp(0.0, 1.0)
        if do_resize and shortest_edge is not None:
            pixels = pixels[..., top : top + size.height, left : left + size.width]
        if do_normalize:
            mean = torch.tensor(image_mean, dtype=pixels.dtype).view(1, -1, 1, 1)
            std = torch.tensor(image_std, dtype=pixels.dtype).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels[0].expand(3, -1, -1).numpy()

    def _preprocess_image_like_inputs(
        self,
        images,
        boxes=None,
        max_regions: int | None = None,
        roi_mode: str | None = None,
        do_resize: bool = True,
        size=None,
        resample=None,
        do_normalize: bool = True,
        image_mean=None,
        image_std=None,
        shortest_edge: int | None = None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        if roi_mode not in ROI_MODES:
            raise ValueError(f"roi_mode={roi_mode!r} is not supported; use one of {ROI_MODES}.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images were given.")
        arrays = [_decode(image, f"image {index}") for index, image in enumerate(images)]
        to_pixels = {
            "do_resize": do_resize,
            "size": size,
            "resample": resample if resample is not None else PILImageResampling.BILINEAR,
            "do_normalize": do_normalize,
            "image_mean": image_mean,
            "image_std": image_std,
        }
        whole = {**to_pixels, "shortest_edge": shortest_edge if do_resize else None}
        data = {"pixel_values": np.stack([self._to_pixel_values(array, **whole) for array in arrays])}
        if boxes is not None:
            data.update(
                self._regions(arrays, boxes, max_regions, roi_mode, to_pixels, whole["shortest_edge"])
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _in_view(box, frame) -> tuple[tuple | None, bool]:
        """A pixel box of the original image as fractions of the model's view, given the view's `_view_frame`,
        clipped to it, and whether it was clipped; `None` for a box wholly outside the view."""
        scale, offset = frame
        scaled = tuple(
            (value - start) / extent for value, extent, start in zip(box, scale, offset, strict=True)
        )
        clipped = tuple(min(max(value, 0.0), 1.0) for value in scaled)
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            return None, True
        return clipped, clipped != scaled

    def _regions(
        self, arrays, boxes, max_regions, roi_mode, to_pixels, shortest_edge
    ) -> dict[str, np.ndarray]:
        if isinstance(boxes, (np.ndarray, torch.Tensor)) and len(arrays) == 1 and np.asarray(boxes).ndim == 2:
            boxes = [boxes]
        if len(boxes) != len(arrays):
            raise ValueError(
                f"Got boxes for {len(boxes)} images but {len(arrays)} images; give one list per image."
            )
        roi_boxes = np.zeros((len(arrays), max_regions, 4), dtype=np.float32)
        roi_mask = np.zeros((len(arrays), max_regions), dtype=np.int64)
        crops = None
        if roi_mode == "crop":
            height, width = to_pixels["size"].height, to_pixels["size"].width
            crops = np.zeros((len(arrays), max_regions, 3, height, width), dtype=np.float32)
        total_clipped = 0
        for index, (array, image_boxes) in enumerate(zip(arrays, boxes, strict=True)):
            image_height, image_width = array.shape[:2]
            where = f"image {index}"
            pixel_boxes, clipped = validate_boxes(
                image_boxes.tolist() if isinstance(image_boxes, torch.Tensor) else image_boxes,
                image_height,
                image_width,
                where,
            )
            total_clipped += clipped
            if len(pixel_boxes) > max_regions:
                raise ValueError(
                    f"{where} has {len(pixel_boxes)} boxes but max_regions={max_regions}; keep the "
                    f"{max_regions} most relevant or raise max_regions (model config and processor)."
                )
            frame = self._view_frame(image_height, image_width, to_pixels["size"], shortest_edge)
            for slot, (x0, y0, x1, y1) in enumerate(pixel_boxes):
                fractions, cut = self._in_view((x0, y0, x1, y1), frame)
                if fractions is None:
                    raise ValueError(
                        f"{where} box {slot} {(x0, y0, x1, y1)}: lies outside the center crop the model sees "
                        f"(shortest_edge={shortest_edge}, size {to_pixels['size'].height}x{to_pixels['size'].width})."
                    )
                total_clipped += cut
                roi_boxes[index, slot] = fractions
                roi_mask[index, slot] = 1
                if crops is not None:
                    left, top = int(np.floor(x0)), int(np.floor(y0))
                    right, bottom = max(int(np.ceil(x1)), left + 1), max(int(np.ceil(y1)), top + 1)
                    crops[index, slot] = self._to_pixel_values(array[top:bottom, left:right], **to_pixels)
        if total_clipped:
            logger.warning(f"{total_clipped} box(es) extended past their image and were clipped to it.")
        regions = {"roi_boxes": roi_boxes, "roi_mask": roi_mask}
        if crops is not None:
            regions["roi_pixel_values"] = crops
        return regions


__all__ = ["RegionMedCLIPImageProcessor", "batched_nms", "box_iou", "decode_image", "nms", "validate_boxes"]
