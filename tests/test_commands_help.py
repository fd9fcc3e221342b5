"""Every command of scripts/ answers --help with its help, showing each option's default, and does nothing else."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Iterator

import pytest

from scripts.command_line import HelpFormatter
from shared.settings import PROJECT_ROOT

COMMANDS = sorted(p.stem for p in (PROJECT_ROOT / "scripts").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def _with_subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _with_subcommands(sub)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default_and_starts_nothing(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(f"scripts.{command}")
    parsers: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def parse_help(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        parsers.append(self)
        return parse(self, ["--help"], namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_help)
    monkeypatch.setattr(sys, "argv", [command, "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert parsers, f"{command} reads no command line"
    for parser in _with_subcommands(parsers[0]):
        assert issubclass(parser.formatter_class, HelpFormatter), f"{parser.prog} hides its defaults"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "%(default)" in (formatter._get_help_string(action) or ""), f"{parser.prog} {action.option_strings}"
