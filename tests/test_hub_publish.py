"""`regionmed-clip publish` against a loopback Hub (tests/hub_server.py): model and dataset round trip, the
model card's figures, and fast, clear failures. Every process runs under a guard that fails any connection or
name lookup beyond 127.0.0.1, and each test checks that the guard never fired."""

import inspect
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from datasets import Image as ImageFeature
from huggingface_hub import HfApi
from transformers import AutoModel, AutoProcessor

from regionmed_clip.cli import main
from regionmed_clip.data.folder import load_rows
from regionmed_clip.hub import PublishArgs, PublishError, finite_timeouts, model_files, publish

from .conftest import make_processor, random_image, tiny_model
from .hub_server import (
    LoopbackHub,
    closed_endpoint,
    install_network_guard,
    silent_endpoint,
    write_guard_sitecustomize,
)
from .test_hub_integration import BLOCK_PACKAGE
from .test_training import tiny_training_config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_loopback_write_token"
REPO = "loopback-user/tiny-regionmed-clip"
DATASET_REPO = "loopback-user/medregion-synth-tiny"
LABELS = ["round nodule", "normal chest", "oval cyst"]
BOXES = [[(3, 4, 30, 33)], [(0, 5, 20, 40), (10, 10, 35, 50)]]
# The suite runs offline (conftest); publishing processes must not, and get only the token a test gives them.
CLEARED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
REMOTE_CODE = {
    "configuration_regionmed_clip.py",
    "modeling_regionmed_clip.py",
    "image_processing_regionmed_clip.py",
    "processing_regionmed_clip.py",
}


def rows_digest(dataset) -> list[dict]:
    """Every column of every row, images as the sha256 of their encoded bytes (JSON-comparable)."""
    import hashlib  # here, not at the top: this function's source also runs in the loading subprocess

    rows = []
    for row in dataset.cast_column("image", ImageFeature(decode=False)):
        row["image"] = hashlib.sha256(row["image"]["bytes"]).hexdigest()
        rows.append(row)
    return json.loads(json.dumps(rows))


LOAD_FROM_HUB = (
    BLOCK_PACKAGE
    + "\n"
    + inspect.getsource(rows_digest)
    + textwrap.dedent(
        """
        import json, socket, sys
        import datasets, numpy as np, torch
        from datasets import Image as ImageFeature, load_dataset
        from PIL import Image
        from transformers import AutoModel, AutoProcessor

        # datasets asks the dataset viewer at `datasets-server.<endpoint host>` for exported infos; a loopback
        # Hub has no such host, and the network guard would (rightly) report the lookup.
        datasets.config.USE_PARQUET_EXPORT = False
        repo, dataset_repo, request = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        try:
            import regionmed_clip
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        images = [Image.fromarray(np.array(a, dtype=np.uint8)) for a in request["images"]]
        inputs = processor(text=request["labels"], images=images, boxes=request["boxes"], return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        splits = load_dataset(dataset_repo)
        vqa = load_dataset(dataset_repo, "vqa", split="test")
        print(json.dumps({
            "guard": socket.getaddrinfo.__qualname__,
            "modules": [type(model).__module__, type(processor).__module__],
            "logits": outputs.logits_per_image.tolist(),
            "region_embeds": outputs.region_embeds.tolist(),
            "rows": {split: rows_digest(rows) for split, rows in splits.items()},
            "features": splits["train"].features.to_dict(),
            "vqa": json.loads(json.dumps(list(vqa))),  # questions only, joined to images by image_id
        }))
        """
    )
)


def _images():
    return [random_image(48, 40, 11), random_image(36, 52, 12, mode="L")]


def _subprocess_env(
    tmp_path: Path, endpoint: str, guard_log: Path, token: str | None, pythonpath: str
) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
    guard = write_guard_sitecustomize(tmp_path / "guard", guard_log)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        # datasets counts loads by a HEAD to s3.amazonaws.com, whatever HF_ENDPOINT says (the guard saw it).
        HF_UPDATE_DOWNLOAD_COUNTS="0",
        TOKENIZERS_PARALLELISM="false",
        # The guard's sitecustomize comes first, so it is installed before anything else runs.
        PYTHONPATH=os.pathsep.join([guard] + ([pythonpath] if pythonpath else [])),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub(tokens=(TOKEN,)) as server:
        yield server


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer, synth_folder) -> Path:
    """A tiny trained-looking model folder: weights, remote code, processor and a training config."""
    folder = tmp_path_factory.mktemp("published-model")
    tiny_model("crop").save_pretrained(folder)
    make_processor(tokenizer, "crop").save_pretrained(folder)
    config = tiny_training_config(folder.parent / "run", synth_folder)
    (folder / "training_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def metrics(model_folder, synth_folder, tmp_path_factory) -> Path:
    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    out = tmp_path_factory.mktemp("eval")
    run_evaluation(
        EvalSettings(model_folder, synth_folder, out, tasks="zero_shot,retrieval,region", bootstrap=10)
    )
    return out / "metrics.json"


@pytest.fixture(scope="module")
def published(hub, model_folder, metrics, synth_folder, tmp_path_factory):
    """`regionmed-clip publish` of model and dataset, through the real command line in its own process."""
    tmp_path = tmp_path_factory.mktemp("publish")
    guard_log = tmp_path / "guard.log"
    command = [sys.executable, "-m", "regionmed_clip.cli", "publish", "--model", str(model_folder)]
    command += ["--repo-id", REPO, "--dataset", str(synth_folder), "--dataset-repo-id", DATASET_REPO]
    command += ["--metrics", str(metrics)]
    started = time.perf_counter()
    result = subprocess.run(
        command,
        env=_subprocess_env(tmp_path, hub.url, guard_log, TOKEN, str(ROOT)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert not guard_log.exists(), guard_log.read_text()
    return result, time.perf_counter() - started


ONLINE = not huggingface_hub.is_offline_mode()
ONLINE_CASES: list[str] = []


def hub_online(test):
    """A case that publishes from the test process: it runs in the online child process of
    `test_online_cases_pass_in_an_online_process`, and is skipped in the offline suite that starts it."""
    reason = "runs in the online child process of test_online_cases_pass_in_an_online_process"
    ONLINE_CASES.append(test.__name__)
    return pytest.mark.hub_online(pytest.mark.skipif(not ONLINE, reason=reason)(test))


@pytest.fixture
def in_process_hub(monkeypatch, tmp_path):
    """huggingface_hub in this process, which must be online (see `test_online_cases_pass_in_an_online_process`),
    under the guard, with the test's token. The guard log is checked when the test ends."""
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    guard_log = tmp_path / "guard.log"
    install_network_guard(str(guard_log), monkeypatch.setattr)
    yield
    assert not guard_log.exists(), guard_log.read_text()


@pytest.mark.skipif(ONLINE, reason="this is the online child process")
def test_online_cases_pass_in_an_online_process(tmp_path):
    """The cases that publish from the test process itself run in a child pytest whose environment is online:
    huggingface_hub reads HF_HUB_OFFLINE, HF_TOKEN_PATH and HF_HUB_DISABLE_XET once, when it is imported, and this
    suite runs offline. Each case names its endpoint through `PublishArgs(endpoint=...)`, and no saved token
    exists in the child's HF_HOME."""
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
    env.update(
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_TOKEN_PATH=str(tmp_path / "hf-home" / "no-saved-token"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "hub_online", __file__]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[
        -2000:
    ]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def _model_index(card: str) -> dict[str, float]:
    return {
        metric["name"]: metric["value"]
        for result in _front_matter(card)["model-index"][0]["results"]
        for metric in result["metrics"]
    }


def _leaves(value) -> list[float]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value] if isinstance(value, float) else []


def test_publish_uploads_safetensors_remote_code_processor_and_card(hub, published):
    result, seconds = published
    assert "created" in result.stdout and DATASET_REPO in result.stdout
    model = hub.repo(REPO).resolve("main")
    names = set(model.files)
    assert names >= REMOTE_CODE | {"config.json", "model.safetensors", "processor_config.json", "README.md"}
    assert {"tokenizer.json", "tokenizer_config.json", "training_config.yaml"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert model.files["model.safetensors"].lfs and not model.files["config.json"].lfs
    assert "auto_map" in json.loads(model.files["config.json"].data)
    dataset = hub.repo(DATASET_REPO, "dataset").resolve("main")
    parquet = [name for name in dataset.files if name.endswith(".parquet")]
    assert parquet and all(dataset.files[name].lfs for name in parquet)
    assert {"README.md", "vqa/test-00000-of-00001.parquet"} <= set(dataset.files)
    assert not hub.repo(REPO).private and not hub.unhandled


def test_published_model_and_dataset_load_from_the_hub_in_a_process_without_the_package(
    hub, published, model_folder, synth_folder, tmp_path
):
    model = AutoModel.from_pretrained(model_folder).eval()
    processor = AutoProcessor.from_pretrained(model_folder)
    inputs = processor(text=LABELS, images=_images(), boxes=BOXES, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs)
    request = {"images": [np.asarray(i).tolist() for i in _images()], "labels": LABELS, "boxes": BOXES}
    guard_log = tmp_path / "guard.log"
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_HUB, REPO, DATASET_REPO, json.dumps(request)],
        env=_subprocess_env(tmp_path, hub.url, guard_log, token=None, pythonpath=""),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert not guard_log.exists(), guard_log.read_text()
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["guard"].startswith("install_network_guard"), (
        "the guard was not installed in the subprocess"
    )
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    np.testing.assert_allclose(report["logits"], expected.logits_per_image.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(report["region_embeds"], expected.region_embeds.numpy(), rtol=0, atol=1e-5)
    assert set(report["rows"]) == {"train", "validation", "test"}
    for split, rows in report["rows"].items():
        assert rows == rows_digest(load_rows(synth_folder, split)), split
    assert report["features"] == load_rows(synth_folder, "train").features.to_dict()
    assert report["vqa"] == json.loads(json.dumps(list(load_rows(synth_folder, "test", config="vqa"))))
    assert not hub.unhandled


def test_published_card_holds_the_real_evaluation_figures(hub, published, metrics):
    card = hub.file(REPO, "README.md").decode()
    front = _front_matter(card)
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "zero-shot-image-classification"
    assert front["license"] == "apache-2.0"
    assert {"medical", "clip", "region-aware"} <= set(front["tags"])
    assert front["datasets"] == [DATASET_REPO]
    evaluation = json.loads(metrics.read_text())
    index = _model_index(card)
    retrieval = evaluation["retrieval"]
    expected = {
        "region → caption R@1 (GT boxes at test)": evaluation["region"]["region_to_caption"]["R@1"],
        "hard-negative accuracy (GT boxes at test)": evaluation["region"]["hard_negative_accuracy"],
        "image → text R@1 (region-aware, GT boxes at test)": retrieval["gt_boxes"]["region-aware"][
            "image_to_text"
        ]["R@1"],
        "text → image R@10 (global, box-free)": retrieval["box_free"]["global"]["text_to_image"]["R@10"],
    }
    auc = evaluation["zero_shot"]["box_free"]["global"]["macro_auc"]
    if not math.isnan(auc):
        expected["macro AUC (global embedding, box-free)"] = auc
    assert {name: index[name] for name in expected} == expected
    assert set(index.values()) <= set(_leaves(evaluation)), "a figure that metrics.json does not hold"
    datasets = {result["dataset"]["type"] for result in front["model-index"][0]["results"]}
    assert datasets == {DATASET_REPO}
    assert f'AutoModel.from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert "PeftModel.from_pretrained" in card and 'pipeline("zero-shot-image-classification"' in card
    assert "Not for clinical use" in card and "MedRegion-synth" in card and "| warmup |" in card
    assert "{{" not in card


@hub_online
def test_private_revision_and_an_existing_repo_get_new_commits(hub, model_folder, metrics, in_process_hub):
    repo_id = "loopback-user/private-tiny"
    [first] = publish(
        PublishArgs(
            str(model_folder), repo_id, metrics=str(metrics), private=True, revision="v1", endpoint=hub.url
        )
    )
    repo = hub.repo(repo_id)
    assert first.created and repo.private
    assert set(repo.branches) == {"main", "v1"} and repo.branches["v1"] == first.commit_oid
    assert set(repo.resolve("main").files) == {".gitattributes"}  # nothing went to the default branch
    assert "README.md" in repo.resolve("v1").files
    [second] = publish(
        PublishArgs(
            str(model_folder),
            repo_id,
            private=True,
            revision="v1",
            commit_message="card only",
            endpoint=hub.url,
        )
    )
    assert not second.created and second.commit_oid != first.commit_oid
    assert repo.commits[second.commit_oid].parent == first.commit_oid
    assert repo.commits[second.commit_oid].message == "card only"
    assert "No evaluation results were supplied" in hub.file(repo_id, "README.md", revision="v1").decode()
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        anonymous.model_info(repo_id, revision="v1")
    assert not hub.unhandled


def _run_cli(argv: list[str]) -> int:
    return main(["publish", *argv])


@hub_online
def test_no_token_fails_at_once_naming_the_login(hub, model_folder, in_process_hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    requests = len(hub.requests)
    started = time.perf_counter()
    argv = ["--model", str(model_folder), "--repo-id", "loopback-user/never", "--endpoint", hub.url]
    assert _run_cli(argv) == 1
    assert time.perf_counter() - started < 5
    error = capsys.readouterr().err
    assert "no Hugging Face token" in error and "hf auth login" in error and "HF_TOKEN" in error
    assert len(hub.requests) == requests


@hub_online
def test_an_endpoint_that_never_answers_fails_within_the_timeout(model_folder, in_process_hub):
    with silent_endpoint() as endpoint:
        started = time.perf_counter()
        with pytest.raises(PublishError, match="did not answer within 2 s"):
            publish(PublishArgs(str(model_folder), "loopback-user/never", timeout=2.0, endpoint=endpoint))
        assert time.perf_counter() - started < 8


@hub_online
def test_finite_timeouts_bound_calls_that_pass_timeout_none(in_process_hub):
    with silent_endpoint() as endpoint, finite_timeouts(1.0):
        started = time.perf_counter()
        with pytest.raises(Exception, match="(?i)timed out"):
            HfApi(endpoint=endpoint, token=TOKEN).model_info("loopback-user/never")  # passes timeout=None
        assert time.perf_counter() - started < 6


@hub_online
def test_refused_endpoint_and_rejected_token_fail_fast(hub, model_folder, in_process_hub, monkeypatch):
    started = time.perf_counter()
    with pytest.raises(PublishError, match="cannot reach the Hub endpoint"):
        publish(PublishArgs(str(model_folder), "loopback-user/never", endpoint=closed_endpoint()))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    with pytest.raises(PublishError, match="rejected the token"):
        publish(PublishArgs(str(model_folder), "loopback-user/never", endpoint=hub.url))
    assert time.perf_counter() - started < 5
    assert ("model", "loopback-user/never") not in hub.repos


@hub_online
def test_folders_are_checked_before_anything_is_sent(tmp_path, model_folder, hub, in_process_hub):
    requests = len(hub.requests)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        publish(PublishArgs(str(tmp_path), "loopback-user/never", endpoint=hub.url))
    with pytest.raises(ValueError, match="go together"):
        publish(
            PublishArgs(str(model_folder), "loopback-user/never", dataset=str(tmp_path), endpoint=hub.url)
        )
    with pytest.raises(FileNotFoundError, match="dataset card"):
        publish(
            PublishArgs(
                str(model_folder),
                "loopback-user/never",
                dataset=str(tmp_path),
                dataset_repo_id="loopback-user/d",
                endpoint=hub.url,
            )
        )
    assert len(hub.requests) == requests


@pytest.mark.parametrize("missing", ["pipeline_regionmed_clip.py", "configuration_regionmed_clip.py"])
def test_a_folder_missing_a_file_its_config_names_is_refused(tmp_path, model_folder, missing):
    """Every module that `auto_map` or `custom_pipelines` names must ship, and every file those import relatively:
    the region pipeline's file and the model file's configuration included."""
    folder = tmp_path / "model"
    folder.mkdir()
    for path in model_folder.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    assert REMOTE_CODE | {"pipeline_regionmed_clip.py"} <= {p.name for p in model_files(folder)}
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=missing):
        model_files(folder)


def test_the_network_guard_blocks_and_reports_anything_beyond_loopback(tmp_path, monkeypatch):
    log = tmp_path / "guard.log"
    install_network_guard(str(log), monkeypatch.setattr)
    with pytest.raises(socket.gaierror, match="network guard"):
        socket.getaddrinfo("huggingface.co", 443)
    with socket.socket() as sock, pytest.raises(OSError, match="network guard"):
        sock.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed, and never tried here
    assert socket.getaddrinfo("127.0.0.1", 80)
    assert log.read_text().count("pid ") == 2
