"""Command-line options generated from typed configs, so an option is defined, typed, documented and defaulted
in one place: the field of a dataclass (its help in `field(metadata={"help": ...})`, the convention of
transformers' `HfArgumentParser`) or the parameter of a function (its help in the docstring's `Args:` block).

Every option shows its help, its type (the metavar) or its choices (`Literal` and `Enum` annotations) and its
default. Options are spelled with dashes (`--out-dir`); booleans get `--flag / --no-flag`; tuples take several
values. Two targets on one command that have a parameter of the same name would share one option, so that is an
error unless one of them is given a `prefix` (`--vlm-device`); each target is then built from its own options
only, never from another target's option of the same name.
"""

import argparse
import dataclasses
import enum
import inspect
import os
import re
import types
import typing
from collections.abc import Callable

_REGISTRY = "_typed_options"  # dest -> "Target.parameter", kept on each parser to detect shared names
_ARGS_ENTRY = re.compile(r"^(\s+)([\w\s/,]+?)(?:\s*\([^)]*\))?:\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    annotation: object
    default: object  # `inspect.Parameter.empty` when required
    help: str


def docstring_args(target) -> dict[str, str]:
    """The `Args:` block of a Google-style docstring (of a function, class or module): `{parameter: text}`;
    `a / b: text` documents both. The block's heading may say more, as in `Args (shared by ...):`."""
    lines = (inspect.getdoc(target) or "").splitlines()
    headings = [i for i, line in enumerate(lines) if re.fullmatch(r"Args\b.*:", line.strip())]
    if not headings:
        return {}
    start = headings[0] + 1
    entries: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        match = _ARGS_ENTRY.match(line)
        if match and (indent is None or depth == indent):
            indent = depth
            names = [name.strip() for name in re.split(r"[/,]", match.group(2))]
            for name in names:
                entries[name] = match.group(3).strip()
        elif names:
            for name in names:
                entries[name] += " " + line.strip()
    return entries


def parameters(target, shared_docs=()) -> list[Parameter]:
    """The typed parameters of a dataclass (its init fields) or of a function, with their help; `shared_docs`
    are objects (e.g. the module) whose `Args:` block documents parameters that several functions share."""
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        found = []
        for item in dataclasses.fields(target):
            if not item.init:
                continue
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            else:
                default = inspect.Parameter.empty
            found.append(Parameter(item.name, hints[item.name], default, item.metadata.get("help", "")))
        return found
    documented = {}
    for source in (*shared_docs, target):
        documented.update(docstring_args(source))
    return [
        Parameter(name, hints.get(name, str), parameter.default, documented.get(name, ""))
        for name, parameter in inspect.signature(target).parameters.items()
        if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    ]


def _argument_type(annotation) -> tuple[Callable, object, tuple | None]:
    """(converter, nargs, choices) for a parameter annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if str in options or os.PathLike in options:
            return str, None, None
        return _argument_type(options[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), None, choices
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation, None, tuple(annotation)
    if origin in (tuple, list):
        args = typing.get_args(annotation) or (str, ...)
        kind, _, choices = _argument_type(args[0])
        nargs = "+" if origin is list or Ellipsis in args else len(args)
        return kind, nargs, choices
    if annotation in (int, float, str):
        return annotation, None, None
    if annotation is os.PathLike:
        return str, None, None
    raise TypeError(f"no command-line form for the annotation {annotation!r}")


def _shown(value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return " ".join(_shown(item) for item in value) or "none"
    return str(value)


@dataclasses.dataclass
class Options:
    """The options one target got on a parser; `build` calls the target with their parsed values."""

    target: object
    dests: dict[str, str]  # parameter name -> argparse dest

    def values(self, args: argparse.Namespace) -> dict:
        values = {name: getattr(args, dest) for name, dest in self.dests.items()}
        return {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}

    def build(self, args: argparse.Namespace, **given):
        return self.target(**self.values(args), **given)


def add_options(
    parser: argparse.ArgumentParser,
    target,
    *,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    aliases: dict[str, str] | None = None,
    positional: tuple[str, ...] = (),
    shared_docs: tuple = (),
) -> Options:
    """Add one option per parameter of `target` (a dataclass or a function) to `parser`.

    Args:
        parser: The parser of one command.
        target: A dataclass (help in field metadata) or a function (help in its docstring's `Args:` block).
        prefix: Prepended to every option and dest (`prefix="vlm"`: `--vlm-device`), for targets that share names.
        skip: Parameters left out (they keep their defaults, or the command passes them to `build`).
        aliases: Other spellings of an option, `{"data_path": "--data"}`; the first alias is the one shown.
        positional: Parameters taken as positional arguments instead of `--options`.
        shared_docs: Objects whose docstring's `Args:` block documents parameters the target shares with others
            (a module documenting the common parameters of its functions once).
    """
    aliases = aliases or {}
    registry = parser.__dict__.setdefault(_REGISTRY, {})
    dests = {}
    for parameter in parameters(target, shared_docs):
        if parameter.name in skip:
            continue
        owner = f"{getattr(target, '__qualname__', target)}.{parameter.name}"
        if not parameter.help:
            raise ValueError(
                f"{owner} has no help: document it (field metadata 'help' or the docstring's Args)"
            )
        dest = f"{prefix}_{parameter.name}" if prefix else parameter.name
        if dest in registry:
            raise ValueError(
                f"{owner} and {registry[dest]} would share the option --{dest.replace('_', '-')}: give one of "
                "them a prefix"
            )
        registry[dest] = owner
        dests[parameter.name] = dest
        required = parameter.default is inspect.Parameter.empty
        default = None if required else parameter.default
        text = parameter.help.replace("%", "%%")
        if not required:
            text += f" (default: {_shown(default)})"
        elif parameter.name not in positional:
            text += " (required)"
        flags = [f"--{dest.replace('_', '-')}"]
        if parameter.name in aliases:
            flags.insert(0, aliases[parameter.name])
        if parameter.annotation is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=default, dest=dest, help=text
            )
            continue
        kind, nargs, choices = _argument_type(parameter.annotation)
        metavar = None if choices else kind.__name__.upper()
        if parameter.name in positional:
            parser.add_argument(dest, type=kind, nargs=nargs, choices=choices, metavar=metavar, help=text)
            continue
        parser.add_argument(
            *flags,
            type=kind,
            nargs=nargs,
            choices=choices,
            required=required,
            default=default,
            dest=dest,
            metavar=metavar,
            help=text,
        )
    return Options(target, dests)


__all__ = ["Options", "add_options", "docstring_args", "parameters"]
