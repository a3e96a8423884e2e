"""The stage callback drives the four stages in transformers' `Trainer` and in the package's Accelerate trainer alike:
the same frozen modules, loss weights and learning rate at every optimizer step, and a loss that goes down."""

import math

import pytest
import torch
from transformers import Trainer as HFTrainer
from transformers import TrainerCallback, TrainingArguments

from regionmed_clip.data.collator import MedRegionCollator
from regionmed_clip.data.folder import load_rows
from regionmed_clip.training import RegionMedCLIPForPreTraining, StageCallback, Trainer, load_config
from regionmed_clip.training.trainer import build_model

from .test_training import losses_by_step, tiny_training_config, write_config

STEPS = (4, 6, 6, 8)
BATCH = 8


class StepRecorder(TrainerCallback):
    """What each optimizer step runs with, read after the stage callback has acted: the stage, the model's frozen
    top-level modules and loss weights, and (through an optimizer hook) the learning rate the step applies."""

    def __init__(self, stage_callback: StageCallback):
        self.stage_callback = stage_callback
        self.steps: list[dict] = []
        self.hooked = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.hooked is not optimizer:
            # Accelerate's prepared optimizer wraps torch's, whose step runs the hook.
            getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self.record_rate)
            self.hooked = optimizer
        base = model.model
        self.steps.append(
            {
                "stage": self.stage_callback.stage_at(state.global_step),
                "frozen": sorted(
                    {name.split(".")[0] for name, p in base.named_parameters() if not p.requires_grad}
                ),
                "weights": dict(model.loss_weights),
                "text_tower_training": base.text_model.training,
            }
        )
        return control

    def record_rate(self, optimizer, args, kwargs):
        self.steps[-1]["lr"] = optimizer.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """A MedRegion-synth folder whose training split is one batch, so every step sees the same images and a
    falling loss means the model learns, not that the batches got easier."""
    from regionmed_clip.data.synth import SynthConfig, generate_synth

    folder = tmp_path_factory.mktemp("one-batch")
    generate_synth(
        SynthConfig(out=str(folder), train=BATCH, validation=2, test=2, image_size=64), progress=False
    )
    return folder


def _config(tmp_path, data, name: str):
    raw = tiny_training_config(tmp_path / name, data, batch_size=BATCH, steps=STEPS, lr=1e-4)
    raw["stages"][0]["frozen"] = ["roi_processor", "text_model"]  # a frozen tower runs in eval mode
    return load_config(write_config(tmp_path / f"{name}.yaml", raw))


def test_transformers_trainer_and_the_package_trainer_run_the_same_stages_through_the_callback(
    tmp_path, one_batch
):
    # The package's Accelerate trainer, its callback watched after it acts.
    ours = Trainer(_config(tmp_path, one_batch, "ours"))
    ours_recorder = StepRecorder(ours.callback)
    step_begin = ours.callback.on_step_begin

    def watched(args, state, control, **kwargs):
        control = step_begin(args, state, control, **kwargs)
        return ours_recorder.on_step_begin(args, state, control, **kwargs)

    ours.callback.on_step_begin = watched
    ours.train()
    ours_losses = losses_by_step(tmp_path / "ours")

    # transformers' Trainer: the same model, data and stages; the package's collator and stage callback.
    config = _config(tmp_path, one_batch, "hf")
    torch.manual_seed(config.seed)
    model, processor = build_model(config.model)
    pretraining = RegionMedCLIPForPreTraining(model.config, model=model, objective=config.objective)
    callback = StageCallback(config.stages, list(STEPS))
    recorder = StepRecorder(callback)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=BATCH,
        max_steps=sum(STEPS),
        lr_scheduler_type="constant",
        remove_unused_columns=False,
        max_grad_norm=config.grad_clip,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        dataloader_num_workers=0,
    )
    collator = MedRegionCollator(processor, config.data.max_length)
    trainer = HFTrainer(
        model=pretraining,
        args=args,
        train_dataset=load_rows(config.data.path, config.data.train_split),
        data_collator=collator,
        callbacks=[callback, recorder],
    )
    trainer.train()

    expected = [
        {
            "stage": index,
            "frozen": sorted(stage.frozen),
            "weights": dict(stage.loss_weights),
            "text_tower_training": "text_model" not in stage.frozen,
        }
        for index, stage in enumerate(config.stages)
        for _ in range(STEPS[index])
    ]
    for steps in (ours_recorder.steps, recorder.steps):
        rates = [step.pop("lr") for step in steps]
        assert steps == expected
        assert rates == [callback.learning_rate(step) for step in range(sum(STEPS))]

    # Each loop trains: finite losses, and in every stage the last step's loss below its first's.
    hf_losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(hf_losses) == sum(STEPS)
    for losses in (hf_losses, [ours_losses[step]["loss/total"] for step in sorted(ours_losses)]):
        assert all(math.isfinite(loss) for loss in losses)
        start = 0
        for steps in STEPS:
            assert losses[start + steps - 1] < losses[start], (start, losses)
            start += steps

    # `trainer.save_model` writes the Hub model: the base model loads from it.
    trainer.save_model(str(tmp_path / "hf" / "model"))
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "hf" / "model")
    for name, tensor in pretraining.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
