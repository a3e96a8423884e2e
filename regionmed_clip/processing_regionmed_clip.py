"""Processor for RegionMed-CLIP: the image processor and a tokenizer that normalises text as the paper does."""

import json
import os
import unicodedata

import numpy as np
from tokenizers import Regex, normalizers
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import BatchEncoding

from .configuration_regionmed_clip import require_supported_transformers

require_supported_transformers()

try:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
except ImportError:  # transformers 4: the same tokenizers-backed class under its v4 name
    from transformers import PreTrainedTokenizerFast as TokenizersBackend

# The tokenizer class name written to `tokenizer_config.json`: transformers 4 knows the tokenizers-backed class only as
# `PreTrainedTokenizerFast`, which transformers 5 keeps as an alias, so folders saved anywhere load everywhere.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# Unicode punctuation plus the ASCII symbols of Python's `string.punctuation` that Unicode files as symbols.
PUNCTUATION_PATTERN = r"[\p{P}$+<=>^`|~]"


# The ASCII symbols PUNCTUATION_PATTERN deletes beside Unicode punctuation (general category P).
_DELETED_SYMBOLS = frozenset("$+<=>^`|~")
# The code points BERT-style tokenizers split into words of their own (`handle_chinese_chars`): CJK ideographs.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def caption_key(text: str) -> str:
    """The identity of a text as the model sees it: two texts have the same key exactly when the tokenizer, behind
    [`with_paper_normalizer`], gives them the same token ids. Every place that asks whether two captions are the
    same (the data validator, the negative generators, evaluation's "identical texts are one target" grouping)
    compares these keys; the loss's caption masks compare the token ids themselves.

    The rule is the tokenizer's normalisation, written with Unicode categories so the data layer needs no
    tokenizer: punctuation (category P) and the symbols `$+<=>^|~` and backquote are deleted, not spaced (so
    "X-Ray" is "xray"); text is lower-cased character by character; accents are stripped (NFD, combining marks
    dropped); control characters are dropped and whitespace collapsed; each CJK ideograph stands as a word of its
    own ("左肺" is "左 肺"). Digits and every script are kept: "L4" and "L5", "рак" and "рок" differ. That is the
    view of the BERT-style uncased tokenizers the package ships with, tested pair by pair on a corpus of tricky
    captions. A tokenizer that keeps accents or does not split CJK ideographs (SentencePiece) tells a few more
    texts apart than the key does. One whose vocabulary lacks a script (an English BERT has few CJK ideographs)
    maps its words to `[UNK]`, so the model cannot tell such captions apart while the key still does: a text
    tower with that script in its vocabulary is the remedy.
    """
    kept = []
    # Lower-cased character by character, as the tokenizer does ("ΣΟΦΟΣ" is "σοφοσ", no final-sigma rule).
    lowered = "".join(char.lower() for char in str(text))
    for char in unicodedata.normalize("NFD", lowered):
        category = unicodedata.category(char)
        if category.startswith("P") or char in _DELETED_SYMBOLS or category == "Mn":
            continue
        if char.isspace():
            kept.append(" ")
        elif category.startswith("C"):
            continue
        else:
            kept.append(f" {char} " if _is_cjk(char) else char)
    return " ".join("".join(kept).split())


def _has_paper_normalizer(normalizer) -> bool:
    return normalizer is not None and PUNCTUATION_PATTERN in str(normalizer)


def with_paper_normalizer(tokenizer) -> TokenizersBackend:
    """Return `tokenizer` as a tokenizers-backed tokenizer whose own normalizer lower-cases and deletes punctuation.

    The paper lower-cases all text and strips punctuation. Doing it inside the tokenizer (a `Replace` + `Lowercase`
    put in front of the existing normalizer) means the processor, the zero-shot pipeline, a bare `AutoTokenizer` and
    training all see the same text. Punctuation is deleted, not replaced by a space, so a hyphenated word joins up:
    "X-Ray" and "xray" give the same ids, as do "left-sided" and "leftsided".

    The result is a generic `TokenizersBackend` (`PreTrainedTokenizerFast` in transformers 4; the processor saves it
    under that name, which both major versions resolve to the generic class): model-specific classes such as
    `BertTokenizer` rebuild their normalizer from their init arguments when loaded, which would drop this one; the
    generic class loads `tokenizer.json` as written. Calling it again is a no-op.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no `tokenizers` backend; RegionMed-CLIP needs a fast tokenizer "
            "(load it with AutoTokenizer, which returns one for BERT-family models)."
        )
    if type(tokenizer) is TokenizersBackend and _has_paper_normalizer(backend.normalizer):
        return tokenizer
    backend = type(backend).from_str(backend.to_str())
    if not _has_paper_normalizer(backend.normalizer):
        steps = [normalizers.Replace(Regex(PUNCTUATION_PATTERN), ""), normalizers.Lowercase()]
        if backend.normalizer is not None:
            steps.append(backend.normalizer)
        backend.normalizer = normalizers.Sequence(steps)
    return TokenizersBackend(
        tokenizer_object=backend,
        model_max_length=tokenizer.model_max_length,
        model_input_names=list(tokenizer.model_input_names),
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        **tokenizer.special_tokens_map,
    )


class RegionMedCLIPProcessor(ProcessorMixin):
    r"""
    Processor of RegionMed-CLIP: a [`RegionMedCLIPImageProcessor`] and a tokenizer, in one call that returns exactly
    the model's input names.

    The tokenizer is wrapped by [`with_paper_normalizer`] on construction, so text is lower-cased and stripped of
    punctuation by the tokenizer itself, wherever it is used. A processor converted from a trained dual encoder
    keeps that model's own tokenizer instead (`normalize_text=False`), since its text tower learned that
    tokenizer's ids.

    Args:
        image_processor ([`RegionMedCLIPImageProcessor`]): The image processor.
        tokenizer (`PreTrainedTokenizerBase`): A fast tokenizer of the text tower.
        normalize_text (`bool`, *optional*, defaults to `True`): Wrap the tokenizer in [`with_paper_normalizer`].
        text_padding (`bool` or `str`, *optional*, defaults to `True`): Default `padding` of every text field
            (`"max_length"` for towers trained on one fixed length, as SigLIP's).
        text_max_length (`int`, *optional*): Default `max_length` of every text field.

    Example:

    ```python
    >>> from PIL import Image
    >>> from regionmed_clip import RegionMedCLIPProcessor
    >>> processor = RegionMedCLIPProcessor.from_pretrained("path/to/regionmed-clip")
    >>> inputs = processor(
    ...     text=["Chest X-ray: a round nodule in the left upper lobe."],
    ...     images=[Image.open("cxr.png")],
    ...     boxes=[[(120, 80, 180, 140)]],
    ...     region_text=[["round nodule left upper"]],
    ...     negative_text=[[["spiculated nodule left upper", "round mass left upper"]]],
    ...     return_tensors="pt",
    ... )
    ```
    """

    if not hasattr(ProcessorMixin, "get_attributes"):
        # transformers 4 lists the sub-processors and their loading classes here; 5 reads the `__init__` signature.
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = PORTABLE_TOKENIZER_CLASS

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        normalize_text: bool = True,
        text_padding: bool | str = True,
        text_max_length: int | None = None,
        **kwargs,
    ):
        if tokenizer is not None and normalize_text:
            tokenizer = with_paper_normalizer(tokenizer)
        super().__init__(image_processor, tokenizer, **kwargs)
        self.normalize_text = normalize_text
        self.text_padding = text_padding
        self.text_max_length = text_max_length

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as `ProcessorMixin` does, naming the tokenizer class `PreTrainedTokenizerFast` (see
        `PORTABLE_TOKENIZER_CLASS`) so that transformers 4 can load the folder too."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        tokenizer_config = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(tokenizer_config):
            with open(tokenizer_config, encoding="utf-8") as handle:
                settings = json.load(handle)
            if settings.get("tokenizer_class") == "TokenizersBackend":
                settings["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
                with open(tokenizer_config, "w", encoding="utf-8") as handle:
                    json.dump(settings, handle, indent=2, sort_keys=True, ensure_ascii=False)
                    handle.write("\n")
        return result

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            *self.image_processor.model_input_names,
            "region_input_ids",
            "region_attention_mask",
            "term_input_ids",
            "term_attention_mask",
            "negative_input_ids",
            "negative_attention_mask",
            "summary_input_ids",
            "summary_attention_mask",
        ]

    def _tokenize(self, texts: list[str], padding, truncation, max_length) -> BatchEncoding:
        return self.tokenizer(
            texts,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_token_type_ids=False,
            return_tensors="np",
        )

    def _captions_per_box(self, captions, boxes, name: str) -> list[list]:
        if boxes is None:
            raise ValueError(f"{name} was given without boxes; region captions need the boxes they describe.")
        if len(captions) != len(boxes):
            raise ValueError(f"{name} covers {len(captions)} images but boxes cover {len(boxes)}.")
        for index, (image_captions, image_boxes) in enumerate(zip(captions, boxes, strict=True)):
            num_boxes = 0 if image_boxes is None else len(image_boxes)
            if len(image_captions) != num_boxes:
                raise ValueError(
                    f"image {index}: {name} has {len(image_captions)} entries for {num_boxes} boxes; give exactly "
                    "one per box."
                )
        return captions

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        boxes=None,
        region_text: list[list[str]] | None = None,
        term_text: list[list[str]] | None = None,
        negative_text: list[list[list[str]]] | None = None,
        summary_text: list[str] | None = None,
        padding: bool | str | None = None,
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchEncoding:
        r"""
        Args:
            text (`str` or `list[str]`, *optional*): Reports or prompts.
            images (*optional*): One image or a list (any input [`RegionMedCLIPImageProcessor`] accepts).
            boxes (`list`, *optional*): Per image, its ROI boxes `(x0, y0, x1, y1)` in original pixels.
            region_text (`list[list[str]]`, *optional*): Per image, one region caption per box.
            term_text (`list[list[str]]`, *optional*): Per image, each box's term (the finding's name, e.g.
                "nodule"): with the captions, the queries the detector is trained on.
            negative_text (`list[list[list[str]]]`, *optional*): Per image, per box, its hard-negative captions
                (the number may vary; missing ones are padded with all-zero attention masks).
            summary_text (`list[str]`, *optional*): Per image, its summary caption.
            padding, truncation, max_length: Passed to the tokenizer for every text field (`padding` and
                `max_length` default to the processor's `text_padding` / `text_max_length`).
            return_tensors (`str`, *optional*): `"pt"` for torch tensors, `"np"` for NumPy arrays.
            **kwargs: Passed to the image processor (e.g. `max_regions`, `size`).

        Returns:
            `BatchEncoding` with `input_ids`, `attention_mask`, `pixel_values`, `roi_boxes`, `roi_mask`,
            `roi_pixel_values` (crop mode), `region_input_ids` / `region_attention_mask` and `term_input_ids` /
            `term_attention_mask` `(B, max_regions, L)`, and
            `negative_input_ids` / `negative_attention_mask` `(B, max_regions, M, L)`, `summary_input_ids` /
            `summary_attention_mask`, each present when its input is.
        """
        if text is None and images is None:
            raise ValueError("Pass text, images, or both.")
        padding = self.text_padding if padding is None else padding
        max_length = self.text_max_length if max_length is None else max_length
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            data.update(self._tokenize(texts, padding, truncation, max_length))
        if images is not None:
            image_inputs = self.image_processor(images, boxes=boxes, **kwargs)
            data.update(image_inputs)
        elif boxes is not None:
            raise ValueError("boxes were given without images.")
        if region_text is not None or term_text is not None or negative_text is not None:
            if "roi_mask" not in data:
                raise ValueError("region_text / term_text / negative_text need images and boxes.")
            slots = data["roi_mask"].shape[1]
        for name, texts in (("region", region_text), ("term", term_text)):
            if texts is None:
                continue
            captions = self._captions_per_box(texts, boxes, f"{name}_text")
            flat = [caption for image_captions in captions for caption in image_captions]
            encoded = self._tokenize(flat, padding, truncation, max_length) if flat else None
            data[f"{name}_input_ids"], data[f"{name}_attention_mask"] = _scatter_rows(
                encoded, [[(slot,) for slot in range(len(c))] for c in captions], (slots,)
            )
        if negative_text is not None:
            negatives = self._captions_per_box(negative_text, boxes, "negative_text")
            most = max(
                (len(per_box) for image_negatives in negatives for per_box in image_negatives), default=0
            )
            flat = [
                caption for image_negatives in negatives for per_box in image_negatives for caption in per_box
            ]
            encoded = self._tokenize(flat, padding, truncation, max_length) if flat else None
            positions = [
                [(slot, k) for slot, per_box in enumerate(image_negatives) for k in range(len(per_box))]
                for image_negatives in negatives
            ]
            data["negative_input_ids"], data["negative_attention_mask"] = _scatter_rows(
                encoded, positions, (slots, most)
            )
        if summary_text is not None:
            summary = self._tokenize(list(summary_text), padding, truncation, max_length)
            data["summary_input_ids"], data["summary_attention_mask"] = (
                summary["input_ids"],
                summary["attention_mask"],
            )
        return BatchEncoding(data=dict(data), tensor_type=return_tensors)


def _scatter_rows(encoded: BatchEncoding | None, positions: list[list[tuple]], slot_shape: tuple):
    """Place consecutive tokenised rows at `(image, *position)` of zero arrays shaped `(B, *slot_shape, L)`."""
    length = 1 if encoded is None else encoded["input_ids"].shape[1]
    ids = np.zeros((len(positions), *slot_shape, length), dtype=np.int64)
    mask = np.zeros_like(ids)
    row = 0
    for image, image_positions in enumerate(positions):
        for position in image_positions:
            ids[(image, *position)] = encoded["input_ids"][row]
            mask[(image, *position)] = encoded["attention_mask"][row]
            row += 1
    return ids, mask


__all__ = ["RegionMedCLIPProcessor", "caption_key", "with_paper_normalizer"]
