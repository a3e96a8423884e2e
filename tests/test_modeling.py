"""Model tester with tiny configs (hidden 32, 2 layers, 32 px images, 8 px patches)."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertModel, CLIPVisionConfig, CLIPVisionModel, ViTModel

import regionmed_clip.modeling_regionmed_clip as modeling
from regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPForZeroShotObjectDetection,
    RegionMedCLIPModel,
    RegionMedCLIPOutput,
)
from regionmed_clip.convert import from_vision_text_pretrained

from .conftest import (
    IMAGE_SIZE,
    make_processor,
    tiny_clip_vision_config,
    tiny_config,
    tiny_model,
    tiny_text_config,
    tiny_vision_config,
)

MODES = ("pool", "crop")


def model_inputs(tokenizer, batch, roi_mode, with_rois=True):
    """The model's inputs: reports and images, with the boxes unless `with_rois` is False (region captions and
    negatives are inputs of the pretraining objective, tested in test_losses.py)."""
    processor = make_processor(tokenizer, roi_mode)
    kwargs = {"text": batch["text"], "images": batch["images"], "return_tensors": "pt"}
    if with_rois:
        kwargs["boxes"] = batch["boxes"]
    return processor(**kwargs)


@pytest.mark.parametrize("roi_mode", MODES)
def test_output_shapes_with_rois(tokenizer, sample_batch, roi_mode):
    model = tiny_model(roi_mode)
    inputs = model_inputs(tokenizer, sample_batch, roi_mode)
    outputs = model(**inputs, return_loss=True)
    assert isinstance(outputs, RegionMedCLIPOutput)
    assert outputs.logits_per_image.shape == (2, 2)
    assert outputs.logits_per_text.shape == (2, 2)
    assert (
        outputs.text_embeds.shape
        == outputs.image_embeds.shape
        == outputs.global_image_embeds.shape
        == (2, 16)
    )
    assert outputs.region_embeds.shape == (2, 3, 16)
    assert outputs.region_mask.tolist() == [[True, False, False], [True, True, False]]
    # As CLIPModel's: the image–text contrastive loss of the logits, here of the region-aware image embeddings.
    torch.testing.assert_close(outputs.loss, modeling.contrastive_loss(outputs.logits_per_image))
    assert outputs.vision_model_output.last_hidden_state.shape == (2, 1 + (IMAGE_SIZE // 8) ** 2, 32)
    assert outputs.text_model_output.last_hidden_state.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(outputs.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(outputs.region_embeds[outputs.region_mask].norm(dim=-1), torch.ones(3))
    assert outputs.region_embeds[~outputs.region_mask].abs().sum() == 0
    assert not torch.allclose(outputs.image_embeds, outputs.global_image_embeds)
    outputs.loss.backward()
    # The loss reads the region-aware embedding, so the ROI processor trains: its gradients are a sizeable share of
    # the visual projection's in the same backward (measured: 0.6 to 0.7 of it for q_proj, 0.001 to 0.02 for the
    # gate), far above float32 round-off (about 1e-7 of it).
    reference = model.visual_projection.weight.grad.norm()
    assert model.roi_processor.attention.q_proj.weight.grad.norm() > 1e-2 * reference
    assert model.roi_processor.gate.grad.abs() > 1e-5 * reference


@pytest.mark.parametrize("roi_mode", MODES)
def test_without_rois_the_model_is_a_clip(tokenizer, sample_batch, roi_mode):
    model = tiny_model(roi_mode)
    outputs = model(**model_inputs(tokenizer, sample_batch, roi_mode, with_rois=False), return_loss=True)
    assert outputs.region_embeds is None and outputs.region_mask is None
    torch.testing.assert_close(outputs.loss, modeling.contrastive_loss(outputs.logits_per_image))
    torch.testing.assert_close(outputs.image_embeds, outputs.global_image_embeds)
    expected = model.logit_scale.exp() * outputs.image_embeds @ outputs.text_embeds.t()
    torch.testing.assert_close(outputs.logits_per_image, expected)


def test_zero_gate_keeps_the_global_embedding(tokenizer, sample_batch):
    model = tiny_model("pool")
    with torch.no_grad():
        model.roi_processor.gate.zero_()
    outputs = model(**model_inputs(tokenizer, sample_batch, "pool"))
    torch.testing.assert_close(outputs.image_embeds, outputs.global_image_embeds)


@pytest.mark.parametrize("roi_mode", MODES)
def test_padded_roi_slots_change_nothing(tokenizer, sample_batch, roi_mode):
    model = tiny_model(roi_mode)
    inputs = model_inputs(tokenizer, sample_batch, roi_mode)
    reference = model(**inputs, return_loss=True)

    padded = dict(inputs)
    generator = torch.Generator().manual_seed(0)
    empty = ~inputs["roi_mask"].bool()
    boxes = inputs["roi_boxes"].clone()
    boxes[empty] = torch.tensor([0.2, 0.3, 0.9, 0.8])
    padded["roi_boxes"] = boxes
    if roi_mode == "crop":
        crops = inputs["roi_pixel_values"].clone()
        crops[empty] = torch.randn(crops[empty].shape, generator=generator)
        padded["roi_pixel_values"] = crops
    outputs = model(**padded, return_loss=True)

    torch.testing.assert_close(outputs.region_embeds, reference.region_embeds)
    torch.testing.assert_close(outputs.image_embeds, reference.image_embeds)
    torch.testing.assert_close(outputs.loss, reference.loss)


def test_flat_crops_give_what_padded_crops_give(tokenizer, sample_batch):
    model = tiny_model("crop")
    inputs = model_inputs(tokenizer, sample_batch, "crop")
    mask = inputs["roi_mask"].bool()
    assert not mask.all(), "the batch needs padded slots for the layouts to differ"
    flat = {**inputs, "roi_pixel_values": inputs["roi_pixel_values"][mask]}
    with torch.no_grad():
        padded_outputs, flat_outputs = model(**inputs, return_loss=True), model(**flat, return_loss=True)
    for field in ("region_embeds", "image_embeds", "loss"):
        torch.testing.assert_close(getattr(flat_outputs, field), getattr(padded_outputs, field))
    short = {**inputs, "roi_pixel_values": inputs["roi_pixel_values"][mask][1:]}
    with pytest.raises(ValueError, match=f"holds {int(mask.sum()) - 1} flat crops but roi_mask marks"):
        model(**short)


@pytest.mark.parametrize("roi_mode", MODES)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, tokenizer, sample_batch, roi_mode):
    model = tiny_model(roi_mode)
    inputs = model_inputs(tokenizer, sample_batch, roi_mode)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is RegionMedCLIPModel
    with torch.no_grad():
        before, after = model(**inputs, return_loss=True), reloaded(**inputs, return_loss=True)
    for field in ("logits_per_image", "image_embeds", "region_embeds", "loss"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field), rtol=0, atol=0)


@pytest.mark.parametrize("learnable", [False, True])
def test_tensors_missing_from_a_checkpoint_are_initialised_not_garbage(tmp_path, learnable):
    model = tiny_model("pool", learnable_temperature=learnable, temperature=0.05)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [key for key in weights if key == "logit_scale" or key.startswith("roi_processor.")]
    assert "logit_scale" in dropped and "roi_processor.gate" in dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors")
    for _ in range(3):
        reloaded = RegionMedCLIPModel.from_pretrained(tmp_path)
        assert reloaded.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.05)).item())
        assert reloaded.roi_processor.gate.item() == 0.0
        for name, tensor in reloaded.roi_processor.state_dict().items():
            assert torch.isfinite(tensor).all(), name
            assert tensor.abs().max() < 10, name


def test_fixed_temperature_is_a_buffer_and_learnable_one_a_parameter():
    fixed = tiny_model("pool")
    assert "logit_scale" not in dict(fixed.named_parameters())
    assert "logit_scale" in dict(fixed.named_buffers())
    for parameter in fixed.parameters():
        parameter.requires_grad_(True)
    assert not fixed.logit_scale.requires_grad
    learnable = tiny_model("pool", learnable_temperature=True)
    assert dict(learnable.named_parameters())["logit_scale"].requires_grad


@pytest.mark.parametrize("roi_mode", MODES)
def test_outputs_are_deterministic_and_batch_size_independent(tokenizer, sample_batch, roi_mode):
    model = tiny_model(roi_mode)
    inputs = model_inputs(tokenizer, sample_batch, roi_mode)
    with torch.no_grad():
        first, second = model(**inputs), model(**inputs)
        torch.testing.assert_close(first.image_embeds, second.image_embeds, rtol=0, atol=0)
        for index in range(2):
            single = {key: value[index : index + 1] for key, value in inputs.items()}
            alone = model(**single)
            for field in ("image_embeds", "text_embeds", "global_image_embeds"):
                cosine = torch.nn.functional.cosine_similarity(
                    getattr(alone, field)[0], getattr(first, field)[index], 0
                )
                assert cosine > 0.9999, field
            real = first.region_mask[index]
            cosines = torch.nn.functional.cosine_similarity(
                alone.region_embeds[0][real], first.region_embeds[index][real]
            )
            assert (cosines > 0.9999).all()


def test_crop_mode_encodes_all_real_crops_in_one_batched_forward(tokenizer, sample_batch):
    model = tiny_model("crop")
    batch_sizes = []
    model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: batch_sizes.append(kwargs["pixel_values"].shape[0]),
        with_kwargs=True,
    )
    model(**model_inputs(tokenizer, sample_batch, "crop"))
    assert batch_sizes == [2, 3]  # the two whole images, then the three real crops (padded slots skipped)


def test_feature_getters_agree_with_forward(tokenizer, sample_batch):
    model = tiny_model("pool")
    inputs = model_inputs(tokenizer, sample_batch, "pool")
    outputs = model(**inputs)
    text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = model.get_image_features(inputs["pixel_values"], inputs["roi_boxes"], inputs["roi_mask"])
    regions = model.get_region_features(inputs["pixel_values"], inputs["roi_boxes"], inputs["roi_mask"])
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(normalize(text.pooler_output, dim=-1), outputs.text_embeds)
    torch.testing.assert_close(normalize(image.pooler_output, dim=-1), outputs.image_embeds)
    torch.testing.assert_close(normalize(image.global_embeds, dim=-1), outputs.global_image_embeds)
    torch.testing.assert_close(
        normalize(regions, dim=-1) * outputs.region_mask[..., None], outputs.region_embeds
    )
    plain = model.get_image_features(inputs["pixel_values"])
    torch.testing.assert_close(normalize(plain.pooler_output, dim=-1), outputs.global_image_embeds)


def test_tuple_output(tokenizer, sample_batch):
    model = tiny_model("pool")
    inputs = model_inputs(tokenizer, sample_batch, "pool")
    as_tuple = model(**inputs, return_dict=False)
    torch.testing.assert_close(as_tuple[0], model(**inputs).logits_per_image)


@pytest.mark.parametrize(
    ("roi_mode", "change", "message"),
    [
        ("crop", lambda inputs: inputs.pop("roi_pixel_values"), "needs roi_pixel_values"),
        (
            "pool",
            lambda inputs: inputs.update(roi_pixel_values=torch.zeros(2, 3, 3, 32, 32)),
            "roi_mode='pool'",
        ),
        (
            "pool",
            lambda inputs: inputs.update(input_ids=inputs["input_ids"][:1], attention_mask=None),
            "pairs image i with text i",
        ),
        ("pool", lambda inputs: inputs.pop("roi_boxes"), "without roi_boxes"),
        ("pool", lambda inputs: inputs.update(roi_boxes=torch.zeros(2, 4)), "roi_boxes must be"),
        (
            "pool",
            lambda inputs: [inputs.pop(k) for k in list(inputs) if k not in ("pixel_values",)],
            "pairs image i with text i",
        ),
    ],
)
def test_bad_model_inputs_raise_clear_errors(tokenizer, sample_batch, roi_mode, change, message):
    model = tiny_model(roi_mode)
    inputs = dict(model_inputs(tokenizer, sample_batch, roi_mode))
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs, return_loss=True)


def test_state_dict_compatible_with_vision_text_dual_encoder_and_equal_logits(tokenizer, sample_batch):
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    ours = tiny_model("pool")
    peer_config = VisionTextDualEncoderConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(), projection_dim=16
    )
    peer = VisionTextDualEncoderModel(peer_config).eval()
    region_branch = ("roi_processor.", "region_proposer.")
    missing, unexpected = peer.load_state_dict(ours.state_dict(), strict=False)
    assert missing == [] and all(key.startswith(region_branch) for key in unexpected)
    missing, unexpected = ours.load_state_dict(peer.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith(region_branch) for key in missing)

    inputs = model_inputs(tokenizer, sample_batch, "pool", with_rois=False)
    with torch.no_grad():
        expected = peer(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
        ).logits_per_image
        actual = ours(**inputs).logits_per_image
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_from_vision_text_pretrained_loads_both_towers_from_local_folders(tmp_path):
    from transformers import BertConfig, ViTConfig

    vit = ViTModel(ViTConfig(**{k: v for k, v in tiny_vision_config().items() if k != "model_type"}))
    bert = BertModel(BertConfig(**{k: v for k, v in tiny_text_config().items() if k != "model_type"}))
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    model = from_vision_text_pretrained(
        str(tmp_path / "vit"),
        str(tmp_path / "bert"),
        projection_dim=16,
        roi_num_heads=4,
        roi_mode="crop",
        text_attn_implementation="eager",
    )
    assert model.config.projection_dim == 16 and model.config.roi_mode == "crop"
    assert model.config.text_config._attn_implementation == "eager"
    for ours, theirs in ((model.vision_model, vit), (model.text_model, bert)):
        for name, tensor in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.roi_processor.gate.item() == 0.0
    assert model.logit_scale.item() == pytest.approx(model.config.logit_scale_init_value)


def test_other_vision_towers_work_in_both_modes(tokenizer, sample_batch):
    clip_vision = tiny_clip_vision_config()
    for roi_mode in MODES:
        model = tiny_model(roi_mode, vision_config=clip_vision)
        assert isinstance(model.vision_model, CLIPVisionModel)
        assert isinstance(model.config.vision_config, CLIPVisionConfig)
        outputs = model(**model_inputs(tokenizer, sample_batch, roi_mode), return_loss=True)
        assert outputs.region_embeds.shape == (2, 3, 16) and torch.isfinite(outputs.loss)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, sample_batch):
    inputs = model_inputs(tokenizer, sample_batch, "crop")
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("crop").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs, return_loss=True).loss.backward()
        grads.append(model.text_projection.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_modeling_code_has_no_device_dtype_or_distributed_assumptions():
    source = inspect.getsource(modeling)
    for forbidden in ("torch.distributed", "cuda", "float16", "bfloat16", "import accelerate"):
        assert forbidden not in source, forbidden


def test_config_class_and_auto_mapping():
    assert RegionMedCLIPModel.config_class is RegionMedCLIPConfig
    config = tiny_config()
    assert type(AutoModel.from_config(config)) is RegionMedCLIPModel


def test_a_full_clip_checkpoint_contributes_its_vision_tower(tmp_path):
    from transformers import BertConfig, CLIPConfig, CLIPModel

    clip_config = CLIPConfig(
        vision_config={k: v for k, v in tiny_clip_vision_config().items() if k != "model_type"},
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    clip = CLIPModel(clip_config)
    clip.save_pretrained(tmp_path / "clip")
    BertModel(
        BertConfig(**{k: v for k, v in tiny_text_config().items() if k != "model_type"})
    ).save_pretrained(tmp_path / "bert")
    model = from_vision_text_pretrained(
        str(tmp_path / "clip"), str(tmp_path / "bert"), projection_dim=16, roi_num_heads=4
    )
    assert isinstance(model.vision_model, CLIPVisionModel)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixels).pooler_output
        actual = clip.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_attention_implementation_and_dtype_reach_both_towers(tmp_path, tokenizer, sample_batch):
    tiny_model("crop").save_pretrained(tmp_path)
    eager = RegionMedCLIPModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.vision_model.config._attn_implementation == "eager"
    assert eager.text_model.config._attn_implementation == "eager"
    half = RegionMedCLIPModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    inputs = model_inputs(tokenizer, sample_batch, "crop")
    with torch.no_grad():
        outputs = half(**inputs, return_loss=True)
    assert outputs.region_embeds.dtype == torch.bfloat16 and torch.isfinite(outputs.loss)


@pytest.mark.parametrize("roi_mode", MODES)
def test_cpu_bf16_autocast_stays_close_to_fp32(tokenizer, sample_batch, roi_mode):
    model = tiny_model(roi_mode)
    inputs = model_inputs(tokenizer, sample_batch, roi_mode)
    with torch.no_grad():
        reference = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(mixed.image_embeds.float(), reference.image_embeds, dim=-1)
    assert (cosine > 0.99).all()


def test_input_embeddings_delegate_to_the_text_tower_and_resize():
    model = tiny_model("pool")
    assert model.get_input_embeddings() is model.text_model.get_input_embeddings()
    model.resize_token_embeddings(30530)
    assert model.config.text_config.vocab_size == 30530
    assert model.get_input_embeddings().weight.shape[0] == 30530


def test_region_captions_are_inputs_of_the_pretraining_objective_not_of_the_model(tokenizer, sample_batch):
    inputs = make_processor(tokenizer)(
        text=sample_batch["text"],
        images=sample_batch["images"],
        boxes=sample_batch["boxes"],
        region_text=sample_batch["region_text"],
        return_tensors="pt",
    )
    with pytest.raises(TypeError, match="RegionMedCLIPForPreTraining"):
        tiny_model("pool")(**inputs)


def test_a_folder_saved_with_the_objectives_settings_in_its_config_loads_with_equal_outputs(tmp_path):
    """tests/fixtures/folder-with-loss-settings: saved when the model config carried the loss weights and L_neg's
    settings (see its README). They are dropped on load, and the model gives the outputs it gave then."""
    fixture = Path(__file__).parent / "fixtures" / "folder-with-loss-settings"
    saved = json.loads((fixture / "config.json").read_text())
    assert saved["roi_loss_weight"] == 1.0 and saved["neg_logit_scale"] == 10.0
    recorded = load_file(fixture / "expected.safetensors")
    inputs = {
        key.removeprefix("inputs."): value for key, value in recorded.items() if key.startswith("inputs.")
    }
    inputs["roi_mask"] = inputs["roi_mask"].bool()
    expected = {
        key.removeprefix("expected."): v for key, v in recorded.items() if key.startswith("expected.")
    }

    model = AutoModel.from_pretrained(fixture).eval()
    assert type(model) is RegionMedCLIPModel
    with torch.no_grad():
        box_free = model(**{key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")})
        boxed = model(**inputs)
        patches = model.get_patch_features(inputs["pixel_values"]).patch_embeds
    actual = {
        **{
            f"box_free.{name}": getattr(box_free, name)
            for name in ("logits_per_image", "image_embeds", "text_embeds")
        },
        **{
            f"boxed.{name}": getattr(boxed, name)
            for name in (
                "logits_per_image",
                "image_embeds",
                "global_image_embeds",
                "region_embeds",
                "dense_region_embeds",
                "proposal_logits",
            )
        },
        "patch_features": patches,
    }
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5, msg=name)

    model.save_pretrained(tmp_path)
    resaved = json.loads((tmp_path / "config.json").read_text())
    assert not [key for key in resaved if key.endswith("_loss_weight") or key.startswith("neg_logit_")]


@pytest.mark.parametrize("roi_mode", MODES)
def test_the_detector_reads_its_best_boxes_again_as_regions(tokenizer, sample_batch, roi_mode):
    """A box's score is σ(class head logit) · σ(region class head logit of the box read as a region) for each
    image's first `detection_top_k` boxes in the proposer's objectness order, and σ(class head logit) times the
    image's lowest such region probability for the other boxes; a query's scores do not depend on the other queries
    asked. Written out image by image through the base model's public `get_region_features`."""
    detector = RegionMedCLIPForZeroShotObjectDetection(tiny_config(roi_mode, detection_top_k=3)).eval()
    inputs = model_inputs(tokenizer, sample_batch, roi_mode, with_rois=False)
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    proposer = detector.regionmed_clip.region_proposer
    heads = (detector.class_head, detector.box_head, detector.region_class_head, proposer)
    with torch.no_grad():
        for parameter in (parameter for head in heads for parameter in head.parameters()):
            parameter.normal_(std=0.3, generator=generator)  # untrained heads score every box alike
        outputs = detector(pixel_values=inputs["pixel_values"], query_embeds=queries)
        alone = detector(pixel_values=inputs["pixel_values"], query_embeds=queries[2:3]).logits
        detector.config.detection_top_k = 0
        first = detector(pixel_values=inputs["pixel_values"], query_embeds=queries)
        base = detector.regionmed_clip
        expected = []
        for image in range(inputs["pixel_values"].shape[0]):
            pixels = inputs["pixel_values"][image : image + 1]
            centres, extents = first.pred_boxes[image, :, :2], first.pred_boxes[image, :, 2:]
            boxes = torch.cat((centres - extents / 2, centres + extents / 2), -1)
            grid = first.objectness_logits.new_zeros(1, IMAGE_SIZE // 8, IMAGE_SIZE // 8, 5)
            grid[..., 0] = first.objectness_logits[image].reshape(grid.shape[1:3])
            chosen = modeling.objectness_order(grid)[0, :3]
            crops = modeling.crop_regions(pixels, boxes[None, chosen]) if roi_mode == "crop" else None
            regions = base.get_region_features(pixels, boxes[None, chosen], None, crops)
            logits = detector.region_class_head(torch.nn.functional.normalize(regions, dim=-1), queries)
            probs = logits[0].sigmoid()
            per_box = probs.min(0).values.repeat(boxes.shape[0], 1)
            per_box[chosen] = probs
            expected.append(first.logits[image].sigmoid() * per_box)
    torch.testing.assert_close(outputs.logits.sigmoid(), torch.stack(expected), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone, outputs.logits[..., 2:3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs.logits, first.logits)


def test_logit_of_product_is_the_logit_of_the_product():
    logits = torch.tensor([-30.0, -3.0, 0.0, 2.0, 25.0, 40.0], dtype=torch.float64)
    probs = torch.tensor([1e-8, 0.3, 0.5, 0.9, 0.2, 1.0], dtype=torch.float64)
    combined = modeling.logit_of_product(logits, probs.log())
    torch.testing.assert_close(combined.sigmoid(), logits.sigmoid() * probs, rtol=1e-9, atol=0)
    assert combined[-1] == logits[-1]  # a probability of 1 leaves the logit as it is


def test_the_detector_holds_the_base_model_and_loads_any_saved_folder(tmp_path, tokenizer, sample_batch):
    """OWL-ViT's shape: the detector holds a RegionMedCLIPModel under `regionmed_clip` and its class head; a folder
    saved by the base model loads into it (and a folder saved by the detector into the base, its heads left out
    quietly) with equal weights."""
    base = tiny_model("pool")
    base.save_pretrained(tmp_path / "base")
    detector = RegionMedCLIPForZeroShotObjectDetection.from_pretrained(tmp_path / "base").eval()
    assert type(detector.regionmed_clip) is RegionMedCLIPModel
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(detector.regionmed_clip.state_dict()[name], tensor, rtol=0, atol=0)
    detector.save_pretrained(tmp_path / "detector")
    again, loading = AutoModel.from_pretrained(tmp_path / "detector", output_loading_info=True)
    assert type(again) is RegionMedCLIPModel
    # The detector's heads are not the base model's: loading leaves them without calling them unexpected.
    assert not loading["unexpected_keys"] and not loading["missing_keys"]
    again.eval()
    inputs = model_inputs(tokenizer, sample_batch, "pool")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits_per_image, base(**inputs).logits_per_image)
        outputs = detector(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
        )
        queries = torch.nn.functional.normalize(
            base.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output, dim=-1
        )
        by_embeds = detector(pixel_values=inputs["pixel_values"], query_embeds=queries)
    grid = (IMAGE_SIZE // 8) ** 2
    assert outputs.logits.shape == (2, grid, 2) and outputs.pred_boxes.shape == (2, grid, 4)
    torch.testing.assert_close(by_embeds.logits, outputs.logits)
