"""Hard-negative region captions: the positive caption with one part of it contradicted.

The paper makes five negatives per region by replacing the shape / appearance adjective with contrasting ones
(appendix B): `generate_negatives` does that (the adjective's strongest contrasts first, then the rest of its
vocabulary group in a seeded order; with `swap_position=True` the first negative instead mirrors the position).

Anatomy and detection data have no lesion adjectives, so `NegativeStrategy` chooses, per dataset, among five kinds
tried in the order given: `given` (negatives read from the file), `adjective` (the paper's swap), `number` (a
numbered name moved to its neighbours: "L4" → "L3" / "L5", "rib 5" → "rib 4" / "rib 6", "BI-RADS 4" →
"BI-RADS 3" / "BI-RADS 5", by the rules of `NUMBER_RULES`; and the region's name replaced by the dataset's own
names that differ from it only in their numbers, `number_siblings`: "cerebellum 4 5" → "cerebellum 3", "crus1" →
"crus2"), `position` (laterality / position mirrored: left↔right, upper↔lower, …) and `term` (the region's name
replaced by another name from the dataset's own vocabulary of region names or classes: "left hippocampus" → "left
amygdala"). A region for which the kinds find fewer negatives than asked keeps the ones found (the loss masks
missing slots). The same caption and seed always give the same negatives, whatever else is processed, because each
random stream is seeded from the caption itself.

Two captions are the same when their `caption_key`s are (the tokenizer's view: digits and every script count,
case and punctuation do not), so "fracture L5" is a negative of "fracture L4", and a caption in any script has
negatives of its own.
"""

import random
import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from ..processing_regionmed_clip import caption_key
from .vocabulary import ADJECTIVE_TO_GROUP, OPPOSITES, POSITION_OPPOSITES, contrasts

WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")  # letters and digits of any script, hyphens inside allowed
NUM_NEGATIVES = 5


NO_FINDING = "No Finding"  # the paper's region_extraction for an image without findings (compared normalised)


def is_no_finding(value) -> bool:
    """Whether a text says "no finding" (any case or punctuation: "No Finding", "No finding", "no-finding")."""
    return isinstance(value, str) and caption_key(value).replace(" ", "") == "nofinding"


@dataclass(frozen=True)
class RegionTriple:
    """The paper's `region_extraction`: "adjective|term|position". The term is required; the adjective and the
    position may be empty ("|hippocampus|left"), since anatomy and detection regions have no lesion adjective.
    Each part may have several words ("ground glass|opacity|right lower", "acute|fracture|L5 vertebra") in any
    script ("圆形|结节|左肺上叶"): "|" separates the parts, the one thing the format reserves."""

    adjective: str
    term: str
    position: str

    @classmethod
    def parse(cls, text: str, position_words: Collection[str] | None = None) -> "RegionTriple":
        """Parse "adjective|term|position" (case and spacing normalised).

        Args:
            text: The triple.
            position_words: When given, the position may use only these words.

        Raises:
            ValueError: not three parts, an empty term, or a position word outside `position_words`.
        """
        parts = [" ".join(part.split()).lower() for part in str(text).split("|")]
        if len(parts) != 3 or not parts[1]:
            raise ValueError(
                f"region_extraction must be 'adjective|term|position': three parts with a non-empty term (the "
                f"adjective and position may be empty), got {text!r}"
            )
        adjective, term, position = parts
        if position_words is not None:
            unknown = [word for word in position.split() if word not in position_words]
            if unknown:
                raise ValueError(
                    f"the position {position!r} of {text!r} uses {unknown}; use only {', '.join(sorted(position_words))}"
                )
        return cls(adjective, term, position)

    @property
    def caption(self) -> str:
        """The region caption, e.g. "round nodule left upper"."""
        return region_caption(self.adjective, self.term, self.position)


def region_caption(adjective: str, term: str, position: str) -> str:
    return " ".join(part for part in (adjective, term, position) if part)


def negative_caption(variation: str, triple: RegionTriple) -> str:
    """A negative given for a region, as a caption: a full caption as it is, or a bare adjective (the paper's "five
    alternative adjectives", of any number of words: "spiculated", "ground glass", "不规则") put in place of the
    region's adjective. A variation that names a word of the region's term or position ("nodule", "upper",
    "左肺上叶"; compared as `caption_key`s, a word as a whole) is a full caption; any other is an adjective."""
    variation = str(variation).strip()
    words = caption_key(variation).split()
    for word in WORD.findall(f"{triple.term} {triple.position}"):
        part = caption_key(word).split()
        if part and any(words[start : start + len(part)] == part for start in range(len(words))):
            return variation
    return region_caption(variation.lower(), triple.term, triple.position)


def _spans(caption: str, vocabulary) -> list[re.Match]:
    return [match for match in WORD.finditer(caption) if match.group().lower() in vocabulary]


def _replace(caption: str, span: re.Match, word: str) -> str:
    if span.group()[0].isupper():
        word = word[0].upper() + word[1:]
    return caption[: span.start()] + word + caption[span.end() :]


def _term_span(caption: str, term: str) -> re.Match | None:
    """Where `term` stands in the caption as whole words (case-insensitively)."""
    return re.search(rf"(?<![^\W_]){re.escape(term)}(?![^\W_])", caption, flags=re.IGNORECASE)


def _swap_positions(caption: str) -> str | None:
    spans = _spans(caption, POSITION_OPPOSITES)
    if not spans:
        return None
    for span in reversed(spans):
        caption = _replace(caption, span, POSITION_OPPOSITES[span.group().lower()])
    return caption


def _adjective_swaps(caption: str, adjective: str | None, rng: random.Random) -> list[str]:
    """The caption with a vocabulary adjective (`adjective` when it is in the caption) replaced by its strong
    contrasts, then by the rest of its group in a seeded order."""
    spans = _spans(caption, ADJECTIVE_TO_GROUP)
    if adjective is not None:
        spans = [span for span in spans if span.group().lower() == adjective.lower()] or spans
    strong, weak = [], []
    for span in spans:
        word = span.group().lower()
        for contrast in contrasts(word):
            (strong if contrast in OPPOSITES.get(word, ()) else weak).append(
                _replace(caption, span, contrast)
            )
    rng.shuffle(weak)
    return strong + weak


def _numbered(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{number}" for number in range(first, last + 1))


ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X")
SPINE = _numbered("C", 1, 7) + _numbered("T", 1, 12) + _numbered("L", 1, 5) + _numbered("S", 1, 5)
_ROMAN_PATTERN = "X|IX|VIII|VII|VI|IV|V|III|II|I"  # longest first, so "VIII" is not read as "V"
_END = r"(?![^\W_])"  # not followed by a letter or digit


@dataclass(frozen=True)
class NumberRule:
    """One kind of numbered name: `pattern` finds it (group `n` is the number) and the swaps are the number's
    neighbours in the `series` holding it, nearest first (L4 → L3, L5, L2, S1, …)."""

    name: str
    pattern: str
    series: tuple[tuple[str, ...], ...]

    def swaps(self, caption: str) -> list[str]:
        candidates = []
        for match in re.finditer(self.pattern, caption, flags=re.IGNORECASE):
            value = match.group("n")
            for series in self.series:
                upper = [item.upper() for item in series]
                if value.upper() not in upper:
                    continue
                index = upper.index(value.upper())
                order = sorted(range(len(series)), key=lambda other: (abs(other - index), other))
                for other in order[1:]:
                    swap = series[other].lower() if value.islower() else series[other]
                    candidates.append(caption[: match.start("n")] + swap + caption[match.end("n") :])
                break
        return candidates


# The number-swap rules, one table: what each numbered name looks like and the series its swaps come from. Liver
# segments in the "S4" form and TNM categories outside a full "T2N0M0" are left out: both read as vertebrae.
NUMBER_RULES = (
    NumberRule("vertebra (C1-S5)", rf"(?<![^\W_])(?P<n>[CTLS](?:1[0-2]|[1-9])){_END}", (SPINE,)),
    NumberRule("rib (1-12)", rf"\bribs?\s+(?P<n>1[0-2]|[1-9]){_END}", (_numbered("", 1, 12),)),
    NumberRule(
        "tooth (FDI 11-48, within its quadrant)",
        rf"\b(?:tooth|teeth)\s+(?P<n>[1-4][1-8]){_END}",
        tuple(_numbered(str(quadrant), 1, 8) for quadrant in range(1, 5)),
    ),
    NumberRule(
        "liver segment (1-8 / I-VIII)",
        rf"\bsegments?\s+(?P<n>{_ROMAN_PATTERN}|[1-8]){_END}",
        (_numbered("", 1, 8), ROMAN[:8]),
    ),
    NumberRule("cerebellar lobule (I-X)", rf"\blobules?\s+(?P<n>{_ROMAN_PATTERN}){_END}", (ROMAN,)),
    NumberRule("BI-RADS (0-6)", rf"\bBI-?RADS\s*(?P<n>[0-6]){_END}", (_numbered("", 0, 6),)),
    NumberRule("PI-RADS (1-5)", rf"\bPI-?RADS\s*(?P<n>[1-5]){_END}", (_numbered("", 1, 5),)),
    NumberRule("TI-RADS (1-5)", rf"\bTI-?RADS\s*(?P<n>[1-5]){_END}", (_numbered("", 1, 5),)),
    NumberRule("LI-RADS (1-5)", rf"\bLI-?RADS\s*(?P<n>[1-5]){_END}", (_numbered("", 1, 5),)),
    NumberRule("TNM T category (T0-T4)", r"\b[cpy]?T(?P<n>[0-4])(?=N[0-3X]M[01X]\b)", (_numbered("", 0, 4),)),
    NumberRule("grade (1-4)", rf"\bgrade\s+(?P<n>[1-4]){_END}", (_numbered("", 1, 4),)),
    NumberRule(
        "stage (1-4 / I-IV)", rf"\bstage\s+(?P<n>IV|III|II|I|[1-4]){_END}", (_numbered("", 1, 4), ROMAN[:4])
    ),
)


def _number_swaps(caption: str) -> list[str]:
    """The caption with a numbered name moved to its neighbours, rule by rule (`NUMBER_RULES`)."""
    return [candidate for rule in NUMBER_RULES for candidate in rule.swaps(caption)]


def number_skeleton(name: str) -> str | None:
    """`name` with its numbers taken out, or None when it has none: a word holding a digit keeps only the letters
    before it ("crus1" → "crus#", "7b" → "#"), and bare numbers in a row count as one ("cerebellum 4 5" →
    "cerebellum #"). Names with one skeleton differ only in their numbers."""
    words, numbered = [], False
    for word in WORD.findall(name.lower()):
        digit = next((index for index, char in enumerate(word) if char.isdecimal()), None)
        if digit is None:
            words.append(word)
            continue
        numbered = True
        stem = word[:digit] + "#"
        if stem != "#" or not words or words[-1] != "#":
            words.append(stem)
    return " ".join(words) if numbered else None


def _first_number(name: str) -> int:
    return int(re.search(r"\d+", name).group())


def number_siblings(vocabulary: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The numbered names of a dataset's vocabulary grouped by `number_skeleton`: each group's names differ from each
    other only in their numbers ("cerebellum 3", "cerebellum 4 5", "cerebellum 7b"; "crus1", "crus2"), so an
    atlas's numbered parts are each other's `number` negatives without a rule of `NUMBER_RULES` for the atlas.
    Groups of one name are left out."""
    groups: dict[str, dict[str, str]] = {}
    for name in vocabulary:
        skeleton = number_skeleton(name)
        if skeleton is not None:
            groups.setdefault(skeleton, {}).setdefault(caption_key(name), name)
    return {skeleton: tuple(names.values()) for skeleton, names in groups.items() if len(names) > 1}


def _sibling_swaps(caption: str, term: str, siblings: dict[str, tuple[str, ...]]) -> list[str]:
    """The caption with its `term` replaced by each name of its `number_siblings` group, the nearest number first
    (then by name): "left cerebellum 4 5" → "left cerebellum 3", "left cerebellum 6", "left cerebellum 7b"."""
    skeleton = number_skeleton(term) if term else None
    found = _term_span(caption, term) if skeleton in siblings else None
    if found is None:
        return []
    first = _first_number(term)
    others = [name for name in siblings[skeleton] if caption_key(name) != caption_key(term)]
    others.sort(key=lambda name: (abs(_first_number(name) - first), name))
    lower = found.group().islower()
    return [_replace(caption, found, name.lower() if lower else name) for name in others]


def generate_negatives(
    caption: str,
    adjective: str | None = None,
    num: int = NUM_NEGATIVES,
    swap_position: bool = False,
    seed: int = 0,
) -> list[str]:
    """`num` distinct hard negatives of a region caption, none equal to it (compared by `caption_key`).

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
    candidates = []
    if swap_position and (mirrored := _swap_positions(caption)) is not None:
        candidates.append(mirrored)
    candidates += _adjective_swaps(caption, adjective, rng)

    positive = caption_key(caption)
    negatives, seen = [], {positive}
    for candidate in candidates:
        key = caption_key(candidate)
        if key not in seen:
            seen.add(key)
            negatives.append(candidate)
        if len(negatives) == num:
            return negatives
    raise ValueError(
        f"cannot make {num} hard negatives for region caption {caption!r}: found "
        f"{len(negatives)}; it needs an adjective from the vocabulary (e.g. round, irregular, ill-defined)."
    )


def _swap_terms(caption: str, term: str, vocabulary: Sequence[str], rng: random.Random) -> list[str]:
    """The caption with its `term` (found case-insensitively) replaced by each other vocabulary term, seeded order."""
    found = _term_span(caption, term) if term else None
    if found is None:
        return []
    others = sorted({other for other in vocabulary if other and other.lower() != term.lower()})
    rng.shuffle(others)
    # A lower-case caption gets lower-case names ("small left pneumonia", not "small left Pneumonia").
    lower = found.group().islower()
    return [_replace(caption, found, other.lower() if lower else other) for other in others]


def _mirrored_positions(caption: str) -> list[str]:
    """Every position word mirrored at once, then each one alone ("left upper" → "right lower", "right upper",
    "left lower")."""
    spans = _spans(caption, POSITION_OPPOSITES)
    if not spans:
        return []
    candidates = [_swap_positions(caption)]
    if len(spans) > 1:
        candidates += [_replace(caption, span, POSITION_OPPOSITES[span.group().lower()]) for span in spans]
    return candidates


NEGATIVE_KINDS = ("given", "adjective", "number", "position", "term")


@dataclass
class NegativeStrategy:
    """How a dataset's hard negatives are made, and a tally of what made them (for the dataset card).

    Args:
        kinds: The kinds tried in order until `num` negatives are found (see the module docstring); `"auto"` in a
            comma list is all of them in the order `given, adjective, number, position, term`.
        num: Negatives per region.
        vocabulary: The dataset's region names or classes, for the `term` kind.
        seed: Seed of the choice among equally good candidates.
    """

    kinds: tuple[str, ...] = NEGATIVE_KINDS
    num: int = NUM_NEGATIVES
    vocabulary: tuple[str, ...] = ()
    seed: int = 0
    made: Counter = field(default_factory=Counter)
    short_regions: int = 0
    siblings: dict[str, tuple[str, ...]] = field(
        init=False, repr=False
    )  # `number_siblings` of the vocabulary

    def __post_init__(self):
        unknown = [kind for kind in self.kinds if kind not in NEGATIVE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"negative kinds must be some of {NEGATIVE_KINDS}, got {list(self.kinds)}")
        if self.num < 0:
            raise ValueError(f"the number of negatives must be non-negative, got {self.num}")
        self.siblings = number_siblings(self.vocabulary)

    @classmethod
    def from_text(cls, text: str, **kwargs) -> "NegativeStrategy":
        """A strategy from a comma list such as "adjective,position" or "auto"."""
        kinds = [kind.strip().lower() for kind in str(text).split(",") if kind.strip()]
        if kinds == ["auto"]:
            kinds = list(NEGATIVE_KINDS)
        return cls(tuple(kinds), **kwargs)

    def make(
        self, caption: str, adjective: str = "", term: str = "", given: Sequence[str] = ()
    ) -> tuple[list[str], list[str]]:
        """Up to `num` distinct negatives of `caption`, none equal to it (compared by `caption_key`), and the kind
        that made each; fewer when the kinds find fewer. Negatives given for the region (kind `given`) are its
        negatives as they are, not topped up by generated ones (`row_problems` rejects one equal to the caption,
        naming the row)."""
        rng = random.Random(f"{self.seed}|{caption}")
        negatives, kinds, seen = [], [], {caption_key(caption)}
        for kind in self.kinds:
            if kind == "given":
                candidates = [str(item).strip() for item in given]
            elif kind == "adjective":
                candidates = _adjective_swaps(caption, adjective or None, rng)
            elif kind == "number":
                candidates = _number_swaps(caption) + _sibling_swaps(caption, term, self.siblings)
            elif kind == "position":
                candidates = _mirrored_positions(caption)
            else:
                candidates = _swap_terms(caption, term, self.vocabulary, rng)
            for candidate in candidates:
                if len(negatives) == self.num:
                    break
                key = caption_key(candidate)
                if kind == "given" or key not in seen:
                    seen.add(key)
                    negatives.append(candidate)
                    kinds.append(kind)
            if kind == "given" and negatives:
                break  # the file's own negatives are the region's negatives, not topped up by generated ones
        return negatives, kinds

    def tally(self, kinds: Sequence[str]) -> None:
        """Count one written region's negatives (the kinds `make` returned) for the card."""
        self.made.update(kinds)
        self.short_regions += len(kinds) < self.num

    def describe(self) -> str:
        """One paragraph for the dataset card: the kinds, their order and what each made."""
        made = ", ".join(f"{kind} {self.made.get(kind, 0)}" for kind in self.kinds)
        text = (
            f"Hard negatives ({self.num} per region, seed {self.seed}) were made by the strategies "
            f"{', '.join(f'`{kind}`' for kind in self.kinds)}, tried in that order. Negatives made by each: {made}."
        )
        if self.short_regions:
            text += (
                f" {self.short_regions} regions have fewer than {self.num} negatives (the loss masks the missing "
                "slots)."
            )
        if "number" in self.kinds:
            text += (
                f" Numbered names moved to their neighbours: {', '.join(rule.name for rule in NUMBER_RULES)}."
            )
            if self.siblings:
                text += (
                    f" Region names that differ only in their numbers are each other's number negatives "
                    f"({sum(map(len, self.siblings.values()))} names in {len(self.siblings)} groups)."
                )
        if "term" in self.kinds:
            shown = ", ".join(sorted(self.vocabulary)[:20]) + (" …" if len(self.vocabulary) > 20 else "")
            text += f" Term vocabulary ({len(self.vocabulary)} names): {shown}."
        return text

    def card_metadata(self) -> dict:
        """The strategy as YAML-ready data for the card's front matter."""
        return {
            "kinds": list(self.kinds),
            "per_region": self.num,
            "seed": self.seed,
            "made": {kind: self.made.get(kind, 0) for kind in self.kinds},
            "regions_with_fewer": self.short_regions,
            **({"number_rules": [rule.name for rule in NUMBER_RULES]} if "number" in self.kinds else {}),
            **(
                {"number_siblings": [list(names) for names in self.siblings.values()]}
                if "number" in self.kinds and self.siblings
                else {}
            ),
        }
