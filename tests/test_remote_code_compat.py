"""The region pipeline, and the remote-code folder on every pinned transformers version.

`.ci/run` builds one environment per pinned version (torch, that transformers, pillow, numpy, pydicom; never this
package) and names their interpreters in `REGIONMED_COMPAT_PYTHONS` (separated by `os.pathsep`). Without it the
cross-version test is skipped locally and fails under CI (`CI=true`), so CI cannot pass without running it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, ZeroShotObjectDetectionPipeline, pipeline

from regionmed_clip import (
    RegionMedCLIPForZeroShotObjectDetection,
    ZeroShotRegionClassificationPipeline,
    ZeroShotRegionDetectionPipeline,
    decode_image,
)
from regionmed_clip.training import RegionMedCLIPForPreTraining

from .conftest import make_processor, random_image, tiny_model
from .test_hub_integration import BLOCK_PACKAGE

LABELS = ["round nodule", "normal chest", "oval cyst"]
# Capitals and punctuation: scores agree across versions only if the tokenizer keeps its normalizer there.
TEMPLATE = "A Scan, showing: {}."
CHECK_SCRIPT = Path(__file__).with_name("remote_code_check.py")
COMPAT_PYTHONS = [path for path in os.environ.get("REGIONMED_COMPAT_PYTHONS", "").split(os.pathsep) if path]
TOO_OLD_PYTHON = os.environ.get("REGIONMED_TOO_OLD_PYTHON", "")
IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("regionmed-clip-compat")
    model = tiny_model("pool")
    with torch.no_grad():  # a proposer with peaks and boxes of several sizes (it starts at zero)
        model.region_proposer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    # Saved as training saves a model: the detector's layout (the base model's weights under `regionmed_clip.`),
    # which every Auto class and pipeline must read on every version.
    RegionMedCLIPForPreTraining(model.config, model=model).save_pretrained(folder)
    make_processor(tokenizer, "pool").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A DICOM path (pydicom's CT test file, 16-bit) and a PNG path, with their boxes."""
    png = tmp_path_factory.mktemp("images") / "scan.png"
    random_image(48, 40, 3).save(png)
    return [pydicom.data.get_testdata_file("CT_small.dcm"), str(png)], [
        [(3, 4, 30, 33)],
        [(0, 5, 20, 39), (10, 10, 35, 30)],
    ]


def _forward(folder, images, boxes):
    """Per-box and whole-image softmax scores from the model's own forward, label order."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(
        text=[TEMPLATE.format(label) for label in LABELS], images=images, boxes=boxes, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(**inputs)
    region = (model.logit_scale.exp() * outputs.region_embeds @ outputs.text_embeds.t()).softmax(-1)
    return region, outputs.logits_per_image.softmax(-1), outputs.region_mask


def _by_label(ranking):
    return [{item["label"]: item["score"] for item in ranking}[label] for label in LABELS]


def _assert_matches_forward(results, folder, images, boxes):
    region, whole, mask = _forward(folder, images, boxes)
    assert len(results) == len(images)
    for index, (result, image_boxes) in enumerate(zip(results, boxes, strict=True)):
        scores = [item["score"] for item in result["image"]]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(_by_label(result["image"]), whole[index].numpy(), rtol=0, atol=1e-5)
        assert [tuple(r["box"]) for r in result["regions"]] == [tuple(b) for b in image_boxes]
        assert int(mask[index].sum()) == len(image_boxes)
        for slot, entry in enumerate(result["regions"]):
            np.testing.assert_allclose(
                _by_label(entry["scores"]), region[index, slot].numpy(), rtol=0, atol=1e-5
            )


def test_saved_folder_ships_both_pipelines(folder):
    assert (folder / "pipeline_regionmed_clip.py").is_file()
    pipelines = json.loads((folder / "config.json").read_text())["custom_pipelines"]
    assert {task: spec["impl"] for task, spec in pipelines.items()} == {
        "zero-shot-region-classification": "pipeline_regionmed_clip.ZeroShotRegionClassificationPipeline",
        "zero-shot-region-detection": "pipeline_regionmed_clip.ZeroShotRegionDetectionPipeline",
    }


def test_region_pipeline_scores_equal_the_models_forward_in_batches(folder, images):
    paths, boxes = images
    classifier = pipeline(
        "zero-shot-region-classification",
        model=str(folder),
        pipeline_class=ZeroShotRegionClassificationPipeline,
    )
    batched = classifier(paths, boxes=boxes, candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    _assert_matches_forward(batched, folder, paths, boxes)
    one_per_forward = classifier(
        paths, boxes=boxes, candidate_labels=LABELS, hypothesis_template=TEMPLATE, batch_size=1
    )
    for a, b in zip(batched, one_per_forward, strict=True):
        np.testing.assert_allclose(_by_label(a["image"]), _by_label(b["image"]), rtol=0, atol=1e-5)
    single = classifier(paths[1], boxes=boxes[1], candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    assert single["regions"][1]["box"] == list(boxes[1][1])
    as_array = classifier(
        paths[1], boxes=np.array(boxes[1]), candidate_labels=LABELS, hypothesis_template=TEMPLATE
    )
    assert as_array == single


def test_region_pipeline_without_boxes_ranks_the_whole_image_like_the_standard_pipeline(folder, images):
    png = images[0][1]
    regions = pipeline(
        "zero-shot-region-classification",
        model=str(folder),
        pipeline_class=ZeroShotRegionClassificationPipeline,
    )(png, candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    standard = pipeline("zero-shot-image-classification", model=str(folder))(
        png, candidate_labels=LABELS, hypothesis_template=TEMPLATE
    )
    assert regions["regions"] == []
    np.testing.assert_allclose(_by_label(regions["image"]), _by_label(standard), rtol=0, atol=1e-6)


def test_region_pipeline_rejects_mismatched_boxes(folder, images):
    classifier = pipeline(
        "zero-shot-region-classification",
        model=str(folder),
        pipeline_class=ZeroShotRegionClassificationPipeline,
    )
    with pytest.raises(ValueError, match="boxes for 1"):
        classifier(images[0], boxes=[[(0, 0, 5, 5)]], candidate_labels=LABELS)
    with pytest.raises(ValueError, match="candidate_labels"):
        classifier(images[0][1], candidate_labels=[])


def _check_inputs(tmp_path, images) -> Path:
    pngs = [random_image(48, 40, 11), random_image(36, 52, 12, mode="L")]
    path = tmp_path / "inputs.json"
    path.write_text(
        json.dumps(
            {
                "images": [np.asarray(image).tolist() for image in pngs],
                "labels": LABELS,
                "boxes": [[[3, 4, 30, 33]], [[0, 5, 20, 40], [10, 10, 35, 50]]],
                "template": TEMPLATE,
                "paths": [images[0][0]],
                "path_boxes": [images[1][0]],
            }
        )
    )
    return path


def _run_check(python: str, folder, tmp_path, inputs) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [python, str(CHECK_SCRIPT), str(folder), str(inputs), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_report_matches(report, expected):
    assert all(module.startswith("transformers_modules.") for module in report["classes"]), report["classes"]
    assert report["fields"] == expected["fields"]
    assert report["resaved_fields"] == expected["fields"]
    np.testing.assert_allclose(report["logits"], expected["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(report["resaved_logits"], expected["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(report["loss"], expected["loss"], rtol=0, atol=1e-5)
    for got, want in zip(report["zero_shot"], expected["zero_shot"], strict=True):
        assert [s["label"] for s in got] == [s["label"] for s in want]
        np.testing.assert_allclose([s["score"] for s in got], [s["score"] for s in want], rtol=0, atol=1e-5)
    assert len(report["region"]) == 3
    for got, want in zip(report["region"], expected["region"], strict=True):
        np.testing.assert_allclose(_by_label(got["image"]), _by_label(want["image"]), rtol=0, atol=1e-5)
        for got_box, want_box in zip(got["regions"], want["regions"], strict=True):
            np.testing.assert_allclose(
                _by_label(got_box["scores"]), _by_label(want_box["scores"]), rtol=0, atol=1e-5
            )
    assert report["eager_towers"] == ["eager", "eager"]
    _assert_same_detections(report["detection"], expected["detection"])
    assert len(report["region_detection"]) == 3 and all(report["region_detection"])
    for got, want in zip(report["region_detection"], expected["region_detection"], strict=True):
        _assert_same_detections(got, want)


def _expected_detections(folder, images, labels):
    """Per image, the detections (at threshold 0) that the image processor's post-processing makes of the
    detector's own forward, with every label as a query, in the image's pixels."""
    model = RegionMedCLIPForZeroShotObjectDetection.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(text=labels, images=images, return_tensors="pt"))
    sizes = [decode_image(image).shape[:2] for image in images]
    found = processor.image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=sizes
    )
    return [
        [
            {
                "score": score,
                "label": labels[label],
                "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)),
            }
            for score, label, box in zip(
                image["scores"].tolist(), image["labels"].tolist(), image["boxes"].int().tolist(), strict=True
            )
        ]
        for image in found
    ]


@pytest.fixture(scope="module")
def region_detector(folder):
    return pipeline(
        "zero-shot-region-detection", model=str(folder), pipeline_class=ZeroShotRegionDetectionPipeline
    )


def test_zero_shot_object_detection_stays_transformers_pipeline_with_the_same_detections(folder, images):
    image = Image.open(images[0][1]).convert("RGB")
    detector = pipeline("zero-shot-object-detection", model=str(folder))
    assert isinstance(detector, ZeroShotObjectDetectionPipeline)
    assert isinstance(detector.model, RegionMedCLIPForZeroShotObjectDetection)
    results = detector(image, candidate_labels=LABELS, threshold=0.0)
    (expected,) = _expected_detections(folder, [image], LABELS)
    assert len({result["label"] for result in results}) == len(LABELS)
    _assert_same_detections(results, expected)
    middle = len(results) // 2
    cut = (results[middle - 1]["score"] + results[middle]["score"]) / 2
    top = detector(image, candidate_labels=LABELS, threshold=cut)
    _assert_same_detections(top, [result for result in expected if result["score"] > cut])
    assert 0 < len(top) < len(results)


def test_region_detection_finds_one_label_list_in_a_list_of_images_and_dicom_paths(
    folder, images, region_detector
):
    dicom, png = images[0]
    inputs = [png, random_image(30, 50, 4), dicom]
    results = region_detector(inputs, candidate_labels=LABELS, threshold=0.0, batch_size=2)
    assert len(results) == len(inputs) and all(results)
    for got, want in zip(results, _expected_detections(folder, inputs, LABELS), strict=True):
        _assert_same_detections(got, want)
    _assert_same_detections(region_detector(png, candidate_labels=LABELS, threshold=0.0), results[0])


def test_region_detection_takes_labels_as_one_string_and_keeps_the_top_k(images, region_detector):
    png = images[0][1]
    every = region_detector(png, candidate_labels=LABELS, threshold=0.0)
    assert region_detector(png, candidate_labels=" , ".join(LABELS) + ",", threshold=0.0) == every
    top = region_detector(png, candidate_labels=LABELS, threshold=0.0, top_k=2)
    assert len(every) > 2 and top == every[:2]
    with pytest.raises(ValueError, match="candidate_labels"):
        region_detector(png, candidate_labels=" , ")


def test_region_detection_encodes_the_labels_once_per_call(images, region_detector):
    towers = region_detector.model.regionmed_clip
    texts, forwards = [], []
    hooks = [
        towers.text_model.register_forward_hook(lambda module, args, output: texts.append(len(output[0]))),
        towers.vision_model.register_forward_hook(
            lambda module, args, output: forwards.append(len(output[0]))
        ),
    ]
    try:
        region_detector([images[0][1]] * 3, candidate_labels=[*LABELS, LABELS[0]], batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert texts == [len(LABELS)]  # one forward of the distinct labels
    # Per batch of images: the detector's forward, then the second stage's region read (a pool-mode model: its
    # boxes are RoIAlign'ed from one more forward of the same images, no crops).
    assert forwards == [2, 2, 1, 1]


def test_region_detection_runs_under_the_zero_shot_object_detection_task_name(
    folder, images, region_detector
):
    named = pipeline(
        "zero-shot-object-detection", model=str(folder), pipeline_class=ZeroShotRegionDetectionPipeline
    )
    png = images[0][1]
    assert named(png, candidate_labels=LABELS) == region_detector(png, candidate_labels=LABELS)


def test_both_detection_pipelines_run_from_the_folder_where_the_package_cannot_be_imported(
    folder, images, tmp_path
):
    dicom, png = images[0]
    code = BLOCK_PACKAGE + (
        "import json\nfrom PIL import Image\nfrom transformers import pipeline\n"
        f"builtin = pipeline('zero-shot-object-detection', model={str(folder)!r}, trust_remote_code=True)\n"
        f"region = pipeline('zero-shot-region-detection', model={str(folder)!r}, trust_remote_code=True)\n"
        f"image = Image.open({png!r}).convert('RGB')\n"
        "print(json.dumps({"
        f"'builtin': builtin(image, candidate_labels={LABELS!r}, threshold=0.0), "
        f"'region': region([{png!r}, {dicom!r}], candidate_labels={', '.join(LABELS)!r}, threshold=0.0, top_k=4)"
        "}))\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": "",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    png_detections, dicom_detections = _expected_detections(folder, [png, dicom], LABELS)
    _assert_same_detections(remote["builtin"], png_detections)
    assert len(remote["region"]) == 2
    for got, want in zip(remote["region"], (png_detections, dicom_detections), strict=True):
        assert len(got) == 4
        _assert_same_detections(got, want[:4])


def _assert_same_detections(got: list[dict], want: list[dict]):
    def key(result):
        return (result["label"], tuple(result["box"].values()))

    assert sorted(map(key, got)) == sorted(map(key, want))
    scores = {key(result): result["score"] for result in want}
    for result in got:
        assert result["score"] == pytest.approx(scores[key(result)], abs=1e-5)


def test_region_pipeline_runs_from_the_folder_where_the_package_cannot_be_imported(folder, images, tmp_path):
    paths, boxes = images
    code = BLOCK_PACKAGE + (
        "import json, sys\nfrom transformers import pipeline\n"
        f"p = pipeline('zero-shot-region-classification', model={str(folder)!r}, trust_remote_code=True)\n"
        f"print(json.dumps(p({paths!r}, boxes={boxes!r}, candidate_labels={LABELS!r}, hypothesis_template={TEMPLATE!r})))\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": "",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    _assert_matches_forward(results, folder, paths, [[tuple(b) for b in image] for image in boxes])


@pytest.mark.skipif(
    not COMPAT_PYTHONS and not IN_CI,
    reason="REGIONMED_COMPAT_PYTHONS is unset: .ci/run builds the pinned transformers environments and sets it",
)
def test_remote_code_on_every_pinned_transformers(folder, images, tmp_path):
    assert COMPAT_PYTHONS, (
        "CI=true but REGIONMED_COMPAT_PYTHONS is unset: .ci/run must build the compat environments"
    )
    inputs = _check_inputs(tmp_path, images)
    expected = _run_check(sys.executable, folder, tmp_path / "main", inputs)
    versions = []
    for index, python in enumerate(COMPAT_PYTHONS):
        report = _run_check(python, folder, tmp_path / f"env{index}", inputs)
        _assert_report_matches(report, expected)
        versions.append(report["transformers"])
    assert len(set(versions)) == len(COMPAT_PYTHONS), versions


@pytest.mark.skipif(
    not TOO_OLD_PYTHON and not IN_CI,
    reason="REGIONMED_TOO_OLD_PYTHON is unset: .ci/run builds a transformers older than the supported range",
)
@pytest.mark.parametrize("loader", ["AutoConfig", "AutoModel", "AutoProcessor", "pipeline"])
def test_remote_code_below_the_supported_range_names_the_minimum_version(folder, tmp_path, loader):
    assert TOO_OLD_PYTHON, (
        "CI=true but REGIONMED_TOO_OLD_PYTHON is unset: .ci/run must build that environment"
    )
    call = (
        f"transformers.pipeline('zero-shot-region-classification', model={str(folder)!r}, trust_remote_code=True)"
        if loader == "pipeline"
        else f"transformers.{loader}.from_pretrained({str(folder)!r}, trust_remote_code=True)"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [TOO_OLD_PYTHON, "-c", f"import transformers\n{call}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    assert "ImportError: RegionMed-CLIP needs transformers>=4.57; found 4.56" in result.stderr, result.stderr[
        -3000:
    ]
