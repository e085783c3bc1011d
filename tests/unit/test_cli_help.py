"""Every subcommand's --help: help for every option, defaults shown, one spelling of -k; serve lists the settings."""
from __future__ import annotations

import argparse
import importlib
from dataclasses import fields

import pytest

from vllm_dspark.cli import COMMANDS, HelpFormatter


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a subcommand builds, caught when it parses (nothing after that runs)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module, func = COMMANDS[command][0].split(":")
    with pytest.raises(_Captured) as info:
        getattr(importlib.import_module(module), func)([])
    return info.value.parser


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "serve"])
def test_every_option_has_help_and_shows_its_default(command, monkeypatch):
    parser = _parser_of(command, monkeypatch)
    assert parser.formatter_class is HelpFormatter
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert [a.option_strings for a in options if not (a.help or "").strip()] == []
    text = parser.format_help()
    for action in options:
        if action.default not in (None, False) and not action.required and "default" not in action.help:
            assert f"(default: {action.default})" in " ".join(text.split()), (command, action.option_strings)
    for action in options:
        if "-k" in action.option_strings or "--num-speculative-tokens" in action.option_strings:
            assert action.option_strings == ["-k", "--num-speculative-tokens"] and action.metavar == "K"


def test_help_formatter_hides_only_defaults_there_are_none_of():
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter)
    ap.add_argument("--a", default=0, help="zero")
    ap.add_argument("--b", default=None, help="none")
    ap.add_argument("--c", action="store_true", help="flag")
    text = " ".join(ap.format_help().split())
    assert "zero (default: 0)" in text and "none (default" not in text and "flag (default" not in text


def test_serve_help_lists_every_dspark_setting_with_its_default(capsys, monkeypatch):
    from vllm_dspark.integration import serve
    from vllm_dspark.settings import DSparkSettings

    def no_vllm(*_):
        raise _Captured(None)

    monkeypatch.setattr(serve, "install_version_shim", no_vllm)
    with pytest.raises(_Captured):
        serve.main(["--help"])
    out = capsys.readouterr().out
    assert "-k, --num-speculative-tokens K" in out and "(default: 7)" in out
    for f in fields(DSparkSettings):
        line = next((l for l in out.splitlines() if l.strip().startswith(f"{f.name} = ")), None)
        assert line is not None, f.name
        if f.name != "drafter":
            import json

            assert line.split()[2] == json.dumps(f.default), line
            assert len(line.split()) > 3, f"{f.name} has no description"
