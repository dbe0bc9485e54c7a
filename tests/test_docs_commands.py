"""Every command shown in README.md and docs/ runs as written (issue 14.6; issue 13 item 5).

The commands are extracted from the Markdown itself (fenced blocks and inline code), so docs and tests
cannot drift: ``lightning-gi fit --config configs/X`` must parse with its overrides (``--print_config``),
``lightning-gi <tool> ...`` and ``python -m lightning_gi.<module> ...`` must answer ``--help`` and accept
every flag shown, ``make <target>`` must be a Makefile target, and every ``configs/...`` path must exist.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
import warnings
from pathlib import Path

import pytest
from factories import run_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "checkpoints" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_CLI = re.compile(r"(?:^|[\s;&(])(?:[\w./-]*/)?lightning-gi(?=\s|$)(.*)")
_MODULE = re.compile(r"(?:^|\s)-m\s+(lightning_gi[\w.]*)(.*)")
_MAKE = re.compile(r"^make\s+([\w-]+)")
_CONFIG_PATH = re.compile(r"(?<![\w/.-])configs/[\w./-]+\.ya?ml")
_PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.")


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line number, one logical line) from fenced blocks and inline code spans; continuations joined."""
    out: list[tuple[int, str]] = []
    for block in _FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        joined, start = "", None
        for i, line in enumerate(block.group(1).splitlines()):
            start = first + i if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            out.append((start, joined + line))
            joined, start = "", None
    outside = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in _INLINE.finditer(outside):
        out.append((outside.count("\n", 0, span.start()) + 1, span.group(1)))
    return out


def _strip_comment(line: str) -> str:
    return re.split(r"\s#\s|\s#$", line, maxsplit=1)[0].strip()


def _commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, kind, name, argv): kind is "cli" (lightning-gi), "module" (python -m) or "make"."""
    found: dict[tuple[str, str, tuple[str, ...]], str] = {}
    for doc in DOCS:
        for lineno, raw in _snippets(doc.read_text()):
            line = _strip_comment(raw)
            where = f"{doc.relative_to(ROOT)}:{lineno}"
            if m := _MODULE.search(line):
                kind, name, rest = "module", m.group(1), m.group(2)
            elif m := _CLI.search(line):
                kind, name, rest = "cli", "lightning-gi", m.group(1)
            elif m := _MAKE.match(line):
                kind, name, rest = "make", m.group(1), ""
            else:
                continue
            try:
                argv = shlex.split(rest)
            except ValueError:
                argv = rest.split()
            found.setdefault((kind, name, tuple(argv)), where)
    return [(where, kind, name, list(argv)) for (kind, name, argv), where in found.items()]


COMMANDS = _commands()


def _run_cli(argv: list[str]) -> tuple[int, str]:
    code, out, err = run_cli(argv)
    return code, out + err


def _run_module(name: str, argv: list[str], monkeypatch) -> tuple[int, str]:
    """``python -m name argv`` in this process (runpy runs the module's ``__main__`` block as Python does)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [name, *argv])
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was already imported by the package
        try:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--") and not _PLACEHOLDER.search(a)]


def _check_flags_in_help(argv: list[str], help_text: str, where: str) -> None:
    for flag in _flags(argv):
        assert flag in help_text, f"{where}: {flag} is not an option ({' '.join(argv)})"


def test_the_docs_show_commands():
    kinds = {kind for _, kind, _, _ in COMMANDS}
    assert {"cli", "make"} <= kinds, kinds
    assert any(argv[:1] == ["giml"] for _, _, _, argv in COMMANDS)


def test_every_config_path_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        for match in _CONFIG_PATH.finditer(doc.read_text()):
            if not (ROOT / match.group(0)).is_file():
                missing.append(f"{doc.relative_to(ROOT)}: {match.group(0)}")
    assert not missing, missing


@pytest.mark.parametrize("where,kind,name,argv", COMMANDS, ids=[f"{w} {k} {' '.join(a)[:60]}" for w, k, _, a in COMMANDS])
def test_documented_command_runs_as_written(where, kind, name, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    if kind == "make":
        targets = re.findall(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(), flags=re.M)
        assert name in targets, f"{where}: make {name} is not a Makefile target ({targets})"
        return
    if kind == "module":
        if name == "lightning_gi.cli":  # the console script's module: same checks as `lightning-gi`
            kind = "cli"
        elif "--config" in argv:  # a module with its own LightningCLI (giml): the command as written parses
            code, output = _run_module(name, [*argv, "--print_config"], monkeypatch)
            assert code == 0, f"{where}: python -m {name} {' '.join(argv)} fails:\n{output[-2000:]}"
            return
        else:
            code, output = _run_module(name, ["--help"], monkeypatch)
            assert code == 0, f"{where}: python -m {name} --help failed:\n{output[-2000:]}"
            _check_flags_in_help(argv, output, where)
            return
    if not argv:
        return  # "lightning-gi" named in prose
    command = argv[0]
    from lightning_gi.cli import COMMANDS as CLI_COMMANDS

    assert command in CLI_COMMANDS or command.startswith("-"), f"{where}: unknown subcommand {command!r}"
    if command == "fit":
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        if config is None or _PLACEHOLDER.search(config) or not config.startswith("configs/"):
            return  # prose ("lightning-gi fit") or the user's own file (my_attack.yaml)
        assert (ROOT / config).is_file(), f"{where}: {config} does not exist"
        args = [a for a in argv if a != "--print_config"]
        code, output = _run_cli([*args, "--print_config"])
        assert code == 0, f"{where}: `lightning-gi {' '.join(args)}` does not parse:\n{output[-2000:]}"
        return
    code, output = _run_cli([command, "--help"])
    assert code == 0, f"{where}: lightning-gi {command} --help failed:\n{output[-2000:]}"
    _check_flags_in_help(argv[1:], output, where)
    for path in _CONFIG_PATH.findall(" ".join(argv)):
        assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    if "--config" in argv:  # a tool with its own LightningCLI (giml): its config parses too
        code, output = _run_cli([*argv, "--print_config"])
        assert code == 0, f"{where}: `lightning-gi {' '.join(argv)}` does not parse:\n{output[-2000:]}"
