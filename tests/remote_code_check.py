"""Remote-code check for one transformers version, run as a script in an environment holding only torch,
transformers, pillow, numpy and pydicom (never this package).

    python tests/remote_code_check.py FOLDER INPUTS.json WORKDIR

Loads FOLDER (saved by the main environment) through the Auto classes with `trust_remote_code=True`, scores the
inputs of INPUTS.json with the model, the zero-shot pipeline, the region pipeline, the zero-shot-object-detection
pipeline and the region detection pipeline, computes the image–text loss of `return_loss=True`, saves and reloads the
model and processor under WORKDIR, and prints one JSON report on the last line of stdout.
`tests/test_remote_code_compat.py` compares the report with the main environment's own scores.
"""

import json
import os
import sys


def _block_package():
    """Make `import regionmed_clip` fail, so that only the folder's own code can run."""

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "regionmed_clip" or name.startswith("regionmed_clip."):
                raise ImportError("regionmed_clip is blocked in this process")

    sys.meta_path.insert(0, _Block())


def main(folder: str, inputs_path: str, workdir: str) -> dict:
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

    with open(inputs_path, encoding="utf-8") as handle:
        inputs = json.load(handle)
    images = [Image.fromarray(np.array(array, dtype=np.uint8)) for array in inputs["images"]]
    labels, boxes, template = inputs["labels"], inputs["boxes"], inputs["template"]

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def logits_of(model, processor):
        batch = processor(text=labels, images=images, boxes=boxes, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).logits_per_image.tolist()

    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    zero_shot = classifier(images, candidate_labels=labels, hypothesis_template=template)
    regions = pipeline("zero-shot-region-classification", model=folder, trust_remote_code=True)
    # File inputs (a DICOM path) go through the folder's own decoder.
    region_results = regions(
        images + inputs["paths"],
        boxes=boxes + inputs["path_boxes"],
        candidate_labels=labels,
        hypothesis_template=template,
    )

    detector = pipeline("zero-shot-object-detection", model=folder, trust_remote_code=True)
    detection = detector(images[0], candidate_labels=labels, threshold=0.0)
    # Every image and the DICOM path in one call, the labels as one string.
    region_detector = pipeline("zero-shot-region-detection", model=folder, trust_remote_code=True)
    region_detection = region_detector(
        images + inputs["paths"], candidate_labels=", ".join(labels), threshold=0.0, top_k=4
    )

    # CLIPModel's `return_loss`: image i paired with label i, with its boxes.
    paired = processor(text=labels[: len(images)], images=images, boxes=boxes, return_tensors="pt")
    with torch.no_grad():
        loss = model(**paired, return_loss=True).loss.item()

    saved = os.path.join(workdir, "resaved")
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    reloaded_model = AutoModel.from_pretrained(saved, trust_remote_code=True).eval()
    reloaded_processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    eager = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")

    own_fields = [
        name for name in type(config).__annotations__ if name not in ("vision_config", "text_config")
    ]
    return {
        "transformers": transformers.__version__,
        "fields": {name: getattr(config, name) for name in own_fields},
        "resaved_fields": {name: getattr(reloaded_model.config, name) for name in own_fields},
        "classes": [
            type(component).__module__ for component in (config, model, processor, regions, region_detector)
        ],
        "logits": logits_of(model, processor),
        "loss": loss,
        "zero_shot": zero_shot,
        "region": region_results,
        "detection": detection,
        "region_detection": region_detection,
        "resaved_logits": logits_of(reloaded_model, reloaded_processor),
        "eager_towers": [
            eager.config.vision_config._attn_implementation,
            eager.config.text_config._attn_implementation,
        ],
    }


if __name__ == "__main__":
    _block_package()
    print(json.dumps(main(*sys.argv[1:4])))
