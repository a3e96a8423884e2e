"""Finding and reading the raw images to annotate.

Images are read with the package's own decoder (`decode_image`: PNG, JPEG, TIFF, 16-bit and float images, and
DICOM with the `dicom` extra), so the models see the same 8-bit RGB picture the RegionMed-CLIP processor would.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.schema import IMAGE_SUFFIXES, stored_image
from ..image_processing_regionmed_clip import DecodeError, decode_image


def list_images(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(id, path) of every image under `root` (recursive, sorted); the id is the relative path without its suffix.

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: two files would get the same id (e.g. `a.png` and `a.jpg`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            image_id = path.relative_to(root).with_suffix("").as_posix()
            if image_id in found:
                raise ValueError(
                    f"{found[image_id]} and {path} would both get the id {image_id!r}; rename one"
                )
            found[image_id] = path
    return list(found.items())


def read_image(path: str | os.PathLike) -> tuple[Image.Image, dict]:
    """The image as 8-bit RGB for the models, and the value stored in the dataset's `image` column.

    The stored value is `data.schema.stored_image`'s: the file's own bytes, or for DICOM the decoded PNG.

    Raises:
        DecodeError: the file cannot be read; the message names it.
    """
    path = Path(path)
    pixels = decode_image(path, where="image")
    image = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    return image, stored_image(path)


__all__ = ["IMAGE_SUFFIXES", "DecodeError", "list_images", "read_image"]
