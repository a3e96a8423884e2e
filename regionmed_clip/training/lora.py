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


def lora_target_names(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """The `nn.Linear` modules `spec.target_modules` selects (a regex on full names, or a list of names)."""
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if isinstance(spec.target_modules, str):
        pattern = re.compile(spec.target_modules)
        selected = [name for name in names if pattern.fullmatch(name)]
    else:
        wanted = set(spec.target_modules)
        selected = [name for name in names if name in wanted or name.rsplit(".", 1)[-1] in wanted]
    if not selected:
        raise ValueError(f"lora.target_modules {spec.target_modules!r} matches no linear layer of the model")
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
