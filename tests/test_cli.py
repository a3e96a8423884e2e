"""The `regionmed-clip` command line: every option of every command has its help, type or choices, and default;
options come from typed configs, and two configs with one field name never share a value."""

import argparse
import contextlib
import enum
import io
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from regionmed_clip.cli import build_parser, main
from regionmed_clip.cli.options import add_options, docstring_args

from .test_training import ENV


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every command that runs (the leaves of the sub-command tree)."""
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subcommands:
        yield path, parser
        return
    for name, child in subcommands[0].choices.items():
        yield from leaf_commands(child, (*path, name))


COMMANDS = [words for words, _ in leaf_commands(build_parser())]


def test_every_command_is_listed():
    assert set(COMMANDS) >= {
        ("data", "synth"),
        ("data", "import-annotations"),
        ("data", "import-coco"),
        ("data", "import-csv"),
        ("data", "validate"),
        ("train",),
        ("finetune",),
        ("eval",),
        ("explain",),
        ("annotate", "calibrate"),
        ("annotate", "run"),
        ("publish",),
        ("demo",),
    }


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_help_shows_help_type_choices_and_default_of_every_option(words):
    parser = dict(leaf_commands(build_parser()))[words]
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    shown = " ".join(output.getvalue().split())  # argparse wraps the help text
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options or words == ("data", "validate")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{' '.join(words)} {action.dest} has no help"
        assert " ".join(action.help.replace("%%", "%").split()) in shown
        if not action.option_strings:
            continue
        flag = action.option_strings[0]
        assert flag in shown
        if action.required:
            assert action.help.endswith("(required)")
        else:
            assert "(default: " in action.help, f"{flag} does not show its default"
        if isinstance(action, argparse.BooleanOptionalAction):
            assert f"--no-{flag[2:]}" in shown
        elif action.choices is not None:
            assert "{" + ",".join(str(choice) for choice in action.choices) + "}" in shown
        else:
            assert action.metavar in ("INT", "FLOAT", "STR"), f"{flag} does not show its type"


def test_literal_fields_become_choices():
    parser = dict(leaf_commands(build_parser()))
    finetune = {a.dest: a for a in parser[("finetune",)]._actions}
    assert tuple(finetune["method"].choices) == ("lora", "full")
    assert tuple(finetune["task"].choices) == ("contrastive", "classification")
    assert set(finetune["mixed_precision"].choices) == {"no", "bf16", "fp16", "auto"}
    run = {a.dest: a for a in parser[("annotate", "run")]._actions}
    assert tuple(run["mask_quality"].choices) == ("stability", "predicted_iou")


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Detector:
    device: str = field(default="cpu", metadata={"help": "Where the detector runs"})
    colour: Colour = field(default=Colour.RED, metadata={"help": "Box colour"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "Box sizes"})
    mode: Literal["fast", "exact"] = field(default="fast", metadata={"help": "Speed or exactness"})
    threshold: float | None = field(default=None, metadata={"help": "Score threshold"})
    verbose: bool = field(default=True, metadata={"help": "Print progress"})


@dataclass
class Reporter:
    device: str = field(default="cuda", metadata={"help": "Where the reporter runs"})
    out: str = field(default="report.json", metadata={"help": "Output file"})


def write(images: str, out: str = "out.json", device: str = "cpu") -> tuple[str, str, str]:
    """Write something.

    Args:
        images: Folder of images,
            searched recursively.
        out / device: Where it goes, and on what.
    """
    return images, out, device


def test_typed_fields_parse_to_their_types():
    parser = argparse.ArgumentParser()
    options = add_options(parser, Detector)
    args = parser.parse_args(
        ["--colour", "blue", "--sizes", "3", "4", "5", "--mode", "exact", "--no-verbose"]
    )
    assert options.build(args) == Detector(
        colour=Colour.BLUE, sizes=(3, 4, 5), mode="exact", threshold=None, verbose=False
    )
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["--mode", "slow"])


def test_two_configs_with_one_field_name_are_an_error():
    parser = argparse.ArgumentParser()
    add_options(parser, Detector)
    with pytest.raises(
        ValueError, match=r"Reporter.device and Detector.device would share the option --device"
    ):
        add_options(parser, Reporter)


def test_a_prefix_keeps_same_named_fields_apart():
    parser = argparse.ArgumentParser()
    detector = add_options(parser, Detector)
    reporter = add_options(parser, Reporter, prefix="report")
    args = parser.parse_args(["--device", "cuda:1", "--report-device", "cpu", "--report-out", "r.json"])
    assert detector.build(args).device == "cuda:1"
    assert (reporter.build(args).device, reporter.build(args).out) == ("cpu", "r.json")


def test_a_skipped_parameter_is_never_filled_from_another_config():
    parser = argparse.ArgumentParser()
    reporter = add_options(parser, Reporter)
    writer = add_options(parser, write, skip=("out", "device"))
    args = parser.parse_args(["--images", "raw/", "--out", "r.json", "--device", "cpu"])
    assert writer.build(args) == ("raw/", "out.json", "cpu")  # write's own defaults, not Reporter's options
    assert reporter.build(args).out == "r.json"


def test_function_options_take_their_help_from_the_docstring():
    assert docstring_args(write) == {
        "images": "Folder of images, searched recursively.",
        "out": "Where it goes, and on what.",
        "device": "Where it goes, and on what.",
    }

    def undocumented(images: str):
        """No Args block."""

    with pytest.raises(ValueError, match="undocumented.images has no help"):
        add_options(argparse.ArgumentParser(), undocumented)


def test_console_entry_points_run():
    for command in (
        [sys.executable, "-m", "regionmed_clip.cli", "publish", "--help"],
        [sys.executable, "-m", "regionmed_clip.cli.train", "--help"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "--config" in done.stdout or "--repo-id" in done.stdout
        assert "Warning" not in done.stderr
