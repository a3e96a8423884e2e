"""The collator: rows → model inputs, with workers, and from streaming datasets with flat memory."""

import gc
import pickle
import statistics

import psutil
import pytest
import torch
from torch.utils.data import DataLoader

from regionmed_clip.data.collator import MedRegionCollator, image_input
from regionmed_clip.data.folder import load_rows

from .conftest import make_processor, tiny_model
from .test_losses import PAPER_TERMS, objective_of


@pytest.mark.parametrize("roi_mode", ["pool", "crop"])
def test_batches_feed_the_model(synth_folder, tokenizer, roi_mode):
    rows = load_rows(synth_folder, "train")
    collator = MedRegionCollator(make_processor(tokenizer, roi_mode), max_length=48)
    batch = collator([rows[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["roi_boxes"].shape == (4, 3, 4)
    assert batch["negative_input_ids"].shape[:3] == (4, 3, 5)
    assert batch["summary_input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 48
    assert batch["roi_mask"].sum(1).tolist() == [len(rows[i]["regions"]) for i in range(4)]
    assert ("roi_pixel_values" in batch) == (roi_mode == "crop")
    if roi_mode == "crop":
        # Flat: the real ROIs' crops only, those the processor pads into the slots, in roi_mask order.
        padded = collator.processor(
            images=[image_input(rows[i]["image"]) for i in range(4)],
            boxes=[[region["bbox"] for region in collator.kept_regions(rows[i])] for i in range(4)],
            return_tensors="pt",
        )
        torch.testing.assert_close(
            batch["roi_pixel_values"], padded["roi_pixel_values"][padded["roi_mask"].bool()]
        )
        assert batch["roi_pixel_values"].shape[0] == int(batch["roi_mask"].sum())
    outputs = objective_of(tiny_model(roi_mode), PAPER_TERMS)(**batch)
    assert set(outputs.loss_terms) == set(PAPER_TERMS)
    assert batch["summary_input_ids"].dtype == torch.int64


def test_global_only_rows_give_no_roi_inputs(synth_folder, tokenizer):
    rows = load_rows(synth_folder, "train")
    batch = MedRegionCollator(make_processor(tokenizer), with_regions=False)([rows[0], rows[1]])
    assert not any(key.startswith(("roi_", "region_", "negative_")) for key in batch)


@pytest.mark.parametrize(
    "terms", [["global_loss"], ["global_loss", "roi_loss"], ["summary_loss", "neg_loss"]]
)
def test_a_stage_collator_builds_only_its_inputs_and_those_as_a_full_one_does(synth_folder, tokenizer, terms):
    from regionmed_clip.training.losses import stage_inputs

    dataset = load_rows(synth_folder, "train")
    rows = [dataset[index] for index in range(4)]
    fields = stage_inputs(dict.fromkeys(terms, 1.0))
    processor = make_processor(tokenizer, "crop")
    regions = "roi_boxes" in fields
    full = MedRegionCollator(processor, max_length=48, with_regions=regions)(rows)
    staged = MedRegionCollator(processor, max_length=48, with_regions=regions, fields=fields)(rows)
    optional = {"roi_pixel_values"}  # crop mode's crops come with the boxes
    assert fields - optional <= set(staged) <= fields | optional
    assert set(staged) < set(full)
    for key, value in staged.items():
        assert torch.equal(value, full[key]), key


def test_extra_regions_keep_the_highest_scores_and_are_counted(synth_folder, tokenizer):
    row = dict(load_rows(synth_folder, "train")[0])
    base = row["regions"][0]
    row["regions"] = [
        dict(base, score=score, caption=f"round nodule {score}") for score in (0.1, 0.9, 0.5, 0.7)
    ]
    collator = MedRegionCollator(make_processor(tokenizer, max_regions=3))
    batch = collator([row])
    assert collator.dropped_regions == 1
    kept = collator.processor.tokenizer.batch_decode(batch["region_input_ids"][0], skip_special_tokens=True)
    assert [text.split()[-1] for text in kept] == ["09", "07", "05"]


def test_collator_pickles_and_workers_give_the_same_batches(synth_folder, tokenizer):
    collator = MedRegionCollator(make_processor(tokenizer, "crop"))
    assert pickle.loads(pickle.dumps(collator)).processor.tokenizer("x")["input_ids"]
    rows = load_rows(synth_folder, "train")
    serial = list(DataLoader(rows, batch_size=8, collate_fn=collator))
    parallel = list(DataLoader(rows, batch_size=8, collate_fn=collator, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_streaming_batches_equal_in_memory_batches(synth_folder, tokenizer):
    collator = MedRegionCollator(make_processor(tokenizer))
    in_memory = list(DataLoader(load_rows(synth_folder, "train"), batch_size=10, collate_fn=collator))
    streamed = list(
        DataLoader(load_rows(synth_folder, "train", streaming=True), batch_size=10, collate_fn=collator)
    )
    assert [b["pixel_values"].shape[0] for b in streamed] == [10, 10, 4]
    for a, b in zip(in_memory, streamed, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_streaming_20k_rows_keeps_memory_flat(tmp_path, tokenizer):
    from regionmed_clip.data.folder import ShardedParquetWriter
    from regionmed_clip.data.schema import FEATURES
    from regionmed_clip.data.synth import SynthConfig, iter_synth

    config = SynthConfig(out=str(tmp_path), train=20_000, validation=0, test=0, image_size=64, max_lesions=1)
    writer = ShardedParquetWriter(tmp_path, FEATURES, rows_per_shard=2000)
    process = psutil.Process()
    for number, (row, _) in enumerate(iter_synth(config, "train")):  # built lazily, one row at a time
        writer.add("train", row)
        if number == 2000:
            written_early = process.memory_info().rss
    writer.close()
    write_growth = process.memory_info().rss - written_early
    data_bytes = sum(path.stat().st_size for path in (tmp_path / "data").glob("*.parquet"))

    gc.collect()
    loader = DataLoader(
        load_rows(tmp_path, "train", streaming=True),
        batch_size=250,
        collate_fn=MedRegionCollator(make_processor(tokenizer)),
    )
    rows_seen, samples = 0, []
    for batch in loader:
        rows_seen += batch["pixel_values"].shape[0]
        samples.append(process.memory_info().rss)
    # Medians of the second and the last quarter: RSS swings by about 10 MiB with each shard pyarrow opens, so a
    # single sample or the maximum reads that swing as growth; a leak of the rows read shows as half its size here.
    quarter = len(samples) // 4
    read_growth = statistics.median(samples[-quarter:]) - statistics.median(samples[quarter : 2 * quarter])
    print(
        f"\n20k rows, {data_bytes / 2**20:.1f} MiB of parquet: RSS growth while writing "
        f"{write_growth / 2**20:.1f} MiB, while streaming {read_growth / 2**20:.1f} MiB"
    )
    assert rows_seen == 20_000
    assert data_bytes > 100 * 2**20
    assert write_growth < data_bytes / 4 and read_growth < data_bytes / 4


def test_load_rows_sees_a_folder_regenerated_in_place(tmp_path):
    from regionmed_clip.data.synth import SynthConfig, generate_synth

    captions = []
    for seed in (1, 2):
        generate_synth(
            SynthConfig(out=str(tmp_path), train=3, validation=1, test=1, image_size=48, seed=seed), False
        )
        captions.append(load_rows(tmp_path, "train")["summary_caption"])
    assert captions[0] != captions[1]
