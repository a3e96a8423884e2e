"""The medical region vocabulary: descriptive adjectives in contrast groups, lesion terms, and positions.

Region captions in the paper are "adjective|term|position" triples. Hard negatives swap the adjective for one that
contradicts it, so each adjective group lists words that describe the same property (shape, margin, texture,
colour, density) in mutually exclusive ways. Within a group every other word is a contrast; the explicit `OPPOSITES`
are the strongest contrasts and are tried first.
"""

import string

ADJECTIVE_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": (
        "round",
        "oval",
        "irregular",
        "lobulated",
        "spiculated",
        "elongated",
        "linear",
        "wedge-shaped",
        "tubular",
    ),
    "margin": ("well-defined", "ill-defined", "smooth", "indistinct", "circumscribed", "infiltrative"),
    "texture": (
        "homogeneous",
        "heterogeneous",
        "cystic",
        "solid",
        "ground-glass",
        "reticular",
        "granular",
        "raised",
        "flat",
    ),
    "colour": ("red", "pink", "pale", "brown", "dark", "yellow", "white", "blue-black", "erythematous"),
    "density": (
        "hyperdense",
        "hypodense",
        "calcified",
        "radiolucent",
        "hyperechoic",
        "hypoechoic",
        "hyperintense",
        "hypointense",
    ),
}

# The strongest contrasts of a word: tried before the rest of its group.
OPPOSITES: dict[str, tuple[str, ...]] = {
    "round": ("irregular", "spiculated", "lobulated"),
    "oval": ("irregular", "spiculated", "linear"),
    "irregular": ("round", "oval", "smooth"),
    "lobulated": ("round", "oval", "linear"),
    "spiculated": ("round", "smooth", "oval"),
    "elongated": ("round", "oval", "wedge-shaped"),
    "linear": ("round", "lobulated", "oval"),
    "wedge-shaped": ("round", "linear", "oval"),
    "tubular": ("round", "wedge-shaped", "lobulated"),
    "well-defined": ("ill-defined", "indistinct", "infiltrative"),
    "ill-defined": ("well-defined", "circumscribed", "smooth"),
    "smooth": ("infiltrative", "indistinct", "ill-defined"),
    "indistinct": ("well-defined", "circumscribed", "smooth"),
    "circumscribed": ("ill-defined", "infiltrative", "indistinct"),
    "infiltrative": ("circumscribed", "well-defined", "smooth"),
    "homogeneous": ("heterogeneous", "reticular", "granular"),
    "heterogeneous": ("homogeneous", "solid", "flat"),
    "cystic": ("solid", "calcified", "granular"),
    "solid": ("cystic", "ground-glass", "reticular"),
    "ground-glass": ("solid", "calcified", "homogeneous"),
    "reticular": ("homogeneous", "solid", "flat"),
    "granular": ("homogeneous", "smooth", "cystic"),
    "raised": ("flat", "ground-glass", "reticular"),
    "flat": ("raised", "granular", "cystic"),
    "red": ("pale", "white", "blue-black"),
    "pink": ("dark", "brown", "blue-black"),
    "pale": ("red", "dark", "erythematous"),
    "brown": ("pink", "white", "pale"),
    "dark": ("pale", "white", "yellow"),
    "yellow": ("dark", "blue-black", "red"),
    "white": ("dark", "red", "brown"),
    "blue-black": ("pink", "yellow", "pale"),
    "erythematous": ("pale", "white", "brown"),
    "hyperdense": ("hypodense", "radiolucent", "hypoechoic"),
    "hypodense": ("hyperdense", "calcified", "hyperechoic"),
    "calcified": ("radiolucent", "hypodense", "cystic"),
    "radiolucent": ("calcified", "hyperdense", "hyperintense"),
    "hyperechoic": ("hypoechoic", "hypodense", "radiolucent"),
    "hypoechoic": ("hyperechoic", "hyperdense", "calcified"),
    "hyperintense": ("hypointense", "hypodense", "radiolucent"),
    "hypointense": ("hyperintense", "hyperdense", "calcified"),
}

TERMS: tuple[str, ...] = (
    "nodule",
    "mass",
    "cyst",
    "calcification",
    "opacity",
    "lesion",
    "consolidation",
    "effusion",
    "tumor",
    "polyp",
    "ulcer",
    "plaque",
    "infiltrate",
    "hemorrhage",
    "exudate",
    "drusen",
    "nevus",
    "papule",
    "fracture",
    "stenosis",
)

HORIZONTAL: tuple[str, ...] = ("left", "center", "right")
VERTICAL: tuple[str, ...] = ("upper", "middle", "lower")
POSITION_OPPOSITES: dict[str, str] = {
    "left": "right",
    "right": "left",
    "upper": "lower",
    "lower": "upper",
    "superior": "inferior",
    "inferior": "superior",
    "anterior": "posterior",
    "posterior": "anterior",
    "medial": "lateral",
    "lateral": "medial",
}
POSITION_WORDS: frozenset[str] = frozenset(POSITION_OPPOSITES) | {"center", "central", "middle"}

ADJECTIVE_TO_GROUP: dict[str, str] = {
    word: group for group, words in ADJECTIVE_GROUPS.items() for word in words
}


def contrasts(adjective: str) -> list[str]:
    """Words that contradict `adjective`: its explicit opposites, then the rest of its group, in a fixed order."""
    group = ADJECTIVE_GROUPS[ADJECTIVE_TO_GROUP[adjective]]
    first = list(OPPOSITES.get(adjective, ()))
    return first + [word for word in group if word != adjective and word not in first]


def grid_position(center_x: float, center_y: float) -> str:
    """'left upper' … 'right lower' for a point given as fractions of the image width / height (image coordinates:
    'left' is the left of the picture)."""
    column = HORIZONTAL[min(int(center_x * 3), 2)]
    row = VERTICAL[min(int(center_y * 3), 2)]
    return "center" if (column, row) == ("center", "middle") else f"{column} {row}"


def without_position_words(caption: str) -> str:
    """`caption` with its position words (`POSITION_WORDS`, any case, punctuation around them ignored) taken out:
    "round nodule left upper" → "round nodule". What is left says what a region is, not where it is."""
    return " ".join(
        word for word in caption.split() if word.strip(string.punctuation).lower() not in POSITION_WORDS
    )
