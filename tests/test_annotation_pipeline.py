"""The annotation pipeline end to end, offline: tiny randomly initialised Grounding DINO, SAM and Qwen2.5-VL models
built here and loaded through transformers' pipelines from their folders; the CLI; kill-and-restart and Ctrl-C.

Random models write garbage, so the real VLM proves the path up to a counted rejection (parse failure → retry with
the errors fed back → rejection); a deterministic stand-in `generate(image, messages)` gives valid reports through
the same interface for the path to a written dataset folder.

Qwen2.5-VL's processor insists on a video processor, which needs torchvision (not installable here; real GPU
environments have it). The tiny model therefore gets the real Qwen2.5-VL processor minus its video half
(`ImageOnlyQwen2_5_VLProcessor`, registered with AutoProcessor for these tests); the model, image processor, chat
template and pipeline are the real ones.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from regionmed_clip.annotation import AnnotateConfig, Proposal, ProposalConfig, ReportConfig, annotate
from regionmed_clip.annotation.store import JOURNAL, AnnotationStore
from regionmed_clip.cli import build_parser
from regionmed_clip.data.folder import load_rows
from regionmed_clip.data.schema import validate_rows

REPO = Path(__file__).resolve().parents[1]
SUMMARY = "A round nodule is seen in the left upper zone of this image."
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template (images only).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---- stand-ins shared with the subprocess of the kill test -------------------------------------------------------


def canned_answer(messages: list[dict]) -> str:
    """A valid answer naming every candidate region of the prompt "round nodule left upper" (negatives left to the
    generator)."""
    prompt = messages[1]["content"][1]["text"]
    regions = len(re.findall(r"^\d+\. \[", prompt, flags=re.MULTILINE))
    return json.dumps(
        {
            "image": "x.png",
            "summary_caption": SUMMARY,
            "detailed_report": "A well-circumscribed round nodule in the left upper zone.",
            "region_extraction": ["round|nodule|left upper"] * regions or "No Finding",
        }
    )


class FixedProposer:
    """One fixed region per image: the driver's tests do not need real proposals."""

    def propose(self, images, score_threshold=None):
        box = [2.0, 2.0, 12.0, 10.0]
        return [[Proposal(box, "nodule", 0.9, 0.9, 1.0, 1.0, box)] for _ in images]


def write_images(folder: Path, count: int, size: tuple[int, int] = (48, 40)) -> list[str]:
    """`count` PNGs with a bright blob; returns their ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = []
    for index in range(count):
        pixels = rng.integers(0, 60, size=(size[1], size[0], 3), dtype=np.uint8)
        y, x = rng.integers(4, size[1] - 12), rng.integers(4, size[0] - 12)
        pixels[y : y + 8, x : x + 8] = 230
        Image.fromarray(pixels).save(folder / f"img{index:02d}.png")
        ids.append(f"img{index:02d}")
    return ids


def folder_ids(out: Path) -> list[str]:
    """Every row id in the folder's parquet files (with repeats, if any)."""
    return [
        image_id
        for path in sorted((out / "data").glob("*.parquet"))
        for image_id in pq.read_table(path, columns=["id"]).column("id").to_pylist()
    ]


def validated_rows(out: Path) -> list[dict]:
    rows = []
    for split in ("train", "validation", "test"):
        if list((out / "data").glob(f"{split}-*.parquet")):
            rows += list(validate_rows(load_rows(out, split)))
    return rows


def _subprocess_main(images: str, out: str, delay: float) -> None:
    def slow_generate(image, messages):
        time.sleep(delay)  # a real pause per image, like a real VLM: the test kills the run in the middle
        return canned_answer(messages)

    config = AnnotateConfig(images=images, out=out, batch_size=2)
    summary = annotate(config, proposer=FixedProposer(), generate=slow_generate, progress=False)
    print(json.dumps({"annotated": summary.annotated, "already_done": summary.already_done}))


# ---- tiny models -------------------------------------------------------------------------------------------------


def build_tiny_grounding_dino(folder: Path, tokenizer_path: str) -> str:
    from transformers import (
        AutoTokenizer,
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    backbone = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 1],
        window_size=4,
        out_features=["stage1", "stage2"],
    )
    text = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,  # the box heads are tied across decoder layers, which needs two of them
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=32,  # GroupNorm(32) in the input projections
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=16,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 48})
    GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(folder)
    return str(folder)


def build_tiny_sam(folder: Path) -> str:
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    config = SamConfig(
        vision_config={
            "hidden_size": 16,
            "output_channels": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
            "window_size": 2,
            "global_attn_indexes": [0],
            "num_pos_feats": 8,
            "mlp_dim": 32,
        },
        prompt_encoder_config={
            "hidden_size": 16,
            "image_size": 64,
            "patch_size": 16,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    torch.manual_seed(0)
    model = SamModel(config)
    with torch.no_grad():  # SAM's default init makes every mask logit ~0; wider weights give varied masks
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(image_processor).save_pretrained(folder)
    return str(folder)


def image_only_qwen_processor_class():
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without the video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2_5_VLProcessor


def build_tiny_qwen2_5_vl(folder: Path, processor_class) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Byte-level BPE with no merges: every text round-trips, 256 byte tokens + Qwen's special tokens.
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(byte_tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
            "window_size": 56,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, minilm_path):
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    processor_class = image_only_qwen_processor_class()
    AutoProcessor.register(Qwen2_5_VLConfig, processor_class, exist_ok=True)
    root = tmp_path_factory.mktemp("tiny-models")
    yield {
        "detector": build_tiny_grounding_dino(root / "grounding-dino", minilm_path),
        "segmenter": build_tiny_sam(root / "sam"),
        "vlm": build_tiny_qwen2_5_vl(root / "qwen2_5_vl", processor_class),
    }
    # transformers has no public unregister: the registration is pointed back at the library's own class.
    AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLProcessor, exist_ok=True)


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory) -> Path:
    """Three images (one in a sub-folder), an unreadable "image" and a file that is not an image."""
    folder = tmp_path_factory.mktemp("raw")
    write_images(folder, 2)
    write_images(folder / "sub", 3)
    for name in ("img00.png", "img01.png"):
        (folder / "sub" / name).unlink()
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    (folder / "notes.txt").write_text("ignored")
    return folder


def tiny_proposals(models: dict, **overrides) -> ProposalConfig:
    settings = {
        "detector": models["detector"],
        "segmenter": models["segmenter"],
        "terms": ("nodule", "mass"),
        "device": "cpu",
        "detection_threshold": 0.0,
        "candidates_per_image": 4,
        "mask_quality": "predicted_iou",
        "multimask": True,
        "score_threshold": 0.0,
        "top_k": 2,
    }
    settings.update(overrides)
    return ProposalConfig(**settings)


def tiny_reports(models: dict, **overrides) -> ReportConfig:
    settings = {"vlm": models["vlm"], "vlm_device": "cpu", "vlm_dtype": "float32", "max_new_tokens": 8}
    settings.update(overrides)
    return ReportConfig(**settings)


# ---- tests -------------------------------------------------------------------------------------------------------


def test_tiny_models_end_to_end(tiny_models, raw_images, tmp_path):
    from regionmed_clip.annotation import PipelineGenerator, RoiProposer

    proposals, reports = tiny_proposals(tiny_models), tiny_reports(tiny_models, max_attempts=2)
    proposer = RoiProposer(proposals)
    real_vlm = PipelineGenerator(reports)
    calls = []

    def recording_vlm(image, messages):
        calls.append(messages)
        return real_vlm(image, messages)

    # The real tiny VLM: garbage → retry with the problems fed back → counted rejection.
    few = tmp_path / "few"
    write_images(few, 1)
    (few / "broken.png").write_bytes(b"this is not a PNG")
    garbage = tmp_path / "garbage"
    summary = annotate(
        AnnotateConfig(images=str(few), out=str(garbage), batch_size=2),
        proposals,
        reports,
        proposer=proposer,
        generate=recording_vlm,
        progress=False,
    )
    assert (summary.annotated, summary.rejected, summary.unreadable) == (0, 1, 1)
    assert summary.extra_attempts == 1 and len(calls) == 2
    assert "Your answer is not valid" in calls[1][-1]["content"][0]["text"]
    assert "1. [" in calls[0][1]["content"][1]["text"]  # the proposals reached the prompt
    (entry,) = [json.loads(line) for line in (garbage / JOURNAL).read_text().splitlines()]
    assert list(entry["rejected"]) == ["img00"] and entry["rejected"]["img00"]["attempts"] == 2
    assert entry["rejected"]["img00"]["problems"]
    assert list(entry["unreadable"]) == ["broken"] and "broken.png" in entry["unreadable"]["broken"]
    assert "broken" in summary.describe()
    assert summary.counts == {} and not (garbage / "README.md").exists()

    # The same proposals with a stand-in report model: a dataset folder the data package validates and loads.
    out = tmp_path / "dataset"
    summary = annotate(
        AnnotateConfig(images=str(raw_images), out=str(out), batch_size=2, modality="chest radiograph"),
        proposals,
        reports,
        proposer=proposer,
        generate=lambda image, messages: canned_answer(messages),
        progress=False,
    )
    assert (summary.annotated, summary.rejected, summary.unreadable) == (3, 0, 1)
    assert summary.regions > 0 and summary.negatives_generated == summary.regions
    rows = validated_rows(out)
    assert sorted(row["id"] for row in rows) == ["img00", "img01", "sub/img02"]
    assert sum(summary.counts.values()) == 3
    for row in rows:
        assert row["modality"] == "chest radiograph" and row["summary_caption"] == SUMMARY
        assert row["image"].size == (48, 40)
        assert 1 <= len(row["regions"]) <= 2
        for region in row["regions"]:
            x0, y0, x1, y1 = region["bbox"]
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 40
            assert 0.0 <= region["score"] <= 1.0 and region["source"] == "auto"
            assert region["caption"] == "round nodule left upper" and len(region["negatives"]) == 5
    assert "qwen2_5_vl" in (out / "README.md").read_text()

    # Nothing left to do: no model is even loaded.
    again = annotate(AnnotateConfig(images=str(raw_images), out=str(out)), proposals, reports, progress=False)
    assert (again.annotated, again.already_done) == (0, 4)


def test_cli_calibrate_then_run(tiny_models, raw_images, tmp_path, capsys):
    parser = build_parser()
    common = [
        "--detector",
        tiny_models["detector"],
        "--segmenter",
        tiny_models["segmenter"],
        "--device",
        "cpu",
    ]
    common += ["--terms", "nodule", "mass", "--detection-threshold", "0.0", "--candidates-per-image", "4"]
    common += ["--mask-quality", "stability", "--no-multimask", "--top-k", "2"]  # MedSAM's settings
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"img00.png": [[6, 6, 30, 30]], "sub/img02.png": [[0, 0, 48, 40]]}))
    calibration = tmp_path / "calibration.json"
    args = parser.parse_args(
        [
            "annotate",
            "calibrate",
            "--images",
            str(raw_images),
            "--boxes",
            str(boxes),
            "--out",
            str(calibration),
        ]
        + common
    )
    assert args.run(args) == 0
    saved = json.loads(calibration.read_text())
    assert saved["num_images"] == 2 and saved["num_labelled"] == 2 and saved["curve"]
    assert 0.0 <= saved["threshold"] <= 1.0 and saved["settings"]["terms"] == ["nodule", "mass"]
    assert "precision" in capsys.readouterr().out

    run = ["annotate", "run", "--images", str(raw_images), "--out", str(tmp_path / "out"), "--calibration"]
    run += [str(calibration), "--vlm", tiny_models["vlm"], "--vlm-device", "cpu", "--vlm-dtype", "float32"]
    run += ["--max-attempts", "1", "--max-new-tokens", "4", "--batch-size", "3"]
    args = parser.parse_args(run + common)
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "3 rejected, 1 unreadable" in printed

    args = parser.parse_args(run + common + ["--top-k", "3"])
    with pytest.raises(ValueError, match="other proposal settings: top_k=2"):
        args.run(args)


def test_kill_and_restart_loses_and_duplicates_nothing(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    ids = write_images(images, 9)
    script = (
        "import sys; sys.path.insert(0, sys.argv[4]); from tests.test_annotation_pipeline import _subprocess_main; "
        "_subprocess_main(sys.argv[1], sys.argv[2], float(sys.argv[3]))"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(images), str(out), "0.3", str(REPO)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    journal = out / JOURNAL
    deadline = time.monotonic() + 120
    try:
        # Kill once two batches are on disk (the journal line comes after a batch's files).
        while not (journal.is_file() and len(journal.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the run wrote no batch in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    with AnnotationStore(out) as store:
        written = store.written_ids()
    assert 4 <= len(written) < 9, "the kill should land in the middle of the run"
    assert not (out / "README.md").exists()  # killed: never finalized
    assert Counter(folder_ids(out)).most_common(1)[0][1] == 1

    annotated_on_restart = []

    def counting(image, messages):
        annotated_on_restart.append(messages[1]["content"][1]["text"].split("Image: ")[1].split(" ")[0])
        return canned_answer(messages)

    summary = annotate(
        AnnotateConfig(images=str(images), out=str(out), batch_size=2),
        proposer=FixedProposer(),
        generate=counting,
        progress=False,
    )
    assert summary.already_done == len(written) and summary.annotated == 9 - len(written)
    assert sorted(name.removesuffix(".png") for name in annotated_on_restart) == sorted(set(ids) - written)
    assert sorted(folder_ids(out)) == ids  # every image exactly once
    assert sorted(row["id"] for row in validated_rows(out)) == ids


def test_interrupt_finalizes_and_loses_only_the_current_batch(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    ids = write_images(images, 7)
    calls = []

    def interrupted(image, messages):
        calls.append(1)
        if len(calls) == 5:  # the first image of the third batch
            raise KeyboardInterrupt
        return canned_answer(messages)

    config = AnnotateConfig(images=str(images), out=str(out), batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        annotate(config, proposer=FixedProposer(), generate=interrupted, progress=False)
    assert sorted(folder_ids(out)) == ids[:4]
    assert (out / "README.md").is_file() and not list((out / "data").glob("*-batch-*"))
    assert sorted(row["id"] for row in validated_rows(out)) == ids[:4]

    summary = annotate(
        config,
        proposer=FixedProposer(),
        generate=lambda image, messages: canned_answer(messages),
        progress=False,
    )
    assert (summary.already_done, summary.annotated) == (4, 3)
    assert sorted(folder_ids(out)) == ids
