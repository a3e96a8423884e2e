"""Loss curves per term with the stage boundaries marked."""

import json
from pathlib import Path


def plot_loss_curves(metrics_path: Path, out_path: Path, config) -> Path | None:
    if not Path(metrics_path).is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line
    ]
    if not records:
        return None
    terms = sorted({key for record in records for key in record if key.startswith("loss/")})
    figure, axis = plt.subplots(figsize=(9, 4.5))
    steps = [record["step"] for record in records]
    for term in terms:
        # NaN where a stage does not use the term, so its curve breaks instead of bridging the stage.
        values = [record.get(term, float("nan")) for record in records]
        axis.plot(steps, values, label=term.removeprefix("loss/"), linewidth=1.2)
    starts = {}
    for record in records:
        starts.setdefault(record.get("stage", 0), record["step"])
    for stage, step in sorted(starts.items()):
        axis.axvline(step - 0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.text(
            step, axis.get_ylim()[1], f" {config.stages[stage].name}", va="top", fontsize=8, color="grey"
        )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("RegionMed-CLIP training")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path
