"""The paper's tower shapes, ViT-B/16 at 224 px and a BERT-base (PubMedBERT's shape), as the `vision_config` /
`text_config` of a training config's `model` section: for runs of the paper's size with random weights (the
recipe-stability study; `benchmarks/`' memory section reads them too)."""

VIT_B16 = {
    "model_type": "vit",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
}
BERT_BASE = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
}

__all__ = ["BERT_BASE", "VIT_B16"]
