"""The Gradio demo (`demo/app.py`): its scoring functions against direct processor + model calls, its input errors,
and the whole app in a real headless Chromium (Debian's `chromium`, driven by Playwright) that uploads an image,
gets zero-shot scores and saves a screenshot to `test-artifacts/demo_app.png`."""

import importlib.util
import re
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import make_processor, tiny_model

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "test-artifacts" / "demo_app.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous for 2 busy cores, bounded so that a broken page fails with Playwright's message instead of hanging.
BROWSER_TIMEOUT_MS = 60_000
LABELS = ["round nodule", "pleural effusion", "normal chest"]


def _load_app():
    # demo/ is a Space folder, not a package: load app.py the way `python demo/app.py` would see it.
    spec = importlib.util.spec_from_file_location("regionmed_demo_app", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


app = _load_app()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer):
    """A tiny random model saved to a folder and loaded back by the app's own loader."""
    folder = tmp_path_factory.mktemp("demo-model")
    tiny_model().save_pretrained(folder)
    make_processor(tokenizer).save_pretrained(folder)
    return app.load_model(folder, device="cpu")


def test_load_model_puts_the_model_on_the_resolved_device(tmp_path, tokenizer, monkeypatch):
    from regionmed_clip import RegionMedCLIPModel

    tiny_model().save_pretrained(tmp_path)
    make_processor(tokenizer).save_pretrained(tmp_path)
    moved = []
    original = RegionMedCLIPModel.to

    def record(self, *args, **kwargs):
        moved.append(torch.device(args[0]))
        return original(self, "cpu")  # CUDA is mocked: the model stays where it can run

    monkeypatch.setattr(RegionMedCLIPModel, "to", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = app.load_model(tmp_path)
    assert moved == [torch.device("cuda")] and not model.training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    app.load_model(tmp_path, device="auto")
    assert moved[-1] == torch.device("cpu")


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A 160 × 120 greyscale "scan": a smooth background with a bright round lesion (for a readable screenshot)."""
    y, x = np.mgrid[:120, :160]
    pixels = 60 + 50 * np.sin(x / 25.0) * np.cos(y / 30.0) + 120 * (((x - 105) ** 2 + (y - 45) ** 2) < 14**2)
    path = tmp_path_factory.mktemp("demo-image") / "scan.png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L").save(path)
    return path


def _direct(model, processor, image, labels, boxes=None):
    inputs = processor(text=labels, images=[image], boxes=boxes, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


def test_zero_shot_scores_are_the_models_softmax(loaded, scan):
    model, processor = loaded
    scores = app.zero_shot_scores(model, processor, app.read_image(scan), LABELS)
    assert list(scores) == LABELS
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    expected = _direct(model, processor, str(scan), LABELS).logits_per_image[0].softmax(-1)
    torch.testing.assert_close(torch.tensor(list(scores.values())), expected)


def test_region_scores_match_the_model_called_with_boxes(loaded, scan):
    model, processor = loaded
    boxes = app.parse_boxes("2, 3, 30, 40; 10,5,60,45")
    image_level, per_box = app.region_scores(model, processor, app.read_image(scan), LABELS, boxes)

    outputs = _direct(model, processor, str(scan), LABELS, boxes=[boxes])
    torch.testing.assert_close(
        torch.tensor(list(image_level.values())), outputs.logits_per_image[0].softmax(-1)
    )
    # The region-aware image scores are not the plain CLIP ones (the tiny model's gate is open).
    plain = _direct(model, processor, str(scan), LABELS).logits_per_image[0].softmax(-1)
    assert not torch.allclose(torch.tensor(list(image_level.values())), plain)
    # Each ROI queries the image on its own, so box k scored alone must give the k-th row: this pins the order.
    assert len(per_box) == 2
    for box, scores in zip(boxes, per_box, strict=True):
        assert list(scores) == LABELS and sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
        alone = _direct(model, processor, str(scan), LABELS, boxes=[[box]])
        cosine = alone.region_embeds[0, 0] @ alone.text_embeds.t()
        torch.testing.assert_close(
            torch.tensor(list(scores.values())), (model.logit_scale.exp() * cosine).softmax(-1)
        )


def test_dicom_upload_is_decoded_and_scored(loaded):
    from pydicom.data import get_testdata_file

    model, processor = loaded
    image = app.read_image(get_testdata_file("CT_small.dcm", download=False))
    assert image.shape == (128, 128, 3) and 0.0 <= image.min() < image.max() <= 1.0
    assert sum(app.zero_shot_scores(model, processor, image, LABELS).values()) == pytest.approx(1.0, abs=1e-6)


def test_heatmap_overlay_is_an_rgb_picture(loaded, scan):
    model, processor = loaded
    picture = app.heatmap_overlay(model, processor, app.read_image(scan), "round nodule")
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype.name == "uint8"
    with pytest.raises(ValueError, match="Heatmap: type a text"):
        app.heatmap_overlay(model, processor, app.read_image(scan), "  ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"Boxes: type at least one box"),
        ("1,2,3", r"Box 1 \('1,2,3'\): expected 4 numbers x0,y0,x1,y1, got 3"),
        ("1,2,30,40; 5,x,9,9", r"Box 2 \('5,x,9,9'\): 'x' is not a number"),
        ("1 2 30 40", r"Box 1 \('1 2 30 40'\): expected 4 numbers"),
    ],
)
def test_bad_box_text_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        app.parse_boxes(text)


def test_box_geometry_errors_come_from_the_processor(loaded, scan):
    model, processor = loaded
    with pytest.raises(ValueError, match="inverted box"):
        app.region_scores(model, processor, app.read_image(scan), LABELS, app.parse_boxes("30,40,2,3"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "type at least two"),
        ("only one", "type at least two"),
        ("nodule, cyst, nodule", "'nodule' given more than once"),
    ],
)
def test_bad_labels_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        app.parse_labels(text)


def test_unreadable_or_missing_upload_is_named(tmp_path):
    junk = tmp_path / "scan.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="uploaded file 'scan.png'.*not a recognised image format"):
        app.read_image(junk)
    with pytest.raises(ValueError, match="upload an image first"):
        app.read_image(None)


def test_input_errors_reach_the_page_as_gr_error():
    @app.shown_to_user
    def handler(text):
        app.parse_boxes(text)

    with pytest.raises(gr.Error, match="Box 1") as caught:
        handler("<b>1,2</b>")
    assert "&lt;b&gt;" in caught.value.message  # shown as typed, not rendered as HTML


def test_app_without_a_model_says_how_to_name_one(monkeypatch, capsys):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit):
        app.main([])
    assert "pass --model or set REGIONMED_MODEL" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_browser_uploads_an_image_and_shows_scores(loaded, scan, tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing; the browser test needs Debian's Chromium: apt-get install -y chromium"
        )
    from playwright.sync_api import expect, sync_playwright

    model, processor = loaded
    expected = app.zero_shot_scores(model, processor, app.read_image(scan), LABELS)
    demo = app.build_demo(model, processor)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, quiet=True, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    blocked = []
    try:
        with sync_playwright() as playwright:
            # A persistent context is how Playwright takes a user-data dir; a fresh one keeps runs independent.
            browser = playwright.chromium.launch_persistent_context(
                tmp_path / "chromium-profile",
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                timeout=BROWSER_TIMEOUT_MS,
                viewport={"width": 1280, "height": 900},
            )
            try:
                # Anything but the app is refused at once, so an offline CI machine cannot stall on it.
                def local_only(route):
                    if route.request.url.startswith(url):
                        route.continue_()
                    else:
                        blocked.append(route.request.url)
                        route.abort()

                browser.route("**/*", local_only)
                page = browser.new_page()
                page.set_default_timeout(BROWSER_TIMEOUT_MS)
                expect.set_options(timeout=BROWSER_TIMEOUT_MS)
                try:
                    page.goto(url)
                    page.locator("#image-file input[type=file]").set_input_files(scan)
                    # The preview appears once the upload is on the server; scoring before that would see no file.
                    expect(page.locator("#preview img")).to_be_visible()
                    expect(page.locator("#image-size")).to_contain_text("160 × 120 px")
                    page.locator("#labels textarea").fill(", ".join(LABELS))
                    page.locator("#classify").click()
                    scores = page.locator("#zero-shot-scores")
                    expect(scores).to_contain_text(re.compile(r"\d+(\.\d+)?%"))
                    text = scores.inner_text()
                    heading = scores.get_by_test_id("label-output-value").inner_text()
                    # Each bar is a <meter> named by its label whose value is the probability the server sent.
                    shown = {
                        label: float(scores.locator(f'meter[aria-label="{label}"]').get_attribute("value"))
                        for label in LABELS
                    }
                finally:
                    SCREENSHOT.parent.mkdir(exist_ok=True)
                    page.screenshot(path=SCREENSHOT, full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()

    for label in LABELS:
        assert label in text
    percentages = [float(value) for value in re.findall(r"(\d+(?:\.\d+)?)%", text)]
    assert len(percentages) == len(LABELS), text
    assert sum(percentages) == pytest.approx(100.0, abs=len(LABELS))  # each rounded for display
    assert shown == pytest.approx(expected, abs=1e-6)
    assert heading == max(expected, key=expected.get)
    assert SCREENSHOT.stat().st_size > 10_000
    assert not blocked, f"the page asked for more than the app: {blocked}"
