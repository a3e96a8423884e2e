"""VQA evaluation: the VQA-RAD / SLAKE / MedRegion-synth loaders on fixture files in the real layouts, answer
normalisation, and the frozen-encoder answer head on the tiny model."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from regionmed_clip.data.folder import load_rows
from regionmed_clip.evaluation.vqa import (
    VQAExample,
    evaluate_vqa,
    load_slake,
    load_synth_vqa,
    load_vqa_rad,
    normalize_answer,
)

from .conftest import make_processor, random_image, tiny_model

# ---- fixture files in the public layouts -------------------------------------------------------------------------


def vqa_rad_entry(qid, image_name, question, answer, answer_type, phrase_type):
    return {
        "qid": qid,
        "image_name": image_name,
        "image_organ": "CHEST",
        "answer": answer,
        "used": True,
        "question_type": "PRES",
        "question": question,
        "question_frame": "",
        "phrase_type": phrase_type,
        "answer_type": answer_type,
    }


@pytest.fixture
def vqa_rad(tmp_path):
    image_dir = tmp_path / "VQA_RAD Image Folder"
    image_dir.mkdir()
    for seed, name in enumerate(["synpic100.jpg", "synpic200.jpg", "synpic300.jpg"]):
        random_image(24, 20, seed).save(image_dir / name, format="PNG")
    entries = [
        vqa_rad_entry(1, "synpic100.jpg", "Is there a mass?", "Yes", "CLOSED", "freeform"),
        vqa_rad_entry(2, "synpic100.jpg", "Is a mass present?", "yes", "closed", "para"),
        vqa_rad_entry(3, "synpic200.jpg", "How many nodules?", 2, "OPEN ", "freeform"),
        vqa_rad_entry(4, "synpic200.jpg", "What organ is this?", "Lung", "open", "para"),
        vqa_rad_entry(5, "synpic300.jpg", "Is the heart enlarged?", "no", " CLOSED", "freeform"),
        vqa_rad_entry(6, "synpic300.jpg", "Where is the lesion?", "left lung", "OPEN", "test_freeform"),
        vqa_rad_entry(7, "synpic100.jpg", "Is this an MRI?", "No", "CLOSED", "test_para"),
        vqa_rad_entry(8, "synpic200.jpg", "How many lesions?", 3, "OPEN", "test_freeform"),
    ]
    json_path = tmp_path / "VQA_RAD Dataset Public.json"
    json_path.write_text(json.dumps(entries), encoding="utf-8")
    return json_path, image_dir, entries


def slake_entry(qid, img_name, question, answer, answer_type, q_lang="en"):
    return {
        "img_id": int(img_name.split("/")[0].removeprefix("xmlab")),
        "img_name": img_name,
        "question": question,
        "answer": answer,
        "q_lang": q_lang,
        "location": "Lung",
        "modality": "CT",
        "answer_type": answer_type,
        "base_type": "vqa",
        "content_type": "Organ",
        "triple": ["vhead", "_", "_"],
        "qid": qid,
    }


@pytest.fixture
def slake(tmp_path):
    root = tmp_path / "Slake1.0"
    for seed, folder in enumerate(["xmlab1", "xmlab2", "xmlab3"]):
        (root / "imgs" / folder).mkdir(parents=True)
        random_image(20, 24, 10 + seed).save(root / "imgs" / folder / "source.jpg")
    files = {
        "train.json": [
            slake_entry(0, "xmlab1/source.jpg", "Which organ is abnormal?", "Lung", "OPEN"),
            slake_entry(1, "xmlab1/source.jpg", "哪个器官不正常？", "肺", "OPEN", q_lang="zh"),
            slake_entry(2, "xmlab2/source.jpg", "Is this a CT image?", "Yes", "CLOSED"),
        ],
        "validate.json": [
            slake_entry(3, "xmlab2/source.jpg", "Does the picture contain liver?", "No", "CLOSED")
        ],
        "test.json": [
            slake_entry(4, "xmlab3/source.jpg", "What modality is used?", "CT", "OPEN"),
            slake_entry(5, "xmlab3/source.jpg", "这是什么模态？", "CT", "OPEN", q_lang="zh"),
        ],
    }
    for name, entries in files.items():
        (root / name).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return root


# ---- loaders -----------------------------------------------------------------------------------------------------


def test_load_vqa_rad_splits_types_answers_and_paths(vqa_rad):
    json_path, image_dir, entries = vqa_rad
    examples = load_vqa_rad(json_path, image_dir)
    assert len(examples) == len(entries)
    assert [e.split for e in examples] == ["train"] * 5 + ["test"] * 3
    assert [e.answer_type for e in examples] == [
        "CLOSED",
        "CLOSED",
        "OPEN",
        "OPEN",
        "CLOSED",
        "OPEN",
        "CLOSED",
        "OPEN",
    ]
    assert examples[2].answer == "2" and examples[7].answer == "3"  # integer answers become strings
    assert examples[0].question == "Is there a mass?"
    for example, entry in zip(examples, entries, strict=True):
        assert example.image == str(image_dir / entry["image_name"])
        assert example.image_id == entry["image_name"]


def test_load_vqa_rad_missing_image_names_the_entry_and_file(vqa_rad):
    json_path, image_dir, _ = vqa_rad
    (image_dir / "synpic300.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"entry 4 \(qid 5\).*synpic300\.jpg"):
        load_vqa_rad(json_path, image_dir)


def test_load_vqa_rad_missing_field_names_the_file_entry_and_key(vqa_rad):
    json_path, image_dir, entries = vqa_rad
    del entries[3]["answer_type"]
    json_path.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError, match=r"Public\.json entry 3 \(qid 4\): missing field 'answer_type'"):
        load_vqa_rad(json_path, image_dir)


def test_load_vqa_rad_rejects_an_unknown_answer_type(vqa_rad):
    json_path, image_dir, entries = vqa_rad
    entries[0]["answer_type"] = "OTHER"
    json_path.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError, match="entry 0.*'OTHER'"):
        load_vqa_rad(json_path, image_dir)


def test_load_slake_keeps_english_folds_validation_into_train_and_finds_nested_images(slake):
    examples = load_slake(slake)
    assert [e.question for e in examples] == [
        "Which organ is abnormal?",
        "Is this a CT image?",
        "Does the picture contain liver?",
        "What modality is used?",
    ]
    assert [e.split for e in examples] == ["train", "train", "train", "test"]
    assert [e.answer_type for e in examples] == ["OPEN", "CLOSED", "CLOSED", "OPEN"]
    assert examples[0].image == str(slake / "imgs" / "xmlab1" / "source.jpg")
    assert examples[0].image_id == "xmlab1/source.jpg"
    assert examples[3].image == str(slake / "imgs" / "xmlab3" / "source.jpg")


def test_load_slake_clear_errors(slake):
    (slake / "imgs" / "xmlab2" / "source.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.json entry 2 \(qid 2\).*xmlab2/source\.jpg"):
        load_slake(slake)
    (slake / "validate.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"validate\.json"):
        load_slake(slake)


def test_load_slake_missing_field(slake):
    entries = json.loads((slake / "test.json").read_text(encoding="utf-8"))
    del entries[0]["question"]
    (slake / "test.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.json entry 0 \(qid 4\): missing field 'question'"):
        load_slake(slake)


def test_load_synth_vqa_joins_the_image_rows(synth_folder):
    examples = load_synth_vqa(synth_folder)
    counts = {
        split: len(load_rows(synth_folder, split, config="vqa")) for split in ("train", "validation", "test")
    }
    assert sum(e.split == "train" for e in examples) == counts["train"] + counts["validation"]
    assert sum(e.split == "test" for e in examples) == counts["test"]
    assert {e.answer_type for e in examples} == {"CLOSED", "OPEN"}
    images = {
        row["id"]: (split, row["image"])
        for split in ("train", "validation", "test")
        for row in load_rows(synth_folder, split)
    }
    for example in examples:
        split, image = images[example.image_id]
        assert example.split == ("test" if split == "test" else "train")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(example.image))), np.asarray(image))


# ---- answers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("  Left   Lung ", "left lung"),
        ("NO!", "no"),
        ("right .", "right"),
        (2, "2"),
        ("50%", "50%"),
        ("(a)", "(a)"),
        ("T2-weighted", "t2-weighted"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---- the answer head ---------------------------------------------------------------------------------------------

QUESTIONS = [
    ("is it red", "yes", "CLOSED"),
    ("is it blue", "no", "CLOSED"),
    ("what organ is shown", "lung", "OPEN"),
    ("what modality is this", "ct", "OPEN"),
    ("where is the lesion", "left", "OPEN"),
]
HEAD = {"epochs": 30, "hidden": 64, "batch_size": 8, "progress": False}


def question_examples(num_train: int = 8, num_test: int = 4) -> list[VQAExample]:
    """Every image gets every question; the answer depends on the question only, never on the image."""
    examples = []
    for index in range(num_train + num_test):
        split = "train" if index < num_train else "test"
        image = random_image(40, 36, seed=index)
        for question, answer, answer_type in QUESTIONS:
            examples.append(VQAExample(image, question, answer, answer_type, split, f"image-{index}"))
    return examples


@pytest.fixture
def model_and_processor(tokenizer):
    return tiny_model(), make_processor(tokenizer)


def test_head_learns_answers_from_the_question(model_and_processor):
    model, processor = model_and_processor
    metrics = evaluate_vqa(model, processor, question_examples(), **HEAD)
    assert set(metrics) == {"open", "closed", "overall", "avg", "num_train", "num_test", "num_answers"}
    assert (metrics["num_train"], metrics["num_test"], metrics["num_answers"]) == (40, 20, 5)
    # Chance is 1/5 over the answer vocabulary (1/2 on closed); the images carry no signal.
    assert metrics["open"] >= 0.9 and metrics["closed"] >= 0.9 and metrics["overall"] >= 0.9
    assert metrics["avg"] == pytest.approx((metrics["open"] + metrics["closed"] + metrics["overall"]) / 3)


def test_same_seed_same_result_and_the_callers_rng_is_untouched(model_and_processor):
    model, processor = model_and_processor
    examples = question_examples(num_train=4, num_test=2)
    settings = {**HEAD, "epochs": 5}
    state = torch.random.get_rng_state()
    first = evaluate_vqa(model, processor, examples, seed=3, **settings)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert evaluate_vqa(model, processor, examples, seed=3, **settings) == first


def test_unseen_test_answers_are_wrong_and_absent_types_are_nan(model_and_processor):
    model, processor = model_and_processor
    examples = [e for e in question_examples() if e.split == "train" or e.answer_type == "OPEN"]
    image = random_image(40, 36, seed=99)
    examples.append(VQAExample(image, "what organ is shown", "Kidney", "OPEN", "test", "image-99"))
    metrics = evaluate_vqa(model, processor, examples, **HEAD)
    assert metrics["num_test"] == 13 and metrics["num_answers"] == 5
    assert metrics["open"] == metrics["overall"] == pytest.approx(12 / 13)
    assert math.isnan(metrics["closed"]) and math.isnan(metrics["avg"])


def test_answers_are_matched_after_normalisation(model_and_processor):
    model, processor = model_and_processor
    examples = question_examples()
    for example in examples:
        if example.split == "test":
            example.answer = f" {example.answer.upper()}."
    metrics = evaluate_vqa(model, processor, examples, **HEAD)
    assert metrics["num_answers"] == 5 and metrics["overall"] >= 0.9


def test_evaluate_vqa_needs_both_splits(model_and_processor):
    model, processor = model_and_processor
    train_only = question_examples(num_train=2, num_test=0)
    with pytest.raises(ValueError, match="train and test"):
        evaluate_vqa(model, processor, train_only, **HEAD)
    train_only[0].split = "validation"
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate_vqa(model, processor, train_only, **HEAD)


def test_evaluate_vqa_on_synth_runs_from_encoded_images(model_and_processor, synth_folder):
    model, processor = model_and_processor
    examples = load_synth_vqa(synth_folder)
    metrics = evaluate_vqa(model, processor, examples, epochs=2, hidden=32, progress=False)
    assert metrics["num_train"] + metrics["num_test"] == len(examples)
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("open", "closed", "overall", "avg"))
