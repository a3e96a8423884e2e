"""Oracle tests: every loss and RoIAlign against a naive loop written here, forward and backward."""

import math

import pytest
import torch

from regionmed_clip.modeling_regionmed_clip import (
    caption_groups_from_ids,
    contrastive_loss,
    global_contrastive_loss,
    hard_negative_loss,
    region_contrastive_loss,
    roi_align,
)


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
