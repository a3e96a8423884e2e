"""L_dense, L_global-region and L_proposal against naive references (forward and backward), and self-proposed regions
(`auto_regions`): deterministic, inside the image, used by `get_image_features` and the pipeline."""

import json

import numpy as np
import torch
import torch.nn.functional as F
from transformers import pipeline

from regionmed_clip.modeling_regionmed_clip import crop_regions, objectness_order, propose_regions, roi_align
from regionmed_clip.training.config import ObjectiveSpec
from regionmed_clip.training.losses import (
    caption_groups_from_ids,
    dense_region_loss,
    detection_loss,
    generalized_box_iou,
    global_region_loss,
    multi_positive_contrastive_loss,
    proposal_region_targets,
    region_class_loss,
    region_proposal_loss,
)
from regionmed_clip.training.pretraining import RegionMedCLIPForPreTraining

from .conftest import make_processor, random_image, tiny_model
from .test_hub_integration import LABELS, _run_isolated
from .test_losses import _grads, _unit, naive_info_nce, objective_of


def test_dense_region_loss_matches_naive_loop_forward_and_backward():
    dense, captions = _unit(6, 8, seed=4), _unit(6, 8, seed=5)
    groups = torch.tensor([0, 1, 0, 2, 3, 1])
    allowed = [[bool(groups[i] != groups[j]) for j in range(6)] for i in range(6)]
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    value, grads = _grads(lambda a, b: dense_region_loss(a, b, scale, groups), dense, captions)
    expected, expected_grads = _grads(lambda a, b: naive_info_nce(a, b, scale, allowed), dense, captions)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


# Image i's region captions, as indices into a table of distinct caption texts (image 3 has none; text 1 is
# shared by images 0 and 2, and image 0 has it twice, as two lesions with one caption).
CAPTION_TEXTS = [[0, 1, 1], [2], [1, 3], []]


def naive_global_region(images, table, scale, bias=None):
    """Per image: −log Σ_{its distinct texts} exp / Σ_{all texts} exp; per text: the same over the images that
    have it; the mean of both (InfoNCE), or with `bias` SigLIP's sum over (image, text) pairs / images."""
    texts = sorted({t for row in CAPTION_TEXTS for t in row})
    has = [[t in row for t in texts] for row in CAPTION_TEXTS]
    sims = [[scale * torch.dot(images[i], table[t]) for t in texts] for i in range(len(CAPTION_TEXTS))]
    if bias is not None:
        total = 0.0
        for i, row in enumerate(sims):
            for j, value in enumerate(row):
                total = total - F.logsigmoid((1.0 if has[i][j] else -1.0) * (value + bias))
        return total / len(sims)

    def direction(scores, positives):
        losses = [
            torch.logsumexp(torch.stack(row), 0)
            - torch.logsumexp(torch.stack([v for v, p in zip(row, pos, strict=True) if p]), 0)
            for row, pos in zip(scores, positives, strict=True)
            if any(pos)
        ]
        return sum(losses) / len(losses)

    transpose = [list(column) for column in zip(*sims, strict=True)]
    return (direction(sims, has) + direction(transpose, [list(c) for c in zip(*has, strict=True)])) / 2


def _global_region_inputs(table):
    rows = [t for row in CAPTION_TEXTS for t in row]
    images = torch.tensor([i for i, row in enumerate(CAPTION_TEXTS) for _ in row])
    # Group ids as the loss module makes them (`caption_groups_from_ids`): equal exactly for identical texts.
    return table[rows], images, caption_groups_from_ids(torch.tensor(rows)[:, None])


def test_global_region_loss_matches_naive_loop_forward_and_backward():
    images, table = _unit(4, 8, seed=11), _unit(4, 8, seed=12)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)

    def ours(a, b):
        captions, owners, groups = _global_region_inputs(b)
        return global_region_loss(a, captions, owners, scale, groups)

    value, grads = _grads(ours, images, table)
    expected, expected_grads = _grads(lambda a, b: naive_global_region(a, b, scale), images, table)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_global_region_sigmoid_loss_matches_naive_loop_forward_and_backward():
    images, table = _unit(4, 8, seed=13), _unit(4, 8, seed=14)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)

    def ours(a, b, c):
        captions, owners, groups = _global_region_inputs(b)
        return global_region_loss(a, captions, owners, scale, groups, c, "sigmoid")

    value, grads = _grads(ours, images, table, bias)
    expected, expected_grads = _grads(
        lambda a, b, c: naive_global_region(a, b, scale, c), images, table, bias
    )
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_multi_positive_loss_with_one_positive_each_is_infonce():
    a, b = _unit(5, 8, seed=15), _unit(5, 8, seed=16)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    logits = scale * a @ b.t()
    torch.testing.assert_close(
        multi_positive_contrastive_loss(logits, torch.eye(5, dtype=torch.bool)), naive_info_nce(a, b, scale)
    )


def _region_batch():
    boxes = torch.tensor(
        [[[0.1, 0.1, 0.5, 0.6], [0.5, 0.4, 0.9, 0.9]], [[0.2, 0.3, 0.7, 0.8], [0.0, 0.0, 0.0, 0.0]]]
    )
    mask = torch.tensor([[True, True], [True, False]])
    region_ids = torch.tensor([[[101, 5, 102], [101, 6, 102]], [[101, 5, 102], [0, 0, 0]]])
    region_attention = (region_ids > 0).long()
    return boxes, mask, region_ids, region_attention


def test_dense_embeddings_are_projected_roi_align_of_the_patch_tokens_in_both_modes():
    boxes, mask, region_ids, region_attention = _region_batch()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in ("pool", "crop"):
        model = tiny_model(mode)
        extra = {"roi_pixel_values": crop_regions(pixels, boxes)} if mode == "crop" else {}
        inputs = dict(pixel_values=pixels, roi_boxes=boxes, roi_mask=mask, **extra)
        outputs = objective_of(model, {"dense_loss": 1.0})(
            region_input_ids=region_ids, region_attention_mask=region_attention, **inputs
        )
        tokens = model(**inputs).vision_model_output.last_hidden_state[
            :, 1:
        ]  # ViT: CLS, then the 4 x 4 patches
        grid = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
        pooled = roi_align(grid, boxes, model.config.roi_align_size, model.config.roi_sampling_ratio)
        expected = F.normalize(model.visual_projection(pooled), dim=-1) * mask[..., None]
        torch.testing.assert_close(outputs.dense_region_embeds, expected)
        groups = caption_groups_from_ids(region_ids[mask], region_attention[mask])
        allowed = [[bool(groups[i] != groups[j]) for j in range(3)] for i in range(3)]
        reference = naive_info_nce(
            outputs.dense_region_embeds[mask],
            outputs.region_text_embeds[mask],
            model.logit_scale.exp(),
            allowed,
        )
        torch.testing.assert_close(outputs.loss_terms["dense_loss"], reference)


def naive_assignment(boxes, mask, b, i, j, grid_h, grid_w):
    """FCOS's rule for patch (i, j) of image b: the smallest real box whose inside holds the patch centre, or whose
    centre lies in the patch; None for a negative patch."""
    cx, cy = (j + 0.5) / grid_w, (i + 0.5) / grid_h
    hits = []
    for k in range(boxes.shape[1]):
        if not mask[b, k]:
            continue
        x0, y0, x1, y1 = boxes[b, k].tolist()
        centre_cell = (
            min(int((x0 + x1) / 2 * grid_w), grid_w - 1) == j
            and min(int((y0 + y1) / 2 * grid_h), grid_h - 1) == i
        )
        if (x0 < cx < x1 and y0 < cy < y1) or centre_cell:
            hits.append(((x1 - x0) * (y1 - y0), k))
    return None if not hits else min(hits)[1]


def naive_box(edge_logits, b, i, j, grid_h, grid_w):
    """Patch (i, j)'s predicted box: its centre and the four sigmoid edge distances, clipped to the image."""
    cx, cy = (j + 0.5) / grid_w, (i + 0.5) / grid_h
    d = torch.sigmoid(edge_logits[b, i, j])
    return torch.stack((cx - d[0], cy - d[1], cx + d[2], cy + d[3])).clamp(0.0, 1.0)


def naive_giou(box, other):
    """IoU and GIoU of two boxes, written out."""
    inter_w = torch.clamp(torch.minimum(box[2], other[2]) - torch.maximum(box[0], other[0]), min=0)
    inter_h = torch.clamp(torch.minimum(box[3], other[3]) - torch.maximum(box[1], other[1]), min=0)
    inter = inter_w * inter_h
    union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
    hull = (torch.maximum(box[2], other[2]) - torch.minimum(box[0], other[0])) * (
        torch.maximum(box[3], other[3]) - torch.minimum(box[1], other[1])
    )
    return inter / union, inter / union - (hull - union) / hull


def naive_box_loss(edge_logits, boxes, mask, l1_weight=1.0, giou_weight=1.0):
    """Over the positive patches of annotated images: the weighted L1 mean of the edge distances plus the weighted
    GIoU-loss mean."""
    batch_size, grid_h, grid_w = edge_logits.shape[:3]
    l1, giou_loss, positives = 0.0, 0.0, 0
    for b in range(batch_size):
        for i in range(grid_h):
            for j in range(grid_w):
                k = naive_assignment(boxes, mask, b, i, j, grid_h, grid_w)
                if k is None:
                    continue
                cx, cy = (j + 0.5) / grid_w, (i + 0.5) / grid_h
                x0, y0, x1, y1 = boxes[b, k].tolist()
                wanted = torch.tensor([cx - x0, cy - y0, x1 - cx, y1 - cy], dtype=edge_logits.dtype)
                l1 = l1 + (torch.sigmoid(edge_logits[b, i, j]) - wanted).abs().sum()
                box = naive_box(edge_logits, b, i, j, grid_h, grid_w)
                giou_loss = giou_loss + 1 - naive_giou(box, boxes[b, k])[1]
                positives += 1
    return l1_weight * l1 / (4 * positives) + giou_weight * giou_loss / positives


def naive_proposal_loss(logits, boxes, mask):
    """Targets patch by patch and box by box, then the BCE mean plus the box loss."""
    batch_size, grid_h, grid_w = logits.shape[:3]
    bce, patches = 0.0, 0
    for b in range(batch_size):
        if not mask[b].any():
            continue
        for i in range(grid_h):
            for j in range(grid_w):
                target = 0.0 if naive_assignment(boxes, mask, b, i, j, grid_h, grid_w) is None else 1.0
                z = logits[b, i, j, 0]
                bce = bce + torch.clamp(z, min=0) - z * target + torch.log1p(torch.exp(-torch.abs(z)))
                patches += 1
    return bce / patches + naive_box_loss(logits[..., 1:], boxes, mask)


def naive_detection_loss(class_logits, box_logits, boxes, mask, answers, beta=2.0):
    """The box loss of the box head (L1 5, GIoU 2), plus, patch by patch and query by query: the target is the
    IoU of the patch's box with the box it is assigned where that box answers the query, else 0; BCE ·
    |σ − target|^β summed over annotated images, over the number of positive pairs."""
    batch_size, grid_h, grid_w = box_logits.shape[:3]
    total, positives = 0.0, 0
    for b in range(batch_size):
        if not mask[b].any():
            continue
        for i in range(grid_h):
            for j in range(grid_w):
                k = naive_assignment(boxes, mask, b, i, j, grid_h, grid_w)
                iou = None
                if k is not None:
                    iou = naive_giou(naive_box(box_logits.detach(), b, i, j, grid_h, grid_w), boxes[b, k])[0]
                for q in range(class_logits.shape[-1]):
                    target = iou if k is not None and answers[b, k, q] else 0.0
                    positives += int(k is not None and bool(answers[b, k, q]))
                    z = class_logits[b, i * grid_w + j, q]
                    bce = torch.clamp(z, min=0) - z * target + torch.log1p(torch.exp(-torch.abs(z)))
                    total = total + bce * (torch.sigmoid(z) - target).abs() ** beta
    return naive_box_loss(box_logits, boxes, mask, l1_weight=5.0, giou_weight=2.0) + total / max(positives, 1)


def _loss_oracle_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping boxes (the smaller one wins), a box smaller than a patch, and an image without boxes."""
    boxes = torch.tensor(
        [
            [[0.1, 0.1, 0.9, 0.8], [0.3, 0.2, 0.6, 0.5]],
            [[0.41, 0.42, 0.44, 0.45], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    return boxes, torch.tensor([[True, True], [True, False], [False, False]])


def test_region_proposal_loss_matches_naive_loop_forward_and_backward():
    logits = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boxes, mask = _loss_oracle_boxes()
    value, (grad,) = _grads(lambda z: region_proposal_loss(z, boxes, mask), logits)
    expected, (expected_grad,) = _grads(lambda z: naive_proposal_loss(z, boxes, mask), logits)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.all(grad[2] == 0)  # the image without boxes is not taught that it has none


def test_generalized_box_iou_matches_its_definition():
    generator = torch.Generator().manual_seed(2)
    corners = torch.rand(6, 2, 2, generator=generator, dtype=torch.float64).sort(dim=1).values
    boxes = corners.reshape(6, 4)  # x0, y0, x1, y1 with x0 < x1, y0 < y1
    others = boxes.flip(0)
    iou, giou = generalized_box_iou(boxes, others)
    for index in range(6):
        expected = naive_giou(boxes[index], others[index])
        torch.testing.assert_close((iou[index], giou[index]), expected)
    assert giou[0] < iou[0]  # disjoint or not, the enclosing box costs


def test_detection_loss_matches_naive_loop_forward_and_backward():
    generator = torch.Generator().manual_seed(3)
    box_logits = torch.randn(3, 4, 5, 4, generator=generator, dtype=torch.float64)
    class_logits = torch.randn(3, 20, 3, generator=generator, dtype=torch.float64)
    boxes, mask = _loss_oracle_boxes()
    # Box 0 of image 0 answers queries 0 and 2, its box 1 query 1; image 1's box answers query 2 (image 1 holds
    # nothing query 0 or 1 asks for: every patch of it is a negative of those); image 2 is unannotated.
    answers = torch.zeros(3, 2, 3, dtype=torch.bool)
    answers[0, 0, [0, 2]] = True
    answers[0, 1, 1] = True
    answers[1, 0, 2] = True
    value, grads = _grads(lambda z, e: detection_loss(z, e, boxes, mask, answers), class_logits, box_logits)
    expected, expected_grads = _grads(
        lambda z, e: naive_detection_loss(z, e, boxes, mask, answers), class_logits, box_logits
    )
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
        assert torch.all(grad[2] == 0)  # the unannotated image is not taught that it holds nothing


def test_region_class_loss_matches_naive_loop_forward_and_backward():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    # Real ROIs' targets are 1 / 0; a proposed box's is its IoU with a box that answers the query.
    answers = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 0.6, 0], [1, 0, 0], [0.3, 0, 1]], dtype=torch.float64)

    def naive(z):
        total = 0.0
        for r in range(z.shape[0]):
            for q in range(z.shape[1]):
                target = float(answers[r, q])
                bce = (
                    torch.clamp(z[r, q], min=0)
                    - z[r, q] * target
                    + torch.log1p(torch.exp(-torch.abs(z[r, q])))
                )
                total = total + bce
        return total / float(answers.sum())

    value, (grad,) = _grads(lambda z: region_class_loss(z, answers), logits)
    expected, (expected_grad,) = _grads(naive, logits)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_proposal_region_targets_match_naive_loop():
    boxes, mask, _, _ = _region_batch()
    answers = torch.zeros(2, 2, 3, dtype=torch.bool)
    answers[0, 0, 0] = answers[0, 1, 1] = answers[0, 1, 0] = answers[1, 0, 2] = True
    proposals = torch.tensor(
        [
            [[0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.8], [0.0, 0.0, 0.1, 0.1]],
            [[0.2, 0.2, 0.7, 0.8], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.2, 0.3]],
        ]
    )

    def iou(box, other):
        width = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
        height = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        return width * height / (area(box) + area(other) - width * height)

    expected = torch.zeros(2, 3, 3)
    for b in range(2):
        for p in range(3):
            for q in range(3):
                fits = [
                    iou(proposals[b, p].tolist(), boxes[b, k].tolist())
                    for k in range(2)
                    if mask[b, k] and answers[b, k, q]
                ]
                expected[b, p, q] = max(fits, default=0.0)
    torch.testing.assert_close(proposal_region_targets(proposals, boxes, answers), expected)
    assert expected[0, 2].max() == 0 and expected[1, 0, 2] > 0.8  # background, and a near match


def test_the_detection_term_reads_the_detectors_own_top_boxes_as_proposals():
    boxes, mask, region_ids, region_attention = _region_batch()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = tiny_model("crop")
    inputs = dict(
        pixel_values=pixels,
        roi_boxes=boxes,
        roi_mask=mask,
        roi_pixel_values=crop_regions(pixels, boxes),
        region_input_ids=region_ids,
        region_attention_mask=region_attention,
        term_input_ids=region_ids,
        term_attention_mask=region_attention,
    )
    weights = {"detection_loss": 1.0}
    objective = RegionMedCLIPForPreTraining(
        model.config, model=model, loss_weights=weights, objective=ObjectiveSpec(detection_proposals=2)
    )
    outputs = objective(**inputs)
    detected = objective.detector(pixel_values=pixels, query_embeds=F.normalize(torch.ones(1, 16), dim=-1))
    centres, extents = detected.pred_boxes[..., :2], detected.pred_boxes[..., 2:]
    corners = torch.cat((centres - extents / 2, centres + extents / 2), dim=-1)
    top = objectness_order(outputs.proposal_logits)[:, :2]
    expected = corners.gather(1, top[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(outputs.proposal_region_boxes, expected)
    regions = model.get_region_features(pixels, expected, None, crop_regions(pixels, expected))
    torch.testing.assert_close(outputs.proposal_region_embeds, F.normalize(regions, dim=-1))

    without = RegionMedCLIPForPreTraining(
        model.config, model=model, loss_weights=weights, objective=ObjectiveSpec(detection_proposals=0)
    )(**inputs)
    assert without.proposal_region_boxes is None
    assert not torch.allclose(without.loss_terms["detection_loss"], outputs.loss_terms["detection_loss"])


def test_proposal_loss_through_the_objective_uses_the_given_boxes():
    boxes, mask, region_ids, region_attention = _region_batch()
    objective = objective_of(tiny_model("pool"), {"proposal_loss": 1.0})
    outputs = objective(pixel_values=torch.randn(2, 3, 32, 32), roi_boxes=boxes, roi_mask=mask)
    torch.testing.assert_close(
        outputs.loss_terms["proposal_loss"], naive_proposal_loss(outputs.proposal_logits, boxes, mask)
    )


def test_proposals_take_distinct_peaks_first_and_are_inside_the_image():
    logits = torch.full((1, 4, 4, 5), -5.0)
    logits[0, 1, 1, 0], logits[0, 1, 2, 0], logits[0, 3, 3, 0] = (
        3.0,
        2.5,
        1.0,
    )  # (1, 2) is no peak: (1, 1) beats it
    logits[0, ..., 1:] = 10.0  # distances σ(10) ≈ 1: boxes reach the image border and are clipped there
    boxes = propose_regions(logits, 3)
    assert boxes.shape == (1, 3, 4)
    assert torch.all((boxes >= 0) & (boxes <= 1))
    assert torch.all(boxes[..., 2] > boxes[..., 0]) and torch.all(boxes[..., 3] > boxes[..., 1])
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # Tiny predicted distances: each box is widened to its patch, so the box says which patch was chosen. The
    # second comes from the peak at (3, 3), not from (1, 2), the runner-up next to the first peak.
    logits[..., 1:] = -10.0
    boxes = propose_regions(logits, 3)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.25, 0.25, 0.5, 0.5]))
    torch.testing.assert_close(boxes[0, 1], torch.tensor([0.75, 0.75, 1.0, 1.0]))
    assert not torch.allclose(boxes[0, 2], torch.tensor([0.5, 0.25, 0.75, 0.5]))
    torch.testing.assert_close(propose_regions(logits, 3), boxes, rtol=0, atol=0)


def test_self_proposed_regions_are_deterministic_inside_the_image_and_feed_the_embedding():
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for mode in ("pool", "crop"):
        model = tiny_model(mode, auto_regions=2)
        with torch.no_grad():
            first, second = model.get_image_features(pixels), model.get_image_features(pixels)
        assert first.region_boxes.shape == (3, 2, 4)
        torch.testing.assert_close(first.region_boxes, second.region_boxes, rtol=0, atol=0)
        torch.testing.assert_close(first.pooler_output, second.pooler_output, rtol=0, atol=0)
        assert torch.all((first.region_boxes >= 0) & (first.region_boxes <= 1))
        assert torch.all(first.region_boxes[..., 2:] > first.region_boxes[..., :2])
        # The embedding is the one the ROI branch gives for those boxes, passed explicitly.
        extra = {"roi_pixel_values": crop_regions(pixels, first.region_boxes)} if mode == "crop" else {}
        with torch.no_grad():
            given = model.get_image_features(pixels, roi_boxes=first.region_boxes, **extra)
        torch.testing.assert_close(first.pooler_output, given.pooler_output)
        assert not torch.allclose(first.pooler_output, first.global_embeds)
        model.config.auto_regions = 0
        with torch.no_grad():
            plain = model.get_image_features(pixels)
        assert plain.region_boxes is None
        torch.testing.assert_close(plain.pooler_output, plain.global_embeds)


def test_pipeline_uses_self_proposed_regions_through_remote_code(tokenizer, tmp_path):
    folder = tmp_path / "auto-regions"
    model = tiny_model("crop", auto_regions=2)
    model.save_pretrained(folder)
    make_processor(tokenizer, "crop").save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_regions"] == 2
    image = random_image(48, 40, 11)
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    expected = classifier(image, candidate_labels=LABELS, hypothesis_template="{}")
    plain = pipeline("zero-shot-image-classification", model=str(folder), model_kwargs={"auto_regions": 0})
    box_free = plain(image, candidate_labels=LABELS, hypothesis_template="{}")
    assert [s["score"] for s in expected] != [s["score"] for s in box_free]  # the region branch took part
    code = f"""
        import json, numpy as np
        from PIL import Image
        from transformers import pipeline
        try:
            import regionmed_clip
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        image = Image.fromarray(np.array(json.loads({json.dumps(np.asarray(image).tolist())!r}), dtype=np.uint8))
        classifier = pipeline("zero-shot-image-classification", model={str(folder)!r}, trust_remote_code=True)
        assert classifier.model.config.auto_regions == 2
        print(json.dumps(classifier(image, candidate_labels={LABELS!r}, hypothesis_template="{{}}")))
    """
    result = _run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["label"] for s in scores] == [s["label"] for s in expected]
    np.testing.assert_allclose(
        [s["score"] for s in scores], [s["score"] for s in expected], rtol=0, atol=1e-6
    )


def test_proposer_pooled_global_embedding_matches_its_definition():
    model = tiny_model("pool", global_pool="cls_proposer")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    features = model.get_image_features(pixels)
    outputs = model.vision_model(pixel_values=pixels)
    patches = outputs.last_hidden_state[:, 1:]  # (B, 16, D), row-major like the proposer's map
    weights = features.proposal_logits[..., 0].reshape(2, -1).softmax(-1)
    expected = model.visual_projection(outputs.pooler_output + (weights[..., None] * patches).sum(1))
    torch.testing.assert_close(features.global_embeds, expected)
    torch.testing.assert_close(features.pooler_output, expected)
    (features.global_embeds.sum()).backward()
    # The global loss alone trains the weights too: their gradient is of the size of the projection's, which the
    # same backward reaches directly (measured: 1.7 times it), not round-off.
    reference = model.visual_projection.weight.grad.norm()
    assert model.region_proposer.weight.grad.norm() > 1e-2 * reference


def test_the_objective_pairs_each_region_caption_with_its_image_for_the_global_region_term():
    boxes, mask, region_ids, region_attention = _region_batch()
    model = tiny_model("pool")
    outputs = objective_of(model, {"global_region_loss": 1.0})(
        pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        roi_boxes=boxes,
        roi_mask=mask,
        region_input_ids=region_ids,
        region_attention_mask=region_attention,
    )
    # Image 0 has captions [5] and [6], image 1 caption [5]: two distinct captions, [5] shared.
    captions = outputs.region_text_embeds[mask]
    expected = global_region_loss(
        outputs.global_image_embeds,
        captions,
        torch.tensor([0, 0, 1]),
        model.logit_scale.exp(),
        torch.tensor([0, 1, 0]),
    )
    torch.testing.assert_close(outputs.loss_terms["global_region_loss"], expected)


def test_the_objective_computes_exactly_the_weighted_terms():
    boxes, mask, region_ids, region_attention = _region_batch()
    inputs = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "roi_boxes": boxes,
        "roi_mask": mask,
        "region_input_ids": region_ids,
        "region_attention_mask": region_attention,
    }
    outputs = objective_of(tiny_model("pool"), {"roi_loss": 1.0, "proposal_loss": 0.5})(**inputs)
    assert set(outputs.loss_terms) == {"roi_loss", "proposal_loss"}
    torch.testing.assert_close(
        outputs.loss, outputs.loss_terms["roi_loss"] + 0.5 * outputs.loss_terms["proposal_loss"]
    )
