"""The processor, and the paper's text normalisation living inside the saved tokenizer."""

import inspect
import itertools

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, BertTokenizer, BertTokenizerFast

from regionmed_clip import RegionMedCLIPModel, RegionMedCLIPProcessor, caption_key, with_paper_normalizer
from regionmed_clip.training import RegionMedCLIPForPreTraining

from .conftest import make_processor, random_image

NOISY = "A Chest X-Ray, showing: NODULE."
CLEAN = "a chest xray showing nodule"


def test_normaliser_lowercases_and_deletes_punctuation_including_hyphens(tokenizer):
    normalized = with_paper_normalizer(tokenizer)
    assert normalized(NOISY)["input_ids"] == normalized(CLEAN)["input_ids"]
    assert normalized("left-sided")["input_ids"] == normalized("leftsided")["input_ids"]
    assert normalized("5% HER2+ (grade 3)")["input_ids"] == normalized("5 her2 grade 3")["input_ids"]
    assert (
        tokenizer(NOISY)["input_ids"] != tokenizer(CLEAN)["input_ids"]
    )  # the stock tokenizer keeps punctuation
    assert with_paper_normalizer(normalized) is normalized


# Captions that differ only where a normaliser could go wrong: digits, hyphens and dashes, Unicode punctuation and
# spacing, case (Greek final sigma included), accents, CJK with and without spaces, Cyrillic, Greek letters. The CJK
# ideographs are ones the MiniLM vocabulary has (most are [UNK] there, and two [UNK]s look alike).
TRICKY_CAPTIONS = [
    "acute fracture L4 vertebra",
    "acute fracture L5 vertebra",
    "Acute fracture, L5 vertebra.",
    "acute fracture l 5 vertebra",
    "rib 5",
    "rib 6",
    "rib5",
    "BI-RADS 4",
    "BI-RADS 3",
    "birads 4",
    "BI RADS 4",
    "X-Ray",
    "xray",
    "x ray",
    "X–Ray",
    "x—ray",
    "left-sided",
    "leftsided",
    "left sided",
    "nodule  left\tupper",
    "nodule left upper",
    " nodule left upper ",
    "nodule left upper…",
    "«nodule» left upper",
    "nodule left\u200bupper",
    "nodule left\u00a0upper",
    "2.5 cm nodule",
    "25 cm nodule",
    "2 5 cm nodule",
    "5° angle",
    "5 ° angle",
    "segment IV",
    "segment iv",
    "segment VI",
    "T2N0M0",
    "t2n0m0",
    "T3N0M0",
    "上 中 部",
    "上中部",
    "上，中部。",
    "下 中 部",
    "рак лёгкого",
    "рак легкого",
    "рок лёгкого",
    "РАК ЛЁГКОГО",
    "α-fetoprotein",
    "alpha fetoprotein",
    "αfetoprotein",
    "β-hCG",
    "Β-HCG",
    "ΣΟΦΟΣ",
    "σοφοσ",
    "σοφος",
    "café-au-lait spot",
    "cafe au lait spot",
    "cafeaulait spot",
]


def test_caption_key_agrees_with_the_tokenizer_on_every_pair_of_tricky_captions(tokenizer):
    normalized = with_paper_normalizer(tokenizer)
    ids = [tuple(normalized(text, add_special_tokens=False)["input_ids"]) for text in TRICKY_CAPTIONS]
    assert not [
        text for text, row in zip(TRICKY_CAPTIONS, ids, strict=True) if normalized.unk_token_id in row
    ]
    same = disagree = 0
    for (i, first), (j, second) in itertools.combinations(enumerate(TRICKY_CAPTIONS), 2):
        by_ids = ids[i] == ids[j]
        same += by_ids
        if by_ids != (caption_key(first) == caption_key(second)):
            disagree += 1
            print(f"{first!r} vs {second!r}: ids {'equal' if by_ids else 'differ'}, keys do not")
    assert disagree == 0
    assert same >= 20  # the corpus has many equal pairs, not only different ones
    assert caption_key("Acute fracture, L5 vertebra.") == "acute fracture l5 vertebra" != caption_key("L4")
    assert caption_key("上，中部。") == "上 中 部" and caption_key("X–Ray") == "xray"


def test_every_path_gives_the_same_ids(tmp_path, tokenizer):
    processor = make_processor(tokenizer)
    processor.save_pretrained(tmp_path)
    expected = processor.tokenizer(CLEAN)["input_ids"]
    assert processor(text=NOISY)["input_ids"][0].tolist() == expected
    bare = AutoTokenizer.from_pretrained(tmp_path)
    assert bare(NOISY)["input_ids"] == expected
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is RegionMedCLIPProcessor
    assert reloaded(text=NOISY)["input_ids"][0].tolist() == expected
    assert reloaded.tokenizer(NOISY)["input_ids"] == expected


def test_vocabulary_survives_and_is_not_the_five_token_default(tmp_path, tokenizer, minilm_path):
    # transformers 5: BertTokenizerFast(vocab_file=...) ignores the file and maps every word to [UNK].
    broken = BertTokenizerFast(vocab_file=f"{minilm_path}/vocab.txt")
    assert set(broken("chest nodule")["input_ids"][1:-1]) == {broken.unk_token_id}
    processor = make_processor(tokenizer)
    processor.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = reloaded("chest nodule")["input_ids"][1:-1]
    assert reloaded.unk_token_id not in ids
    assert ids == BertTokenizer(vocab=f"{minilm_path}/vocab.txt")("chest nodule")["input_ids"][1:-1]
    assert len(reloaded) == len(tokenizer)


def test_processor_returns_exactly_the_models_input_names(tokenizer, sample_batch):
    for roi_mode in ("pool", "crop"):
        processor = make_processor(tokenizer, roi_mode)
        inputs = processor(**sample_batch, summary_text=["a", "b"], return_tensors="pt")
        # With captions, the inputs of the pretraining objective; without, the model's.
        assert set(inputs) <= set(inspect.signature(RegionMedCLIPForPreTraining.forward).parameters)
        plain = processor(
            text=sample_batch["text"], images=sample_batch["images"], boxes=sample_batch["boxes"]
        )
        assert set(plain) <= set(inspect.signature(RegionMedCLIPModel.forward).parameters)
        expected = {
            "input_ids",
            "attention_mask",
            "pixel_values",
            "roi_boxes",
            "roi_mask",
            "region_input_ids",
            "region_attention_mask",
            "negative_input_ids",
            "negative_attention_mask",
            "summary_input_ids",
            "summary_attention_mask",
        } | ({"roi_pixel_values"} if roi_mode == "crop" else set())
        assert set(inputs) == expected
        assert set(inputs) <= set(processor.model_input_names)


def test_region_and_negative_captions_are_placed_per_box(tokenizer, sample_batch):
    processor = make_processor(tokenizer)
    inputs = processor(**sample_batch, return_tensors="pt")
    assert inputs["region_input_ids"].shape[:2] == (2, 3)
    assert inputs["negative_input_ids"].shape[:3] == (2, 3, 3)
    present = inputs["region_attention_mask"].sum(-1) > 0
    assert present.tolist() == inputs["roi_mask"].bool().tolist()
    negatives_present = (inputs["negative_attention_mask"].sum(-1) > 0).tolist()
    assert negatives_present == [
        [[True, True, False], [False] * 3, [False] * 3],
        [[True, False, False], [True, True, True], [False] * 3],
    ]
    row = inputs["region_input_ids"][1, 1][inputs["region_attention_mask"][1, 1].bool()]
    assert row.tolist() == processor.tokenizer("round nodule left upper")["input_ids"]


def test_caption_count_must_match_box_count(tokenizer, sample_batch):
    processor = make_processor(tokenizer)
    bad = dict(sample_batch, region_text=[["round nodule left upper"], ["only one caption"]])
    with pytest.raises(ValueError, match="image 1: region_text has 1 entries for 2 boxes"):
        processor(**bad)
    bad = dict(sample_batch, negative_text=[[["a"]]])
    with pytest.raises(ValueError, match="negative_text covers 1 images but boxes cover 2"):
        processor(**bad)
    with pytest.raises(ValueError, match="need images and boxes"):
        processor(text=["x"], images=[random_image(8, 8, 0)], region_text=[[]])


def test_processor_output_feeds_the_model_end_to_end(tokenizer, sample_batch):
    from .conftest import tiny_model
    from .test_losses import PAPER_TERMS, objective_of

    processor = make_processor(tokenizer, "crop")
    inputs = processor(**sample_batch, return_tensors="pt")
    outputs = objective_of(tiny_model("crop"), PAPER_TERMS)(**inputs)
    assert set(outputs.loss_terms) == set(PAPER_TERMS) - {"summary_loss"} and torch.isfinite(outputs.loss)


def test_a_tokenizer_without_a_rust_backend_is_rejected():
    class Slow:
        pass

    with pytest.raises(TypeError, match="needs a fast tokenizer"):
        with_paper_normalizer(Slow())
