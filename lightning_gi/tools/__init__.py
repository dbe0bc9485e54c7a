"""Command-line entries of the project's tools (``lightning-gi aux-stats``, ``train-dcgan``, ``giml``).

Each module holds only the command: a typed function parsed by jsonargparse (the parser LightningCLI uses),
so every tool has the flag style of ``lightning-gi fit``: ``--snake_case value`` options, ``--config
file.yaml`` (keys = option names), ``--print_config``, and a ``--help`` that lists each option with its type
and default; ``Literal[...]`` options only accept their choices. The computation lives in the library
(:mod:`lightning_gi.labels.auxiliary_stats`, :mod:`lightning_gi.generators.train_dcgan`,
:mod:`lightning_gi.attacks.giml`).

For the flags of the older per-tool parsers, ``--kebab-case`` spellings of the options are accepted too
(``--num-classes`` = ``--num_classes``), a boolean option given alone means ``true`` (``--calibrate_bn``),
and a tuple option takes its values space-separated as well as as a list (``--mean 0.5 0.5 0.5``).
"""
from __future__ import annotations

import re
import typing
from typing import Any, Callable, Optional

__all__ = ["ToolInputError", "run_command", "command_parser"]


class ToolInputError(ValueError):
    """A tool's command line that does not parse (unknown option, bad value, missing option)."""


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return hints


def _is_bool(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) is typing.Union and set(typing.get_args(tp)) == {bool, type(None)})


def _is_sequence(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Union:
        return any(_is_sequence(t) for t in typing.get_args(tp) if t is not type(None))
    return typing.get_origin(tp) in (tuple, list)


def normalise_argv(function: Callable[..., Any], argv: list[str]) -> list[str]:
    """The older flag spellings -> jsonargparse's (see the module docs); other tokens are left as they are."""
    hints = _hints(function)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        flag, eq, value = token.partition("=")
        key = flag[2:].replace("-", "_")
        if key not in hints:
            out.append(token)
            continue
        flag = f"--{key}"
        if eq:
            out.append(f"{flag}={value}")
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
            if not _is_sequence(hints[key]):
                break
        if not values and _is_bool(hints[key]):
            values = ["true"]
        elif len(values) > 1:  # --mean 0.5 0.5 0.5 -> --mean [0.5, 0.5, 0.5]
            values = ["[" + ", ".join(values) + "]"]
        out.extend([flag, *values])
    return out


def command_parser(function: Callable[..., Any], prog: str, description: str, exit_on_error: bool = True) -> Any:
    """A jsonargparse parser with ``--config`` and one option per argument of ``function``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=exit_on_error)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of option values (keys: the option names)")
    parser.add_function_arguments(function, fail_untyped=True)
    return parser


_TYPE_NAMES = (
    (re.compile(r"<class '(\w+)'>"), r"\1"),
    (re.compile(r"typing\.Literal\[([^\]]*)\]"), r"one of \1"),
    (re.compile(r"typing\.Optional\[([^\]]*)\]"), r"\1 or null"),
)


def _one_sentence(message: str, prog: str) -> str:
    """jsonargparse's report of a bad command line -> one sentence naming the option."""
    key = re.search(r'(?:Parser key|Key) "([^"]+)"', message)
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("Expected a") and "NoneType" not in line]
    given = re.search(r"Got value: (.*)|Given value: (.*)", message)
    if key and reasons:
        reason = reasons[0].split(". Got value:")[0]
        for pattern, repl in _TYPE_NAMES:
            reason = pattern.sub(repl, reason)
        reason = reason.replace("Expected a ", "expected ", 1)
        got = next(g for g in given.groups() if g is not None).strip() if given else None
        return f"--{key.group(1)}: {reason}" + (f", got {got!r}" if got is not None else "")
    required = re.match(r"the following arguments are required: (.*)", lines[0] if lines else "")
    if required:
        names = ", ".join(f"--{n.strip()}" for n in required.group(1).split(","))
        return f"{names} is required (see {prog} --help)"
    if key and "is required" in message:
        return f"--{key.group(1)} is required (see {prog} --help)"
    first = lines[0] if lines else "bad command line"
    return f"{first} (see {prog} --help)"


def run_command(function: Callable[..., Any], argv: Optional[list[str]], prog: str, description: str, exit_on_error: bool = True) -> Any:
    """Parse ``argv`` (default: ``sys.argv[1:]``) for ``function`` and call it with the parsed options.

    ``exit_on_error=False``: a bad command line raises :class:`ToolInputError` (one sentence) instead of
    printing the usage and exiting with status 2 (``lightning-gi`` prints the sentence and exits 2).
    """
    import sys

    from jsonargparse import ArgumentError

    args = normalise_argv(function, list(sys.argv[1:] if argv is None else argv))
    parser = command_parser(function, prog, description, exit_on_error)
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as err:
        raise ToolInputError(_one_sentence(str(err), prog)) from None
    values = cfg.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return function(**{k: v for k, v in values.items() if k in _hints(function)})
