"""Speed and memory of RegionMed-CLIP against transformers' VisionTextDualEncoderModel with the same towers.

`make bench` runs every section and writes benchmarks/RESULTS.md; `--only SECTION ...` runs some and replaces
their tables in an existing RESULTS.md. Every figure is a ratio measured in the same run on the same machine
(interleaved repetitions, median), never an absolute target: nothing here asserts a timing. "Before" figures are
recorded data (`benchmarks/before.py`), printed as such. `NOTES.md` (the analysis behind the figures) is appended
to a full run's results.
"""

import argparse
import datetime
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BATCH, TEXT_LENGTH, commit, machine
from benchmarks.sections import (
    captions,
    evaluation,
    inference,
    loading,
    memory,
    processing,
    roofline,
    scaling,
    streaming,
    train,
)

# In the order of RESULTS.md.
SECTIONS = {
    "train-step": train,
    "inference": inference,
    "roofline": roofline,
    "processing": processing,
    "repeated-captions": captions,
    "streaming": streaming,
    "loading": loading,
    "evaluation": evaluation,
    "scaling": scaling,
    "memory": memory,
}
RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class Settings:
    repeats: int = 5
    compile: bool = True


def section_block(name: str, settings: Settings) -> str:
    """A section's heading, where and how it was measured, and its tables."""
    module = SECTIONS[name]
    print(module.HEADING)
    body = module.run(settings)
    print("\n".join(body), flush=True)
    provenance = (
        f"Measured at commit {commit() or 'unknown'}, {datetime.date.today().isoformat()} "
        f"(`python -m benchmarks.run_benchmarks --only {name}`)."
    )
    return "\n".join([module.HEADING, "", provenance, "", *body, ""]) + "\n"


def splice_sections(path: Path, blocks: dict[str, str]):
    """Replace the named sections of an existing RESULTS.md in place, or add a missing one where `SECTIONS`
    places it (before the next section present, else before the notes). Each block ends with a blank line."""
    text = path.read_text(encoding="utf-8")
    order = list(SECTIONS)
    for name, block in blocks.items():
        heading = SECTIONS[name].HEADING
        if heading in text:
            start = text.index(heading)
            end = text.find("\n## ", start + len(heading))
            text = text[:start] + block + text[end + 1 :] if end >= 0 else text[:start] + block
            continue
        later = [SECTIONS[other].HEADING for other in order[order.index(name) + 1 :]] + ["## Notes"]
        anchor = next((text.index(h) for h in later if h in text), len(text))
        text = text[:anchor] + block + text[anchor:]
    path.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=Settings.repeats)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile row (about a minute)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), help="run only these sections and replace them in --out"
    )
    args = parser.parse_args()
    settings = Settings(repeats=args.repeats, compile=not args.no_compile)
    started = time.perf_counter()
    if args.only:
        splice_sections(args.out, {name: section_block(name, settings) for name in args.only})
        print(f"updated {args.out} in {(time.perf_counter() - started) / 60:.1f} minutes")
        return 0
    blocks = [section_block(name, settings) for name in SECTIONS]
    header = (
        "# Benchmark results\n\n"
        f"Machine: {machine()}. Commit {commit() or 'unknown'}; run {datetime.date.today().isoformat()}, "
        f"{(time.perf_counter() - started) / 60:.1f} minutes. Towers: ViT hidden 384 × 6 layers at 224 px, BERT "
        f"hidden 384 × 6 layers; batch {BATCH}, text length {TEXT_LENGTH}. Ratios are medians of {args.repeats} "
        'interleaved runs; "before" rows are figures recorded at an earlier commit (benchmarks/before.py), not '
        "re-run.\n\n"
    )
    notes = Path(__file__).with_name("NOTES.md")
    footer = notes.read_text(encoding="utf-8") if notes.is_file() else ""
    args.out.write_text(header + "".join(blocks) + footer, encoding="utf-8")
    print(f"wrote {args.out} in {(time.perf_counter() - started) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
