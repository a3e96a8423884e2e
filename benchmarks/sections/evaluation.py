"""Evaluation at growing split sizes: the box-only control's memory and time."""

from benchmarks.fresh import run_job

HEADING = "## Evaluation memory"


def run(settings) -> list[str]:
    rows = [
        "Random boxes with captions of 72 distinct phrases; `BoxOnlyControl(train).region_retrieval(test)` in a fresh "
        "process; peak RSS above the interpreter with the package imported (the inputs included).",
        "",
        "| box-only control, test × training regions | s | peak RSS MiB |",
        "|---|---|---|",
    ]
    timed = {}
    for test, train in ((600, 4_800), (6_000, 48_000)):
        run = run_job("box_only_control", test=test, train=train)
        timed[test] = run["seconds"]
        rows.append(f"| {test:,} × {train:,} | {run['seconds']:.1f} | {run['mib']:.0f} |")
    rows.append(f"| time, 10× both splits | {timed[6_000] / timed[600]:.0f}× | |")
    return rows
