"""Zero-shot and few-shot classification from image embeddings and class text prototypes (Tables 1, 5 and 6).

Decisions:
- A class's text prototype is the normalised mean of its normalised prompt embeddings over a template set
  (prompt ensembling as in CLIP); `DEFAULT_TEMPLATES` is a medical set, overridable per dataset by a YAML file.
- Scores are cosine similarities; AUC is one-vs-rest per class (scikit-learn) and its macro mean, as in Table 1.
- The 95 % confidence interval of the macro AUC is a percentile bootstrap over images (seeded).
- k-shot episodes draw k support images per class from the support pool (seeded per episode); the queries are the
  evaluation split. Two classifiers: the *prototype rule* — each class vector is the normalised sum of its zero-shot
  text prototype and the mean of its normalised support embeddings, i.e. text and image evidence weighted equally —
  and a logistic-regression probe on the support embeddings alone.
"""

from pathlib import Path

import numpy as np
import torch
import yaml

from .features import text_embeddings
from .metrics import macro_auc

DEFAULT_TEMPLATES = (
    "{}",
    "a medical image showing {}",
    "an image with a {}",
    "findings consistent with {}",
    "a scan showing a {}",
)


def load_templates(path: str | Path | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """Templates and display names from a YAML file (`templates: [...]`, `class_names: {label: text}`)."""
    if path is None:
        return DEFAULT_TEMPLATES, {}
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    templates = tuple(data.get("templates") or DEFAULT_TEMPLATES)
    if not all("{}" in template for template in templates):
        raise ValueError(f"{path}: every template needs a '{{}}' placeholder for the class name")
    return templates, dict(data.get("class_names") or {})


@torch.no_grad()
def class_prototypes(
    model, processor, class_texts: list[str], templates=DEFAULT_TEMPLATES, max_length: int | None = None
) -> torch.Tensor:
    """`(C, P)` normalised text prototypes: the mean of each class's normalised template embeddings (prompts cut
    at `max_length` tokens, by default the tokenizer's limit)."""
    prompts = [template.format(text) for text in class_texts for template in templates]
    embeds = text_embeddings(model, processor, prompts, max_length, batch_size=len(prompts))
    embeds = embeds.view(len(class_texts), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(embeds, dim=-1)


def bootstrap_ci(
    scores: np.ndarray, labels: np.ndarray, samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of the macro AUC over images resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        index = rng.integers(0, len(labels), len(labels))
        value = macro_auc(scores[index], labels[index])["macro_auc"]
        if not np.isnan(value):
            values.append(value)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def zero_shot_scores(image_embeds: torch.Tensor, prototypes: torch.Tensor) -> np.ndarray:
    """`(N, C)` cosine similarities of the images to the class prototypes: the zero-shot scores."""
    return (torch.nn.functional.normalize(image_embeds.float(), dim=-1) @ prototypes.t()).numpy()


def zero_shot(
    image_embeds: torch.Tensor,
    labels: np.ndarray,
    prototypes: torch.Tensor,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Zero-shot macro / per-class AUC, accuracy and a bootstrap 95 % CI; `labels` are class indices."""
    scores = zero_shot_scores(image_embeds, prototypes)
    auc = macro_auc(scores, labels)
    return {
        "macro_auc": auc["macro_auc"],
        "per_class_auc": auc["per_class"],
        "accuracy": float((scores.argmax(1) == labels).mean()),
        "macro_auc_ci95": bootstrap_ci(scores, labels, bootstrap, seed) if bootstrap else None,
        "scores": scores,
    }


def few_shot(
    support_embeds: torch.Tensor,
    support_labels: np.ndarray,
    query_embeds: torch.Tensor,
    query_labels: np.ndarray,
    prototypes: torch.Tensor,
    shots: int,
    episodes: int = 5,
    seed: int = 0,
) -> dict:
    """Mean ± std macro AUC over seeded `shots`-shot episodes, for the prototype rule and a logistic probe."""
    from sklearn.linear_model import LogisticRegression

    support = torch.nn.functional.normalize(support_embeds.float(), dim=-1)
    queries = torch.nn.functional.normalize(query_embeds.float(), dim=-1)
    classes = prototypes.shape[0]
    results = {"prototype": [], "linear_probe": []}
    for episode in range(episodes):
        rng = np.random.default_rng([seed, shots, episode])
        chosen = []
        for label in range(classes):
            pool = np.flatnonzero(support_labels == label)
            if len(pool) < shots:
                raise ValueError(f"class {label} has {len(pool)} support images, fewer than {shots} shots")
            chosen.append(rng.choice(pool, shots, replace=False))
        chosen = np.concatenate(chosen)
        means = torch.stack([support[chosen[support_labels[chosen] == c]].mean(0) for c in range(classes)])
        vectors = torch.nn.functional.normalize(
            prototypes + torch.nn.functional.normalize(means, dim=-1), dim=-1
        )
        results["prototype"].append(macro_auc((queries @ vectors.t()).numpy(), query_labels)["macro_auc"])
        probe = LogisticRegression(max_iter=2000, C=10.0, random_state=episode)
        probe.fit(support[chosen].numpy(), support_labels[chosen])
        probabilities = np.zeros((len(queries), classes))
        probabilities[:, probe.classes_] = probe.predict_proba(queries.numpy())
        results["linear_probe"].append(macro_auc(probabilities, query_labels)["macro_auc"])
    return {
        name: {"mean": float(np.mean(values)), "std": float(np.std(values)), "episodes": len(values)}
        for name, values in results.items()
    }
