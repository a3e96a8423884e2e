"""Oracle tests: every loss and RoIAlign against a naive loop written here, forward and backward; the pretraining
objective's terms on a model's features; caption deduplication and the caption cache against the plain
computation."""

import math

import pytest
import torch

from regionmed_clip import RegionMedCLIPModel
from regionmed_clip.evaluation.features import REGION_TERMS
from regionmed_clip.modeling_regionmed_clip import contrastive_loss, roi_align, sigmoid_loss
from regionmed_clip.training.losses import (
    LOSS_TERMS,
    caption_groups_from_ids,
    global_contrastive_loss,
    hard_negative_loss,
    region_contrastive_loss,
)
from regionmed_clip.training.pretraining import CaptionEmbeddingCache, RegionMedCLIPForPreTraining

from .conftest import make_processor, random_image, tiny_config, tiny_model


def _unit(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1
    )


def naive_info_nce(a, b, scale, allowed=None):
    """Mean over both directions of −log softmax at the diagonal; `allowed[i][j]` says whether j is in row i's sum."""
    n = a.shape[0]
    sims = [[scale * torch.dot(a[i], b[j]) for j in range(n)] for i in range(n)]

    def direction(get):
        total = 0.0
        for i in range(n):
            terms = [get(i, j) for j in range(n) if allowed is None or j == i or allowed[i][j]]
            total = total - (get(i, i) - torch.logsumexp(torch.stack(terms), 0))
        return total / n

    return (direction(lambda i, j: sims[i][j]) + direction(lambda i, j: sims[j][i])) / 2


def _grads(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def test_global_contrastive_loss_matches_naive_loop():
    images, texts = _unit(6, 8, seed=0), _unit(6, 8, seed=1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    value, grads = _grads(lambda a, b: global_contrastive_loss(a, b, scale), images, texts)
    expected, expected_grads = _grads(lambda a, b: naive_info_nce(a, b, scale), images, texts)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_contrastive_loss_of_perfect_alignment_is_near_zero_and_of_uniform_is_log_n():
    assert contrastive_loss(torch.eye(5) * 100).item() < 1e-6
    assert contrastive_loss(torch.zeros(5, 5)).item() == pytest.approx(math.log(5))


def test_region_loss_masks_identical_captions_and_matches_naive_loop():
    regions, captions = _unit(7, 8, seed=2), _unit(7, 8, seed=3)
    groups = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    allowed = [[bool(groups[i] != groups[j]) for j in range(7)] for i in range(7)]
    scale = torch.tensor(10.0, dtype=torch.float64)
    value, grads = _grads(lambda a, b: region_contrastive_loss(a, b, scale, groups), regions, captions)
    expected, expected_grads = _grads(lambda a, b: naive_info_nce(a, b, scale, allowed), regions, captions)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    unmasked = region_contrastive_loss(regions, captions, scale)
    assert not torch.isclose(unmasked, value)
    torch.testing.assert_close(unmasked, naive_info_nce(regions, captions, scale))


def test_caption_groups_follow_token_ids_under_the_attention_mask():
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 5, 6, 102, 0], [101, 5, 7, 102, 0], [101, 5, 6, 102, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    groups = caption_groups_from_ids(ids, mask).tolist()
    assert groups[0] == groups[1] == groups[3] != groups[2]


@pytest.mark.parametrize(("scale", "bias"), [(1.0, 0.0), (10.0, -2.0)])
def test_hard_negative_loss_matches_the_papers_formula(scale, bias):
    regions, negatives = _unit(4, 8, seed=4), _unit(4, 3, 8, seed=5)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)

    def naive(a, b):
        terms = [
            -torch.log(1 - torch.sigmoid(scale * torch.dot(a[i], b[i, k]) + bias))
            for i in range(4)
            for k in range(3)
            if mask[i, k]
        ]
        return torch.stack(terms).mean()

    value, grads = _grads(lambda a, b: hard_negative_loss(a, b, mask, scale, bias), regions, negatives)
    expected, expected_grads = _grads(naive, regions, negatives)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_hard_negative_loss_stays_finite_where_the_naive_formula_overflows():
    regions = torch.nn.functional.normalize(torch.ones(1, 4), dim=-1)
    value = hard_negative_loss(regions, regions[:, None], scale=100.0)
    assert torch.isfinite(value) and value.item() == pytest.approx(100.0, rel=1e-4)


def naive_roi_align(features, box, output_size, sampling_ratio):
    """torchvision's roi_align(aligned=True) for one box of normalised coordinates, averaged over bins."""
    _, height, width = features.shape
    x0, y0, x1, y1 = box[0] * width - 0.5, box[1] * height - 0.5, box[2] * width - 0.5, box[3] * height - 0.5
    bin_w, bin_h = (x1 - x0) / output_size, (y1 - y0) / output_size

    def bilinear(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(features.shape[0], dtype=features.dtype)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_low = y_high = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_low = x_high = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1 - ly, 1 - lx
        return (
            hy * hx * features[:, y_low, x_low]
            + hy * lx * features[:, y_low, x_high]
            + ly * hx * features[:, y_high, x_low]
            + ly * lx * features[:, y_high, x_high]
        )

    bins = []
    for ph in range(output_size):
        for pw in range(output_size):
            samples = [
                bilinear(
                    float(y0 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio),
                    float(x0 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio),
                )
                for iy in range(sampling_ratio)
                for ix in range(sampling_ratio)
            ]
            bins.append(torch.stack(samples).mean(0))
    return torch.stack(bins).mean(0)


@pytest.mark.parametrize(("output_size", "sampling_ratio"), [(1, 1), (2, 2), (3, 2)])
def test_roi_align_matches_naive_per_box_bilinear_reference(output_size, sampling_ratio):
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 5, 6, 7, generator=generator, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.35, 0.9], [0.5, 0.5, 0.52, 0.55]],
            [[0.9, 0.05, 1.0, 0.3], [0.0, 0.6, 0.4, 1.0], [0.3, 0.3, 0.7, 0.7]],
        ],
        dtype=torch.float64,
    )
    pooled = roi_align(features, boxes, output_size, sampling_ratio)
    assert pooled.shape == (2, 3, 5)
    for b in range(2):
        for k in range(3):
            expected = naive_roi_align(features[b], boxes[b, k].tolist(), output_size, sampling_ratio)
            torch.testing.assert_close(pooled[b, k], expected)


def test_roi_align_is_differentiable_like_the_reference():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(1, 3, 4, 4, generator=generator, dtype=torch.float64)
    box = torch.tensor([[[0.2, 0.1, 0.8, 0.7]]], dtype=torch.float64)
    _, (grad,) = _grads(lambda f: roi_align(f, box, 2, 2).sum(), features)
    _, (expected,) = _grads(lambda f: naive_roi_align(f[0], box[0, 0].tolist(), 2, 2).sum(), features)
    torch.testing.assert_close(grad, expected)


def naive_sigmoid(a, b, scale, bias, allowed=None):
    """SigLIP's loss as the paper writes it: −1/|B| Σ_i Σ_j log 1 / (1 + exp(z_ij (−t x_i·y_j − b))), over the pairs
    `allowed[i][j]` permits (the diagonal always)."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j and allowed is not None and not allowed[i][j]:
                continue
            z = 1.0 if i == j else -1.0
            total = total - torch.log(1 / (1 + torch.exp(z * (-scale * torch.dot(a[i], b[j]) - bias))))
    return total / n


def test_global_sigmoid_loss_matches_the_siglip_formula():
    images, texts = _unit(6, 8, seed=8), _unit(6, 8, seed=9)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    value, grads = _grads(
        lambda a, b, c: global_contrastive_loss(a, b, scale, c, objective="sigmoid"), images, texts, bias
    )
    expected, expected_grads = _grads(lambda a, b, c: naive_sigmoid(a, b, scale, c), images, texts, bias)
    torch.testing.assert_close(value, expected)
    assert len(grads) == 3  # the bias is learned: its gradient is checked too
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_region_sigmoid_loss_leaves_identical_captions_out_and_matches_naive_loop():
    regions, captions = _unit(7, 8, seed=10), _unit(7, 8, seed=11)
    groups = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    allowed = [[bool(groups[i] != groups[j]) for j in range(7)] for i in range(7)]
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64)

    def ours(a, b, c):
        return region_contrastive_loss(a, b, scale, groups, c, objective="sigmoid")

    value, grads = _grads(ours, regions, captions, bias)
    expected, expected_grads = _grads(
        lambda a, b, c: naive_sigmoid(a, b, scale, c, allowed), regions, captions, bias
    )
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    assert not torch.isclose(sigmoid_loss(scale * regions @ captions.t() + bias), value)


def test_sigmoid_loss_stays_finite_for_large_logits():
    logits = torch.tensor([[200.0, -200.0], [300.0, 150.0]])
    value = sigmoid_loss(logits)
    # Only the negative pair (1, 0) at logit 300 costs anything: −log σ(−300) = 300, over 2 rows.
    assert torch.isfinite(value) and value.item() == pytest.approx(300.0 / 2, rel=1e-4)


def _region_batch(tokenizer, roi_mode="pool"):
    """Four images with repeated region captions and negatives (a caption is also another ROI's negative)."""
    processor = make_processor(tokenizer, roi_mode)
    captions = ["round nodule left upper", "oval cyst right lower", "round nodule left upper"]
    return processor(
        text=["nodule", "cyst", "nodule left", "normal"],
        images=[random_image(40, 40, seed) for seed in range(4)],
        boxes=[
            [(1, 1, 20, 20), (5, 5, 30, 30)],
            [(0, 0, 39, 39)],
            [(2, 2, 10, 12), (3, 3, 33, 33), (1, 1, 9, 9)],
            [],
        ],
        region_text=[captions[:2], captions[1:2], captions, []],
        negative_text=[
            [["oval cyst right lower", "round cyst"], ["round nodule left upper"]],
            [["round cyst"]],
            [["round cyst"], ["round cyst", "oval cyst right lower"], []],
            [],
        ],
        summary_text=["round nodule", "oval cyst", "round nodule", "normal"],
        return_tensors="pt",
    )


def objective_of(model: RegionMedCLIPModel, weights: dict[str, float]) -> RegionMedCLIPForPreTraining:
    """The pretraining objective around `model`, with `weights`."""
    return RegionMedCLIPForPreTraining(model.config, model=model, loss_weights=weights)


PAPER_TERMS = {
    "global_loss": 1.0,
    "fused_global_loss": 0.25,
    "summary_loss": 0.5,
    "roi_loss": 1.0,
    "neg_loss": 1.0,
}


@pytest.mark.parametrize("objective", ["infonce", "sigmoid"])
def test_the_objectives_terms_match_the_functions_on_the_models_features(tokenizer, objective):
    model = tiny_model(loss_objective=objective)
    pretraining = objective_of(model, PAPER_TERMS)
    inputs = _region_batch(tokenizer)
    outputs = pretraining(**inputs)
    scale, bias = model.logit_scale.exp(), model.logit_bias
    assert (bias is None) == (objective == "infonce")
    mask = outputs.region_mask
    groups = caption_groups_from_ids(inputs["region_input_ids"][mask], inputs["region_attention_mask"][mask])
    expected = {
        "global_loss": global_contrastive_loss(
            outputs.global_image_embeds, outputs.text_embeds, scale, bias, objective
        ),
        "fused_global_loss": global_contrastive_loss(
            outputs.image_embeds, outputs.text_embeds, scale, bias, objective
        ),
        "summary_loss": global_contrastive_loss(
            outputs.global_image_embeds, outputs.summary_embeds, scale, bias, objective
        ),
        "roi_loss": region_contrastive_loss(
            outputs.region_embeds[mask], outputs.region_text_embeds[mask], scale, groups, bias, objective
        ),
        "neg_loss": hard_negative_loss(
            outputs.region_embeds[mask], outputs.negative_text_embeds[mask], outputs.negative_mask[mask]
        ),
    }
    assert set(outputs.loss_terms) == set(expected)
    for name, term in expected.items():
        torch.testing.assert_close(outputs.loss_terms[name], term, msg=name)
    # z_global and z_fused differ once the gate is open, so the two image ↔ report terms are distinct.
    assert not torch.isclose(outputs.loss_terms["global_loss"], outputs.loss_terms["fused_global_loss"])
    torch.testing.assert_close(outputs.loss, sum(PAPER_TERMS[name] * term for name, term in expected.items()))
    # The model's own `return_loss` is the image ↔ text term of its (region-aware) embeddings alone.
    plain = model(
        **{key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}, return_loss=True
    )
    torch.testing.assert_close(plain.loss, expected["global_loss"])

    pretraining.loss_weights = {"global_loss": 1.0}
    assert set(pretraining(**inputs).loss_terms) == {"global_loss"}
    with pytest.raises(ValueError, match="unknown loss terms"):
        pretraining.loss_weights = {"contrast": 1.0}


def test_the_terms_evaluation_counts_as_training_the_roi_processor_are_the_registrys():
    assert set(REGION_TERMS) == {name for name, term in LOSS_TERMS.items() if term.trains_roi_processor}


def test_logit_bias_is_a_learned_parameter_initialised_from_the_config(tmp_path):
    model = RegionMedCLIPModel(tiny_config(loss_objective="sigmoid", logit_bias_init_value=-7.0))
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.item() == -7.0
    assert "logit_bias" in dict(model.named_parameters())
    assert RegionMedCLIPModel(tiny_config()).logit_bias is None
    # A checkpoint without the bias (trained with InfoNCE) loaded for the sigmoid objective: `_init_weights` sets
    # it from the config instead of leaving uninitialised memory.
    RegionMedCLIPModel(tiny_config()).save_pretrained(tmp_path)
    reloaded = RegionMedCLIPModel.from_pretrained(
        tmp_path, loss_objective="sigmoid", logit_bias_init_value=-4.0
    )
    assert reloaded.logit_bias.item() == -4.0
    with pytest.raises(ValueError, match="loss_objective"):
        tiny_config(loss_objective="softmax")


def _loss_and_gradients(pretraining, inputs):
    """The terms, and the gradient of every parameter of the model by its name in the model."""
    pretraining.zero_grad(set_to_none=True)
    outputs = pretraining(**inputs)
    outputs.loss.backward()
    parameters = pretraining.model.named_parameters()
    return outputs.loss_terms, {name: p.grad.clone() for name, p in parameters if p.grad is not None}


def _one_row_at_a_time(pretraining, input_ids, attention_mask):
    """The un-deduplicated computation: every caption row through the text tower on its own."""
    model = pretraining.model
    rows = [
        torch.nn.functional.normalize(model.get_text_features(ids[None], mask[None]).pooler_output, dim=-1)
        for ids, mask in zip(input_ids, attention_mask, strict=True)
    ]
    return (
        torch.cat(rows) if rows else input_ids.new_zeros((0, model.config.projection_dim), dtype=torch.float)
    )


@pytest.mark.parametrize("roi_mode", ["pool", "crop"])
def test_deduplicated_captions_give_the_losses_and_gradients_of_the_plain_computation(
    tokenizer, roi_mode, monkeypatch
):
    # In float64: the two computations sum the same gradients in another order, which float32 round-off would
    # show in elements that are sums of many (a token embedding used by every caption).
    model = tiny_model(roi_mode).double()
    pretraining = objective_of(model, PAPER_TERMS).train()
    inputs = {
        key: value.double() if value.is_floating_point() else value
        for key, value in _region_batch(tokenizer, roi_mode).items()
    }
    calls = []
    model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    terms, gradients = _loss_and_gradients(pretraining, inputs)
    distinct = {
        tuple(ids[mask.bool()].tolist())
        for name in ("summary", "region", "negative")
        for ids, mask in zip(
            inputs[f"{name}_input_ids"].flatten(0, -2),
            inputs[f"{name}_attention_mask"].flatten(0, -2),
            strict=True,
        )
        if mask.any()
    }
    # One pass for the reports, one for every distinct summary, region caption and negative together.
    assert calls == [4, len(distinct)] and len(distinct) < 4 + 6 + 7

    monkeypatch.setattr(RegionMedCLIPForPreTraining, "_encode_text_rows", _one_row_at_a_time)
    expected_terms, expected_gradients = _loss_and_gradients(pretraining, inputs)
    assert len(calls) == 2 + 1 + 4 + 6 + 7  # the reference encoded the reports, then every caption on its own
    assert (
        set(terms)
        == set(expected_terms)
        == {"global_loss", "fused_global_loss", "summary_loss", "roi_loss", "neg_loss"}
    )
    for name in terms:
        torch.testing.assert_close(terms[name], expected_terms[name], atol=1e-12, rtol=1e-10, msg=name)
    assert set(gradients) == set(expected_gradients) and any(n.startswith("text_model.") for n in gradients)
    for name in gradients:
        torch.testing.assert_close(gradients[name], expected_gradients[name], atol=1e-12, rtol=1e-9, msg=name)


def test_caption_cache_serves_a_frozen_text_tower_and_keeps_the_projection_trainable(tokenizer):
    model = tiny_model()
    pretraining = objective_of(model, PAPER_TERMS).train()
    model.text_model.requires_grad_(False)
    model.text_model.eval()
    inputs = _region_batch(tokenizer)
    expected_terms, expected_gradients = _loss_and_gradients(pretraining, inputs)

    cache = pretraining.enable_caption_cache()
    calls = []
    model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    for _ in range(2):
        terms, gradients = _loss_and_gradients(pretraining, inputs)
        for name in expected_terms:
            torch.testing.assert_close(terms[name], expected_terms[name], atol=1e-6, rtol=1e-5, msg=name)
        assert set(gradients) == set(expected_gradients) and "text_projection.weight" in gradients
        for name in gradients:
            torch.testing.assert_close(
                gradients[name], expected_gradients[name], atol=1e-6, rtol=1e-4, msg=name
            )
    # The reports pass every time; the captions only on the first call, then come from the cache.
    assert calls == [4, len(cache), 4]
    # A tower that trains (or runs with dropout) is never served from the cache.
    model.text_model.train()
    _loss_and_gradients(pretraining, inputs)
    assert calls[-2:] == [4, len(cache)]


def test_caption_cache_is_bounded_and_evicts_the_least_recently_used():
    cache = CaptionEmbeddingCache(max_entries=2)
    cache.put((1,), torch.zeros(2))
    cache.put((2,), torch.ones(2))
    assert cache.get((1,)) is not None  # (2,) is now the least recently used
    cache.put((3,), torch.ones(2))
    assert len(cache) == 2 and cache.get((2,)) is None and cache.get((1,)) is not None
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        CaptionEmbeddingCache(0)


def test_a_saved_folder_carries_no_loss_code_and_its_return_loss_runs_through_remote_code(
    tokenizer, tmp_path
):
    """The pretraining objective stays in the package: the folder its `save_pretrained` writes holds the model
    files only, with no loss setting in its config, and `return_loss=True` (the image ↔ text term, sigmoid form)
    gives the package's value in a process that cannot import the package."""
    import json

    from .test_hub_integration import _run_isolated

    folder = tmp_path / "model"
    model = tiny_model(loss_objective="sigmoid")
    objective_of(model, {name: 1.0 for name in LOSS_TERMS if name != "class_loss"}).save_pretrained(folder)
    make_processor(tokenizer).save_pretrained(folder)
    code_files = sorted(path.name for path in folder.glob("*.py"))
    assert code_files == [
        "configuration_regionmed_clip.py",
        "image_processing_regionmed_clip.py",
        "modeling_regionmed_clip.py",
        "pipeline_regionmed_clip.py",
        "processing_regionmed_clip.py",
    ]
    assert not any(name in (folder / file).read_text() for file in code_files for name in LOSS_TERMS)
    config = json.loads((folder / "config.json").read_text())
    assert not [key for key in config if key.endswith("_loss_weight") or key.startswith("neg_logit_")]
    inputs = {
        key: value
        for key, value in _region_batch(tokenizer).items()
        if not key.startswith(("region_", "negative_", "summary_"))
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs, return_loss=True).loss
    code = f"""
        import json, torch
        from transformers import AutoModel
        try:
            import regionmed_clip
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            outputs = model(**inputs, return_loss=True)
        print(json.dumps({{"module": type(model).__module__, "loss": float(outputs.loss)}}))
    """
    result = _run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["loss"] == pytest.approx(float(expected), abs=1e-6)
