"""Region grounding: the pointing game against naive loops, patch-to-text maps against a per-patch recomputation,
the heatmap overlay, the `explain` command end to end, and the metric over a MedRegion-synth split."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from regionmed_clip.cli import main
from regionmed_clip.data.folder import load_rows
from regionmed_clip.data.vocabulary import without_position_words
from regionmed_clip.evaluation.grounding import (
    grounding_metrics,
    patch_text_similarity,
    pointing_accuracy,
    pointing_ceiling,
    save_heatmap_overlay,
)

from .conftest import make_processor, random_image, tiny_clip_vision_config, tiny_model

cosine = torch.nn.functional.cosine_similarity


def naive_pointing(regions, captions, mask) -> dict:
    hits, inverse_counts = [], []
    for b in range(mask.shape[0]):
        real = [k for k in range(mask.shape[1]) if mask[b, k]]
        if len(real) < 2:
            continue
        inverse_counts.append(1 / len(real))
        for k in real:
            scores = {j: cosine(regions[b, k], captions[b, j], dim=0).item() for j in real}
            hits.append(all(scores[k] > scores[j] for j in real if j != k))
    return {
        "pointing_accuracy": float(np.mean(hits)),
        "num_regions": len(hits),
        "num_images": len(inverse_counts),
        "chance": float(np.mean(inverse_counts)),
    }


def test_pointing_accuracy_matches_a_naive_loop_with_padding_ties_and_single_region_images():
    generator = torch.Generator().manual_seed(0)
    batch, slots, dim = 16, 4, 6
    # Padded slots hold random vectors, not zeros: whatever is there must not take part.
    regions = torch.randn(batch, slots, dim, generator=generator)
    captions = torch.randn(batch, slots, dim, generator=generator)
    mask = torch.rand(batch, slots, generator=generator) > 0.35
    mask[0] = torch.tensor([True, True, True, False])
    mask[1] = torch.tensor([False, False, True, False])  # a single region: left out
    mask[2] = False  # no regions
    # Image 0: ROI 0 scores its own caption and caption 1 exactly alike (every other term of the dot products is
    # an exact 0), which must count as a miss; caption 2 points away from ROI 0.
    regions[0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    captions[0, 0] = torch.tensor([0.6, 0.8, 0, 0, 0, 0])
    captions[0, 1] = torch.tensor([0.6, -0.8, 0, 0, 0, 0])
    captions[0, 2] = torch.tensor([-1.0, 0, 0, 0, 0, 1])

    expected = naive_pointing(regions, captions, mask)
    result = pointing_accuracy(regions, captions, mask)
    assert result == pytest.approx(expected)
    assert result["num_images"] == sum(int(row.sum()) >= 2 for row in mask)
    assert 0 < result["pointing_accuracy"] < 1


def test_pointing_accuracy_on_a_hand_made_batch():
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    regions = torch.tensor(
        [
            [[1.0, 0.3], e1, [0.0, 0.0]],
            [e0, e1, [-1.0, 0.0]],
            [e0, [5.0, 5.0], [5.0, 5.0]],
        ]
    )
    captions = torch.tensor(
        [
            # Both hit; the padded slot holds a caption that would beat ROI 0's own if it were counted.
            [e0, e1, [1.0, 0.3]],
            # ROI 0 ties captions 0 and 1 (miss), ROI 1 ties them too (miss), ROI 2 hits.
            [e1, e1, [-1.0, 0.0]],
            # A single real ROI: the image is left out.
            [e0, e1, e1],
        ]
    )
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    result = pointing_accuracy(regions, captions, mask)
    assert result == pytest.approx(
        {"pointing_accuracy": 3 / 5, "num_regions": 5, "num_images": 2, "chance": (1 / 2 + 1 / 3) / 2}
    )


def test_pointing_accuracy_without_an_image_of_two_regions_is_nan():
    result = pointing_accuracy(
        torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]])
    )
    assert result["num_regions"] == result["num_images"] == 0
    assert math.isnan(result["pointing_accuracy"]) and math.isnan(result["chance"])


def test_pointing_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="region_mask"):
        pointing_accuracy(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))


def test_without_position_words_keeps_what_a_region_is():
    assert without_position_words("round nodule left upper") == "round nodule"
    assert without_position_words("Left, lower lobe opacity") == "lobe opacity"
    assert without_position_words("oval cyst center") == "oval cyst"
    assert without_position_words("left-sided effusion") == "left-sided effusion"
    assert without_position_words("right middle") == ""


def test_pointing_ceiling_misses_exactly_the_captions_shared_within_an_image():
    rng = np.random.default_rng(0)
    region_image = torch.tensor(sorted(rng.integers(0, 12, size=40).tolist()))
    captions = [f"finding {int(rng.integers(3))}" for _ in range(40)]
    hits = []
    for image in region_image.unique().tolist():
        members = [captions[i] for i in (region_image == image).nonzero()[:, 0].tolist()]
        if len(members) >= 2:
            hits += [members.count(caption) == 1 for caption in members]
    assert 0 < np.mean(hits) < 1
    assert pointing_ceiling(captions, region_image) == pytest.approx(np.mean(hits))
    # Spelled apart but the same to the model: still a tie.
    respelled = [caption.upper() + "." if index % 2 else caption for index, caption in enumerate(captions)]
    assert pointing_ceiling(respelled, region_image) == pytest.approx(np.mean(hits))
    assert math.isnan(pointing_ceiling([], torch.zeros(0, dtype=torch.long)))


def test_position_free_pointing_matches_a_naive_recomputation(tmp_path, synth_folder, tokenizer):
    """`grounding.position_free`: the model's ROI embeddings against its embeddings of the captions without their
    position words, one text at a time, scored by the naive loop; the box-only control fitted on the same
    position-free training captions."""
    from regionmed_clip.evaluation import EvalSettings, run_evaluation
    from regionmed_clip.evaluation.controls import BoxOnlyControl
    from regionmed_clip.evaluation.features import extract_features
    from regionmed_clip.evaluation.grounding import region_slots
    from regionmed_clip.evaluation.harness import split_regions

    model, processor = tiny_model(), make_processor(tokenizer)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    metrics = run_evaluation(
        EvalSettings(
            tmp_path / "model", synth_folder, tmp_path / "eval", tasks="grounding", split="train", bootstrap=0
        )
    )
    section = metrics["grounding"]["position_free"]

    features = extract_features(model, processor, load_rows(synth_folder, "train"), progress=False)
    captions = [without_position_words(caption) for caption in features.region_captions]
    assert all(captions) and captions != features.region_captions
    with torch.no_grad():
        texts = torch.cat(
            [
                model.get_text_features(
                    input_ids=t["input_ids"], attention_mask=t["attention_mask"]
                ).pooler_output
                for t in (processor(text=[c], return_tensors="pt") for c in captions)
            ]
        )
    (order, slots), mask = region_slots(features.region_image)
    regions = torch.zeros(*mask.shape, features.region_embeds.shape[-1])
    caption_slots = torch.zeros(*mask.shape, texts.shape[-1])
    regions[order, slots], caption_slots[order, slots] = features.region_embeds, texts
    expected = naive_pointing(regions, caption_slots, mask)
    assert section["num_regions"] == expected["num_regions"] > 10
    assert section["pointing_accuracy"] == pytest.approx(expected["pointing_accuracy"])
    assert section["num_captions_changed"] == len(captions) and section["num_captions_emptied"] == 0
    assert section["ceiling"] == pointing_ceiling(captions, features.region_image)

    train = split_regions(synth_folder, "train")
    control = BoxOnlyControl(train["boxes"], [without_position_words(c) for c in train["captions"]])
    result = control.pointing(features.region_boxes.numpy(), captions, features.region_image)
    assert section["controls"] == {"box_only": {"pointing_accuracy": result["pointing_accuracy"]}}
    # The full game keeps the position words: its control reads them off the boxes.
    assert metrics["grounding"]["controls"]["box_only"]["pointing_accuracy"] > result["pointing_accuracy"]
    assert (
        "| pointing accuracy, position words removed (ceiling"
        in (tmp_path / "eval" / "metrics.md").read_text()
    )


def test_position_free_pointing_is_skipped_when_no_caption_has_a_position_word(
    tmp_path, synth_folder, tokenizer
):
    import shutil

    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    from .test_evaluation import write_split

    data = tmp_path / "data"
    shutil.copytree(synth_folder, data)
    rows = [
        {**row, "regions": [{**r, "caption": without_position_words(r["caption"])} for r in row["regions"]]}
        for row in load_rows(synth_folder, "test")
    ]
    write_split(data, "test", rows)
    tiny_model().save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    metrics = run_evaluation(
        EvalSettings(tmp_path / "model", data, tmp_path / "eval", tasks="grounding", bootstrap=0)
    )
    assert metrics["grounding"]["position_free"] == {
        "skipped": "no region caption of the split has a position word"
    }
    assert "position words removed | skipped" in (tmp_path / "eval" / "metrics.md").read_text()


def test_regions_whose_caption_is_all_position_words_are_left_out_and_counted(
    tmp_path, synth_folder, tokenizer
):
    import shutil

    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    from .test_evaluation import write_split

    data = tmp_path / "data"
    shutil.copytree(synth_folder, data)
    rows = list(load_rows(synth_folder, "train"))
    emptied = 0
    for row in rows:
        if len(row["regions"]) >= 2:
            row["regions"][0]["caption"] = "left upper"
            emptied += 1
    write_split(data, "train", rows)
    tiny_model().save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    metrics = run_evaluation(
        EvalSettings(
            tmp_path / "model", data, tmp_path / "eval", tasks="grounding", split="train", bootstrap=0
        )
    )
    section = metrics["grounding"]["position_free"]
    assert emptied > 0 and section["num_captions_emptied"] == emptied
    # Each emptied region leaves its image's game; images left with one region drop out.
    kept = [len(row["regions"]) - (len(row["regions"]) >= 2) for row in rows]
    assert section["num_regions"] == sum(count for count in kept if count >= 2)
    assert section["num_images"] == sum(count >= 2 for count in kept)


CLIP_VISION = tiny_clip_vision_config()


@pytest.mark.parametrize("tower", ["vit", "clip"])
def test_patch_text_similarity_matches_a_per_patch_recomputation(tokenizer, tower):
    model = tiny_model() if tower == "vit" else tiny_model(vision_config=CLIP_VISION)
    processor = make_processor(tokenizer)
    image, text = random_image(50, 40, 3), "Round nodule, left upper."
    similarity = patch_text_similarity(model, processor, image, text)

    assert similarity.shape == (4, 4)  # 32 px input, patch 8
    assert np.all(np.abs(similarity) <= 1.0) and np.isfinite(similarity).all()
    assert similarity.std() > 0
    with torch.no_grad():
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        tokens = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state[0]
        if tower == "clip":  # CLIP's last_hidden_state precedes the layer norm its CLS gets
            tokens = model.vision_model.post_layernorm(tokens)
        text_embed = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output[0]
        expected = np.zeros((4, 4))
        for index in range(16):  # ViT order: CLS, then the patches row by row
            row, column = divmod(index, 4)
            projected = model.visual_projection(tokens[1 + index])
            expected[row, column] = cosine(projected, text_embed, dim=0).item()
    np.testing.assert_allclose(similarity, expected, atol=1e-5)


@pytest.mark.parametrize("width, height", [(90, 45), (40, 80)])
def test_save_heatmap_overlay_writes_a_png_shaped_like_the_image(tmp_path, width, height):
    similarity = np.linspace(-0.3, 0.6, 16, dtype=np.float32).reshape(4, 4)
    path = save_heatmap_overlay(
        random_image(width, height, 1, mode="L"),
        similarity,
        tmp_path / "sub" / "map.png",
        title="round nodule left upper",
        boxes=[(5, 5, 30, 20), (0, 0, width, height)],
    )
    assert path == tmp_path / "sub" / "map.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB"))
    assert min(pixels.shape[:2]) > 150
    # The figure follows the image's orientation (the colour bar widens it a little).
    assert (pixels.shape[1] > pixels.shape[0]) == (width > height)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def test_save_heatmap_overlay_writes_each_box_label_at_its_box(tmp_path):
    similarity = np.linspace(-0.3, 0.6, 16, dtype=np.float32).reshape(4, 4)
    image = random_image(90, 90, 1, mode="L")

    def drawn(box, labels):
        path = save_heatmap_overlay(image, similarity, tmp_path / "map.png", boxes=[box], box_labels=labels)
        with Image.open(path) as png:
            return np.asarray(png.convert("RGB")).astype(int)

    centres = []
    for box in ((5, 5, 30, 30), (55, 55, 85, 85)):
        changed = np.argwhere(np.abs(drawn(box, ["0.93"]) - drawn(box, None)).sum(-1) > 0)
        assert len(changed) > 20  # the label's pixels
        centres.append(changed.mean(0))
    # The label goes with its box: lower and further right for the box at the lower right.
    assert (centres[1] > centres[0] + 20).all()


def test_save_heatmap_overlay_rejects_a_flat_map(tmp_path):
    with pytest.raises(ValueError, match="similarity"):
        save_heatmap_overlay(random_image(20, 20, 0), np.zeros(16), tmp_path / "x.png")


def test_explain_command_end_to_end(tmp_path, tokenizer, capsys):
    model_dir, image_path, out = tmp_path / "model", tmp_path / "scan.png", tmp_path / "heat" / "map.png"
    tiny_model().save_pretrained(model_dir)
    make_processor(tokenizer).save_pretrained(model_dir)
    random_image(64, 48, 2).save(image_path)

    assert (
        main(
            [
                "explain",
                "--model",
                str(model_dir),
                "--image",
                str(image_path),
                "--text",
                "oval cyst",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert out.is_file() and str(out) in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG"


def test_grounding_metrics_on_synth_rows(tokenizer, synth_folder):
    rows = load_rows(synth_folder, "test")
    model = tiny_model().train()
    processor = make_processor(tokenizer, max_regions=3)
    eligible = [row for row in rows if len(row["regions"]) >= 2]
    assert eligible, "the synth test split should have images with several regions"

    metrics = grounding_metrics(model, processor, rows, batch_size=4)
    assert model.training  # put back in the mode it came in
    assert metrics["num_images"] == len(eligible)
    assert metrics["num_regions"] == sum(len(row["regions"]) for row in eligible)  # every region, in passes
    assert 0.0 <= metrics["pointing_accuracy"] <= 1.0 and 0.0 < metrics["chance"] <= 0.5
    # Counts accumulated batch by batch give what one batch gives.
    assert grounding_metrics(model, processor, rows, batch_size=64) == pytest.approx(metrics)


def test_explain_puts_the_model_on_the_resolved_device(tmp_path, tokenizer, monkeypatch):
    from regionmed_clip import RegionMedCLIPModel
    from regionmed_clip.evaluation.grounding import ExplainArgs, explain

    tiny_model().save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    random_image(40, 40, 3).save(tmp_path / "scan.png")
    moved = []
    original = RegionMedCLIPModel.to

    def record(self, *args, **kwargs):
        moved.append(torch.device(args[0]))
        return original(self, "cpu")  # CUDA is mocked: the model stays where it can run

    monkeypatch.setattr(RegionMedCLIPModel, "to", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ExplainArgs(tmp_path / "model", tmp_path / "scan.png", "oval cyst", tmp_path / "a.png")
    assert ExplainArgs("m", "i", "t").out == "heatmap.png" and args.device == "auto"
    explain(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    explain(dataclasses.replace(args, out=tmp_path / "b.png"))
    explain(dataclasses.replace(args, out=tmp_path / "c.png", device="cpu"))
    assert moved == [torch.device("cpu"), torch.device("cuda"), torch.device("cpu")]
