"""Publishing to the Hugging Face Hub: which files go up, finite HTTP timeouts, and the push.

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
  `timeout=None` explicitly, so while publishing a request hook on that shared client (`get_session`) gives
  every request without a limit a finite one; an access check (`whoami`) with a short limit runs first, so a
  wrong endpoint, a missing network or a rejected token fail in seconds with a message naming the cause,
  before any file is hashed or sent.
"""

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx2
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, get_session, get_token, metadata_load
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, validate_repo_id

from .card import render_model_card

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ACCESS_CHECK_TIMEOUT_S = 10.0  # the first request: long enough for a slow link, short enough to fail fast
CONNECT_TIMEOUT_S = 10.0


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


#: A flat relative import of a remote-code file, the rule transformers' `get_relative_imports` applies.
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)

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
    missing = [name for name in remote_code_files(config, folder) if not (folder / name).is_file()]
    if "auto_map" not in config or missing:
        raise ValueError(
            f"{folder} lacks the remote code (auto_map in config.json, "
            f"{', '.join(missing) or 'the model files'}): save it with `regionmed_clip` imported so that "
            "`trust_remote_code=True` can load it from the Hub"
        )
    if not (folder / "processor_config.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder} has no processor files; save the processor next to the model")
    return [p for p in files if p.suffix not in PICKLE_SUFFIXES and p.name != "README.md"]


def remote_code_files(config: dict, folder: str | os.PathLike | None = None) -> list[str]:
    """The module files a saved `config.json` asks `trust_remote_code` to import: those its `auto_map` and its
    `custom_pipelines` name (`"module.Class"`), and with `folder`, every file those import relatively (`from .loss
    import ...`), followed as transformers follows them. A folder saved before the region pipeline existed names no
    pipeline and is complete without its file; one that names it must ship it."""
    references = list((config.get("auto_map") or {}).values())
    references += [spec.get("impl", "") for spec in (config.get("custom_pipelines") or {}).values()]
    names = {f"{reference.rsplit('.', 1)[0]}.py" for reference in references if "." in reference}
    pending = sorted(names) if folder is not None else []
    while pending:
        path = Path(folder) / pending.pop()
        if not path.is_file():
            continue
        for module in RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")):
            name = f"{module}.py"
            if name not in names:
                names.add(name)
                pending.append(name)
    return sorted(names)


def dataset_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """Every file of a dataset folder (parquet shards and the card), once its card declares configs."""
    folder = Path(dataset_dir)
    card = folder / "README.md"
    if not card.is_file():
        raise FileNotFoundError(
            f"{folder} has no README.md dataset card; write it with `regionmed-clip data`"
        )
    try:
        metadata = metadata_load(card)
    except (ValueError, yaml.YAMLError) as error:
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
    limits. The hook goes on the shared client itself (`get_session`, public), so whatever factory built it (a
    user's proxy settings) stays as it is; the client's hooks are restored on exit. A client built anew inside
    the block (after `close_session` or `set_client_factory`) has no hook.
    """
    limits = {"connect": min(seconds, CONNECT_TIMEOUT_S), "read": seconds, "write": seconds, "pool": seconds}

    def fill_limits(request) -> None:
        given = request.extensions.get("timeout") or {}
        request.extensions = {
            **request.extensions,
            "timeout": {key: limits[key] if given.get(key) is None else given[key] for key in limits},
        }

    session = get_session()
    hooks = session.event_hooks
    previous = {event: list(callbacks) for event, callbacks in hooks.items()}
    session.event_hooks = {**previous, "request": [*previous.get("request", []), fill_limits]}
    try:
        yield
    finally:
        session.event_hooks = previous


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


@dataclasses.dataclass
class PublishArgs:
    """What `publish` uploads and where (the token is never one of them: it stays out of shell histories)."""

    model: str = dataclasses.field(
        metadata={"help": "The saved model folder (weights, config, remote code, processor)"}
    )
    repo_id: str = dataclasses.field(metadata={"help": "The model repository on the Hub, `ORG/NAME`"})
    dataset: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A dataset folder (parquet shards and card) to publish with the model"},
    )
    dataset_repo_id: str | None = dataclasses.field(
        default=None, metadata={"help": "The dataset repository on the Hub, `ORG/NAME` (with --dataset)"}
    )
    metrics: str | None = dataclasses.field(
        default=None,
        metadata={"help": "The metrics.json of `regionmed-clip eval` whose figures go into the model card"},
    )
    private: bool = dataclasses.field(
        default=False,
        metadata={"help": "Create new repositories as private (an existing one keeps its visibility)"},
    )
    revision: str | None = dataclasses.field(
        default=None, metadata={"help": "The branch to push to, created from `main` when missing"}
    )
    commit_message: str | None = dataclasses.field(
        default=None, metadata={"help": "The message of the model repository's commit"}
    )
    timeout: float = dataclasses.field(
        default=60.0, metadata={"help": "Limit of each HTTP request, in seconds"}
    )
    endpoint: str | None = dataclasses.field(
        default=None,
        metadata={"help": "The Hub to publish to (default: HF_ENDPOINT, else the Hugging Face Hub)"},
    )


def publish(args: PublishArgs, token: str | None = None) -> list[PublishResult]:
    """Publish a trained model folder to the Hugging Face Hub, optionally with its dataset.

    The model repository gets the safetensors weights, `config.json` with `auto_map`, the remote-code files,
    the processor files, `training_config.yaml` and a `README.md` rendered from `model_card.md` with the
    figures of `metrics` (the metrics.json of `regionmed-clip eval`; without it, those of a card already in
    the folder). The dataset folder (parquet shards and card) goes to `dataset_repo_id` first, so the model
    card can name it. The endpoint is `endpoint`, else `HF_ENDPOINT`; the token is `token`, else HF_TOKEN or the
    one `hf auth login` saved. An existing repository gets a new commit; `revision` names a branch, created when
    missing.
    """
    model, repo_id, dataset, dataset_repo_id = args.model, args.repo_id, args.dataset, args.dataset_repo_id
    private, revision, timeout = args.private, args.revision, args.timeout
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
    card = render_model_card(
        model, args.metrics, repo_id=repo_id, dataset_id=dataset_repo_id, dataset_dir=dataset
    )
    token = _resolve_token(token)
    api = HfApi(endpoint=args.endpoint, token=token)
    results = []
    with finite_timeouts(timeout):
        check_access(api.endpoint, token, min(timeout, ACCESS_CHECK_TIMEOUT_S))
        if dataset is not None:
            results.append(publish_dataset(api, dataset, dataset_repo_id, private, revision))
        results.append(publish_model(api, model, repo_id, card, private, revision, args.commit_message))
    return results


__all__ = [
    "PublishArgs",
    "PublishError",
    "PublishResult",
    "check_access",
    "dataset_files",
    "finite_timeouts",
    "model_files",
    "publish",
    "publish_dataset",
    "publish_model",
]
