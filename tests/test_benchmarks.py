"""The benchmark's helpers (make bench itself takes minutes, so CI only checks that its parts fit together)."""

import torch

from benchmarks import run_benchmarks as bench


def test_batch_inputs_have_the_model_input_shapes():
    inputs = bench.batch_inputs(4, "crop", captions=True, image_size=32)
    assert inputs["pixel_values"].shape == (bench.BATCH, 3, 32, 32)
    assert inputs["roi_boxes"].shape == (bench.BATCH, 4, 4) and inputs["roi_mask"].shape == (bench.BATCH, 4)
    assert inputs["roi_pixel_values"].shape == (bench.BATCH, 4, 3, 32, 32)
    assert inputs["region_input_ids"].shape == (bench.BATCH, 4, bench.CAPTION_LENGTH)
    assert inputs["negative_input_ids"].shape == (bench.BATCH, 4, bench.NEGATIVES, bench.CAPTION_LENGTH)
    assert (inputs["roi_boxes"][..., 2:] > inputs["roi_boxes"][..., :2]).all()


def test_interleaved_returns_a_median_per_function():
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert set(times) == {"a", "b"} and calls == ["a", "b"] * 4


def test_baseline_code_loads_beside_the_current_package():
    baseline = bench.baseline_module("image_processing_regionmed_clip")
    if baseline is None:  # a checkout without the history: the benchmark then leaves out its "before" rows
        return
    pixels = baseline.RegionMedCLIPImageProcessor()(torch.zeros(3, 8, 8), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)


def test_repeated_caption_batch_repeats_captions_as_real_region_data_does():
    global_batch, roi_batch = bench.repeated_caption_batch()
    mask = roi_batch["roi_mask"].bool()
    assert set(global_batch) < set(roi_batch) and mask.shape == (bench.ROI_IMAGES, bench.ROI_REGIONS)
    captions = torch.cat(
        [roi_batch["region_input_ids"][..., None, :], roi_batch["negative_input_ids"]], dim=2
    )[mask]
    slots = captions.flatten(0, 1)
    assert 1_700 <= len(slots) <= 2_100 and len(torch.unique(slots, dim=0)) == bench.DISTINCT_CAPTIONS
    assert not roi_batch["region_attention_mask"][~mask].any()


def test_splice_sections_replaces_a_section_in_place_and_adds_a_new_one(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## A\n\nold\n\n## Scaling\n\nkept\n", encoding="utf-8")
    bench.splice_sections(results, {"## A": ["new"], "## B": ["added"]})
    assert results.read_text() == "# R\n\n## A\n\nnew\n\n## B\n\nadded\n\n## Scaling\n\nkept\n"
