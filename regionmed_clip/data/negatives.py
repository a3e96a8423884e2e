"""Hard-negative region captions: the positive caption with its adjective (optionally its position) contradicted.

The paper makes five negatives per region by replacing the shape / appearance adjective with contrasting ones
(appendix B). Here the adjective's strongest contrasts come first, then the rest of its vocabulary group in a seeded
order; with `swap_position=True` the first negative instead mirrors the position (left↔right, upper↔lower). The
same caption and seed always give the same negatives, whatever else is processed, because the random stream is
seeded from the caption itself.
"""

import random
import re
from dataclasses import dataclass

from .vocabulary import ADJECTIVE_TO_GROUP, OPPOSITES, POSITION_OPPOSITES, contrasts

WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
NUM_NEGATIVES = 5


@dataclass(frozen=True)
class RegionTriple:
    """The paper's `region_extraction`: "adjective|term|position"."""

    adjective: str
    term: str
    position: str

    @classmethod
    def parse(cls, text: str) -> "RegionTriple":
        parts = [part.strip() for part in str(text).split("|")]
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise ValueError(
                f"region_extraction must be 'adjective|term|position' (two '|', adjective and term non-empty), "
                f"got {text!r}"
            )
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower())

    @property
    def caption(self) -> str:
        """The region caption, e.g. "round nodule left upper"."""
        return region_caption(self.adjective, self.term, self.position)


def region_caption(adjective: str, term: str, position: str) -> str:
    return " ".join(part for part in (adjective, term, position) if part)


def normalize_caption(text: str) -> str:
    """Lower-case words only: how captions compare (the tokenizer drops case and punctuation the same way)."""
    return " ".join(word.lower() for word in WORD.findall(text.replace("-", "")))


def _spans(caption: str, vocabulary) -> list[re.Match]:
    return [match for match in WORD.finditer(caption) if match.group().lower() in vocabulary]


def _replace(caption: str, span: re.Match, word: str) -> str:
    if span.group()[0].isupper():
        word = word[0].upper() + word[1:]
    return caption[: span.start()] + word + caption[span.end() :]


def _swap_positions(caption: str) -> str | None:
    spans = _spans(caption, POSITION_OPPOSITES)
    if not spans:
        return None
    for span in reversed(spans):
        caption = _replace(caption, span, POSITION_OPPOSITES[span.group().lower()])
    return caption


def generate_negatives(
    caption: str,
    adjective: str | None = None,
    num: int = NUM_NEGATIVES,
    swap_position: bool = False,
    seed: int = 0,
) -> list[str]:
    """`num` distinct hard negatives of a region caption, none equal to it (compared as normalised text).

    Args:
        caption: The positive region caption; structured ("round nodule left upper") or free text ("A well-defined
            round nodule in the left upper lobe"). Adjectives and positions are found by the vocabulary.
        adjective: The adjective to contradict when known (e.g. from `region_extraction`); otherwise every
            vocabulary adjective in the caption is a candidate.
        num: How many negatives.
        swap_position: Make the first negative the caption with its position mirrored.
        seed: Seed of the choice among the weaker contrasts.

    Raises:
        ValueError: the caption has no vocabulary adjective (nor, with `swap_position`, a position) to contradict,
            or not enough distinct negatives exist.
    """
    rng = random.Random(f"{seed}|{caption}")
    spans = _spans(caption, ADJECTIVE_TO_GROUP)
    if adjective is not None:
        spans = [span for span in spans if span.group().lower() == adjective.lower()] or spans
    candidates = []
    if swap_position and (mirrored := _swap_positions(caption)) is not None:
        candidates.append(mirrored)
    strong, weak = [], []
    for span in spans:
        word = span.group().lower()
        for contrast in contrasts(word):
            (strong if contrast in OPPOSITES.get(word, ()) else weak).append(
                _replace(caption, span, contrast)
            )
    rng.shuffle(weak)
    candidates += strong + weak

    positive = normalize_caption(caption)
    negatives, seen = [], {positive}
    for candidate in candidates:
        key = normalize_caption(candidate)
        if key not in seen:
            seen.add(key)
            negatives.append(candidate)
        if len(negatives) == num:
            return negatives
    raise ValueError(
        f"cannot make {num} hard negatives for region caption {caption!r}: found "
        f"{len(negatives)}; it needs an adjective from the vocabulary (e.g. round, irregular, ill-defined)."
    )
