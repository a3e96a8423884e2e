"""Options are dataclass fields with `metadata={"help": ...}`, read by transformers' `HfArgumentParser` as in its
example scripts: one declaration gives an option its name (the field's, with dashes or underscores, and any
`aliases`), type, choices, default and help; a boolean takes `--flag`, `--flag false` and `--no-flag`.
`positional` in a field's metadata takes it by place instead."""

import argparse
from collections.abc import Callable

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help; descriptions (docstrings) keep their own line breaks."""


class CommandParser(HfArgumentParser):
    """A `regionmed-clip` command: its options come from dataclasses, its sub-commands from `add_command`."""

    def __init__(self, dataclass_types=None, **kwargs):
        super().__init__(dataclass_types, **{"formatter_class": HelpFormatter, **kwargs})
        self.commands: dict[str, CommandParser] = {}
        self._command_choices = None

    def add_argument(self, *names, positional: bool = False, **kwargs):
        if not kwargs.get("help"):
            raise ValueError(f"the option {names[0]} has no help: give its field metadata={{'help': ...}}")
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %
        if kwargs.pop("required", False):
            kwargs["default"] = argparse.SUPPRESS  # argparse would show a required option's default as None
            if positional:
                return super().add_argument(names[0].removeprefix("--"), **kwargs)
            kwargs.update(required=True, help=kwargs["help"] + " (required)")
        action = super().add_argument(*names, **kwargs)
        if kwargs.get("type") is string_to_bool and kwargs.get("default") is False:
            # HfArgumentParser gives only a boolean that defaults to True a --no-flag; every boolean has one here.
            no_flag = f"--no-{action.dest.replace('_', '-')}"
            super().add_argument(no_flag, action="store_false", dest=action.dest, help=argparse.SUPPRESS)
        return action

    def add_command(
        self, name: str, options: tuple[type, ...] = (), run: Callable[..., int] | None = None, **kwargs
    ) -> "CommandParser":
        """Add the sub-command `name` (`kwargs` as for `add_parser`: `help`, `description`) whose options are the
        fields of the dataclasses `options`; `main` calls `run` with one instance of each, in order."""
        if self._command_choices is None:
            self._command_choices = self.add_subparsers(dest="command", metavar="COMMAND", required=True)
        parser = self._command_choices.add_parser(name, dataclass_types=options, **kwargs)
        self.commands[name] = parser
        if run is not None:
            parser.set_defaults(run=lambda args: run(*parser.parse_namespace(args)))
        return parser

    def parse_namespace(self, args: argparse.Namespace) -> tuple:
        """One instance of each option dataclass of this command, from its parsed command line."""
        return self.parse_dict(vars(args), allow_extra_keys=True)


__all__ = ["CommandParser", "HelpFormatter"]
