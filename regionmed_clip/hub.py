"""Publishing to the Hugging Face Hub (`regionmed-clip publish`) and the model card.

Decisions:

- One commit per repository, built from explicit file lists: the model folder's files (safetensors weights,
  `config.json` with its `auto_map`, the four remote-code files, processor and tokenizer files, the training
  config) plus a `README.md` rendered from the top-level `model_card.md`; a dataset folder goes up as it is
  (parquet shards and its dataset card). Pickled weights are never uploaded.
- A repository that already exists gets a new commit, as `push_to_hub` does; its visibility is left as it is.
  With `revision`, the branch is created from the default branch when missing and the commit goes there.
- Endpoint and token are huggingface_hub's own: `HF_ENDPOINT`, then `HF_TOKEN` or the token saved by
  `hf auth login` (`huggingface-cli login` in older releases).
- No call may hang. huggingface_hub 2.4's shared HTTP client has no timeout, and some of its calls pass
  `timeout=None` explicitly, so while publishing a request hook gives every request without a limit a finite
  one; an access check (`whoami`) with a short limit runs first, so a wrong endpoint, a missing network or a
  rejected token fail in seconds with a message naming the cause, before any file is hashed or sent.
- The model card is filled by a small pure-Python renderer (`{{ name }}` placeholders, every one required), so
  no template engine is needed; the YAML front matter comes from huggingface_hub's `ModelCardData`, whose
  `model-index` holds the evaluation figures exactly as `regionmed-clip eval` wrote them, none invented.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import yaml
from huggingface_hub import (
    CommitOperationAdd,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_session,
    get_token,
    set_client_factory,
)
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import _http as hub_http  # the current client factory is not exposed publicly
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, validate_repo_id

# The top-level model_card.md, reached through a link inside the package so that wheels carry it as package data.
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
REMOTE_CODE_FILES = (
    "configuration_regionmed_clip.py",
    "modeling_regionmed_clip.py",
    "image_processing_regionmed_clip.py",
    "processing_regionmed_clip.py",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ACCESS_CHECK_TIMEOUT_S = 10.0  # the first request: long enough for a slow link, short enough to fail fast
CONNECT_TIMEOUT_S = 10.0
TAGS = (
    "medical",
    "clip",
    "region-aware",
    "vision-language",
    "zero-shot-image-classification",
    "regionmed-clip",
)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class PublishError(RuntimeError):
    """A publish step failed for a reason the user can act on; the message names it."""


@dataclasses.dataclass
class PublishResult:
    repo_id: str
    repo_type: str
    url: str
    commit_oid: str
    commit_url: str
    created: bool  # False: the repository existed and got a new commit
    revision: str
    files: int

    def describe(self) -> str:
        state = "created" if self.created else "existed (new commit pushed; visibility unchanged)"
        return (
            f"{self.repo_type} {self.repo_id}: {state}; {self.files} files committed to {self.revision} "
            f"as {self.commit_oid[:12]}: {self.commit_url}"
        )


# --- model card ---------------------------------------------------------------------------------------------


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace every `{{ name }}` of `template`; a placeholder without a value is an error, never left in."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise ValueError(f"model card template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else value


def _card_dataset_name(folder: Path) -> str | None:
    """`pretty_name` from a dataset folder's card."""
    from .data.folder import card_front_matter

    try:
        return (card_front_matter(folder / "README.md") or {}).get("pretty_name")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


# (model-index task type, task name) per evaluation task; the retrieval and region types are not pipeline
# tags, which the model-index allows (as MTEB's cards do).
ZERO_SHOT = ("zero-shot-image-classification", "Zero-shot classification")
FEW_SHOT = ("image-classification", "Few-shot classification")
RETRIEVAL = ("image-text-retrieval", "Image–text retrieval")
REGION = ("region-text-retrieval", "Region–caption retrieval")
GROUNDING = ("region-grounding", "Region grounding")
VQA = ("visual-question-answering", "Visual question answering")


def eval_results(
    metrics: dict, dataset_id: str | None = None, dataset_dir: str | os.PathLike | None = None
) -> list[EvalResult]:
    """`huggingface_hub.EvalResult`s for every figure a `regionmed-clip eval` metrics.json holds.

    Values are the JSON's own numbers (fractions, not percentages); NaN and skipped tasks are left out. The
    results name `dataset_id` as their dataset only when the metrics' recorded data sha256 is that of
    `dataset_dir` (the folder being published); otherwise the Hub id or folder name the evaluation recorded.
    """
    from .evaluation.report import dataset_hash  # the evaluation package imports torch; publishing need not

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
    dataset = (dataset_type, _card_dataset_name(Path(data)) or dataset_type)
    results = []

    def add(task: tuple[str, str], metric_type: str, metric_name: str, value, on: tuple[str, str] = dataset):
        value = _number(value)
        if value is not None:
            results.append(
                EvalResult(
                    task_type=task[0],
                    task_name=task[1],
                    dataset_type=on[0],
                    dataset_name=on[1],
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=value,
                )
            )

    for embedding, result in metrics.get("zero_shot", {}).items():
        add(ZERO_SHOT, "roc_auc", f"macro AUC ({embedding} embedding)", result.get("macro_auc"))
        add(ZERO_SHOT, "accuracy", f"accuracy ({embedding} embedding)", result.get("accuracy"))
    for shots, result in metrics.get("few_shot", {}).items():
        for rule, name in (("prototype", "prototype rule"), ("linear_probe", "logistic probe")):
            add(FEW_SHOT, "roc_auc", f"{shots} macro AUC ({name})", result.get(rule, {}).get("mean"))
    for embedding, result in metrics.get("retrieval", {}).items():
        for direction, arrow in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
            for k in (1, 5, 10):
                add(
                    RETRIEVAL,
                    "recall",
                    f"{arrow} R@{k} ({embedding})",
                    result.get(direction, {}).get(f"R@{k}"),
                )
    region = metrics.get("region", {})
    for k in (1, 5, 10):
        add(REGION, "recall", f"region → caption R@{k}", region.get("region_to_caption", {}).get(f"R@{k}"))
    add(REGION, "accuracy", "hard-negative accuracy", region.get("hard_negative_accuracy"))
    add(GROUNDING, "accuracy", "pointing accuracy", metrics.get("grounding", {}).get("pointing_accuracy"))
    for name, result in metrics.get("vqa", {}).items():
        for part in ("open", "closed", "overall"):
            add(VQA, "accuracy", f"{part} accuracy", result.get(part), on=(name.lower(), name))
    return results


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
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
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


def _training_section(config: dict | None) -> tuple[str, list[str]]:
    """The recipe from a saved `training_config.yaml`, and the limitations that follow from it."""
    if not config:
        return "No training configuration was saved with this model.", []
    model, data, stages = config.get("model") or {}, config.get("data") or {}, config.get("stages") or []
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
    betas = config.get("adam_betas") or (0.9, 0.98)
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
        lora = config["lora"]
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
            raise ValueError(
                "the metrics file holds none of the evaluation tasks (zero_shot, few_shot, retrieval, region,"
                " grounding, vqa): pass the metrics.json that `regionmed-clip eval` writes"
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


# --- files --------------------------------------------------------------------------------------------------


def model_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files of a model folder that go to the Hub, after checking the folder loads as remote code."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"{folder} has no safetensors weights; save the model with `save_pretrained`")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if "auto_map" not in config or missing:
        raise ValueError(
            f"{folder} lacks the remote code (auto_map in config.json, "
            f"{', '.join(missing) or 'the model files'}): save it with `regionmed_clip` imported so that "
            "`trust_remote_code=True` can load it from the Hub"
        )
    if not (folder / "processor_config.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no processor files; save the processor next to the model")
    return [p for p in files if p.suffix not in PICKLE_SUFFIXES and p.name != "README.md"]


def dataset_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """Every file of a dataset folder (parquet shards and the card), once its card declares configs."""
    folder = Path(dataset_dir)
    card = folder / "README.md"
    if not card.is_file():
        raise FileNotFoundError(
            f"{folder} has no README.md dataset card; write it with `regionmed-clip data`"
        )
    from .data.folder import card_front_matter

    try:
        metadata = card_front_matter(card)
    except yaml.YAMLError as error:
        raise ValueError(f"{card} has no readable YAML front matter: {error}") from error
    if metadata is None:
        raise ValueError(f"{card} has no readable YAML front matter: it does not start with '---'")
    if not metadata.get("configs"):
        raise ValueError(f"{card} declares no `configs`: `load_dataset` would not find the parquet shards")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not p.name.endswith(".partial")
    )
    if not any(p.suffix == ".parquet" for p in files):
        raise ValueError(f"{folder} holds no parquet shards")
    return files


# --- Hub calls ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def finite_timeouts(seconds: float) -> Iterator[None]:
    """Give every huggingface_hub request without a time limit one of `seconds` (connect: at most 10 s).

    huggingface_hub 2.4 builds its shared client with `timeout=None`, and calls like `model_info` pass
    `timeout=None` explicitly, so a client-level default is not enough: a request hook fills in the missing
    limits. The factory that was set before is wrapped (a user's proxy settings stay) and restored on exit.
    """
    previous = getattr(hub_http, "_GLOBAL_CLIENT_FACTORY", hub_http.default_client_factory)
    limits = {"connect": min(seconds, CONNECT_TIMEOUT_S), "read": seconds, "write": seconds, "pool": seconds}

    def fill_limits(request) -> None:
        given = request.extensions.get("timeout") or {}
        request.extensions = {
            **request.extensions,
            "timeout": {key: limits[key] if given.get(key) is None else given[key] for key in limits},
        }

    def factory():
        client = previous()
        client.event_hooks["request"].append(fill_limits)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token found: run `hf auth login` (`huggingface-cli login` in older releases) "
            "or set HF_TOKEN to a token with write access"
        )
    return token


def check_access(endpoint: str, token: str, timeout: float = ACCESS_CHECK_TIMEOUT_S) -> str:
    """The user name the token belongs to (`/api/whoami-v2`), or a `PublishError` saying why there is none."""
    hint = f"the Hub endpoint {endpoint}" + (" (HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else "")
    try:
        response = get_session().get(
            f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=timeout
        )
    except OfflineModeIsEnabled as error:
        raise PublishError("HF_HUB_OFFLINE is set: unset it to publish") from error
    except httpx2.TimeoutException as error:
        raise PublishError(f"{hint} did not answer within {timeout:g} s") from error
    except httpx2.TransportError as error:
        raise PublishError(f"cannot reach {hint}: {error}") from error
    if response.status_code == 401:
        raise PublishError(
            "the Hub rejected the token (HF_TOKEN, or the one saved by `hf auth login`): it is invalid or "
            "expired"
        )
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as error:
        raise PublishError(f"the token check at {hint} failed: {error}") from error
    return response.json().get("name", "")


@contextlib.contextmanager
def _step(description: str) -> Iterator[None]:
    """Turn the HTTP and Hub errors of one step into a `PublishError` that names the step."""
    try:
        yield
    except httpx2.TimeoutException as error:
        raise PublishError(f"{description}: the Hub did not answer in time ({error})") from error
    except httpx2.TransportError as error:
        raise PublishError(f"{description}: cannot reach the Hub ({error})") from error
    except HfHubHTTPError as error:
        raise PublishError(f"{description}: {error}") from error
    except PublishError:
        raise
    except RuntimeError as error:  # huggingface_hub wraps a failed LFS upload in a RuntimeError
        raise PublishError(f"{description}: {error} ({error.__cause__})") from error


def _push(
    api: HfApi,
    repo_id: str,
    repo_type: str,
    files: dict[str, Path | bytes],
    private: bool,
    revision: str | None,
    commit_message: str,
) -> PublishResult:
    created = True
    with _step(f"creating the {repo_type} repository {repo_id}"):
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private)
        except HfHubHTTPError as error:
            if error.response is None or error.response.status_code != 409:
                raise
            created = False
    if revision and revision != "main":
        with _step(f"creating the branch {revision!r} of {repo_id}"):
            api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=str(source) if isinstance(source, Path) else source
        )
        for name, source in files.items()
    ]
    with _step(f"uploading {len(operations)} files to {repo_id}"):
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message, repo_type=repo_type, revision=revision
        )
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return PublishResult(
        repo_id=repo_id,
        repo_type=repo_type,
        url=f"{api.endpoint}/{prefix}{repo_id}",
        commit_oid=info.oid,
        commit_url=info.commit_url,
        created=created,
        revision=revision or "main",
        files=len(operations),
    )


def publish_dataset(
    api: HfApi, dataset: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None
) -> PublishResult:
    """Upload a dataset folder (parquet shards + dataset card) as it is, with an `HfApi` already checked."""
    folder = Path(dataset)
    files = {p.relative_to(folder).as_posix(): p for p in dataset_files(folder)}
    return _push(api, repo_id, "dataset", files, private, revision, f"Upload {folder.name} (regionmed-clip)")


def publish_model(
    api: HfApi,
    model: str | os.PathLike,
    repo_id: str,
    card: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PublishResult:
    """Upload a model folder and its rendered `card`, with an `HfApi` already checked."""
    files: dict[str, Path | bytes] = {p.name: p for p in model_files(model)}
    files["README.md"] = card.encode("utf-8")
    message = commit_message or "Upload RegionMed-CLIP model (regionmed-clip publish)"
    return _push(api, repo_id, "model", files, private, revision, message)


def publish(
    model: str,
    repo_id: str,
    dataset: str | None = None,
    dataset_repo_id: str | None = None,
    metrics: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    timeout: float = 60.0,
    token: str | None = None,
) -> list[PublishResult]:
    """Publish a trained model folder to the Hugging Face Hub, optionally with its dataset.

    The model repository gets the safetensors weights, `config.json` with `auto_map`, the remote-code files,
    the processor files, `training_config.yaml` and a `README.md` rendered from `model_card.md` with the
    figures of `metrics` (the metrics.json of `regionmed-clip eval`; without it, those of a card already in
    the folder). The dataset folder (parquet shards and card) goes to `dataset_repo_id` first, so the model
    card can name it. The endpoint is `HF_ENDPOINT`; the token comes from HF_TOKEN or `hf auth login`. An
    existing repository gets a new commit; `revision` names a branch, created when missing. `timeout` bounds
    each HTTP request (seconds).
    """
    for name in (repo_id, dataset_repo_id):
        if name is not None:
            validate_repo_id(name)
    if (dataset is None) != (dataset_repo_id is None):
        raise ValueError("--dataset and --dataset-repo-id go together")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    model_files(model)
    if dataset is not None:
        dataset_files(dataset)
    card = render_model_card(model, metrics, repo_id=repo_id, dataset_id=dataset_repo_id, dataset_dir=dataset)
    token = _resolve_token(token)
    api = HfApi(token=token)
    results = []
    with finite_timeouts(timeout):
        check_access(api.endpoint, token, min(timeout, ACCESS_CHECK_TIMEOUT_S))
        if dataset is not None:
            results.append(publish_dataset(api, dataset, dataset_repo_id, private, revision))
        results.append(publish_model(api, model, repo_id, card, private, revision, commit_message))
    return results


def add_publish_command(subparsers) -> None:
    """Add `regionmed-clip publish` (options from `publish`'s signature; the token is never an option, so it
    stays out of shell histories)."""
    from .cli import _call_with, add_signature_arguments

    parser = subparsers.add_parser(
        "publish",
        help="upload a model folder (and its dataset) to the Hugging Face Hub",
        description=inspect.getdoc(publish),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_signature_arguments(parser, publish, skip=("token",))

    def run(args) -> int:
        try:
            results = _call_with(publish, args, skip=("token",))
        except PublishError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for result in results:
            print(result.describe())
        return 0

    parser.set_defaults(run=run)


__all__ = [
    "PublishError",
    "PublishResult",
    "add_publish_command",
    "check_access",
    "eval_results",
    "fill_template",
    "finite_timeouts",
    "publish",
    "publish_dataset",
    "publish_model",
    "render_model_card",
]
