"""Reports from a vision-language model: the paper's structured prompt (appendix B, Figure 6), a strict parser, and
retries that feed the parser's complaints back to the model.

The prompt keeps Figure 6 (role, task, JSON format, guidelines) and the appendix's rules (a 10–15 word summary
without commas or semicolons ending with a period; "adjective|term|position" with standard positions; five
contrasting adjectives as negatives). One change is needed because our regions come from the proposer, not from the
model: the prompt lists the candidate regions (pixel box, detector term, grid position) and asks for one
`region_extraction` entry per candidate, in order, "No Finding" rejecting a candidate. So the model names each box
it is shown, and acts as a second check on the detector. With no candidates, only the summary and the report are
used.

Parsing is strict (everything the dataset needs is checked, and the first error of each kind is reported in words
the model can act on); an invalid answer is sent back with the list of problems, up to `max_attempts` tries, after
which the image is rejected and counted. Missing `negative_variations` are not an error: the region's negatives
come from the package's hard-negative generator, counted as such. Present but wrong ones are an error.

The report model is any callable `generate(image, messages) -> str`. `messages` are chat messages whose first user
turn holds an `{"type": "image"}` placeholder for `image`; `PipelineGenerator` runs them through a transformers
`image-text-to-text` pipeline (Qwen2.5-VL in the paper), greedy decoding so that a run is repeatable.
"""

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from ..data.negatives import (
    NO_FINDING,
    NUM_NEGATIVES,
    RegionTriple,
    generate_negatives,
    is_no_finding,
    negative_caption,
    region_caption,
)
from ..data.vocabulary import POSITION_WORDS, grid_position
from ..processing_regionmed_clip import caption_key

SUMMARY_WORDS = (10, 15)
# A sentence end inside the summary: . ! or ? not between digits (3.5 cm is fine).
_INNER_SENTENCE_END = re.compile(r"[!?]|\.(?!\d)")

SYSTEM_PROMPT = (
    "You are an experienced radiologist with expertise in interpreting chest X-rays, CT scans, MRI, ultrasound, "
    "endoscopy, fundus photographs, dermoscopy, pathology slides and other diagnostic imaging modalities. You "
    "annotate medical images for a vision-language dataset. Describe only clearly visible abnormalities, do not "
    "speculate, use standard medical terminology and anatomical references, assess image quality where relevant, "
    "and stay objective."
)

Generate = Callable[[Image.Image, list[dict]], str]


@dataclass
class ReportConfig:
    """The report model and how hard to try."""

    vlm: str = field(
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        metadata={"help": "Image-text-to-text checkpoint; the paper used Qwen2.5-VL-72B-Instruct"},
    )
    vlm_device: str = field(
        default="auto",
        metadata={
            "help": 'Device of the report model: "auto" shards over every visible GPU (device_map="auto"); or "cuda:0", "cpu"'
        },
    )
    vlm_dtype: str = field(
        default="auto",
        metadata={"help": 'The checkpoint\'s dtype (bfloat16 for Qwen2.5-VL); or "float16", "float32"'},
    )
    max_attempts: int = field(default=3, metadata={"help": "Tries per image before it is rejected"})
    max_new_tokens: int = field(default=768, metadata={"help": "Token limit of each answer"})

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


@dataclass
class RegionReport:
    """One candidate region as the model named it; `negatives` are five full negative captions."""

    adjective: str
    term: str
    position: str
    negatives: list[str]
    negatives_generated: bool = False

    @property
    def caption(self) -> str:
        return region_caption(self.adjective, self.term, self.position)


@dataclass
class Report:
    """A parsed, valid answer: `regions[i]` is candidate i as named, or None where the model said "No Finding"."""

    summary_caption: str
    detailed_report: str
    regions: list[RegionReport | None] = field(default_factory=list)

    @property
    def negatives_generated(self) -> int:
        return sum(1 for region in self.regions if region is not None and region.negatives_generated)


class ReportError(ValueError):
    """The model's answer is not a valid annotation; `problems` say why, in words fit to send back to it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class ReportOutcome:
    """What `write_report` got: a report, or None after `attempts` invalid answers (the last one's `problems`)."""

    report: Report | None
    attempts: int
    problems: list[str] = field(default_factory=list)
    last_output: str = ""


# ---- prompt ------------------------------------------------------------------------------------------------------


def region_hint(box: Sequence[float], term: str, width: int, height: int) -> str:
    """How a candidate region is shown to the model: pixel box, detector term and grid position."""
    x0, y0, x1, y1 = box
    position = grid_position((x0 + x1) / 2 / width, (y0 + y1) / 2 / height)
    return f"[{', '.join(str(round(value)) for value in box)}] (detector: {term}; grid position: {position})"


def user_prompt(
    image_name: str, width: int, height: int, regions: Sequence[tuple[Sequence[float], str]]
) -> str:
    """Figure 6's prompt, with the candidate regions ((box, term) pairs) the answer must name."""
    lines = [
        "Medical Image Analysis Prompt",
        "",
        "Role: Radiologist analyzing medical images",
        "",
        "Task: Generate structured JSON annotation",
        "",
        "JSON Format:",
        "{",
        f'    "image": "{image_name}",',
        '    "summary_caption": "Brief summary (10-15 words)",',
        '    "detailed_report": "Comprehensive findings",',
        '    "region_extraction": ["adjective|term|position", ...one per candidate region],',
        '    "negative_variations": [["5 alternatives"], ...one list per candidate region]',
        "}",
        "",
        "Guidelines:",
        "- Standard medical terminology",
        "- Describe visible abnormalities",
        "- Format: [adjective]|[lesion]|[position]",
        "- Positions: left/right/center, upper/lower/middle",
        f'- No findings: answer "{NO_FINDING}"',
        "",
        "Rules:",
        f"- summary_caption: one diagnostic sentence of {SUMMARY_WORDS[0]} to {SUMMARY_WORDS[1]} words with no "
        "commas or semicolons, ending with a period; the principal finding and its location in simple words.",
        "- detailed_report: the comprehensive findings.",
        "- region_extraction: for each candidate region below, in the same order, exactly three parts separated "
        'by "|": a one-word shape or appearance adjective (e.g. irregular, round, oval, raised), a lesion term '
        "(e.g. lesion, mass, nodule, opacity) and its position using only left, right, center, central, upper, "
        f'lower, middle (e.g. "left upper"). Write "{NO_FINDING}" for a candidate that shows no abnormality.',
        f"- negative_variations: for each region, {NUM_NEGATIVES} alternative adjectives that contradict its "
        "adjective (contrasting shape, margin, texture, colour or density).",
        "- Answer with the JSON object only.",
        "",
        f"Image: {image_name} ({width}x{height} pixels).",
    ]
    if regions:
        lines.append("Candidate regions (pixel boxes [x0, y0, x1, y1] from a lesion detector):")
        lines += [
            f"{number}. {region_hint(box, term, width, height)}"
            for number, (box, term) in enumerate(regions, start=1)
        ]
    else:
        lines.append(
            f'No candidate regions were detected: set "region_extraction" to "{NO_FINDING}" and '
            '"negative_variations" to [].'
        )
    return "\n".join(lines)


def build_messages(
    image_name: str, width: int, height: int, regions: Sequence[tuple[Sequence[float], str]]
) -> list[dict]:
    """The chat for one image: system role, then the image placeholder and the prompt."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": user_prompt(image_name, width, height, regions)},
            ],
        },
    ]


def feedback_messages(answer: str, problems: list[str]) -> list[dict]:
    """The turns appended after an invalid answer: the answer itself, then what is wrong with it."""
    complaint = "Your answer is not valid:\n" + "\n".join(f"- {problem}" for problem in problems)
    complaint += "\nAnswer again with the corrected JSON object only, following the format and rules above."
    return [
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": complaint}]},
    ]


# ---- parser ------------------------------------------------------------------------------------------------------


def _json_object(text: str) -> dict:
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise ReportError(["the answer contains no JSON object"])
    try:
        value = json.loads(body[start : end + 1])
    except json.JSONDecodeError as error:
        raise ReportError([f"the JSON object does not parse: {error.msg} (character {error.pos})"]) from error
    if not isinstance(value, dict):
        raise ReportError(["the answer must be one JSON object"])
    return value


def summary_problems(summary) -> list[str]:
    """Everything wrong with a summary caption under the paper's rule."""
    if not isinstance(summary, str) or not summary.strip():
        return ["summary_caption must be a non-empty string"]
    summary = summary.strip()
    problems = []
    words = len(summary.split())
    if not SUMMARY_WORDS[0] <= words <= SUMMARY_WORDS[1]:
        problems.append(
            f"summary_caption has {words} words; it must have {SUMMARY_WORDS[0]} to {SUMMARY_WORDS[1]}"
        )
    if "," in summary or ";" in summary:
        problems.append("summary_caption must not contain commas or semicolons")
    if not summary.endswith("."):
        problems.append("summary_caption must end with a period")
    elif _INNER_SENTENCE_END.search(summary[:-1]):
        problems.append("summary_caption must be a single sentence")
    return problems


def _parse_triple(entry, number: int, problems: list[str]) -> RegionTriple | None:
    where = f"region_extraction entry {number}"
    if not isinstance(entry, str):
        problems.append(f'{where} must be a string "adjective|term|position"')
        return None
    try:
        return RegionTriple.parse(entry, position_words=POSITION_WORDS)
    except ValueError as error:
        problems.append(f"{where}: {error}")
        return None


def _negative_lists(value, regions: int, problems: list[str]) -> list:
    """One entry per region: a list of given negatives, or None (generate them)."""
    if value is None or value == [] or value == "":
        return [None] * regions
    if isinstance(value, list) and all(isinstance(item, str) for item in value) and regions == 1:
        return [value]
    if (
        isinstance(value, list)
        and len(value) == regions
        and all(isinstance(item, list) or item is None for item in value)
    ):
        return [item or None for item in value]
    problems.append(
        f"negative_variations must be a list of {regions} lists (one per candidate region) of "
        f"{NUM_NEGATIVES} alternatives"
    )
    return [None] * regions


def _region_negatives(
    given, triple: RegionTriple, number: int, seed: int, problems: list[str]
) -> tuple[list[str], bool] | None:
    adjective, caption = triple.adjective, triple.caption
    if given is None:
        try:
            return generate_negatives(caption, adjective, seed=seed), True
        except ValueError:
            named = f"the adjective {adjective!r} is not one" if adjective else "it has no adjective"
            problems.append(
                f"region {number}: {named} we can contradict automatically; give its {NUM_NEGATIVES} "
                "negative_variations"
            )
            return None
    where = f"negative_variations of region {number}"
    if len(given) != NUM_NEGATIVES or not all(isinstance(item, str) and item.strip() for item in given):
        problems.append(f"{where} must be {NUM_NEGATIVES} non-empty strings, got {given!r}")
        return None
    # A bare adjective replaces the region's adjective (the paper's "five alternative adjectives").
    negatives = [negative_caption(item, triple) for item in given]
    keys = [caption_key(negative) for negative in negatives]
    if caption_key(caption) in keys:
        problems.append(f"{where} repeats the region's own description {caption!r}")
        return None
    if len(set(keys)) != len(keys):
        problems.append(f"{where} must be {NUM_NEGATIVES} different alternatives")
        return None
    return negatives, False


def parse_report(text: str, num_regions: int, seed: int = 0) -> Report:
    """Parse and validate a model answer for an image shown with `num_regions` candidate regions.

    `region_extraction` may be one string when there is one candidate (the paper's format), or "No Finding" for
    all of them; otherwise a list with one entry per candidate. `negative_variations` may be omitted (generated,
    seeded by `seed`), be one list of five for one candidate, or one list per candidate; entries may be bare
    adjectives or full captions.

    Raises:
        ReportError: listing every problem found.
    """
    value = _json_object(text)
    problems = summary_problems(value.get("summary_caption"))
    report_text = value.get("detailed_report")
    if not isinstance(report_text, str) or not report_text.strip():
        problems.append("detailed_report must be a non-empty string")
    regions: list[RegionReport | None] = []
    if num_regions:
        extraction = value.get("region_extraction")
        if extraction is None:
            problems.append("region_extraction is missing")
            extraction = []
        if is_no_finding(extraction) or (
            isinstance(extraction, list) and len(extraction) == 1 and is_no_finding(extraction[0])
        ):
            extraction = [NO_FINDING] * num_regions
        elif isinstance(extraction, str) and num_regions == 1:
            extraction = [extraction]
        if not isinstance(extraction, list) or len(extraction) != num_regions:
            problems.append(
                f"region_extraction must be a list of {num_regions} entries, one per candidate region in order"
            )
            extraction = [NO_FINDING] * num_regions
        given_negatives = _negative_lists(value.get("negative_variations"), num_regions, problems)
        for number, (entry, given) in enumerate(zip(extraction, given_negatives, strict=True), start=1):
            if is_no_finding(entry):
                regions.append(None)
                continue
            triple = _parse_triple(entry, number, problems)
            negatives = _region_negatives(given, triple, number, seed, problems) if triple else None
            if triple is None or negatives is None:
                regions.append(None)
                continue
            regions.append(
                RegionReport(
                    triple.adjective,
                    triple.term,
                    triple.position,
                    negatives=negatives[0],
                    negatives_generated=negatives[1],
                )
            )
    if problems:
        raise ReportError(problems)
    return Report(value["summary_caption"].strip(), report_text.strip(), regions)


# ---- generation --------------------------------------------------------------------------------------------------


def write_report(
    generate: Generate,
    image: Image.Image,
    image_name: str,
    regions: Sequence[tuple[Sequence[float], str]],
    max_attempts: int = 3,
    seed: int = 0,
) -> ReportOutcome:
    """Ask `generate` for the report of `image` with its candidate `regions` ((box, term) pairs), retrying with the
    parser's problems fed back, at most `max_attempts` times."""
    messages = build_messages(image_name, image.width, image.height, regions)
    problems: list[str] = []
    answer = ""
    for attempt in range(1, max_attempts + 1):
        answer = generate(image, messages)
        try:
            return ReportOutcome(parse_report(answer, len(regions), seed), attempt, [], answer)
        except ReportError as error:
            problems = error.problems
            messages = messages + feedback_messages(answer, problems)
    return ReportOutcome(None, max_attempts, problems, answer)


class PipelineGenerator:
    """`generate(image, messages) -> str` on a transformers `image-text-to-text` pipeline (greedy decoding).

    Args:
        config: The model id and where to run it.

    Example:
        ```python
        generate = PipelineGenerator(ReportConfig(vlm="Qwen/Qwen2.5-VL-7B-Instruct", vlm_device="cuda"))
        outcome = write_report(generate, image, "chest.png", regions=[([40, 52, 90, 101], "nodule")])
        ```
    """

    def __init__(self, config: ReportConfig):
        import torch
        from transformers import pipeline

        self.config = config
        placement = {"device": "cpu"}
        if config.vlm_device == "auto":
            if torch.cuda.is_available():
                placement = {"device_map": "auto"}
        else:
            placement = {"device": config.vlm_device}
        self.pipe = pipeline("image-text-to-text", model=config.vlm, dtype=config.vlm_dtype, **placement)

    def __call__(self, image: Image.Image, messages: list[dict]) -> str:
        chat = [
            {
                **message,
                "content": [
                    {**item, "image": image} if item.get("type") == "image" and "image" not in item else item
                    for item in message["content"]
                ],
            }
            for message in messages
        ]
        output = self.pipe(
            text=chat,
            max_new_tokens=self.config.max_new_tokens,
            return_full_text=False,
            generate_kwargs={"do_sample": False},
        )
        return output[0]["generated_text"]


__all__ = [
    "NO_FINDING",
    "SYSTEM_PROMPT",
    "Generate",
    "PipelineGenerator",
    "RegionReport",
    "Report",
    "ReportConfig",
    "ReportError",
    "ReportOutcome",
    "build_messages",
    "feedback_messages",
    "parse_report",
    "region_hint",
    "summary_problems",
    "user_prompt",
    "write_report",
]
