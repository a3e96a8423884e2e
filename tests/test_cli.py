"""The `regionmed-clip` command line: every option of every command is a field of a typed config, read by
`HfArgumentParser`, and its `--help` shows each option with its help and its default (or that it is required)."""

import contextlib
import dataclasses
import io
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from regionmed_clip.cli import build_parser, main
from regionmed_clip.cli.options import CommandParser

from .test_training import ENV


def leaf_commands(parser: CommandParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every command that runs (the leaves of the sub-command tree)."""
    if not parser.commands:
        yield path, parser
    for name, child in parser.commands.items():
        yield from leaf_commands(child, (*path, name))


LEAVES = dict(leaf_commands(build_parser()))


def test_every_command_is_listed():
    assert set(LEAVES) == {
        ("data", "synth"),
        ("data", "import-annotations"),
        ("data", "import-coco"),
        ("data", "import-detection"),
        ("data", "import-grounding"),
        ("data", "import-csv"),
        ("data", "validate"),
        ("train",),
        ("finetune",),
        ("eval",),
        ("explain",),
        ("locate",),
        ("annotate", "calibrate"),
        ("annotate", "run"),
        ("publish",),
        ("convert",),
        ("demo",),
        ("learning-check",),
        ("ablation",),
        ("recipe-stability",),
    }


def help_text(words: tuple[str, ...]) -> str:
    """The `--help` of a command with no whitespace at all (argparse wraps its lines, at spaces and hyphens)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    return squash(output.getvalue())


def squash(text) -> str:
    return "".join(str(text).split())


@pytest.mark.parametrize("words", sorted(LEAVES), ids=" ".join)
def test_help_shows_every_option_with_its_help_and_default(words):
    shown = help_text(words)
    fields = [item for options in LEAVES[words].dataclass_types for item in dataclasses.fields(options)]
    assert fields
    for item in fields:
        where = f"{' '.join(words)} {item.name}"
        if item.metadata.get("positional"):
            assert f"]{item.name}" in shown, f"{where} is not in the usage"
        else:
            assert f"--{item.name}" in shown and f"--{item.name.replace('_', '-')}" in shown, where
        assert squash(item.metadata["help"]) in shown, f"{where} has no help"
        if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            if not item.metadata.get("positional"):
                assert squash(item.metadata["help"]) + "(required)" in shown, (
                    f"{where} is not marked required"
                )
            continue
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        assert squash(f"(default: {default})") in shown, f"{where} does not show its default"


@dataclass
class Detector:
    device: str = field(metadata={"help": "Where the detector runs"})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Box sizes"})
    mode: Literal["fast", "exact"] = field(default="fast", metadata={"help": "Speed or exactness"})
    threshold: float | None = field(default=None, metadata={"help": "Score threshold, 95 % sure"})
    verbose: bool = field(default=True, metadata={"help": "Print progress"})
    folder: str = field(default="out", metadata={"help": "Output folder", "aliases": ["--out"]})


@dataclass
class Reporter:
    images: str = field(metadata={"help": "Folder of images", "positional": True})
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad image"})


def test_fields_parse_to_their_types_and_run_the_command():
    parser = CommandParser(prog="tool")
    seen = []
    parser.add_command("detect", (Detector, Reporter), lambda *options: seen.append(options) or 0)
    args = parser.parse_args(
        ["detect", "raw/", "--device", "cuda:1", "--sizes", "3", "4", "--mode", "exact", "--no-verbose"]
        + ["--threshold", "0.5", "--out", "boxes", "--strict"]
    )
    assert args.run(args) == 0
    assert seen == [
        (
            Detector(
                device="cuda:1", sizes=[3, 4], mode="exact", threshold=0.5, verbose=False, folder="boxes"
            ),
            Reporter(images="raw/", strict=True),
        )
    ]
    args = parser.parse_args(["detect", "raw/", "--device", "cpu"])
    args.run(args)
    assert seen[-1] == (Detector(device="cpu"), Reporter(images="raw/"))
    for flags, strict in (
        (["--strict", "false"], False),
        (["--strict", "--no-strict"], False),
        (["--strict"], True),
    ):
        args = parser.parse_args(["detect", "raw/", "--device", "cpu", *flags])
        args.run(args)
        assert seen[-1][1].strict is strict, flags
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["detect", "raw/", "--device", "cpu", "--mode", "slow"])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["detect", "raw/"])  # --device is required


def test_help_marks_required_options_and_shows_every_default():
    parser = CommandParser(prog="tool")
    parser.add_command("detect", (Detector, Reporter), lambda *options: 0)
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
        parser.parse_args(["detect", "--help"])
    shown = " ".join(output.getvalue().split())
    assert "Where the detector runs (required)" in shown and "(default: None) (required)" not in shown
    assert "Score threshold, 95 % sure (default: None)" in shown
    assert "Box sizes (default: [1, 2])" in shown and "{fast,exact}" in shown and "--no-verbose" in shown
    assert "images Folder of images" in shown


def test_two_configs_with_one_field_name_and_a_field_without_help_are_errors():
    @dataclass
    class Other:
        device: str = field(default="cpu", metadata={"help": "Where the other runs"})

    @dataclass
    class Undocumented:
        images: str = "raw/"

    parser = CommandParser(prog="tool")
    with pytest.raises(Exception, match="conflicting option string: --device"):
        parser.add_command("detect", (Detector, Other))
    with pytest.raises(ValueError, match="--images has no help"):
        parser.add_command("undocumented", (Undocumented,))


def test_console_entry_points_run():
    for command in (
        [sys.executable, "-m", "regionmed_clip.cli", "publish", "--help"],
        [sys.executable, "-m", "regionmed_clip.cli.train", "--help"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "--config" in done.stdout or "--repo-id" in done.stdout
        assert "Warning" not in done.stderr
