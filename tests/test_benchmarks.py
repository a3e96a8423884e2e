"""The benchmark's parts (make bench itself takes minutes, so CI checks that its parts fit together and that the
code it runs in fresh processes runs)."""

import pytest
import torch
import yaml

from benchmarks import common, run_benchmarks
from benchmarks.fresh import run_job
from benchmarks.sections import captions, loading, memory
from regionmed_clip.training.config import load_config

TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_batch_inputs_have_the_model_input_shapes():
    inputs = common.batch_inputs(4, "crop", captions=True, image_size=32, batch=3)
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert inputs["roi_boxes"].shape == (3, 4, 4) and inputs["roi_mask"].shape == (3, 4)
    assert inputs["roi_pixel_values"].shape == (3, 4, 3, 32, 32)
    assert inputs["region_input_ids"].shape == (3, 4, common.CAPTION_LENGTH)
    assert inputs["negative_input_ids"].shape == (3, 4, common.NEGATIVES, common.CAPTION_LENGTH)
    assert (inputs["roi_boxes"][..., 2:] > inputs["roi_boxes"][..., :2]).all()


def test_interleaved_returns_a_median_per_function():
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert set(times) == {"a", "b"} and calls == ["a", "b"] * 4


def test_a_fresh_process_job_reports_its_time_peak_memory_and_marks():
    run = run_job("box_only_control", test=50, train=400)
    assert (
        set(run) == {"seconds", "mib", "peak_rss_mib", "before"}
        and run["seconds"] > 0
        and run["mib"] >= run["before"]
    )


def test_a_failing_job_names_itself():
    with pytest.raises(RuntimeError, match="benchmark job retrieval failed"):
        run_job("retrieval", size=-1)


def test_every_section_has_a_heading_and_a_runner():
    headings = [module.HEADING for module in run_benchmarks.SECTIONS.values()]
    assert len(set(headings)) == len(headings) and all(h.startswith("## ") for h in headings)
    assert all(callable(module.run) for module in run_benchmarks.SECTIONS.values())


def test_repeated_caption_batch_repeats_captions_as_real_region_data_does():
    global_batch, roi_batch = captions.repeated_caption_batch()
    mask = roi_batch["roi_mask"].bool()
    assert set(global_batch) < set(roi_batch) and mask.shape == (captions.IMAGES, captions.REGIONS)
    slots = torch.cat([roi_batch["region_input_ids"][..., None, :], roi_batch["negative_input_ids"]], dim=2)[
        mask
    ]
    slots = slots.flatten(0, 1)
    assert 1_700 <= len(slots) <= 2_100 and len(torch.unique(slots, dim=0)) == captions.DISTINCT_CAPTIONS
    assert not roi_batch["region_attention_mask"][~mask].any()


def test_the_loading_stages_are_valid_configs_of_the_same_steps(tmp_path):
    steps = []
    for rows in (loading.SHORT_EPOCH, loading.STEPS * loading.BATCH):
        epochs = loading.STEPS * loading.BATCH // rows
        path = tmp_path / f"{rows}.yaml"
        path.write_text(yaml.safe_dump(loading.stage_config(tmp_path, rows, epochs)), encoding="utf-8")
        (stage,) = load_config(path).stages
        steps.append(stage.epochs * rows // stage.batch_size)
    assert steps == [loading.STEPS, loading.STEPS]


def test_splice_sections_replaces_a_section_in_place_and_adds_a_missing_one_in_order(tmp_path):
    sections = run_benchmarks.SECTIONS
    first, second, third = (sections[name].HEADING for name in ("train-step", "inference", "roofline"))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\n{first}\n\nold\n\n{third}\n\nkept\n\n## Notes\n\nnotes\n", encoding="utf-8")
    run_benchmarks.splice_sections(
        results, {"train-step": f"{first}\n\nnew\n\n", "inference": f"{second}\n\nadded\n\n"}
    )
    assert results.read_text() == (
        f"# R\n\n{first}\n\nnew\n\n{second}\n\nadded\n\n{third}\n\nkept\n\n## Notes\n\nnotes\n"
    )


def test_the_memory_fit_is_a_line_through_both_points_and_the_cards_hold_its_batches():
    fixed, per_image, largest = memory.fits((2, 1_000.0), (4, 1_600.0))
    assert fixed == pytest.approx(400.0) and per_image == pytest.approx(300.0)
    for gb, batch in largest.items():
        card = gb * 1000**3 / 2**20
        assert fixed + per_image * batch <= card < fixed + per_image * (batch + 1)


@pytest.mark.parametrize(
    ("config", "source"),
    [
        ("configs/demo.yaml", None),
        (
            "configs/medsiglip-region.yaml",
            {
                "vision": {**TINY_TOWER, "image_size": 32, "patch_size": 8},
                "text": {
                    **TINY_TOWER,
                    "vocab_size": 32000,
                    "max_position_embeddings": 64,
                    "pad_token_id": 0,
                    "bos_token_id": 101,
                    "eos_token_id": 102,
                },
            },
        ),
    ],
    ids=["demo", "medsiglip-tiny-source"],
)
def test_a_shipped_config_trains_its_last_stage_on_full_batches_in_a_fresh_process(config, source):
    run = run_job("config_train_step", config=config, batch=2, steps=1, caption_length=8, source=source)
    stage = load_config(config).stages[-1]
    regions = {"configs/demo.yaml": 3, "configs/medsiglip-region.yaml": 8}[config]
    negatives = load_config(config).data.max_negatives or common.NEGATIVES
    assert run["stage"] == stage.name and run["step"] > 0 and run["peak_rss_mib"] > 0
    # report + summary + a caption and its negatives per region
    assert run["texts_per_image"] == 2 + regions * (1 + negatives)
