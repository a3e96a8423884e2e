"""LoRA presets per tower family: every adapter they create trains."""

import pytest
import torch

from regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel
from regionmed_clip.training import RegionMedCLIPForPreTraining
from regionmed_clip.training.config import LoraSpec
from regionmed_clip.training.lora import (
    LORA_PRESETS,
    TOWER_FAMILIES,
    apply_lora,
    lora_preset,
    lora_target_names,
)

from .conftest import IMAGE_SIZE, PATCH_SIZE

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION = {**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
VOCAB_SIZE = 1000
# Special tokens inside the vocabulary, as every real tokenizer has them: CLIP's text tower pools the first end token,
# and with an end id outside the vocabulary (CLIP's default 49407) it would pool position 0, which under the causal
# mask attends only to itself, so its query and key get exactly no gradient.
BOS_ID, EOS_ID, PAD_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1, 0
TEXT = {
    **TOWER,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 16,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
TOWER_PAIRS = {
    "vit+bert": ("vit", "bert"),
    "clip": ("clip_vision_model", "clip_text_model"),
    "siglip": ("siglip_vision_model", "siglip_text_model"),
}


def _model(vision_type: str, text_type: str) -> RegionMedCLIPModel:
    torch.manual_seed(0)
    dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = RegionMedCLIPConfig(
        vision_config={"model_type": vision_type, **VISION, **(dropout if vision_type == "vit" else {})},
        text_config={"model_type": text_type, **TEXT, **(dropout if text_type == "bert" else {})},
        projection_dim=16,
        roi_num_heads=4,
        max_regions=2,
        roi_align_size=2,
    )
    return RegionMedCLIPModel(config).double()


def _token_ids(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Texts as a tokenizer gives them: the start token, words, the end token last."""
    words = torch.randint(1, BOS_ID, (*shape[:-1], shape[-1] - 2), generator=generator)
    return torch.cat(
        (torch.full((*shape[:-1], 1), BOS_ID), words, torch.full((*shape[:-1], 1), EOS_ID)), dim=-1
    )


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=torch.float64),
        "input_ids": _token_ids((2, 8), generator),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "roi_boxes": torch.tensor([[[0.1, 0.1, 0.6, 0.6], [0.4, 0.3, 0.9, 0.9]]] * 2),
        "region_input_ids": _token_ids((2, 2, 6), generator),
        "region_attention_mask": torch.ones(2, 2, 6, dtype=torch.long),
    }


def _with_lora(base: RegionMedCLIPModel, spec: LoraSpec) -> RegionMedCLIPForPreTraining:
    """The pretraining objective (report, region-aware and ROI terms) around `base` with `spec`'s adapters, set up
    as the trainer sets it up."""
    weights = {"global_loss": 1.0, "fused_global_loss": 1.0, "roi_loss": 1.0}
    objective = RegionMedCLIPForPreTraining(base.config, model=base, loss_weights=weights)
    objective.detector.regionmed_clip = apply_lora(objective.model, spec)
    return objective


def _lora_gradients(objective) -> tuple[dict[str, torch.Tensor | None], float]:
    """Each LoRA parameter's gradient, and the loss it is the gradient of."""
    loss = objective(**_batch()).loss
    loss.backward()
    return {name: p.grad for name, p in objective.model.named_parameters() if "lora_" in name}, loss.item()


# The models run in float64, so that a gradient which is mathematically zero (an adapter cut off from the loss)
# comes out as float64 round-off (measured: 3e-17 to 6e-17 of the loss, AVX-512 and AVX2 kernels), while the
# smallest real one here is about 1e-8 of it (an A matrix after one step, whose gradient scales with the still
# small B). The bound sits four orders of magnitude from each.
TRAINS = 1e-12


def _not_training(gradients: dict[str, torch.Tensor | None], loss: float) -> list[str]:
    return [name for name, grad in gradients.items() if grad is None or float(grad.norm()) <= TRAINS * loss]


def test_every_family_has_a_preset_and_unknown_towers_ask_for_targets():
    assert set(TOWER_FAMILIES.values()) == set(LORA_PRESETS) == {"vit", "clip", "siglip", "bert"}
    with pytest.raises(ValueError, match="no LoRA preset for a 'swin' tower"):
        lora_preset("swin")


@pytest.mark.parametrize("pair", TOWER_PAIRS)
def test_every_lora_parameter_of_the_presets_gets_a_gradient(pair):
    """LoRA's B starts at 0, so in the first step only the B matrices see a gradient; after one update every A and
    B must."""
    base = _model(*TOWER_PAIRS[pair])
    targets = lora_target_names(base, LoraSpec())
    for tower in ("vision_model.", "text_model."):
        assert sum(name.startswith(tower) for name in targets) == 2 * 4  # 2 layers x q, k, v, out
    assert sum(name.startswith("roi_processor.") for name in targets) == 4
    model = _with_lora(base, LoraSpec(r=2, dropout=0.0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    first, loss = _lora_gradients(model)
    assert len(first) == 2 * len(targets)
    silent = _not_training({name: grad for name, grad in first.items() if "lora_B" in name}, loss)
    assert not silent, silent
    optimizer.step()
    optimizer.zero_grad()

    second, loss = _lora_gradients(model)
    silent = _not_training(second, loss)
    assert not silent, silent


def test_an_adapter_on_siglips_attention_pool_head_would_never_train():
    """Why the SigLIP preset stops at the encoder: `nn.MultiheadAttention` uses `out_proj.weight` directly."""
    model = _with_lora(
        _model("siglip_vision_model", "siglip_text_model"),
        LoraSpec(r=2, dropout=0.0, target_modules=r"vision_model\.(.*\.)?head\.attention\.out_proj"),
    )
    gradients, _ = _lora_gradients(model)
    assert gradients and all(grad is None for grad in gradients.values())


def test_auto_targets_skip_modules_trained_in_full():
    """A freshly initialised ROI processor trains in full (`modules_to_save`); adapters inside it would be dead."""
    spec = LoraSpec(
        r=2, dropout=0.0, modules_to_save=["visual_projection", "text_projection", "roi_processor"]
    )
    base = _model("siglip_vision_model", "siglip_text_model")
    targets = lora_target_names(base, spec)
    assert targets and not any(name.startswith("roi_processor.") for name in targets)
    model = _with_lora(base, spec)
    model(**_batch()).loss.backward()
    roi_copy = [p for name, p in model.named_parameters() if "roi_processor" in name and p.requires_grad]
    assert roi_copy and all(p.grad is not None for p in roi_copy)
