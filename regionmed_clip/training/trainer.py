"""The training loop (accelerate's example style): build, then run the progressive stages; checkpoint and resume.

`training_function(config)` is what `accelerate launch train_accelerate.py --config X` and `regionmed-clip train
--config X` run, from one CPU process to many GPUs.
"""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import TrainerControl

from .. import RegionMedCLIPImageProcessor, RegionMedCLIPModel, RegionMedCLIPProcessor
from ..configuration_regionmed_clip import RegionMedCLIPConfig
from ..data.collator import MedRegionCollator
from ..data.folder import load_rows
from .config import TrainConfig, resolve_path
from .data import batches_per_epoch, epoch_seed, stage_dataloader, stage_loader, stage_total_steps
from .pretraining import RegionMedCLIPForPreTraining
from .stages import StageCallback, build_optimizer

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "training_config.yaml"


@dataclasses.dataclass
class TrainerState:
    """Where training is: restored on resume together with the model, optimizer, schedule and RNG."""

    stage: int = 0
    stage_step: int = 0  # optimizer steps done in `stage`
    global_step: int = 0
    epoch: int = 0  # epoch within `stage`
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    stage_ends: list[int] = dataclasses.field(default_factory=list)  # global step at the end of each stage


class MetricSums:
    """The metrics of the optimizer steps since the last log. Tensors are summed where they are (a step adds its
    losses without reading them, so it never waits for the device); `means` reads every sum in one transfer and
    divides each by the number of steps that had it (a term can be absent from a step). Plain numbers (the
    learning rate) keep the latest step's value."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.latest: dict[str, float] = {}
        self.names: dict[str, None] = {}  # every name seen, in the order first seen

    def add(self, metrics: dict):
        for name, value in metrics.items():
            self.names.setdefault(name)
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
                self.sums[name] = value if name not in self.sums else self.sums[name] + value
                self.counts[name] = self.counts.get(name, 0) + 1
            else:
                self.latest[name] = value

    def means(self) -> dict[str, float]:
        """The averages, and an empty window for the next steps."""
        names = list(self.sums)
        values = torch.stack([self.sums[name] for name in names]).tolist() if names else []
        sums = dict(zip(names, values, strict=True))
        record = {
            name: sums[name] / self.counts[name] if name in sums else self.latest[name] for name in self.names
        }
        self.sums, self.counts, self.latest, self.names = {}, {}, {}, {}
        return record


def cpu_supports_bf16() -> bool:
    """Whether torch computes bf16 natively on this CPU: the CPU has avx512_bf16 or AMX, and torch runs its AVX-512
    kernels. With `ATEN_CPU_CAPABILITY=avx2` torch takes its AVX2 kernels on such a CPU, and some bf16 kernels
    (the fused attention's) then refuse to run ("pack_vnni2 is only supported when avx512 is supported")."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(setting: str) -> str:
    """ "auto" → bf16 where the hardware computes it natively (CUDA with bf16, or a CPU with avx512_bf16 / AMX whose
    AVX-512 kernels torch uses; see `cpu_supports_bf16`)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_supports_bf16() else "no"


def build_model(spec) -> tuple[RegionMedCLIPModel, RegionMedCLIPProcessor]:
    """The model and processor a `ModelSpec` describes (pretrained folder, a dual encoder to convert, or towers +
    config)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if spec.pretrained is not None:
        path = resolve_path(spec.pretrained)
        return RegionMedCLIPModel.from_pretrained(path), RegionMedCLIPProcessor.from_pretrained(path)
    if spec.from_dual_encoder is not None:
        from ..convert import convert_processor, from_dual_encoder_pretrained

        path = resolve_path(spec.from_dual_encoder)
        model = from_dual_encoder_pretrained(path, **spec.config)
        return model, convert_processor(path, model.config, image_processor=spec.image_processor)
    towers = {}
    for tower in ("vision", "text"):
        pretrained = resolve_path(getattr(spec, f"{tower}_pretrained"))
        if pretrained is not None:
            towers[tower] = AutoModel.from_pretrained(pretrained)
        else:
            tower_config = dict(getattr(spec, f"{tower}_config"))
            towers[tower] = AutoModel.from_config(
                AutoConfig.for_model(tower_config.pop("model_type"), **tower_config)
            )
    config = RegionMedCLIPConfig(
        vision_config=towers["vision"].config.to_dict(),
        text_config=towers["text"].config.to_dict(),
        **spec.config,
    )
    model = RegionMedCLIPModel(config, vision_model=towers["vision"], text_model=towers["text"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(spec.tokenizer or spec.text_pretrained))
    image_processor = RegionMedCLIPImageProcessor.from_model_config(config, **spec.image_processor)
    return model, RegionMedCLIPProcessor(image_processor, tokenizer)


class Trainer:
    """Runs a `TrainConfig`: stages in order, each with a fresh optimizer, checkpointed atomically.

    The model it trains is a [`RegionMedCLIPForPreTraining`] around the configured model; the stages are applied by
    a [`StageCallback`], the same callback transformers' `Trainer` can drive, through its hooks."""

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=resolve_mixed_precision(config.mixed_precision),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=str(self.output_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)
        self.state = TrainerState()
        self.control = TrainerControl()
        self.optimizer = None  # prepared once, before the first stage (see stages.py)
        self.timings: dict[str, float] = {}

        model, self.processor = build_model(config.model)
        towers = (model.vision_model, model.text_model)
        if config.model.attn_implementation is not None:
            # Per tower: the towers are models of their own, which a composite model's setter does not reach.
            for tower in towers:
                tower.set_attn_implementation(config.model.attn_implementation)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if config.compile_backend is not None:
            for tower in towers:
                tower.compile(backend=config.compile_backend)
        with self.accelerator.main_process_first():
            self.rows = self._load_rows()
        self.class_labels = self._class_labels()
        if self.class_labels is not None:
            # Saved with the model, so the classes it was tuned on travel with it.
            model.config.id2label = dict(enumerate(self.class_labels))
            model.config.label2id = {label: index for index, label in enumerate(self.class_labels)}
        pretraining = RegionMedCLIPForPreTraining(model.config, model=model, objective=config.objective)
        if config.lora is not None:
            from .lora import apply_lora, trainable_summary

            # The adapter fixes the trainable set for the whole run, and DDP is wrapped around exactly that set.
            pretraining.detector.regionmed_clip = apply_lora(pretraining.model, config.lora)
            self.print(f"LoRA {trainable_summary(pretraining.model)[2]}")
        else:
            # Wrapped while every parameter is trainable; stages freeze afterwards (see stages.py).
            for parameter in pretraining.parameters():
                parameter.requires_grad_(True)
        self.model = self.accelerator.prepare(pretraining)
        self.callback = StageCallback(
            config.stages,
            [self.total_steps(index) for index in range(len(config.stages))],
            lora=config.lora is not None,
            # FSDP needs the towers to run on every process at every step (its forward gathers the shards).
            cache_captions=self.accelerator.distributed_type != DistributedType.FSDP,
            report=self.report_stage,
        )
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / CONFIG_FILE)
        if config.report_to != "none":
            self.accelerator.init_trackers("regionmed-clip", config=_flat(config.to_dict()))

    # ---- helpers ----------------------------------------------------------------------------------------------

    @property
    def unwrapped(self) -> RegionMedCLIPForPreTraining:
        return self.accelerator.unwrap_model(self.model)

    def print(self, message: str):
        self.accelerator.print(message)

    def report_stage(self, message: str):
        """The stage callback's announcement of a stage, with the batch it runs at."""
        stage = self.config.stages[self.callback.active]
        self.print(f"{message}, batch {stage.batch_size}x{self.accelerator.num_processes}")

    def _load_rows(self):
        data = self.config.data
        if data.synth is not None and not Path(data.path).exists() and self.accelerator.is_main_process:
            from ..data.synth import SynthConfig, generate_synth

            start = time.perf_counter()
            generate_synth(SynthConfig(out=data.path, **data.synth))
            self.timings["generate MedRegion-synth"] = time.perf_counter() - start
        return load_rows(data.path, data.train_split, streaming=data.streaming)

    def _class_labels(self) -> list[str] | None:
        spec = self.config.classification
        if spec is None:
            return None
        if spec.labels:
            return list(spec.labels)
        if self.config.data.streaming:
            raise ValueError("classification on a streaming dataset needs `classification.labels`")
        if spec.label_column not in self.rows.column_names:
            raise ValueError(f"{self.config.data.path}: no {spec.label_column!r} column to classify on")
        labels = sorted({label for label in self.rows[spec.label_column] if label})
        if len(labels) < 2:
            raise ValueError(
                f"{self.config.data.path}: classification needs at least 2 labels, found {labels}"
            )
        return labels

    def log(self, metrics: dict):
        if self.config.report_to != "none":
            self.accelerator.log(metrics, step=self.state.global_step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.global_step, **metrics}) + "\n")

    def plot(self):
        if self.accelerator.is_main_process:
            from .plots import plot_loss_curves

            plot_loss_curves(
                self.output_dir / "metrics.jsonl", self.output_dir / "loss_curves.png", self.config
            )

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self):
        """`accelerator.save_state` into a temporary folder, renamed into place only once complete: a kill during
        the save leaves the previous checkpoint as the latest one."""
        root = self.output_dir / CHECKPOINTS
        final = root / f"step-{self.state.global_step:08d}"
        partial = root / f".partial-step-{self.state.global_step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps(dataclasses.asdict(self.state)), encoding="utf-8")
            self.config.save(partial / CONFIG_FILE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in sorted(root.glob("step-*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def latest_checkpoint(self) -> Path | None:
        complete = sorted((self.output_dir / CHECKPOINTS).glob("step-*"))
        return complete[-1] if complete else None

    def resume(self) -> bool:
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            self.print("resume: no checkpoint yet, starting from the beginning")
            return False
        self.state = TrainerState(**json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))
        # The optimizer is prepared before `load_state` restores it: mid-stage, the Adam state of that stage; at a
        # stage boundary, an empty state. The learning rate follows from the restored step.
        self.prepare_optimizer()
        self.accelerator.load_state(str(checkpoint))
        self.print(
            f"resumed from {checkpoint.name}: stage {self.state.stage + 1}, step {self.state.global_step}"
        )
        return True

    # ---- training ---------------------------------------------------------------------------------------------

    def _stage_batch(self, batch: dict, stage) -> dict:
        """The fields of `batch` the stage's terms need, on the device (other towers do not run)."""
        inputs = stage.inputs
        optional = {"roi_pixel_values"}  # crop mode only
        missing = sorted(inputs - set(batch) - optional)
        if missing:
            raise ValueError(f"stage {stage.name}: the batch lacks {missing}, which its loss terms need")
        # Non-blocking: from pinned memory (a CUDA device) the copy overlaps the previous step's kernels.
        device = self.accelerator.device
        return {key: value.to(device, non_blocking=True) for key, value in batch.items() if key in inputs}

    def training_step(self, batch: dict) -> dict:
        """One micro-batch, in accelerate's `accumulate` shape: the prepared optimizer steps (and zeroes) only when
        gradients sync, `clip_grad_norm_` unscales fp16 gradients first, and an fp16 step with inf gradients is
        skipped. With clipping on, `grad_norm` is the norm of the unscaled gradients before clipping, as
        `clip_grad_norm_` returns it.

        Returns the losses and `grad_norm` as detached tensors on the device (read them only when logging: reading
        one waits for the step's kernels) and `lr`, the learning rate the step used, as a number."""
        learning_rate = self.optimizer.param_groups[0]["lr"]
        grad_norm = None
        with self.accelerator.accumulate(self.model):
            outputs = self.model(**batch)
            loss, terms = outputs.loss, outputs.loss_terms
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.grad_clip:
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        metrics = {f"loss/{name}": term.detach() for name, term in terms.items()}
        metrics["loss/total"] = loss.detach()
        metrics["lr"] = learning_rate
        if grad_norm is not None:
            metrics["grad_norm"] = torch.as_tensor(grad_norm, device=loss.device).detach()
        return metrics

    def checkpoints_at(self) -> bool:
        """Whether the optimizer step just taken saves a checkpoint (besides the one at each stage's end)."""
        every = self.config.checkpoint_every
        return bool(every) and self.state.global_step % every == 0

    def logs_at(self, stage_ends: bool) -> bool:
        """Whether the optimizer step just taken logs: every `log_every` steps, at a checkpoint and at the end of
        its stage."""
        return stage_ends or self.checkpoints_at() or self.state.global_step % self.config.log_every == 0

    def total_steps(self, index: int) -> int:
        size = None if self.config.data.streaming else len(self.rows)
        return stage_total_steps(
            self.config.stages[index],
            size,
            self.accelerator.num_processes,
            self.config.gradient_accumulation_steps,
        )

    def prepare_optimizer(self):
        """Build and prepare the run's one AdamW (see stages.py), once: before any stage freezes, so the optimizer
        holds every parameter some stage trains."""
        if self.optimizer is None:
            self.optimizer = self.accelerator.prepare(build_optimizer(self.unwrapped, self.config))

    def step_begins(self):
        """The stage callback's `on_step_begin` for the optimizer step about to run (its stage, its rate)."""
        self.prepare_optimizer()
        self.control = self.callback.on_step_begin(
            self.config, self.state, self.control, model=self.unwrapped, optimizer=self.optimizer
        )

    def run_stage(self, index: int, stage):
        accelerator, state = self.accelerator, self.state
        data = self.config.data
        world = accelerator.num_processes
        total = self.total_steps(index)
        classes = self.config.classification if stage.uses_classes else None
        collator = MedRegionCollator(
            self.processor,
            data.max_length,
            data.max_negatives,
            with_regions=stage.uses_regions,
            class_prompts=[classes.template.format(label) for label in self.class_labels]
            if classes
            else None,
            label_index={label: i for i, label in enumerate(self.class_labels)} if classes else None,
            label_column=classes.label_column if classes else "label",
            region_sampling="cycle",
            seed=self.config.seed,
            stage=index,
            fields=stage.inputs,
        )
        start = time.perf_counter()
        progress = tqdm(
            total=total,
            initial=state.stage_step,
            desc=stage.name,
            disable=not accelerator.is_local_main_process,
        )
        # Streaming rows have no length: their epoch ends when its loader does (in `stage_batches`).
        per_epoch = None if data.streaming else batches_per_epoch(len(self.rows), stage.batch_size, world)
        batches = self.stage_batches(index, stage, collator)
        # A window never spans a checkpoint (its step logs), so a resumed run logs the same records.
        window = MetricSums()
        step_begun = False
        for batch in batches if state.stage_step < total else ():
            if not step_begun:
                self.step_begins()
                step_begun = True
            metrics = self.training_step(self._stage_batch(batch, stage))
            state.batch_in_epoch += 1
            if state.batch_in_epoch == per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if accelerator.sync_gradients:
                step_begun = False
                self.finish_step(index, total, metrics, window, progress)
                if state.stage_step >= total:
                    break
        batches.close()
        progress.close()
        self.timings[f"stage {index + 1} {stage.name}"] = time.perf_counter() - start
        state.stage_ends.append(state.global_step)
        state.stage, state.stage_step, state.epoch, state.batch_in_epoch = index + 1, 0, 0, 0
        # The callback asked for the checkpoint at the stage's end; it is taken once the state says the stage is
        # done, so that a run resumed from it starts the next stage.
        if self.control.should_save:
            self.control.should_save = False
            self.save_checkpoint()
        self.plot()

    def finish_step(self, index: int, total: int, metrics: dict, window: MetricSums, progress) -> dict | None:
        """After an optimizer step of stage `index` (of `total` steps): the state and the stage callback's
        `on_step_end`, the metrics window, the log on the steps `logs_at` picks (its record is returned), and a
        checkpoint every `checkpoint_every` steps."""
        state = self.state
        state.stage_step += 1
        state.global_step += 1
        self.control = self.callback.on_step_end(
            self.config, state, self.control, model=self.unwrapped, optimizer=self.optimizer
        )
        progress.update()
        window.add(metrics)
        record = None
        if self.logs_at(state.stage_step >= total):
            record = {**window.means(), "stage": index}
            progress.set_postfix(loss=f"{record['loss/total']:.3f}")
            self.log(record)
        if self.checkpoints_at():
            self.save_checkpoint()
        return record

    def stage_batches(self, index: int, stage, collator):
        """This process's batches of stage `index` from where `state` stands. Map-style rows come from one
        [`stage_loader`] for the whole stage (its workers live across epochs); streaming rows from one loader per
        epoch, each a new shuffle of the stream, with the epoch advanced here when one runs out."""
        state, data, accelerator = self.state, self.config.data, self.accelerator
        options = dict(
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            pin_memory=accelerator.device.type == "cuda",
        )
        where = (self.rows, collator, stage.batch_size, accelerator.process_index, accelerator.num_processes)
        if not data.streaming:
            yield from stage_loader(
                *where,
                lambda epoch: epoch_seed(self.config.seed, index, epoch),
                epoch=state.epoch,
                skip=state.batch_in_epoch,
                **options,
            )
            return
        while True:
            collator.set_epoch(state.epoch)
            seed = epoch_seed(self.config.seed, index, state.epoch)
            yield from stage_dataloader(*where, seed, skip=state.batch_in_epoch, streaming=True, **options)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def train(self) -> Path:
        if self.config.resume:
            self.resume()
        for index in range(self.state.stage, len(self.config.stages)):
            self.run_stage(index, self.config.stages[index])
        return self.save_final()

    def save_final(self) -> Path:
        """The trained model with `save_pretrained` (weights, config, remote code), the processor and the config.
        Under LoRA the adapter alone goes to `adapter/` and `model/` holds the merged model, which loads and
        evaluates like any other."""
        folder = self.output_dir / "model"
        self.accelerator.wait_for_everyone()
        model = self.unwrapped
        if self.config.lora is not None:
            model.model.save_pretrained(
                self.output_dir / "adapter", is_main_process=self.accelerator.is_main_process
            )
            if self.accelerator.is_main_process:
                self.processor.save_pretrained(self.output_dir / "adapter")
            model.detector.regionmed_clip = model.model.merge_and_unload()
        model.save_pretrained(
            folder, is_main_process=self.accelerator.is_main_process, save_function=self.accelerator.save
        )
        if self.accelerator.is_main_process:
            self.processor.save_pretrained(folder)
            self.config.save(folder / CONFIG_FILE)
            (self.output_dir / "timings.json").write_text(
                json.dumps(self.timings, indent=2), encoding="utf-8"
            )
        self.accelerator.end_training()
        return folder


def _flat(config: dict, prefix: str = "") -> dict:
    """Tracker-friendly scalars of a nested config."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def training_function(config: TrainConfig) -> Path:
    return Trainer(config).train()
