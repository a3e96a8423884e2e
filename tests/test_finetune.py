"""Fine-tuning: LoRA (what trains, adapter reload, merge), classification on labels, the `finetune` command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from regionmed_clip import RegionMedCLIPModel
from regionmed_clip.data.collator import MedRegionCollator
from regionmed_clip.data.folder import load_rows
from regionmed_clip.training import Trainer
from regionmed_clip.training.config import LoraSpec
from regionmed_clip.training.finetune import FinetuneArgs, finetune_config
from regionmed_clip.training.lora import apply_lora, load_adapter, lora_target_names
from regionmed_clip.training.losses import class_loss

from .conftest import make_processor, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, tokenizer):
    """A small pretrained RegionMed-CLIP folder (crop mode) to fine-tune."""
    folder = tmp_path_factory.mktemp("base")
    tiny_model("crop").save_pretrained(folder)
    make_processor(tokenizer, "crop").save_pretrained(folder)
    return folder


def tiny_run(tmp_path, base_folder, synth_folder, **overrides) -> FinetuneArgs:
    """A few CPU steps on the synth folder, logged to metrics.jsonl only."""
    options = {"steps": 2, "lr": 1e-3, "batch_size": 8, "max_length": 64, "mixed_precision": "no"}
    options.update(overrides)
    return FinetuneArgs(
        model=str(base_folder),
        data=str(synth_folder),
        output_dir=str(tmp_path / "run"),
        report_to="none",
        **options,
    )


def fixed_inputs(processor, synth_folder):
    rows = load_rows(synth_folder, "validation").select(range(4))
    batch = MedRegionCollator(processor, max_length=64)(list(rows))
    return {
        key: value
        for key, value in batch.items()
        if not key.startswith(("summary_", "region_", "term_", "negative_"))
    }


def outputs_of(model, inputs) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return {"logits": out.logits_per_image, "regions": out.region_embeds, "image": out.image_embeds}


def assert_outputs_close(actual, expected, atol=1e-5):
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def test_lora_targets_the_attention_projections_of_both_towers_and_the_roi_processor():
    names = lora_target_names(tiny_model("crop"), LoraSpec())
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "dense", "out_proj"}
    assert {name.rsplit(".", 1)[-1] for name in names} <= per_layer
    assert sum(name.startswith("vision_model.") for name in names) == 2 * 4  # 2 layers x q, k, v, o
    assert sum(name.startswith("text_model.") for name in names) == 2 * 4  # query, key, value, output.dense
    assert sorted(n for n in names if n.startswith("roi_processor.")) == [
        f"roi_processor.attention.{p}" for p in ("k_proj", "out_proj", "q_proj", "v_proj")
    ]
    assert not any("mlp" in name or "intermediate" in name or "pooler" in name for name in names)


@pytest.mark.parametrize("learnable", [False, True])
def test_the_temperature_never_trains_under_lora(learnable):
    model = apply_lora(tiny_model("crop", learnable_temperature=learnable), LoraSpec())
    scale = dict(model.named_parameters()).get("base_model.model.logit_scale")
    assert (scale is not None) == learnable
    assert scale is None or not scale.requires_grad


def test_lora_training_changes_only_adapters_and_projections_and_reloads_exactly(
    tmp_path, base_folder, synth_folder, capsys
):
    trainer = Trainer(finetune_config(tiny_run(tmp_path, base_folder, synth_folder, steps=3, lr=1e-2)))
    assert "trainable params:" in capsys.readouterr().out
    model = trainer.unwrapped.model  # the base model under its PEFT wrapper
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    trainer.run_stage(0, trainer.config.stages[0])

    after = {name: p.detach() for name, p in model.named_parameters()}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    declared = {
        name for name in before if "lora_" in name or ".modules_to_save." in name
    }  # LoRA matrices and the trained copies of the projections
    assert changed <= declared
    # Every adapter trained: Adam moves each element whose gradient is well above its eps by about the learning
    # rate at each step, where round-off gradients (far below eps) move an element by a small fraction of it.
    lr = trainer.config.stages[0].lr
    lora_b = [name for name in before if "lora_B" in name]
    assert lora_b and all(float((after[name] - before[name]).abs().max()) > 0.1 * lr for name in lora_b)
    assert {n for n in changed if "modules_to_save" in n} >= {
        "base_model.model.visual_projection.modules_to_save.default.weight",
        "base_model.model.text_projection.modules_to_save.default.weight",
    }
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers_before[name]), name  # the temperature buffer among them

    inputs = fixed_inputs(trainer.processor, synth_folder)
    trained = outputs_of(model, inputs)
    trainer.save_final()
    run = tmp_path / "run"
    assert {p.name for p in (run / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert not list((run / "adapter").glob("model.safetensors"))  # the adapter alone, not the base weights

    reloaded = load_adapter(RegionMedCLIPModel.from_pretrained(base_folder), str(run / "adapter"))
    assert_outputs_close(outputs_of(reloaded, inputs), trained)
    merged = reloaded.merge_and_unload()
    assert type(merged) is RegionMedCLIPModel and not any("lora_" in n for n, _ in merged.named_parameters())
    assert_outputs_close(outputs_of(merged, inputs), trained)
    assert_outputs_close(outputs_of(RegionMedCLIPModel.from_pretrained(run / "model"), inputs), trained)
    untouched = outputs_of(RegionMedCLIPModel.from_pretrained(base_folder), inputs)
    assert not torch.allclose(untouched["logits"], trained["logits"], atol=1e-3)


def test_class_loss_matches_a_naive_cross_entropy():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, 8, requires_grad=True), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0, 2, 1, 1, 0])
    scale = torch.tensor(7.0)
    naive = 0.0
    for image, label in zip(images, labels, strict=True):
        logits = [scale * torch.dot(image, c) for c in classes]
        naive = naive - (logits[label] - torch.log(sum(torch.exp(v) for v in logits)))
    naive = naive / len(labels)
    torch.testing.assert_close(class_loss(images, classes, labels, scale), naive)


def test_classification_batches_carry_class_prompts_and_label_indices(tokenizer, synth_folder):
    rows = list(load_rows(synth_folder, "train").select(range(6)))
    labels = sorted({row["label"] for row in rows})
    collator = MedRegionCollator(
        make_processor(tokenizer, "crop"),
        max_length=64,
        class_prompts=[f"a scan showing a {label}" for label in labels],
        label_index={label: i for i, label in enumerate(labels)},
    )
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == len(labels)
    assert [labels[i] for i in batch["labels"].tolist()] == [row["label"] for row in rows]
    with pytest.raises(ValueError, match=r"row 'synth-.*label 'fracture' is not one of the classes"):
        collator([{**rows[0], "label": "fracture"}])


def test_full_classification_fine_tuning_trains_on_labels_and_saves_the_classes(
    tmp_path, base_folder, synth_folder
):
    args = tiny_run(
        tmp_path,
        base_folder,
        synth_folder,
        method="full",
        task="classification",
        template="a scan showing a {}",
        frozen=("text_model",),
    )
    trainer = Trainer(finetune_config(args))
    text_before = {n: p.detach().clone() for n, p in trainer.unwrapped.model.text_model.named_parameters()}
    vision_before = (
        trainer.unwrapped.model.vision_model.embeddings.patch_embeddings.projection.weight.detach().clone()
    )
    folder = trainer.train()
    records = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/class_loss" in r and "loss/global_loss" not in r for r in records)
    for name, parameter in trainer.unwrapped.model.text_model.named_parameters():
        assert torch.equal(parameter, text_before[name]), name
    assert not torch.equal(
        trainer.unwrapped.model.vision_model.embeddings.patch_embeddings.projection.weight, vision_before
    )
    labels = sorted(set(load_rows(synth_folder, "train")["label"]))
    saved = RegionMedCLIPModel.from_pretrained(folder)
    assert [saved.config.id2label[i] for i in range(len(labels))] == labels


def test_finetune_config_errors_say_what_is_wrong(tmp_path):
    common = {"model": "m", "data": "d", "output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match="--method must be one of"):
        FinetuneArgs(**common, method="qlora")
    with pytest.raises(ValueError, match="--frozen applies to --method full"):
        FinetuneArgs(**common, frozen=("text_model",))
    with pytest.raises(ValueError, match="needs a '\\{\\}' placeholder"):
        finetune_config(FinetuneArgs(**common, task="classification", template="a scan"))


def test_finetune_command_runs_lora_through_accelerate_launch(tmp_path, base_folder, synth_folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "regionmed_clip.cli", "finetune", "--method", "lora"]
    command += [
        "--model",
        str(base_folder),
        "--data",
        str(synth_folder),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    command += ["--steps", "2", "--batch-size", "8", "--max-length", "64", "--mixed-precision", "no"]
    command += ["--report-to", "none", "--task", "classification"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trainable params:" in result.stdout + result.stderr
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    model = RegionMedCLIPModel.from_pretrained(run / "model")
    assert len(model.config.id2label) >= 2
    saved = yaml.safe_load((run / "finetune_config.yaml").read_text())
    assert saved["lora"]["r"] == 8 and saved["stages"][0]["loss_weights"] == {"class_loss": 1.0}
