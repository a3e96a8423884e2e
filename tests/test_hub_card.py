"""The model card's figures, parameter count and training recipe come from their sources, never from a copy."""

import dataclasses
import math

import pytest
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from regionmed_clip.evaluation import report
from regionmed_clip.evaluation.report import model_index_figures
from regionmed_clip.hub.card import _parameter_count, _training_section, render_model_card
from regionmed_clip.training.config import TrainConfig

from .conftest import tiny_model

METRICS = {
    "provenance": {"data": "data/medregion-synth", "data_sha256": "abc", "settings": {"split": "test"}},
    "zero_shot": {
        "box_free": {"global": {"macro_auc": float("nan"), "accuracy": 0.5, "macro_auc_ci95": None}},
        "gt_boxes": {"region-aware": {"macro_auc": 0.81, "accuracy": 0.6, "macro_auc_ci95": [0.7, 0.9]}},
    },
    "few_shot": {
        "box_free": {
            "global": {
                "1-shot": {
                    "prototype": {"mean": 0.7, "std": 0.1},
                    "linear_probe": {"mean": 0.65, "std": 0.1},
                },
                "5-shot": {"skipped": "fewer than 5 shots of a class"},
            }
        }
    },
    "region": {
        "region_to_caption": {"R@1": 0.08, "R@5": 0.36, "R@10": 0.5},
        "hard_negative_accuracy": 0.48,
        "controls": {"box_only": {"region_to_caption": {"R@1": 0.07}}},
    },
    "vqa": {"SLAKE": {"open": 0.3, "closed": 0.7, "overall": 0.5, "avg": 0.5}},
}


def test_figures_are_the_measured_values_with_nan_and_skipped_entries_left_out():
    figures = {(figure.task_name, figure.metric_name): figure for figure in model_index_figures(METRICS)}
    zero_shot = "Zero-shot classification"
    assert figures[(zero_shot, "macro AUC (region-aware embedding, GT boxes at test)")].value == 0.81
    assert (zero_shot, "macro AUC (global embedding, box-free)") not in figures  # NaN
    assert figures[(zero_shot, "accuracy (global embedding, box-free)")].value == 0.5
    assert (
        figures[("Few-shot classification", "1-shot macro AUC (logistic probe, global, box-free)")].value
        == 0.65
    )
    assert not any(name.startswith("5-shot") for _, name in figures)
    assert figures[("Region–caption retrieval", "region → caption R@5 (GT boxes at test)")].value == 0.36
    assert 0.07 not in {figure.value for figure in figures.values()}  # a control is not the model's figure
    # Box-free figures come before those that take ground-truth boxes.
    names = [figure.metric_name for figure in model_index_figures(METRICS) if figure.task_name == zero_shot]
    assert names == [
        "accuracy (global embedding, box-free)",
        "macro AUC (region-aware embedding, GT boxes at test)",
        "accuracy (region-aware embedding, GT boxes at test)",
    ]
    assert figures[("Visual question answering", "closed accuracy")].dataset == "SLAKE"
    assert len(figures) == 2 + 1 + 2 + 4 + 3
    assert {figure.task_type for figure in figures.values()} == {
        task_type for (task_type, _), _ in report.MODEL_INDEX_FIGURES.values()
    } - {"image-text-retrieval", "region-grounding"}  # the tasks METRICS does not hold


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    return folder


def _index(card: str) -> dict[str, float]:
    results = ModelCard(card).data.eval_results or []
    return {result.metric_name: result.metric_value for result in results}


def test_a_renamed_metric_key_reaches_the_card(model_folder, monkeypatch):
    """The evaluation package renames `macro_auc` to `macro_auc_box_free` where it writes metrics.json; the card
    follows without a change of its own."""
    name = "macro AUC (region-aware embedding, GT boxes at test)"
    assert _index(render_model_card(model_folder, METRICS))[name] == 0.81
    zero_shot_task, zero_shot_specs = report.MODEL_INDEX_FIGURES["zero_shot"]
    renamed = tuple(
        (kind, name, tuple("macro_auc_box_free" if key == "macro_auc" else key for key in path))
        for kind, name, path in zero_shot_specs
    )
    monkeypatch.setitem(report.MODEL_INDEX_FIGURES, "zero_shot", (zero_shot_task, renamed))
    metrics = {
        **METRICS,
        "zero_shot": {"gt_boxes": {"region-aware": {"macro_auc_box_free": 0.77, "accuracy": 0.6}}},
    }
    index = _index(render_model_card(model_folder, metrics))
    assert index[name] == 0.77
    assert name not in _index(render_model_card(model_folder, METRICS))


def test_parameter_count_is_the_sum_of_the_saved_tensor_sizes(model_folder):
    tensors = load_file(model_folder / "model.safetensors")
    assert _parameter_count(model_folder) == sum(math.prod(t.shape) for t in tensors.values())
    assert _parameter_count(model_folder.parent) is None


def test_training_section_reads_missing_keys_from_train_config_defaults():
    config = yaml.safe_load(
        """
        output_dir: run
        model: {pretrained: some/model}
        data: {path: data}
        stages: [{name: joint, lr: 0.0001, batch_size: 8, steps: 10}]
        """
    )
    section, _ = _training_section(config)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert f"betas {tuple(defaults['adam_betas'])}, weight decay {defaults['weight_decay']}" in section
    assert f"clipped at {defaults['grad_clip']}; mixed precision `{defaults['mixed_precision']}`" in section
    assert "| joint | 10 steps | 0.0001 | 8 | – | global_loss 1 |" in section
