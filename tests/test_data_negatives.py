"""The hard-negative generator and the region vocabulary."""

import pytest

from regionmed_clip import caption_key
from regionmed_clip.data.negatives import RegionTriple, generate_negatives
from regionmed_clip.data.vocabulary import (
    ADJECTIVE_GROUPS,
    ADJECTIVE_TO_GROUP,
    OPPOSITES,
    contrasts,
    grid_position,
)


def test_five_distinct_negatives_none_equal_to_the_positive_and_deterministic():
    caption = "round nodule left upper"
    negatives = generate_negatives(caption, "round", seed=7)
    assert len(negatives) == 5
    assert len({caption_key(n) for n in negatives}) == 5
    assert caption_key(caption) not in {caption_key(n) for n in negatives}
    assert negatives == generate_negatives(caption, "round", seed=7)
    generate_negatives("oval mass right lower", "oval", seed=7)  # other work in between changes nothing
    assert negatives == generate_negatives(caption, "round", seed=7)
    assert negatives[:3] == [
        "irregular nodule left upper",
        "spiculated nodule left upper",
        "lobulated nodule left upper",
    ]
    seeds = {tuple(generate_negatives(caption, "round", seed=seed)) for seed in range(10)}
    assert len(seeds) > 1  # the weaker contrasts follow the seed


@pytest.mark.parametrize("group", sorted(ADJECTIVE_GROUPS))
def test_every_vocabulary_group_produces_contrasting_words(group):
    for adjective in ADJECTIVE_GROUPS[group]:
        negatives = generate_negatives(f"{adjective} lesion center", adjective)
        swapped = [negative.split()[0] for negative in negatives]
        assert adjective not in swapped
        assert set(swapped) <= set(contrasts(adjective))
        assert swapped[: len(OPPOSITES[adjective])] == list(OPPOSITES[adjective])
        assert len(set(swapped)) == 5


def test_opposites_are_vocabulary_words_and_never_the_word_itself():
    for word, opposites in OPPOSITES.items():
        assert word in ADJECTIVE_TO_GROUP
        assert word not in opposites
        assert all(opposite in ADJECTIVE_TO_GROUP for opposite in opposites)
    assert set(OPPOSITES) == set(ADJECTIVE_TO_GROUP)


def test_free_text_captions_find_their_adjectives_and_positions():
    caption = "A well-defined round nodule in the left upper lobe."
    negatives = generate_negatives(caption, swap_position=True)
    assert negatives[0] == "A well-defined round nodule in the right lower lobe."
    assert all(negative.endswith("lobe.") for negative in negatives)
    changed = {tuple(set(n.split()) - set(caption.split())) for n in negatives[1:]}
    assert all(len(words) == 1 for words in changed)
    capitalised = generate_negatives("Ill-defined opacity, right lower zone.")
    assert all(negative[0].isupper() for negative in capitalised)


def test_a_caption_without_vocabulary_adjective_is_an_error():
    with pytest.raises(ValueError, match="needs an adjective from the vocabulary"):
        generate_negatives("nodule seen")


@pytest.mark.parametrize("text", ["round|nodule", "round nodule left upper", "round||left", "a|b|c|d"])
def test_region_extraction_needs_three_parts(text):
    with pytest.raises(ValueError, match="adjective\\|term\\|position"):
        RegionTriple.parse(text)


def test_region_triple_caption():
    triple = RegionTriple.parse(" Irregular | Mass | right lower ")
    assert triple == RegionTriple("irregular", "mass", "right lower")
    assert triple.caption == "irregular mass right lower"


def test_grid_position():
    assert grid_position(0.1, 0.1) == "left upper"
    assert grid_position(0.5, 0.5) == "center"
    assert grid_position(0.9, 0.5) == "right middle"
    assert grid_position(1.0, 1.0) == "right lower"


@pytest.mark.parametrize(
    ("caption", "nearest"),
    [
        ("acute fracture L4 vertebra", ["acute fracture L3 vertebra", "acute fracture L5 vertebra"]),
        ("compression fracture of l1", ["compression fracture of t12", "compression fracture of l2"]),
        ("Fracture C7.", ["Fracture C6.", "Fracture T1."]),
        ("fracture of rib 5", ["fracture of rib 4", "fracture of rib 6"]),
        ("caries tooth 18", ["caries tooth 17", "caries tooth 16"]),
        ("mass BI-RADS 4", ["mass BI-RADS 3", "mass BI-RADS 5"]),
        ("lesion PI-RADS 5", ["lesion PI-RADS 4", "lesion PI-RADS 3"]),
        ("lesion liver segment IV", ["lesion liver segment III", "lesion liver segment V"]),
        ("cyst in segment 8", ["cyst in segment 7", "cyst in segment 6"]),
        ("atrophy of lobule VI", ["atrophy of lobule V", "atrophy of lobule VII"]),
        ("carcinoma T2N0M0", ["carcinoma T1N0M0", "carcinoma T3N0M0"]),
        ("glioma grade 2", ["glioma grade 1", "glioma grade 3"]),
    ],
)
def test_number_swaps_move_a_numbered_name_to_its_neighbours(caption, nearest):
    from regionmed_clip.data.negatives import NegativeStrategy

    negatives, kinds = NegativeStrategy(kinds=("number",), num=5).make(caption)
    assert negatives[:2] == nearest and set(kinds) == {"number"}
    keys = [caption_key(negative) for negative in negatives]
    assert caption_key(caption) not in keys and len(set(keys)) == len(keys)


def test_numbers_outside_a_rule_and_lookalikes_are_not_swapped():
    from regionmed_clip.data.negatives import NUMBER_RULES, NegativeStrategy

    strategy = NegativeStrategy(kinds=("number",), num=5)
    for caption in ("nodule 2 cm", "L9 vertebra", "HER2 positive", "rib 13", "tooth 19", "T2N0M0x"):
        assert strategy.make(caption) == ([], []), caption
    assert strategy.make("T4 vertebra")[0][:2] == ["T3 vertebra", "T5 vertebra"]  # a vertebra, not a TNM T
    assert len({rule.name for rule in NUMBER_RULES}) == len(NUMBER_RULES)
    assert "Numbered names moved to their neighbours: vertebra (C1-S5)" in strategy.describe()
    assert strategy.card_metadata()["number_rules"][0] == "vertebra (C1-S5)"


def test_auto_strategy_makes_number_swaps_first_for_numbered_anatomy():
    from regionmed_clip.data.negatives import NegativeStrategy

    strategy = NegativeStrategy.from_text("auto", vocabulary=("L4 vertebra", "sacrum"))
    negatives, kinds = strategy.make("fracture left L4 vertebra", term="L4 vertebra")
    assert (
        kinds == ["number"] * 5
    )  # nearest first: L3, L5, then L2 and S1 (the spine runs on into the sacrum)
    assert [negative.split()[2] for negative in negatives] == ["L3", "L5", "L2", "S1", "L1"]
    strategy = NegativeStrategy.from_text("auto", num=3)
    assert strategy.make("fracture left L5 vertebra")[1] == ["number", "number", "number"]
    assert strategy.make("fracture left vertebra")[1] == ["position"]


ATLAS = (
    "cerebellum 3",
    "cerebellum 4 5",
    "cerebellum 6",
    "cerebellum 7b",
    "crus1",
    "crus2",
    "vermis 6",
    "vermis 7",
    "vermis 10",
    "hippocampus",
    "amygdala",
)


def test_region_names_that_differ_only_in_their_numbers_are_each_others_number_negatives():
    from regionmed_clip.data.negatives import NegativeStrategy, number_siblings, number_skeleton

    assert number_skeleton("Cerebellum 4 5") == number_skeleton("cerebellum 7b") == "cerebellum #"
    assert number_skeleton("crus1") == "crus#" != number_skeleton("7b")
    assert number_skeleton("hippocampus") is None
    assert sorted(map(sorted, number_siblings(ATLAS).values())) == [
        ["cerebellum 3", "cerebellum 4 5", "cerebellum 6", "cerebellum 7b"],
        ["crus1", "crus2"],
        ["vermis 10", "vermis 6", "vermis 7"],
    ]

    strategy = NegativeStrategy(kinds=("number",), num=5, vocabulary=ATLAS)
    # No rule of NUMBER_RULES knows these names: every negative comes from the vocabulary, nearest number first.
    assert strategy.make("left cerebellum 4 5", term="cerebellum 4 5") == (
        ["left cerebellum 3", "left cerebellum 6", "left cerebellum 7b"],
        ["number"] * 3,
    )
    assert strategy.make("Right Crus1", term="crus1")[0] == ["Right Crus2"]  # the caption's case kept
    assert strategy.make("vermis 6", term="vermis 6")[0] == ["vermis 7", "vermis 10"]
    assert strategy.make("left hippocampus", term="hippocampus") == ([], [])
    assert strategy.make("left crus3", term="crus3")[0] == ["left crus2", "left crus1"]  # a name of no file
    assert NegativeStrategy(kinds=("number",), num=5).make("left crus1", term="crus1") == ([], [])
    assert strategy.card_metadata()["number_siblings"][1] == ["crus1", "crus2"]
    assert "each other's number negatives (9 names in 3 groups)" in strategy.describe()


def test_an_atlas_imported_from_coco_gets_number_negatives_from_its_own_names(tmp_path):
    import json

    from PIL import Image

    from regionmed_clip.data import CocoSource, ImportOptions, import_coco
    from regionmed_clip.data.folder import load_rows

    Image.new("L", (64, 64)).save(tmp_path / "brain.png")
    categories = [{"id": index, "name": f"left {name}"} for index, name in enumerate(ATLAS)]
    coco = {
        "images": [{"id": 1, "file_name": "brain.png", "width": 64, "height": 64, "split": "train"}],
        "annotations": [
            {"id": index, "image_id": 1, "category_id": index, "bbox": [index, index, 10, 10]}
            for index in range(len(ATLAS))
        ],
        "categories": categories,
    }
    (tmp_path / "atlas.json").write_text(json.dumps(coco))
    options = ImportOptions(image_root=str(tmp_path), out_dir=str(tmp_path / "out"), negatives="number")
    import_coco(CocoSource(tmp_path / "atlas.json"), options)
    negatives = {
        region["caption"]: region["negatives"] for region in load_rows(tmp_path / "out")[0]["regions"]
    }
    assert negatives["left crus1"] == ["left crus2"]
    assert negatives["left vermis 7"] == ["left vermis 6", "left vermis 10"]
    assert negatives["left amygdala"] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ground glass|opacity|right lower", RegionTriple("ground glass", "opacity", "right lower")),
        ("well defined|nodule|", RegionTriple("well defined", "nodule", "")),
        ("acute|fracture|L5 vertebra", RegionTriple("acute", "fracture", "l5 vertebra")),
        ("圆形|结节|左肺上叶", RegionTriple("圆形", "结节", "左肺上叶")),
        ("Круглый|узел|справа", RegionTriple("круглый", "узел", "справа")),
    ],
)
def test_region_triples_take_several_words_and_any_script(text, expected):
    assert RegionTriple.parse(text) == expected


def test_a_bare_adjective_of_any_length_or_script_replaces_the_region_adjective():
    from regionmed_clip.data.negatives import negative_caption

    triple = RegionTriple("well defined", "nodule", "left upper")
    assert negative_caption("ill defined", triple) == "ill defined nodule left upper"
    assert negative_caption("Spiculated", triple) == "spiculated nodule left upper"
    assert negative_caption("irregular nodule left upper", triple) == "irregular nodule left upper"
    assert (
        negative_caption("granuloma right upper", triple) == "granuloma right upper"
    )  # names a position word
    chinese = RegionTriple("圆形", "结节", "左肺上叶")
    assert negative_caption("不规则", chinese) == "不规则 结节 左肺上叶"
