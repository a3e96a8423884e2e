"""The hard-negative generator and the region vocabulary."""

import pytest

from regionmed_clip.data.negatives import RegionTriple, generate_negatives, normalize_caption
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
    assert len({normalize_caption(n) for n in negatives}) == 5
    assert normalize_caption(caption) not in {normalize_caption(n) for n in negatives}
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
