"""PEFT LoRA for RegionMed-CLIP, through peft's own API.

transformers 5.24 asks for peft >= 0.22 in its integration (`model.add_adapter`, `load_adapter`, ...), newer than
the peft releases installable here, so this module uses `get_peft_model`, `PeftModel.from_pretrained` and
`merge_and_unload` only, which work with peft 0.21. A trained adapter is the `adapter_model.safetensors` +
`adapter_config.json` pair `PeftModel.save_pretrained` writes; its `base_model_name_or_path` names the model it
was trained on.
"""

import re

import torch

from .config import LoraSpec

# Per tower family, a regex (within the tower) on the attention projections that receive gradients. Every one
# feeds the pooled output: CLIP, ViT and BERT pool one token that attends over all of them in every layer, SigLIP
# pools with its head over the last layer's tokens. SigLIP's vision head is left out: it is an
# `nn.MultiheadAttention`, which calls `out_proj.weight` functionally, so an adapter on its `out_proj` never runs
# (and never trains). Both ViT spellings are matched (`attention.q_proj`, and `attention.attention.query` /
# `attention.output.dense` of earlier transformers).
LORA_PRESETS = {
    "vit": r"layers?\.\d+\.attention\.((attention\.)?(q_proj|k_proj|v_proj|o_proj|query|key|value)|output\.dense)",
    "clip": r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "siglip": r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "bert": r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
}
# The tower family of each supported `model_type`; other towers need an explicit `lora.target_modules`.
TOWER_FAMILIES = {
    "vit": "vit",
    "clip_vision_model": "clip",
    "clip_text_model": "clip",
    "siglip_vision_model": "siglip",
    "siglip_text_model": "siglip",
    "bert": "bert",
    "roberta": "bert",
}
ROI_PROCESSOR_TARGETS = r"roi_processor\.attention\.(q_proj|k_proj|v_proj|out_proj)"


def lora_preset(model_type: str) -> str:
    """The `LORA_PRESETS` regex of the family a tower's `model_type` belongs to."""
    if model_type not in TOWER_FAMILIES:
        raise ValueError(
            f"no LoRA preset for a {model_type!r} tower (presets: {sorted(TOWER_FAMILIES)}); set "
            "lora.target_modules to a regex on the model's module names"
        )
    return LORA_PRESETS[TOWER_FAMILIES[model_type]]


def auto_lora_targets(config) -> str:
    """The regex `target_modules="auto"` stands for on a model with `config` (a `RegionMedCLIPConfig`): each
    tower's family preset under its attribute (`vision_model.` / `text_model.`, any wrapper between), and the ROI
    processor's attention."""
    vision = lora_preset(config.vision_config.model_type)
    text = lora_preset(config.text_config.model_type)
    return rf"vision_model\.(.*\.)?({vision})|text_model\.(.*\.)?({text})|{ROI_PROCESSOR_TARGETS}"


def lora_target_names(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """The `nn.Linear` modules `spec.target_modules` selects: `"auto"` (the towers' presets, see
    `auto_lora_targets`, less any layer inside a module of `spec.modules_to_save`, which trains in full), a regex
    on full names, or a list of names."""
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    target_modules = auto_lora_targets(model.config) if spec.target_modules == "auto" else spec.target_modules
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = [name for name in names if pattern.fullmatch(name)]
        if spec.target_modules == "auto":
            selected = [
                name
                for name in selected
                if not any(name.startswith(f"{module}.") for module in spec.modules_to_save)
            ]
    else:
        wanted = set(target_modules)
        selected = [name for name in names if name in wanted or name.rsplit(".", 1)[-1] in wanted]
    if not selected:
        raise ValueError(f"lora.target_modules {target_modules!r} matches no linear layer of the model")
    return selected


def apply_lora(model: torch.nn.Module, spec: LoraSpec):
    """`model` wrapped in a `PeftModel` with LoRA on the targeted layers; every other parameter frozen except
    those of `spec.modules_to_save`."""
    from peft import LoraConfig, get_peft_model

    module_names = {name for name, _ in model.named_modules()}
    missing = [name for name in spec.modules_to_save if name not in module_names]
    if missing:
        raise ValueError(f"lora.modules_to_save names no module of the model: {missing}")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_target_names(model, spec),
        modules_to_save=list(spec.modules_to_save) or None,
    )
    return get_peft_model(model, config)


def trainable_summary(model: torch.nn.Module) -> tuple[int, int, str]:
    """(trainable, total, message) parameter counts, the message as printed at the start of training."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f} %)"


def load_adapter(base, adapter: str, merge: bool = False):
    """A saved adapter on `base` (a model, or a RegionMed-CLIP folder / Hub id): the `PeftModel`, or with `merge`
    the plain `RegionMedCLIPModel` with the LoRA update folded into its weights."""
    from peft import PeftModel

    if isinstance(base, str):
        from ..modeling_regionmed_clip import RegionMedCLIPModel

        base = RegionMedCLIPModel.from_pretrained(base)
    model = PeftModel.from_pretrained(base, adapter)
    return model.merge_and_unload() if merge else model
