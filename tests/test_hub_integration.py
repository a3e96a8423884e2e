"""Hub-native loading: Auto classes, remote code in a process that cannot import the package, and the pipeline."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    pipeline,
)

from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel, RegionMedCLIPProcessor

from .conftest import make_processor, random_image, tiny_model

LABELS = ["round nodule", "normal chest", "oval cyst"]
MODEL_FILES = {
    "configuration_regionmed_clip.py",
    "modeling_regionmed_clip.py",
    "image_processing_regionmed_clip.py",
    "processing_regionmed_clip.py",
}

BLOCK_PACKAGE = """
import sys

class _BlockRegionMedCLIP:
    def find_spec(self, name, path=None, target=None):
        if name == "regionmed_clip" or name.startswith("regionmed_clip."):
            raise ImportError("regionmed_clip is blocked in this process")

sys.meta_path.insert(0, _BlockRegionMedCLIP())
"""


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("regionmed-clip-tiny")
    model = tiny_model("crop")
    model.save_pretrained(folder)
    make_processor(tokenizer, "crop").save_pretrained(folder)
    return folder


def _images():
    return [random_image(48, 40, 11), random_image(36, 52, 12, mode="L")]


def _images_as_arrays():
    return [np.asarray(image).tolist() for image in _images()]


def _region_inputs():
    return {"boxes": [[(3, 4, 30, 33)], [(0, 5, 20, 40), (10, 10, 35, 50)]]}


def test_saved_folder_holds_remote_code_auto_map_and_safetensors_only(saved_folder):
    names = set(os.listdir(saved_folder))
    assert names >= MODEL_FILES
    assert "model.safetensors" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_regionmed_clip.RegionMedCLIPConfig",
        "AutoModel": "modeling_regionmed_clip.RegionMedCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_regionmed_clip.RegionMedCLIPModel",
        "AutoModelForZeroShotObjectDetection": "modeling_regionmed_clip.RegionMedCLIPForZeroShotObjectDetection",
    }
    processor_config = json.loads((saved_folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_regionmed_clip.RegionMedCLIPProcessor"
    image_auto_map = processor_config["image_processor"]["auto_map"]
    assert (
        image_auto_map["AutoImageProcessor"] == "image_processing_regionmed_clip.RegionMedCLIPImageProcessor"
    )


def test_loading_never_unpickles(saved_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = AutoModel.from_pretrained(saved_folder)
    processor = AutoProcessor.from_pretrained(saved_folder)
    assert isinstance(model, RegionMedCLIPModel) and isinstance(processor, RegionMedCLIPProcessor)


def test_auto_classes_load_the_local_classes_when_the_package_is_imported(saved_folder):
    assert type(AutoConfig.from_pretrained(saved_folder)) is RegionMedCLIPConfig
    assert type(AutoModel.from_pretrained(saved_folder)) is RegionMedCLIPModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(saved_folder)) is RegionMedCLIPModel
    assert type(AutoProcessor.from_pretrained(saved_folder)) is RegionMedCLIPProcessor


def _in_process_results(folder):
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=LABELS, images=_images(), return_tensors="pt", **_region_inputs())
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    scores = classifier(_images()[0], candidate_labels=LABELS, hypothesis_template="{}")
    return logits, scores


def _run_isolated(code: str, tmp_path, stdin=None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=stdin,
    )


def test_remote_code_loads_without_the_package_and_matches_in_process(saved_folder, tmp_path):
    expected_logits, expected_scores = _in_process_results(saved_folder)
    code = f"""
        import json, numpy as np, torch
        from PIL import Image
        from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline
        try:
            import regionmed_clip
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        folder = {str(saved_folder)!r}
        images = [Image.fromarray(np.array(a, dtype=np.uint8)) for a in json.loads({json.dumps(_images_as_arrays())!r})]
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(text={LABELS!r}, images=images, return_tensors="pt", **{_region_inputs()!r})
        with torch.no_grad():
            logits = model(**inputs).logits_per_image
        classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        scores = classifier(images[0], candidate_labels={LABELS!r}, hypothesis_template="{{}}")
        print(json.dumps({{
            "classes": [type(config).__module__, type(model).__module__, type(processor).__module__],
            "logits": logits.tolist(),
            "scores": scores,
        }}))
    """
    result = _run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in report["classes"]), report["classes"]
    np.testing.assert_allclose(report["logits"], expected_logits.numpy(), rtol=0, atol=1e-5)
    assert [s["label"] for s in report["scores"]] == [s["label"] for s in expected_scores]
    np.testing.assert_allclose(
        [s["score"] for s in report["scores"]], [s["score"] for s in expected_scores], rtol=0, atol=1e-6
    )


def test_remote_code_without_trust_fails_fast_with_a_clear_message(saved_folder, tmp_path):
    code = f"""
        from transformers import AutoModel
        AutoModel.from_pretrained({str(saved_folder)!r})
    """
    result = _run_isolated(code, tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "trust_remote_code=True" in result.stderr


def test_pipeline_with_a_custom_template_and_batched_calls_equal_single_calls(saved_folder):
    classifier = pipeline("zero-shot-image-classification", model=str(saved_folder))
    template = "chest radiograph showing {}"
    images = _images()
    batched = classifier(images, candidate_labels=LABELS, hypothesis_template=template)
    singles = [classifier(image, candidate_labels=LABELS, hypothesis_template=template) for image in images]
    assert len(batched) == 2
    for batch_scores, single_scores in zip(batched, singles, strict=True):
        assert {s["label"] for s in batch_scores} == set(LABELS)
        assert sum(s["score"] for s in batch_scores) == pytest.approx(1.0, abs=1e-5)
        by_label = {s["label"]: s["score"] for s in single_scores}
        for score in batch_scores:
            assert score["score"] == pytest.approx(by_label[score["label"]], abs=1e-6)
    default = classifier(images[0], candidate_labels=LABELS)
    assert [s["score"] for s in default] != [s["score"] for s in batched[0]]


def test_pipeline_scores_equal_the_models_own_softmax(saved_folder):
    model = AutoModel.from_pretrained(saved_folder).eval()
    processor = AutoProcessor.from_pretrained(saved_folder)
    image = _images()[1]
    texts = [f"a scan of {label}" for label in LABELS]
    inputs = processor(text=texts, images=image, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits_per_image.softmax(-1)[0]
    classifier = pipeline("zero-shot-image-classification", model=str(saved_folder))
    scores = classifier(image, candidate_labels=LABELS, hypothesis_template="a scan of {}")
    by_label = {s["label"]: s["score"] for s in scores}
    np.testing.assert_allclose([by_label[label] for label in LABELS], probabilities.numpy(), atol=1e-6)


def test_forward_accepts_the_token_type_ids_the_pipeline_passes(saved_folder):
    model = AutoModel.from_pretrained(saved_folder).eval()
    processor = AutoProcessor.from_pretrained(saved_folder)
    text = processor.tokenizer(LABELS, padding=True, return_tensors="pt")
    assert "token_type_ids" in text
    pixels = processor.image_processor(_images()[:1], return_tensors="pt")
    with torch.no_grad():
        with_types = model(**text, **pixels).logits_per_image
        without = model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], **pixels
        ).logits_per_image
    torch.testing.assert_close(with_types, without)
