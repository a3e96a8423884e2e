"""The model card: `README.md` of a published model folder, rendered from the top-level `model_card.md`.

The card is filled by a small pure-Python renderer (`{{ name }}` placeholders, every one required), so no template
engine is needed; the YAML front matter comes from huggingface_hub's `ModelCardData`, whose `model-index` holds the
evaluation figures exactly as `regionmed-clip eval` wrote them, none invented.
"""

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from safetensors import safe_open

# The top-level model_card.md, reached through a link inside the package so that wheels carry it as package data.
MODEL_CARD_TEMPLATE = Path(__file__).parents[1] / "model_card.md"
TAGS = (
    "medical",
    "clip",
    "region-aware",
    "vision-language",
    "zero-shot-image-classification",
    "regionmed-clip",
)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace every `{{ name }}` of `template`; a placeholder without a value is an error, never left in."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise ValueError(f"model card template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _card_dataset_name(folder: Path) -> str | None:
    """`pretty_name` from a dataset folder's card."""
    try:
        return (metadata_load(folder / "README.md") or {}).get("pretty_name")
    except (OSError, ValueError, yaml.YAMLError):
        return None


def eval_results(
    metrics: dict, dataset_id: str | None = None, dataset_dir: str | os.PathLike | None = None
) -> list[EvalResult]:
    """`huggingface_hub.EvalResult`s for every figure a `regionmed-clip eval` metrics.json holds.

    The figures, their names and task types come from the evaluation package (`model_index_figures`, next to
    the code that writes metrics.json), so a renamed metric changes the card with it. Values are the JSON's own
    numbers (fractions, not percentages). The results name `dataset_id` as their dataset only when the metrics'
    recorded data sha256 is that of `dataset_dir` (the folder being published); otherwise the Hub id or folder
    name the evaluation recorded.
    """
    from ..evaluation.report import dataset_hash, model_index_figures

    provenance = metrics.get("provenance", {})
    data = str(provenance.get("data", "unknown"))
    data_sha = str(provenance.get("data_sha256", ""))
    split = provenance.get("settings", {}).get("split")
    if data_sha.startswith("hub:"):
        dataset_type = data_sha.removeprefix("hub:")
    elif (
        dataset_id
        and dataset_dir is not None
        and Path(dataset_dir).is_dir()
        and data_sha == dataset_hash(dataset_dir)
    ):
        dataset_type = dataset_id
    else:
        dataset_type = Path(data).name or data
    dataset_name = _card_dataset_name(Path(data)) or dataset_type
    return [
        EvalResult(
            task_type=figure.task_type,
            task_name=figure.task_name,
            dataset_type=figure.dataset.lower() if figure.dataset else dataset_type,
            dataset_name=figure.dataset or dataset_name,
            dataset_split=split,
            metric_type=figure.metric_type,
            metric_name=figure.metric_name,
            metric_value=figure.value,
        )
        for figure in model_index_figures(metrics)
    ]


def _results_section(results: list[EvalResult], source: str) -> str:
    if not results:
        return (
            "No evaluation results were supplied when this card was written. `regionmed-clip eval --model "
            "MODEL --data DATA --out DIR` measures zero-shot and few-shot AUC, image–text retrieval, "
            "region-level retrieval, grounding and VQA; `regionmed-clip publish --metrics DIR/metrics.json` "
            "puts them here."
        )
    lines = [f"{source} Values are fractions (1.0 = 100 %).", ""]
    task = None
    for result in results:
        if result.task_name != task:
            task = result.task_name
            lines += ["", f"**{task}**", "", "| metric | value | data |", "|---|---|---|"]
        data = result.dataset_name + (f", {result.dataset_split} split" if result.dataset_split else "")
        lines.append(f"| {result.metric_name} | {result.metric_value:.3f} | {data} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def _parameter_count(model_dir: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (no weights are read)."""
    total, found = 0, False
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(weights.get_slice(name).get_shape())
                found = True
    return total if found else None


def _tower(config: dict) -> str:
    kind = config.get("model_type", "unknown")
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    size = f", {config['image_size']} px input" if "image_size" in config else ""
    return f"{kind} (hidden size {hidden}, {layers} layers{size})"


def _architecture_section(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    parameters = _parameter_count(model_dir)
    lines = [
        f"- Vision tower: {_tower(config.get('vision_config') or {})}; text tower: "
        f"{_tower(config.get('text_config') or {})}.",
        f"- Projection dimension {config.get('projection_dim')}, temperature {config.get('temperature')}, "
        f"ROI features by `{config.get('roi_mode')}` (up to {config.get('max_regions')} regions per image).",
    ]
    if parameters is not None:
        lines.append(f"- {parameters:,} parameters (safetensors weights).")
    return "\n".join(lines)


def _loss_weights(weights: dict) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in weights.items()) or "–"


def _defaults(spec) -> dict:
    """The defaults of a config dataclass, so that a card reads them from the config class, never a copy."""
    values = {}
    for item in dataclasses.fields(spec):
        if item.default is not dataclasses.MISSING:
            values[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            values[item.name] = item.default_factory()
    return values


def _training_section(config: dict | None) -> tuple[str, list[str]]:
    """The recipe from a saved `training_config.yaml`, and the limitations that follow from it. Keys the file
    lacks (a config saved by an older release) take `TrainConfig`'s own defaults."""
    if not config:
        return "No training configuration was saved with this model.", []
    from ..training.config import DataSpec, LoraSpec, ModelSpec, StageSpec, TrainConfig

    config = {**_defaults(TrainConfig), **config}
    model = {**_defaults(ModelSpec), **(config.get("model") or {})}
    data = {**_defaults(DataSpec), **(config.get("data") or {})}
    stages = [{**_defaults(StageSpec), **stage} for stage in config.get("stages") or []]
    lines = [
        f"Trained by the package's trainer (`regionmed-clip train`) through {len(stages)} progressive "
        "stage(s); the full configuration is `training_config.yaml` in this repository.",
        "",
        "| stage | length | learning rate | batch per process | frozen | loss weights |",
        "|---|---|---|---|---|---|",
    ]
    for stage in stages:
        length = (
            f"{stage['steps']} steps" if stage.get("steps") is not None else f"{stage.get('epochs')} epochs"
        )
        frozen = ", ".join(stage.get("frozen") or []) or "–"
        lines.append(
            f"| {stage.get('name')} | {length} | {stage.get('lr'):g} | {stage.get('batch_size')} | "
            f"{frozen} | {_loss_weights(stage.get('loss_weights') or {})} |"
        )
    betas = config["adam_betas"]
    lines += [
        "",
        f"- Optimiser: AdamW (betas {tuple(betas)}, weight decay {config.get('weight_decay')} on weight "
        "matrices only), a fresh optimiser and a cosine schedule in every stage, gradients clipped at "
        f"{config.get('grad_clip')}; mixed precision `{config.get('mixed_precision')}`, "
        f"seed {config.get('seed')}.",
    ]
    if model.get("pretrained"):
        lines.append(f"- Initialised from `{model['pretrained']}`.")
    vision = model.get("vision_pretrained")
    text = model.get("text_pretrained")
    lines.append(
        f"- Vision tower: {f'from `{vision}`' if vision else 'trained from random initialisation'}; "
        f"text tower: {f'from `{text}`' if text else 'as configured, from random initialisation'}."
    )
    synth = data.get("synth")
    source = f"`{data.get('path')}`"
    if synth:
        counts = ", ".join(
            f"{synth[split]} {split}" for split in ("train", "validation", "test") if split in synth
        )
        source += f", MedRegion-synth generated here ({counts} images at {synth.get('image_size')} px)"
    lines.append(f"- Data: {source}; at most {data.get('max_negatives')} hard negatives per region.")
    if config.get("lora"):
        lora = {**_defaults(LoraSpec), **config["lora"]}
        lines.append(f"- LoRA fine-tune: r {lora.get('r')}, alpha {lora.get('alpha')}.")
    caveats = []
    if synth:
        caveats.append(
            "- This model was trained on MedRegion-synth, a generated dataset of drawn lesions; its figures "
            "show the training recipe at work and say nothing about real clinical images."
        )
    if not vision and not model.get("pretrained"):
        total = sum(stage.get("steps") or 0 for stage in stages)
        caveats.append(
            "- The vision tower started from random weights (no pretrained vision checkpoint)"
            + (f" and trained for {total} steps in all" if total else "")
            + ": it is far from what the recipe reaches at scale."
        )
    return "\n".join(lines), caveats


def _load_metrics(metrics: dict | str | os.PathLike) -> dict:
    if isinstance(metrics, dict):
        return metrics
    path = Path(metrics)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def _carried_over_results(model_dir: Path) -> list[EvalResult]:
    """The `model-index` of a card already in the folder (e.g. the one `make demo` wrote)."""
    card = model_dir / "README.md"
    if not card.is_file():
        return []
    return ModelCard.load(card).data.eval_results or []


def render_model_card(
    model_dir: str | os.PathLike,
    metrics: dict | str | os.PathLike | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    dataset_dir: str | os.PathLike | None = None,
    training_config: dict | str | os.PathLike | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The model card (`README.md` text) for a saved model folder, from `model_card.md`.

    Args:
        model_dir: the folder `save_pretrained` wrote (config, weights, processor, `training_config.yaml`).
        metrics: a `regionmed-clip eval` metrics.json (path or dict). Without it the results of a card already
            in `model_dir` are carried over; with neither the card says that none were supplied.
        repo_id: the Hub id the usage snippets load (default: `model_dir` itself).
        dataset_id / dataset_dir: the training dataset on the Hub and its local folder; listed under
            `datasets`, and named as the results' dataset when the metrics were computed on that very folder.
        training_config: the training config (default: `model_dir/training_config.yaml` when present).
        template: the template (default: the top-level `model_card.md`).
    """
    model_dir = Path(model_dir)
    template_path = Path(template) if template is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template {template_path} not found (it lives at the top of the source checkout)"
        )
    if training_config is None and (model_dir / "training_config.yaml").is_file():
        training_config = model_dir / "training_config.yaml"
    if training_config is not None and not isinstance(training_config, dict):
        training_config = yaml.safe_load(Path(training_config).read_text(encoding="utf-8"))
    if metrics is not None:
        results = eval_results(_load_metrics(metrics), dataset_id, dataset_dir)
        if not results:
            from ..evaluation.report import MODEL_INDEX_FIGURES

            raise ValueError(
                f"the metrics file holds none of the evaluation tasks ({', '.join(MODEL_INDEX_FIGURES)}): pass "
                "the metrics.json that `regionmed-clip eval` writes"
            )
        source = "Measured by `regionmed-clip eval`."
    else:
        results = _carried_over_results(model_dir)
        source = "Carried over from the model card written with this model folder."
    training, caveats = _training_section(training_config)
    title = (repo_id or "RegionMed-CLIP").split("/")[-1]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license="apache-2.0",
        tags=list(TAGS),
        datasets=[dataset_id] if dataset_id else None,
        metrics=sorted({result.metric_type for result in results}) or None,
        model_name=title,
        eval_results=results or None,
    )
    return fill_template(
        template_path.read_text(encoding="utf-8"),
        {
            "front_matter": card_data.to_yaml().strip(),
            "title": title,
            "model_id": repo_id or str(model_dir),
            "architecture": _architecture_section(model_dir),
            "results": _results_section(results, source),
            "training": training,
            "run_limitations": "\n".join(caveats),
        },
    )


__all__ = ["MODEL_CARD_TEMPLATE", "eval_results", "fill_template", "render_model_card"]
