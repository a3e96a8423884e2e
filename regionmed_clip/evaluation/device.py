"""Where evaluation, `explain` and the demo app run: the accelerator when there is one."""

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` is CUDA when `torch.cuda.is_available()`, else the CPU; anything else is taken as named, and a
    CUDA device asked for on a machine without one is a clear error rather than a failure deep in a forward."""
    if isinstance(device, torch.device):
        device = str(device)
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not one of {DEVICE_CHOICES}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for, but torch sees no CUDA device here; use auto or cpu"
        )
    return resolved
