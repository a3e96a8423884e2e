"""Conversion of trained dual encoders (CLIP, SigLIP, VisionTextDualEncoder) into RegionMed-CLIP."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    BertConfig,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
    pipeline,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from regionmed_clip import RegionMedCLIPModel, RegionMedCLIPProcessor
from regionmed_clip.cli import main
from regionmed_clip.convert import UNKNOWN_LICENSE, ConvertConfig, convert, from_dual_encoder_pretrained
from regionmed_clip.data.synth import SynthConfig, synth_example
from regionmed_clip.modeling_regionmed_clip import roi_align

from .conftest import IMAGE_SIZE, PATCH_SIZE
from .test_hub_integration import _run_isolated

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["round nodule", "pleural effusion", "normal chest", "oval cyst in the left lobe"]
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
# The MiniLM tokenizer's special tokens ([PAD] 0, [CLS] 101, [SEP] 102), so that every tower's special ids lie
# in its vocabulary: SigLIP's and OWL-ViT's text configs default to CLIP's 49406 / 49407.
TEXT = {
    **TOWER,
    "vocab_size": 30522,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 101,
    "eos_token_id": 102,
}
VISION = {**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}


def _clip():
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16, logit_scale_init_value=2.3)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPModel(config), processor, "mit"


def _siglip():
    model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    with torch.no_grad():
        model.logit_scale.fill_(2.1)
        model.logit_bias.fill_(-3.5)
    return model, SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), None


def _vtde():
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(**VISION), BertConfig(**TEXT), projection_dim=16
    )
    model = VisionTextDualEncoderModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
    return model, ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), "apache-2.0"


SOURCES = {"clip": _clip, "siglip": _siglip, "vtde": _vtde}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    """Each tiny source saved as a complete folder (weights, image processor, tokenizer, card)."""
    folders = {}
    for name, build in SOURCES.items():
        torch.manual_seed(0)
        model, image_processor, license = build()
        folder = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(folder)
        image_processor.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if license:
            (folder / "README.md").write_text(
                f"---\nlicense: {license}\n---\n# tiny {name}\n", encoding="utf-8"
            )
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    return {
        name: convert(
            ConvertConfig(source=str(folder), out=str(tmp_path_factory.mktemp(f"{name}-converted")))
        )
        for name, folder in sources.items()
    }


def _images() -> list[Image.Image]:
    """MedRegion-synth images, cropped to non-square shapes so resize and center-crop modes differ."""
    config = SynthConfig(out="unused", image_size=120)
    images = [
        Image.open(io.BytesIO(synth_example(config, "train", i)[0]["image"]["bytes"])) for i in range(2)
    ]
    return [images[0].convert("RGB").crop((0, 10, 120, 100)), images[1].convert("RGB").crop((15, 0, 85, 120))]


def _source_inputs(name, folder):
    """Inputs as the source's own processing makes them (SigLIP: padded to 64 tokens, as its pipeline does)."""
    image_processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer_kwargs = {"padding": "max_length", "max_length": 64} if name == "siglip" else {"padding": True}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {
        **tokenizer(LABELS, return_tensors="pt", **tokenizer_kwargs),
        **image_processor(images=_images(), return_tensors="pt"),
    }


def _source_logits(name, folder, inputs):
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        return logits - (model.logit_bias if name == "siglip" else 0.0)


@pytest.mark.parametrize("name", SOURCES)
def test_converted_model_reproduces_the_source_logits(sources, name):
    inputs = _source_inputs(name, sources[name])
    expected = _source_logits(name, sources[name], inputs)
    model = from_dual_encoder_pretrained(str(sources[name])).eval()
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.7], [0.3, 0.3, 0.9, 0.8]]] * len(_images()))
        with_boxes = model(**inputs, roi_boxes=boxes).logits_per_image
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # The fresh ROI processor's gate is 0: boxes do not move the scores until region training opens it.
    torch.testing.assert_close(with_boxes, logits, rtol=0, atol=0)
    source = AutoModel.from_pretrained(sources[name])
    assert model.logit_scale.item() == pytest.approx(source.logit_scale.item(), abs=1e-6)
    assert model.logit_scale.requires_grad
    if name == "siglip":
        assert model.config.loss_objective == "sigmoid"
        assert model.config.logit_bias_init_value == pytest.approx(source.logit_bias.item())
        assert model.config.projection_dim == VISION["hidden_size"]
        torch.testing.assert_close(model.visual_projection.weight, torch.eye(VISION["hidden_size"]))


@pytest.mark.parametrize("name", ["clip", "vtde"])
def test_pooled_and_projected_features_are_the_sources(sources, name):
    """CLIP pools post_layernorm(CLS) and the EOS token, VTDE the towers' poolers: `_pooled` must read the same."""
    inputs = _source_inputs(name, sources[name])
    source = AutoModel.from_pretrained(sources[name]).eval()
    model = from_dual_encoder_pretrained(str(sources[name])).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(inputs["pixel_values"]).pooler_output,
            source.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
        )
        text = {key: inputs[key] for key in ("input_ids", "attention_mask")}
        torch.testing.assert_close(
            model.get_text_features(**text).pooler_output, source.get_text_features(**text).pooler_output
        )


@pytest.mark.parametrize(("name", "prefix"), [("clip", 1), ("siglip", 0)])
def test_patch_features_are_the_patch_tokens_after_the_norm_the_pooled_token_gets(sources, name, prefix):
    """With or without a class token; CLIP returns its tokens before `post_layernorm`, SigLIP after its final norm."""
    model = from_dual_encoder_pretrained(str(sources[name])).eval()
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state
        if name == "clip":
            tokens = model.vision_model.post_layernorm(tokens)
        patches = model.get_patch_features(pixel_values).patch_embeds
        expected = model.visual_projection(tokens[:, prefix:])
    side = IMAGE_SIZE // PATCH_SIZE
    assert patches.shape == (1, side, side, model.config.projection_dim)
    torch.testing.assert_close(patches.flatten(1, 2), expected)


@pytest.mark.parametrize("roi_mode", ["pool", "crop"])
def test_a_converted_clip_pools_the_patch_features_its_heatmaps_show(sources, roi_mode):
    """RoIAlign of `get_patch_features` (what heatmaps and grounding read) over the boxes the model used is the
    model's own `dense_region_embeds`, in both ROI modes; `auto_regions` passed per call leaves the config alone and
    gives what a model saved with it gives."""
    model = from_dual_encoder_pretrained(str(sources["clip"]), roi_mode=roi_mode).eval()
    config = model.config
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        features = model.get_image_features(pixel_values, auto_regions=2)
        patches = model.get_patch_features(pixel_values).patch_embeds.permute(0, 3, 1, 2)
        pooled = roi_align(patches, features.region_boxes, config.roi_align_size, config.roi_sampling_ratio)
    assert features.region_boxes.shape == (2, 2, 4)
    torch.testing.assert_close(pooled, features.dense_region_embeds)
    assert config.auto_regions == 0

    saved_with_regions = RegionMedCLIPModel(
        config.__class__(**{**config.to_dict(), "auto_regions": 2})
    ).eval()
    saved_with_regions.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            saved_with_regions.get_image_features(pixel_values).pooler_output, features.pooler_output
        )
        assert model.get_image_features(pixel_values).region_boxes is None


def test_loading_kwargs_reach_the_source_and_the_new_layers_follow_its_dtype(sources):
    model = from_dual_encoder_pretrained(
        str(sources["siglip"]), dtype=torch.bfloat16, attn_implementation="eager", max_regions=4
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.vision_config._attn_implementation == "eager" and model.config.max_regions == 4
    inputs = _source_inputs("siglip", sources["siglip"])
    with torch.no_grad():
        logits = model(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}).logits_per_image
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_siglip_text_is_padded_to_its_trained_length_inside_the_model(sources):
    """The pipeline pads per batch; SigLIP's text tower reads position 63, so the model pads to 64 itself."""
    inputs = _source_inputs("siglip", sources["siglip"])
    expected = _source_logits("siglip", sources["siglip"], inputs)
    model = from_dual_encoder_pretrained(str(sources["siglip"])).eval()
    short = AutoTokenizer.from_pretrained(sources["siglip"])(LABELS, padding=True, return_tensors="pt")
    assert short["input_ids"].shape[1] < 64
    with torch.no_grad():
        logits = model(**short, pixel_values=inputs["pixel_values"]).logits_per_image
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SOURCES)
def test_converted_processor_gives_the_source_pixel_values(sources, converted, name):
    expected = AutoImageProcessor.from_pretrained(sources[name])(images=_images(), return_tensors="pt")
    processor = AutoProcessor.from_pretrained(converted[name])
    assert isinstance(processor, RegionMedCLIPProcessor)
    pixel_values = processor(images=_images(), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == expected["pixel_values"].shape
    # The source resizes 8-bit images with PIL and rounds to 8 bits; this processor resizes in float. In 8-bit
    # levels the two differ by about a quarter level on average and never by more than one (measured: max 0.93).
    std = torch.tensor(AutoImageProcessor.from_pretrained(sources[name]).image_std).view(1, -1, 1, 1)
    levels = (pixel_values - expected["pixel_values"]).abs() * std * 255
    assert levels.mean() < 0.5, levels.mean()
    assert levels.max() < 1.5, levels.max()


def test_clip_center_crop_maps_boxes_into_the_crop(converted):
    processor = AutoProcessor.from_pretrained(converted["clip"])
    image = Image.new("RGB", (120, 60))
    # The 120x60 image is resized to 64x32 and the center 32x32 (x 16..48 of 64, i.e. 30..90 px) is kept.
    inputs = processor(images=image, boxes=[[(30, 0, 60, 30), (0, 0, 60, 60)]], return_tensors="np")
    np.testing.assert_allclose(inputs["roi_boxes"][0, :2], [[0, 0, 0.5, 0.5], [0, 0, 0.5, 1]], atol=1e-6)
    with pytest.raises(ValueError, match="outside the center crop"):
        processor(images=image, boxes=[[(0, 0, 20, 20)]])
    # In crop mode a box's crop is resized whole, not center-cropped again (that would cut the region).
    photo = _images()[0]
    crops = processor(images=photo, boxes=[[(10, 5, 90, 45)]], roi_mode="crop", return_tensors="np")
    whole = processor.image_processor(photo.crop((10, 5, 90, 45)), shortest_edge=None, return_tensors="np")
    np.testing.assert_allclose(crops["roi_pixel_values"][0, 0], whole["pixel_values"][0], atol=1e-6)


def test_converted_tokenizer_and_padding_are_the_sources(sources, converted, tokenizer):
    siglip = AutoProcessor.from_pretrained(converted["siglip"])
    clip = AutoProcessor.from_pretrained(converted["clip"])
    assert siglip(text=LABELS)["input_ids"].shape[1] == 64
    assert clip(text=LABELS)["input_ids"].shape[1] < 64
    # No paper normalizer: punctuation is kept, as the source tokenizer keeps it.
    expected = tokenizer(["Effusion, left."])["input_ids"]
    assert clip(text=["Effusion, left."])["input_ids"].tolist() == expected


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_cli_convert_and_the_pipeline_ranks_labels_as_the_source(sources, tmp_path, capsys, name):
    out = tmp_path / "converted"
    assert main(["convert", "--from", str(sources[name]), "--out", str(out), "--max-regions", "4"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["max_regions"] == 4
    assert {"README.md", "model.safetensors", "modeling_regionmed_clip.py", "processor_config.json"} <= {
        path.name for path in out.iterdir()
    }
    image = _images()[0]
    expected = pipeline("zero-shot-image-classification", model=str(sources[name]))(
        image, candidate_labels=LABELS
    )
    scores = pipeline("zero-shot-image-classification", model=str(out))(image, candidate_labels=LABELS)
    assert [s["label"] for s in scores] == [s["label"] for s in expected]


def test_vtde_zero_shot_pipeline_ranks_labels_as_the_source_model(sources, converted):
    """transformers has no zero-shot pipeline for VisionTextDualEncoderModel; the source's own scores stand in."""
    image = _images()[0]
    inputs = _source_inputs("vtde", sources["vtde"])
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    prompts = [f"This is a photo of {label}." for label in LABELS]
    inputs.update(AutoTokenizer.from_pretrained(sources["vtde"])(prompts, padding=True, return_tensors="pt"))
    expected = _source_logits("vtde", sources["vtde"], inputs)[0]
    scores = pipeline("zero-shot-image-classification", model=str(converted["vtde"]))(
        image, candidate_labels=LABELS
    )
    assert [s["label"] for s in scores] == [LABELS[i] for i in expected.argsort(descending=True)]


def test_a_dual_encoder_holding_bare_transformers_converts(tmp_path):
    """transformers 4.x keeps CLIP's and SigLIP's towers as bare transformers (`CLIPVisionTransformer`) inside the
    dual encoder; OWL-ViT's dual encoder still does in 5.x, so it stands in for that layout here."""
    from transformers import OwlViTConfig, OwlViTModel

    torch.manual_seed(0)
    source = OwlViTModel(
        OwlViTConfig(
            text_config={**TEXT, "max_position_embeddings": 16}, vision_config=VISION, projection_dim=16
        )
    ).eval()
    assert type(source.vision_model).__name__ == "OwlViTVisionTransformer"
    source.save_pretrained(tmp_path)
    source = OwlViTModel.from_pretrained(tmp_path).eval()
    model = from_dual_encoder_pretrained(str(tmp_path)).eval()
    assert type(model.vision_model).__name__ == "OwlViTVisionModel"
    inputs = {
        "input_ids": torch.randint(1000, 2000, (3, 16)),
        "attention_mask": torch.ones(3, 16, dtype=torch.long),
        "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),
    }
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits_per_image, source(**inputs).logits_per_image, rtol=0, atol=1e-5
        )
    model.save_pretrained(tmp_path / "converted")
    reloaded = RegionMedCLIPModel.from_pretrained(tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**inputs).logits_per_image, source(**inputs).logits_per_image, rtol=0, atol=1e-5
        )


def test_model_card_names_the_source_and_its_license(sources, converted):
    clip_card = (converted["clip"] / "README.md").read_text(encoding="utf-8")
    assert str(sources["clip"]) in clip_card and "license: mit" in clip_card and "CLIPModel" in clip_card
    siglip_card = (converted["siglip"] / "README.md").read_text(encoding="utf-8")
    assert UNKNOWN_LICENSE in siglip_card and "license: other" in siglip_card


def test_unsupported_checkpoints_are_rejected_with_a_clear_error(tmp_path):
    from transformers import BertModel

    BertModel(BertConfig(**TEXT)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="reads CLIPModel, SiglipModel and VisionTextDualEncoderModel"):
        from_dual_encoder_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_converted_folder_loads_with_remote_code_without_the_package(sources, converted, tmp_path, name):
    inputs = _source_inputs(name, sources[name])
    expected = _source_logits(name, sources[name], inputs)
    np.save(tmp_path / "pixel_values.npy", inputs["pixel_values"].numpy())
    code = f"""
        import json, numpy as np, torch
        from transformers import AutoModel, AutoProcessor
        try:
            import regionmed_clip
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        folder = {str(converted[name])!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(text={LABELS!r}, return_tensors="pt")
        pixel_values = torch.from_numpy(np.load({str(tmp_path / "pixel_values.npy")!r}))
        with torch.no_grad():
            logits = model(**inputs, pixel_values=pixel_values).logits_per_image
        print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist()}}))
    """
    result = _run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    np.testing.assert_allclose(report["logits"], expected.numpy(), rtol=0, atol=1e-5)


def test_medsiglip_recipe_runs_its_stages_on_a_tiny_siglip(sources, synth_folder, tmp_path):
    """configs/medsiglip-region.yaml as shipped, but for the model path, the data, the step counts and the
    machine (no tracker, no worker processes on a small CPU)."""
    import yaml
    from safetensors.torch import load_file

    from regionmed_clip.training import Trainer, load_config

    recipe = yaml.safe_load((ROOT / "configs" / "medsiglip-region.yaml").read_text(encoding="utf-8"))
    assert recipe["model"]["from_dual_encoder"] == "google/medsiglip-448"
    recipe["model"]["from_dual_encoder"] = str(sources["siglip"])
    # The machine: bf16 where torch computes it natively here (the recipe's bf16 is a GPU setting).
    recipe.update(output_dir=str(tmp_path / "run"), report_to="none", log_every=1, mixed_precision="auto")
    recipe["data"].update(path=str(synth_folder), num_workers=0)
    for stage in recipe["stages"]:
        stage.pop("epochs")
        stage.update(steps=2, batch_size=4)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    config = load_config(tmp_path / "recipe.yaml")
    assert config.gradient_checkpointing and config.lora.target_modules == "auto"

    folder = Trainer(config).train()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["stage"] for record in records] == [0, 0, 1, 1]
    assert all(np.isfinite(record["loss/total"]) and record["loss/roi_loss"] > 0 for record in records)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    # LoRA's B starts at 0: under gradient checkpointing every adapter of both towers still trained. Adam's first
    # step of a stage moves every element with a real gradient by the learning rate, where a gradient of round-off
    # size (far below Adam's eps) moves it by a small fraction of it.
    step_size = max(record["lr"] for record in records) / 2
    assert lora_b and all(float(tensor.abs().max()) >= step_size for tensor in lora_b)
    model = RegionMedCLIPModel.from_pretrained(folder)
    assert model.config.loss_objective == "sigmoid" and model.config.roi_mode == "pool"
    assert model.roi_processor.gate.item() != 0.0


def test_the_region_pipeline_gives_a_converted_siglip_the_scores_transformers_gives_the_source(
    sources, converted
):
    """A sigmoid model's scores are each label's sigmoid(logit + bias), equal to transformers' zero-shot pipeline
    on the SigLIP source (which pads every prompt to SigLIP's fixed length); transformers' pipeline on the converted
    folder applies a softmax (it keys the sigmoid on the model type) and so only ranks the labels alike."""
    # At the input size neither processor resizes (the source's resizes 8-bit data, this one floats), so both
    # models see the same pixels.
    image = _images()[0].resize((IMAGE_SIZE, IMAGE_SIZE))
    template = "This is a photo of {}."
    expected = pipeline("zero-shot-image-classification", model=str(sources["siglip"]))(
        image, candidate_labels=LABELS, hypothesis_template=template
    )
    region = pipeline(
        "zero-shot-region-classification", model=str(converted["siglip"]), trust_remote_code=True
    )
    scores = region(image, candidate_labels=LABELS, hypothesis_template=template)["image"]
    assert [s["label"] for s in scores] == [s["label"] for s in expected]
    for ours, source in zip(scores, expected, strict=True):
        assert ours["score"] == pytest.approx(source["score"], abs=1e-6)
    assert sum(s["score"] for s in scores) != pytest.approx(1.0)  # per-label sigmoids, not a softmax
    standard = pipeline("zero-shot-image-classification", model=str(converted["siglip"]))(
        image, candidate_labels=LABELS, hypothesis_template=template
    )
    assert sum(s["score"] for s in standard) == pytest.approx(1.0)


def test_the_region_pipeline_encodes_each_distinct_label_once_per_call(converted):
    region = pipeline("zero-shot-region-classification", model=str(converted["clip"]), trust_remote_code=True)
    texts = []
    region.model.text_model.register_forward_hook(
        lambda module, args, kwargs, output: texts.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    images = _images() * 3
    labels = [*LABELS, LABELS[0]]
    results = region(images, candidate_labels=labels, batch_size=2)
    assert texts == [
        len(LABELS)
    ]  # one text forward for 6 images in 3 batches, the repeated label encoded once
    assert len(results) == 6 and all(len(result["image"]) == len(labels) for result in results)
    one_by_one = [region(image, candidate_labels=labels)["image"] for image in images]
    for result, alone in zip(results, one_by_one, strict=True):
        assert [s["score"] for s in result["image"]] == pytest.approx([s["score"] for s in alone], abs=1e-6)


class LargestTensor(TorchDispatchMode):
    """The most elements any op of the block produced."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                self.elements = max(self.elements, tensor.numel())
        return output


def test_siglips_pooling_head_projects_its_keys_in_one_product_when_its_weights_are_frozen(converted):
    """LoRA freezes the attention-pool head's weights. With frozen weights, torch's matmul does not flatten the
    head's transposed batch-first keys and multiplies them per key position against an expanded weight copy
    (positions × width × 2·width elements: 5 GB for SigLIP so400m at 448 px); the model lays the keys out so that
    they flatten. The head's output is unchanged: the tests above that match the converted SigLIP's logits to the
    source's run through it."""
    model = RegionMedCLIPModel.from_pretrained(converted["siglip"]).train()
    heads = [
        module for module in model.vision_model.modules() if isinstance(module, torch.nn.MultiheadAttention)
    ]
    assert len(heads) == 1
    for parameter in heads[0].parameters():
        parameter.requires_grad_(False)
    width = model.config.vision_config.hidden_size
    positions = (IMAGE_SIZE // PATCH_SIZE) ** 2
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with LargestTensor() as largest:
        features = model.get_image_features(pixels).pooler_output
        features.sum().backward()
    assert largest.elements < positions * width * 2 * width
