"""RegionMed-CLIP demo: zero-shot scores, region-aware scores for typed boxes, and a patch-to-text heatmap.

Laid out as a Hugging Face Space (`app.py` beside `requirements.txt` and a `README.md` with the Space's front
matter); locally:

    REGIONMED_MODEL=outputs/demo/model python demo/app.py        # or: python demo/app.py --model <folder or Hub id>

Decisions:

- The model loads through `AutoModel` / `AutoProcessor` with the classes `import regionmed_clip` registers, not with
  `trust_remote_code=True`. The app needs the package anyway (its image decoder reads DICOM, and the heatmap is the
  package's own `explain` code), so the installed, tested code runs instead of Python files fetched with a model
  repo. Weights load in float32 (as `regionmed-clip explain` does) on `--device`: `auto` (the default) is the GPU
  when there is one. The app scores one image at a time, so it has no batch size.
- Uploads go through `gr.File`, not `gr.Image`: a browser cannot show DICOM, and `gr.Image` would re-encode the
  upload as an 8-bit RGB picture, losing a 16-bit or DICOM image's range before the package's decoder sees it. Any
  file type is accepted (DICOM files often have no extension); `decode_image` decides, and says what it could not
  read. The preview is the decoded image.
- Candidate labels are used as typed (the pipeline's `hypothesis_template="{}"`), so a label may be a whole prompt;
  commas and new lines separate them. Scores are a softmax over the labels.
- Boxes are typed, `x0,y0,x1,y1` in pixels of the original image (the preview states its size), separated by `;`
  or new lines. Drawing them is not offered: Gradio's `ImageEditor` returns freehand brush layers, not
  rectangles, and turning strokes into boxes would be guesswork; the typed boxes are drawn on the result instead.
- Region-aware scores are the model's `logits_per_image` with the boxes given (the region-aware image embedding),
  and per box the softmax over labels of the scaled cosine between its fused region embedding and each label.
- Input problems (no image, unreadable file, no labels, bad box text) are `ValueError`s in the plain functions,
  shown as `gr.Error` in the page.
- No "share" buttons on images: they post to a public Hub discussion, wrong for patient images.
- Gradio is kept off the network: no analytics or version check (`analytics_enabled=False`), no share link, and
  the server binds to 127.0.0.1 unless `GRADIO_SERVER_NAME` says otherwise (a Space sets it to 0.0.0.0).

Research software, not a medical device: not for clinical diagnosis.
"""

import argparse
import functools
import html
import os
import re
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import regionmed_clip  # noqa: F401  (registers the Auto classes)
from regionmed_clip import decode_image
from regionmed_clip.evaluation.device import DEVICE_CHOICES, resolve_device
from regionmed_clip.evaluation.grounding import patch_text_similarity, save_heatmap_overlay

MODEL_ENV = "REGIONMED_MODEL"
DISCLAIMER = "Research demo of a region-aware medical CLIP. **Not for clinical diagnosis.**"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------------------------------
# Loading and parsing
# ---------------------------------------------------------------------------------------------------------------------


def load_model(name_or_path: str | os.PathLike, device: str = "auto"):
    """The model (float32, eval mode, on `device`: `auto` is CUDA when available, else the CPU) and processor of a
    folder or Hub id."""
    model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32).to(resolve_device(device)).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model, processor


def parse_labels(text: str | None) -> list[str]:
    """Candidate labels from text separated by commas or new lines; at least two, none repeated."""
    labels = [label.strip() for label in re.split(r"[,\n]", text or "") if label.strip()]
    if len(labels) < 2:
        raise ValueError(
            "Candidate labels: type at least two, separated by commas (scores are a softmax over the labels)."
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"Candidate labels: {', '.join(map(repr, repeated))} given more than once.")
    return labels


def parse_boxes(text: str | None) -> list[Box]:
    """Boxes from `"x0,y0,x1,y1; x0,y0,x1,y1"` (pixels; `;` or new lines between boxes), numbered from 1 in errors.

    Only the syntax is checked here; the processor checks the geometry against the image (inverted, zero-area or
    outside boxes) and raises its own `ValueError` naming the box.
    """
    parts = [part.strip() for part in re.split(r"[;\n]", text or "") if part.strip()]
    if not parts:
        raise ValueError("Boxes: type at least one box as x0,y0,x1,y1 in pixels, boxes separated by ';'.")
    boxes = []
    for number, part in enumerate(parts, start=1):
        values = [value.strip() for value in part.split(",")]
        if len(values) != 4:
            raise ValueError(f"Box {number} ({part!r}): expected 4 numbers x0,y0,x1,y1, got {len(values)}.")
        bad = [value for value in values if not _NUMBER.match(value)]
        if bad:
            raise ValueError(f"Box {number} ({part!r}): {bad[0]!r} is not a number.")
        boxes.append(tuple(float(value) for value in values))
    return boxes


def read_image(path: str | os.PathLike | None) -> np.ndarray:
    """The uploaded file decoded by the package (PNG, JPEG, 16-bit, DICOM, ...): float32 RGB `(H, W, 3)` in [0, 1]."""
    if path is None:
        raise ValueError("Image: upload an image first (PNG, JPEG or DICOM).")
    return decode_image(path, where=f"uploaded file {Path(path).name!r}")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring (plain functions: the UI only calls them)
# ---------------------------------------------------------------------------------------------------------------------


def _inputs(processor, model, **kwargs) -> dict[str, torch.Tensor]:
    return {key: value.to(model.device) for key, value in processor(**kwargs, return_tensors="pt").items()}


@torch.no_grad()
def zero_shot_scores(model, processor, image, labels: list[str]) -> dict[str, float]:
    """Softmax over `labels` of the whole-image logits (no boxes: the model is then exactly a CLIP)."""
    outputs = model(**_inputs(processor, model, text=labels, images=[image]))
    probabilities = outputs.logits_per_image[0].softmax(-1).tolist()
    return dict(zip(labels, probabilities, strict=True))


@torch.no_grad()
def region_scores(model, processor, image, labels: list[str], boxes: list[Box]) -> tuple[dict, list[dict]]:
    """Region-aware scores of `image` with `boxes` against `labels`.

    Returns:
        The softmax over labels of the region-aware image logits, and per box the softmax over labels of
        `logit_scale · cos(region embedding, label embedding)`, in the order the boxes were given.
    """
    outputs = model(**_inputs(processor, model, text=labels, images=[image], boxes=[boxes]))
    image_level = dict(zip(labels, outputs.logits_per_image[0].softmax(-1).tolist(), strict=True))
    regions = outputs.region_embeds[0, : len(boxes)]
    per_box = (model.logit_scale.exp() * regions @ outputs.text_embeds.t()).softmax(-1).tolist()
    return image_level, [dict(zip(labels, row, strict=True)) for row in per_box]


def heatmap_overlay(model, processor, image, text: str) -> np.ndarray:
    """Where `text` matches `image`: the package's patch-to-text map drawn by its `explain` overlay, as RGB pixels."""
    if not (text or "").strip():
        raise ValueError("Heatmap: type a text to locate, e.g. a finding and its position.")
    similarity = patch_text_similarity(model, processor, image, text.strip())
    # The overlay is drawn by the same function as `regionmed-clip explain`, which writes a PNG.
    with tempfile.TemporaryDirectory() as folder:
        path = save_heatmap_overlay(image, similarity, Path(folder) / "heatmap.png", title=text.strip())
        with Image.open(path) as figure:
            return np.asarray(figure.convert("RGB"))


# ---------------------------------------------------------------------------------------------------------------------
# UI
# ---------------------------------------------------------------------------------------------------------------------


def shown_to_user(handler):
    """Wrap a UI handler so that its `ValueError`s (bad input) appear in the page as a `gr.Error` with the same
    message, rather than as Gradio's generic "Error"."""

    @functools.wraps(handler)
    def wrapped(*args):
        try:
            return handler(*args)
        except ValueError as error:
            # gr.Error renders its message as HTML, and the message quotes what the user typed. A bad input is
            # the user's to fix, not a server fault, so no traceback goes to the log.
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from error

    return wrapped


def build_demo(model, processor) -> gr.Blocks:
    """The Gradio app around `model` and `processor`; the caller launches it."""

    @shown_to_user
    def preview(path):
        if path is None:
            return None, ""
        pixels = read_image(path)
        height, width = pixels.shape[:2]
        return to_uint8(pixels), f"Image size: {width} × {height} px (box coordinates are in these pixels)."

    @shown_to_user
    def classify(path, labels_text):
        return zero_shot_scores(model, processor, read_image(path), parse_labels(labels_text))

    @shown_to_user
    def score_regions(path, labels_text, boxes_text):
        image, labels, boxes = read_image(path), parse_labels(labels_text), parse_boxes(boxes_text)
        image_level, per_box = region_scores(model, processor, image, labels, boxes)
        rows, annotations = [], []
        for number, (box, scores) in enumerate(zip(boxes, per_box, strict=True), start=1):
            best = max(scores, key=scores.get)
            rows.append(
                [number, ",".join(f"{v:g}" for v in box), best, *(round(scores[x], 4) for x in labels)]
            )
            annotations.append((tuple(round(v) for v in box), f"box {number}: {best}"))
        table = {"headers": ["box", "x0,y0,x1,y1", "top label", *labels], "data": rows}
        return image_level, table, (to_uint8(image), annotations)

    @shown_to_user
    def heatmap(path, text):
        return heatmap_overlay(model, processor, read_image(path), text)

    with gr.Blocks(title="RegionMed-CLIP", analytics_enabled=False) as demo:
        gr.Markdown(f"# RegionMed-CLIP\n{DISCLAIMER}")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG, JPEG or DICOM)", type="filepath", elem_id="image-file")
                # No "share" button: it posts the image to a public Hub discussion, wrong for patient images.
                shown = gr.Image(
                    label="Preview", interactive=False, height=320, buttons=["fullscreen"], elem_id="preview"
                )
                size = gr.Markdown(elem_id="image-size")
            with gr.Column(scale=1):
                labels = gr.Textbox(
                    label="Candidate labels",
                    info="Separated by commas or new lines; each is used as typed.",
                    placeholder="pneumothorax, pleural effusion, normal chest",
                    lines=2,
                    elem_id="labels",
                )
                with gr.Tab("Zero-shot"):
                    classify_button = gr.Button("Score labels", variant="primary", elem_id="classify")
                    zero_shot = gr.Label(
                        label="Zero-shot scores", num_top_classes=10, elem_id="zero-shot-scores"
                    )
                with gr.Tab("Regions"):
                    boxes = gr.Textbox(
                        label="Boxes",
                        info="x0,y0,x1,y1 in pixels of the original image; ';' or new lines between boxes.",
                        placeholder="120,80,180,140; 40,200,110,260",
                        elem_id="boxes",
                    )
                    regions_button = gr.Button("Score regions", variant="primary", elem_id="score-regions")
                    region_image = gr.Label(label="Region-aware image scores", num_top_classes=10)
                    region_table = gr.Dataframe(label="Scores per box", interactive=False)
                    region_boxes = gr.AnnotatedImage(label="Boxes")
                with gr.Tab("Heatmap"):
                    text = gr.Textbox(
                        label="Text to locate", placeholder="round nodule in the left upper lobe"
                    )
                    heatmap_button = gr.Button("Draw heatmap", variant="primary")
                    heatmap_image = gr.Image(
                        label="Patch-to-text similarity",
                        interactive=False,
                        buttons=["download", "fullscreen"],
                    )

        upload.change(preview, inputs=upload, outputs=[shown, size])
        classify_button.click(classify, inputs=[upload, labels], outputs=zero_shot)
        regions_button.click(
            score_regions, inputs=[upload, labels, boxes], outputs=[region_image, region_table, region_boxes]
        )
        heatmap_button.click(heatmap, inputs=[upload, text], outputs=heatmap_image)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="RegionMed-CLIP Gradio demo")
    parser.add_argument(
        "--model", default=os.environ.get(MODEL_ENV), help=f"folder or Hub id (default: ${MODEL_ENV})"
    )
    parser.add_argument(
        "--device", default="auto", help=f"{DEVICE_CHOICES} (default: auto, CUDA when present)"
    )
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"no model: pass --model or set {MODEL_ENV} to a model folder or Hub id.")
    demo = build_demo(*load_model(args.model, args.device))
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), share=False)


if __name__ == "__main__":
    main()
