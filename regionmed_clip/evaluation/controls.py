"""Measured controls: what a region figure would be from the caption text alone or from the box alone.

A region figure means something only above what needs no image. Two controls are fitted on the training split and
scored on the evaluation split with the same metric functions as the model:

- Text-only prior for hard negatives (`TextPrior`): a logistic regression on unigram counts of the caption, trained
  to tell the training split's region captions (1) from their hard negatives (0). It never sees an image; when the
  negatives use words that positives never do, it beats the 1 / (M + 1) "chance" by exactly that much.
- Box-only control for region retrieval and pointing (`BoxOnlyControl`): the `k` training regions whose boxes are
  nearest in `(centre x, centre y, width, height)` (fractions of the image) vote for the words of their captions;
  a caption scores the mean log-probability of its words under those votes (add-½ smoothing). Where positions
  follow from the box centre, this control reads them off the box as the ROI processor can.

Words are lower-cased `\\w+` runs; nothing assumes a caption has any particular structure.
"""

import re
from collections.abc import Sequence

import numpy as np
import torch

from .grounding import pointing_accuracy_from_scores, region_slots
from .metrics import caption_targets, hard_negative_accuracy_from_scores, ranks_from_scores, recall_at_k

_WORD = re.compile(r"\w+")


def caption_words(text: str) -> list[str]:
    """The lower-cased word tokens of a caption."""
    return _WORD.findall(text.lower())


def box_geometry(boxes: np.ndarray) -> np.ndarray:
    """`(N, 4)` `(cx, cy, w, h)` from `(N, 4)` normalised `x0, y0, x1, y1` boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
        ],
        axis=1,
    )


class TextPrior:
    """Scores a caption by its text alone: P(positive | unigrams), a logistic regression fitted on the training
    split's region captions against their hard negatives."""

    def __init__(self, captions: Sequence[str], negatives: Sequence[Sequence[str]], seed: int = 0):
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression

        texts = list(captions) + [text for per_region in negatives for text in per_region]
        targets = np.r_[np.ones(len(captions)), np.zeros(len(texts) - len(captions))]
        if len(set(targets.tolist())) < 2:
            raise ValueError("the text prior needs training regions with captions and hard negatives")
        self.vectorizer = CountVectorizer(analyzer=caption_words, binary=True)
        self.classifier = LogisticRegression(max_iter=2000, random_state=seed)
        self.classifier.fit(self.vectorizer.fit_transform(texts), targets)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """The logit of "positive caption" for each text."""
        if not texts:
            return np.zeros(0)
        return self.classifier.decision_function(self.vectorizer.transform(list(texts)))

    def hard_negative_accuracy(self, captions: Sequence[str], negatives: Sequence[Sequence[str]]) -> float:
        """[`hard_negative_accuracy`] with the prior's score in place of the image–text similarity."""
        width = max((len(per_region) for per_region in negatives), default=0)
        flat = [text for per_region in negatives for text in per_region]
        flat_scores = self.score(flat)
        scores = torch.zeros(len(captions), width, dtype=torch.float64)
        mask = torch.zeros(len(captions), width, dtype=torch.bool)
        start = 0
        for row, per_region in enumerate(negatives):
            scores[row, : len(per_region)] = torch.from_numpy(flat_scores[start : start + len(per_region)])
            mask[row, : len(per_region)] = True
            start += len(per_region)
        return hard_negative_accuracy_from_scores(torch.from_numpy(self.score(captions)), scores, mask)


class BoxOnlyControl:
    """Scores a caption for a box from the box alone: its `k` nearest training boxes vote for caption words.

    Time and memory grow linearly with the splits: the `k` nearest training boxes of each query come from a k-d tree
    (scikit-learn's `KDTree` over the box geometry), and queries are scored `chunk` boxes at a time, with
    `chunk × k × words` votes and `chunk × captions` scores alive at once.
    """

    def __init__(
        self,
        boxes: np.ndarray,
        captions: Sequence[str],
        k: int = 25,
        smoothing: float = 0.5,
        chunk_bytes: int = 64 * 2**20,
    ):
        from sklearn.neighbors import KDTree

        if len(captions) == 0:
            raise ValueError("the box-only control needs training regions")
        self.geometry = box_geometry(boxes)
        self.tree = KDTree(self.geometry)
        self.words = [set(caption_words(caption)) for caption in captions]
        self.k = min(k, len(captions))
        self.smoothing = smoothing
        self.chunk_bytes = chunk_bytes

    def nearest(self, query: np.ndarray) -> np.ndarray:
        """`(Q, k)` training rows: each query box's `k` nearest training boxes by squared distance in geometry, ties
        broken by training order (so the control is deterministic), in that order."""
        kth = self.tree.query(query, k=self.k)[0][:, -1]
        # The tree finds every box within the k-th distance (with a margin for its rounding); the exact squared
        # distances then order them, as a stable sort of all training boxes would.
        candidates = self.tree.query_radius(query, r=kth * (1 + 1e-6) + 1e-12)
        nearest = np.empty((len(query), self.k), dtype=np.int64)
        for row, rows in enumerate(candidates):
            rows = np.sort(rows)
            distances = ((query[row] - self.geometry[rows]) ** 2).sum(-1)
            nearest[row] = rows[np.argsort(distances, kind="stable")[: self.k]]
        return nearest

    def score_chunks(self, boxes: np.ndarray, captions: Sequence[str]):
        """`(start, scores)` of consecutive chunks of boxes, `scores` `(chunk, len(captions))`: the mean
        log-probability of each caption's words given each box."""
        vocabulary = sorted(set().union(*self.words, *(caption_words(c) for c in captions)))
        index = {word: i for i, word in enumerate(vocabulary)}
        train = np.zeros((len(self.words), len(vocabulary)), dtype=np.uint8)
        for row, words in enumerate(self.words):
            train[row, [index[word] for word in words]] = 1
        membership = np.zeros((len(captions), len(vocabulary)))
        for row, caption in enumerate(captions):
            words = set(caption_words(caption))
            membership[row, [index[word] for word in words]] = 1 / max(len(words), 1)
        query = box_geometry(boxes)
        row_bytes = 8 * max(self.k * len(vocabulary), len(captions))
        chunk = max(1, self.chunk_bytes // row_bytes)
        for start in range(0, len(query), chunk):
            # Neighbours whose caption holds each word, (chunk, V): integer counts, exact in float64.
            counts = train[self.nearest(query[start : start + chunk])].sum(1, dtype=np.float64)
            log_p = np.log(counts + self.smoothing) - np.log(self.k + 2 * self.smoothing)
            yield start, torch.from_numpy(log_p @ membership.T)

    def scores(self, boxes: np.ndarray, captions: Sequence[str]) -> torch.Tensor:
        """`(len(boxes), len(captions))`: the mean log-probability of each caption's words given each box."""
        chunks = [scores for _, scores in self.score_chunks(boxes, captions)]
        return torch.cat(chunks) if chunks else torch.zeros((0, len(captions)), dtype=torch.float64)

    def region_retrieval(self, boxes: np.ndarray, captions: Sequence[str]) -> dict:
        """Region → caption retrieval among the distinct `captions`, as [`region_metrics`] scores the model; ranked
        chunk by chunk, so only one chunk's scores exist at a time."""
        rows, targets = caption_targets(list(captions))
        distinct = [captions[row] for row in rows]
        groups = torch.arange(len(distinct))
        ranks = [
            ranks_from_scores(scores, targets[start : start + len(scores)], groups)
            for start, scores in self.score_chunks(boxes, distinct)
        ]
        return recall_at_k(torch.cat(ranks))

    def pointing(self, boxes: np.ndarray, captions: Sequence[str], region_image: torch.Tensor) -> dict:
        """The pointing game with the box-only scores: each region against its image's other captions."""
        (order, _), mask = region_slots(region_image)
        scores = torch.full((*mask.shape, mask.shape[1]), float("-inf"), dtype=torch.float64)
        for image in range(mask.shape[0]):
            members = (order == image).nonzero()[:, 0]
            block = self.scores(boxes[members.numpy()], [captions[i] for i in members.tolist()])
            scores[image, : len(members), : len(members)] = block
        return pointing_accuracy_from_scores(scores, mask)
