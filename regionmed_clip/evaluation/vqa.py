"""Medical VQA with frozen encoders (Table 2 of the paper): VQA-RAD, SLAKE and MedRegion-synth.

The encoders stay frozen; a small answer head is trained on the fused image and question embeddings and scored
on the test split as open, closed and overall accuracy plus their mean ("Avg").

Example:

```python
>>> from regionmed_clip import RegionMedCLIPModel, RegionMedCLIPProcessor
>>> from regionmed_clip.evaluation.vqa import evaluate_vqa, load_slake
>>> model = RegionMedCLIPModel.from_pretrained("path/to/checkpoint")  # doctest: +SKIP
>>> processor = RegionMedCLIPProcessor.from_pretrained("path/to/checkpoint")  # doctest: +SKIP
>>> evaluate_vqa(model, processor, load_slake("path/to/Slake1.0"))  # doctest: +SKIP
{'open': ..., 'closed': ..., 'overall': ..., 'avg': ..., 'num_train': ..., 'num_test': ..., 'num_answers': ...}
```
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from tqdm.auto import tqdm

from ..data.collator import image_input
from ..data.folder import load_rows
from .features import batched_embeddings, text_embeddings

ANSWER_TYPES = ("OPEN", "CLOSED")
VQA_SPLITS = ("train", "test")
# Sentence punctuation only: "Yes." and "yes" are one answer, but "50%" or "(a)" keep their meaning.
_TRAILING_PUNCTUATION = ".,;:!?"


@dataclass
class VQAExample:
    """One question about one image.

    Attributes:
        image: A file path, a PIL image or encoded bytes (anything the processor takes).
        question: The question text.
        answer: The reference answer as given by the dataset (normalised only when scored).
        answer_type: `"OPEN"` or `"CLOSED"` (upper-case).
        split: `"train"` or `"test"`.
        image_id: Identifies the image: examples with the same `image_id` share one image embedding.
    """

    image: str | os.PathLike | bytes | PILImage.Image
    question: str
    answer: str
    answer_type: str
    split: str
    image_id: str


def normalize_answer(text) -> str:
    """Lower-case, trim, collapse inner whitespace and drop trailing sentence punctuation (`.,;:!?`), so that
    "Yes." and " yes" are the same answer. Non-strings (VQA-RAD has integer answers) are turned into strings."""
    text = " ".join(str(text).lower().split())
    return text.rstrip(_TRAILING_PUNCTUATION + " ")


def _answer_type(value, where: str) -> str:
    """`OPEN` / `CLOSED` from the datasets' spellings ("closed", "CLOSED ", "Open")."""
    normalised = " ".join(str(value).split()).upper()
    if normalised not in ANSWER_TYPES:
        raise ValueError(f"{where}: answer_type {value!r} is neither OPEN nor CLOSED")
    return normalised


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"VQA annotation file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def _field(entry, key: str, where: str):
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry or entry[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
    return entry[key]


def _existing_image(path: Path, where: str, seen: set) -> str:
    # Many questions share an image; each file is checked once.
    if path not in seen:
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} does not exist")
        seen.add(path)
    return str(path)


def load_vqa_rad(json_path: str | os.PathLike, image_dir: str | os.PathLike) -> list[VQAExample]:
    """VQA-RAD from its public release: the JSON list of questions and the folder of images.

    The split comes from `phrase_type`: values starting with "test" ("test_freeform", "test_para") are the test
    split, everything else ("freeform", "para", ...) is train. Answers may be integers in the JSON and are kept
    as strings; `answer_type` is trimmed and upper-cased. The image is `image_dir / image_name`, and `image_name`
    is the `image_id`.

    Raises:
        `FileNotFoundError`: the JSON or an image file does not exist (naming the entry).
        `ValueError`: an entry lacks a field or has an unknown answer type (naming the file and entry).
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    examples, seen = [], set()
    for index, entry in enumerate(_read_json_list(json_path)):
        qid = entry.get("qid") if isinstance(entry, dict) else None
        where = f"{json_path} entry {index}" + (f" (qid {qid})" if qid is not None else "")
        image_name = str(_field(entry, "image_name", where))
        phrase_type = str(_field(entry, "phrase_type", where)).strip().lower()
        examples.append(
            VQAExample(
                image=_existing_image(image_dir / image_name, where, seen),
                question=str(_field(entry, "question", where)),
                answer=str(_field(entry, "answer", where)),
                answer_type=_answer_type(_field(entry, "answer_type", where), where),
                split="test" if phrase_type.startswith("test") else "train",
                image_id=image_name,
            )
        )
    return examples


SLAKE_FILES = {"train.json": "train", "validate.json": "train", "test.json": "test"}


def load_slake(root: str | os.PathLike) -> list[VQAExample]:
    """SLAKE from its public release: `root/{train,validate,test}.json` and the images under `root/imgs`.

    Only English questions (`q_lang == "en"`) are kept, as in the paper's comparison; the validation file is
    folded into train, since the head is trained for a fixed number of epochs and nothing is selected on it.
    The image is `root/imgs/<img_name>`, and `img_name` (e.g. "xmlab102/source.jpg") is the `image_id`.

    Raises:
        `FileNotFoundError`: one of the three JSON files or an image file does not exist (naming the entry).
        `ValueError`: an entry lacks a field or has an unknown answer type (naming the file and entry).
    """
    root = Path(root)
    # All three files are checked before any is read, so an incomplete copy fails at once, not after parsing.
    missing = [name for name in SLAKE_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"SLAKE folder {root} lacks {', '.join(missing)}")
    examples, seen = [], set()
    for name, split in SLAKE_FILES.items():
        path = root / name
        for index, entry in enumerate(_read_json_list(path)):
            qid = entry.get("qid") if isinstance(entry, dict) else None
            where = f"{path} entry {index}" + (f" (qid {qid})" if qid is not None else "")
            if str(_field(entry, "q_lang", where)).strip().lower() != "en":
                continue
            image_name = str(_field(entry, "img_name", where))
            examples.append(
                VQAExample(
                    image=_existing_image(root / "imgs" / image_name, where, seen),
                    question=str(_field(entry, "question", where)),
                    answer=str(_field(entry, "answer", where)),
                    answer_type=_answer_type(_field(entry, "answer_type", where), where),
                    split=split,
                    image_id=image_name,
                )
            )
    return examples


SYNTH_SPLITS = {"train": "train", "validation": "train", "test": "test"}


def load_synth_vqa(folder: str | os.PathLike) -> list[VQAExample]:
    """MedRegion-synth's `vqa` config joined with its image rows on `image_id`.

    train and validation become "train" and test stays "test" (as with SLAKE). Images are kept encoded (the
    parquet bytes, or the stored path when there are none) rather than decoded to PIL, so a large split does not
    sit in memory as pixels; the processor decodes them batch by batch.

    Raises:
        `ValueError`: a question points at an `image_id` that its split has no image row for.
    """
    from datasets import Image

    examples = []
    for split, target in SYNTH_SPLITS.items():
        rows = load_rows(folder, split).cast_column("image", Image(decode=False))
        images = dict(zip(rows["id"], (image_input(image) for image in rows["image"]), strict=True))
        for row in load_rows(folder, split, config="vqa"):
            if row["image_id"] not in images:
                raise ValueError(
                    f"{folder} ({split}): question {row['id']!r} refers to image_id {row['image_id']!r}, "
                    "which has no image row"
                )
            examples.append(
                VQAExample(
                    image=images[row["image_id"]],
                    question=row["question"],
                    answer=row["answer"],
                    answer_type=_answer_type(
                        row["answer_type"], f"{folder} ({split}) question {row['id']!r}"
                    ),
                    split=target,
                    image_id=row["image_id"],
                )
            )
    return examples


def _answer_head(in_dim: int, hidden: int, num_answers: int, dropout: float) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, hidden),
        torch.nn.GELU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, num_answers),
    )


def _accuracy(targets: np.ndarray, predictions: np.ndarray, mask: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(targets[mask], predictions[mask])) if mask.any() else math.nan


def evaluate_vqa(
    model,
    processor,
    examples: list[VQAExample],
    seed: int = 0,
    epochs: int = 50,
    hidden: int = 512,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    dropout: float = 0.1,
    embed_batch_size: int = 32,
    max_length: int = 64,
    progress: bool = True,
) -> dict:
    """Closed-set VQA accuracy of frozen `model` embeddings with a trained answer head.

    Decisions:

    - The encoders are frozen and run once: every distinct `image_id` is embedded once (the global, normalised
      image embedding, no ROIs) and every distinct question once (normalised text embedding).
    - The head sees the fused feature `[img, q, img * q]` standardised with the train split's per-dimension mean
      and std (the embeddings of one encoder share a large common direction that would otherwise swamp the
      differences between questions), and is `Linear(3P, hidden) → GELU → Dropout → Linear(hidden, n_answers)`.
    - The answers are classes: the vocabulary is every normalised answer ([`normalize_answer`]) of the train
      split. A test answer outside it counts as wrong, so accuracy is over all test questions.
    - Training: cross-entropy, AdamW, `epochs` full passes in `batch_size` mini-batches, no early stopping (there
      is no validation split to select on: SLAKE's and MedRegion-synth's are folded into train). It runs on the
      CPU (the head is tiny) under `torch.manual_seed(seed)` inside a forked RNG, so one seed always gives the
      same head and the caller's random state is left untouched.
    - Returned: accuracy (scikit-learn's `accuracy_score`) on OPEN, CLOSED and all test questions, and `avg`, the
      mean of those three as in the paper's Table 2 "Avg" column. A type with no test question gets NaN (and so
      does `avg`, which cannot be formed then).

    Args:
        model ([`RegionMedCLIPModel`]): The model whose (frozen) embeddings are evaluated.
        processor ([`RegionMedCLIPProcessor`]): Its processor.
        examples (`list[VQAExample]`): Train and test questions together (`split` "train" or "test").
        seed, epochs, hidden, batch_size, lr, weight_decay, dropout: The answer head and its training.
        embed_batch_size (`int`): Images or questions per encoder pass.
        max_length (`int`): Token limit for the questions.
        progress (`bool`): Show progress bars.

    Returns:
        `dict` with `open`, `closed`, `overall`, `avg` (fractions) and `num_train`, `num_test`, `num_answers`.
    """
    for example in examples:
        if example.split not in VQA_SPLITS:
            raise ValueError(f"example split must be one of {VQA_SPLITS}, got {example.split!r}")
    train = [example for example in examples if example.split == "train"]
    test = [example for example in examples if example.split == "test"]
    if not train or not test:
        raise ValueError(f"evaluate_vqa needs train and test examples, got {len(train)} and {len(test)}")

    model.eval()
    device = next(model.parameters()).device

    def encode_images(images: list) -> torch.Tensor:
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        return model.get_image_features(pixel_values=pixel_values).pooler_output

    image_index: dict[str, int] = {}
    images = []
    for example in examples:
        if example.image_id not in image_index:
            image_index[example.image_id] = len(images)
            images.append(example.image)
    question_index = {question: i for i, question in enumerate(dict.fromkeys(e.question for e in examples))}
    image_embeds = batched_embeddings(encode_images, images, embed_batch_size, "vqa images", progress)
    question_embeds = text_embeddings(
        model, processor, list(question_index), max_length, embed_batch_size, "vqa questions", progress
    )

    def fused(split_examples: list[VQAExample]) -> torch.Tensor:
        image = image_embeds[[image_index[example.image_id] for example in split_examples]]
        question = question_embeds[[question_index[example.question] for example in split_examples]]
        return torch.cat([image, question, image * question], dim=-1)

    train_features, test_features = fused(train), fused(test)
    mean, std = train_features.mean(0), train_features.std(0, unbiased=False).clamp_min(1e-6)
    train_features, test_features = (train_features - mean) / std, (test_features - mean) / std

    vocabulary = {answer: i for i, answer in enumerate(sorted({normalize_answer(e.answer) for e in train}))}
    train_targets = torch.tensor([vocabulary[normalize_answer(example.answer)] for example in train])
    # -1 is never predicted: an answer the head cannot output is a wrong answer.
    test_targets = np.array([vocabulary.get(normalize_answer(example.answer), -1) for example in test])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _answer_head(train_features.shape[1], hidden, len(vocabulary), dropout)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        order_generator = torch.Generator().manual_seed(seed)
        head.train()
        for _ in tqdm(range(epochs), desc="vqa head", leave=False, disable=not progress):
            order = torch.randperm(len(train), generator=order_generator)
            for start in range(0, len(train), batch_size):
                batch = order[start : start + batch_size]
                loss = torch.nn.functional.cross_entropy(head(train_features[batch]), train_targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        head.eval()
        with torch.no_grad():
            predictions = head(test_features).argmax(-1).numpy()

    answer_types = np.array([example.answer_type.upper() for example in test])
    metrics = {
        "open": _accuracy(test_targets, predictions, answer_types == "OPEN"),
        "closed": _accuracy(test_targets, predictions, answer_types == "CLOSED"),
        "overall": _accuracy(test_targets, predictions, np.ones(len(test), dtype=bool)),
    }
    metrics["avg"] = float(np.mean([metrics["open"], metrics["closed"], metrics["overall"]]))
    metrics.update(num_train=len(train), num_test=len(test), num_answers=len(vocabulary))
    return metrics
