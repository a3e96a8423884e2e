"""`make ablation` (`regionmed-clip ablation`): the B / W / W+G / W+G+R / W+G+R+F ablation (the paper's Figure 5)
on one data set and one step budget.

B is plain contrastive training: one stage, the global loss only, constant learning rate, the ROI processor unused.
The others are the first 1–4 progressive stages of the training config, their step counts scaled so every variant
trains for the same total number of steps. Each variant is trained in its own process through the real entry point
and evaluated by the shared harness.
"""

import dataclasses
import json
from pathlib import Path

from ..evaluation import EvalSettings, run_evaluation
from ..training.config import TrainConfig, load_config
from ..training.run import train_in_subprocess

VARIANTS = ("B", "W", "W+G", "W+G+R", "W+G+R+F")
# Box-free figures first: what a user without boxes gets; the region figures need the data's boxes.
HEADLINE = {
    "image→report R@1 (box-free)": lambda m: m["retrieval"]["box_free"]["global"]["image_to_text"]["R@1"],
    "zero-shot AUC (box-free)": lambda m: m["zero_shot"]["box_free"]["global"]["macro_auc"],
    "region R@1 (GT boxes)": lambda m: m["region"]["region_to_caption"]["R@1"],
    "hard-negative acc. (GT boxes)": lambda m: m["region"]["hard_negative_accuracy"],
}


def _scaled(stages, total: int):
    counts = [stage.steps for stage in stages]
    scaled = [max(1, round(count * total / sum(counts))) for count in counts]
    scaled[-1] += total - sum(scaled)
    return [dataclasses.replace(stage, steps=steps) for stage, steps in zip(stages, scaled, strict=True)]


def ablation_configs(config: TrainConfig, out_root: str | Path) -> dict[str, TrainConfig]:
    """The five variants of `config` (whose stages must be given in `steps`), each with its own output folder."""
    if any(stage.steps is None for stage in config.stages) or len(config.stages) != 4:
        raise ValueError("the ablation needs the four stages of the config given in `steps`")
    total = sum(stage.steps for stage in config.stages)
    global_stage = config.stages[1]
    plain = dataclasses.replace(
        global_stage,
        name="baseline",
        steps=total,
        warmup_ratio=0.0,
        min_lr_ratio=1.0,
        frozen=sorted(set(global_stage.frozen) | {"roi_processor"}),
        loss_weights={"global_loss": 1.0},
    )
    variants = {"B": [plain]}
    for count, name in enumerate(VARIANTS[1:], start=1):
        variants[name] = _scaled(config.stages[:count], total)
    return {
        name: dataclasses.replace(
            config, output_dir=str(Path(out_root) / name.replace("+", "")), stages=stages
        )
        for name, stages in variants.items()
    }


def _chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(results)
    for index, (variant, values) in enumerate(results.items()):
        positions = [i + (index - (len(results) - 1) / 2) * width for i in range(len(HEADLINE))]
        axis.bar(positions, list(values.values()), width, label=variant)
    axis.set_xticks(range(len(HEADLINE)), list(HEADLINE), fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_title("Ablation on MedRegion-synth (same data and step budget)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclasses.dataclass
class AblationArgs:
    """The options of `regionmed-clip ablation` (`make ablation`)."""

    config: str = dataclasses.field(
        default="configs/demo.yaml",
        metadata={"help": "The training YAML whose four stages (given in `steps`) the variants are cut from"},
    )
    out: str = dataclasses.field(
        default="outputs/ablation",
        metadata={"help": "Folder of the outputs, with one folder of training and evaluation per variant"},
    )


def run_ablation(args: AblationArgs) -> dict:
    """Train and evaluate every variant; write ablation.json, ablation.md and ablation.png to `args.out`. A
    variant whose model a finished run left in its folder is evaluated again, not retrained."""
    config = load_config(args.config)
    out = Path(args.out)
    configs = ablation_configs(config, out)
    results = {}
    for name in VARIANTS:
        variant = configs[name]
        folder = Path(variant.output_dir)
        if not (folder / "model" / "model.safetensors").is_file():
            train_in_subprocess(variant)
        metrics = run_evaluation(
            EvalSettings(
                folder / "model",
                config.data.path,
                folder / "eval",
                tasks="zero_shot,retrieval,region",
                bootstrap=0,
                seed=config.seed,
            )
        )
        results[name] = {label: float(get(metrics)) for label, get in HEADLINE.items()}
        print(f"{name}: " + ", ".join(f"{label} {value:.3f}" for label, value in results[name].items()))
    steps = sum(stage.steps for stage in config.stages)
    lines = [
        f"Ablation on `{config.data.path}` test split, {steps} optimizer steps per variant.",
        "",
        "| variant | " + " | ".join(HEADLINE) + " |",
        "|---|" + "---|" * len(HEADLINE),
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{v:.3f}" for v in values.values()) + " |"
        for name, values in results.items()
    ]
    (out / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    _chart(results, out / "ablation.png")
    return results
