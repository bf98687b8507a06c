"""Every command's and sub-command's ``--help`` checked against what the code does.

The parser is walked from :data:`densevlm.cli.main.COMMANDS`, so a new command or option is covered without
editing this file: each listed (sub)command has help and a description, each option has help, defaults printed in
a help text equal the parser's (and the config's) defaults, ``--set`` examples are keys of the command's config,
every ``example:`` line parses and names recipes that exist and load, and the demo's help names the zoo models it
starts from.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Iterator

import pytest

from densevlm import cli
from densevlm.cli.main import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                        argparse.ArgumentParser,
                                                                                        str]]:
    """(command path, its parser, the one-line help its parent lists) for every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, listed.get(name) or ""
                yield from _walk(sub, (*path, name))


PARSERS = {" ".join(p): (sub, listed) for p, sub, listed in _walk(build_parser())}
# The config class each command with --config/--set reads (the code's own choice, looked up in its run function).
CONFIGS = {
    "toyworld": "densevlm.config.toyworld:ToyWorldConfig", "pretrain": "densevlm.config.pretrain:PretrainConfig",
    "train": "densevlm.config.align:AlignConfig", "cache-teacher": "densevlm.config.align:AlignConfig",
    "eval regions": "densevlm.config.evaluation:RegionEvalConfig",
    "eval semseg": "densevlm.config.semseg:SemSegEvalConfig", "demo": "densevlm.config.demo:DemoConfig",
    "demo regions": "densevlm.config.demo:DemoConfig", "demo talk2dino": "densevlm.config.demo:DemoConfig",
    "demo detection": "densevlm.config.demo:DemoConfig",
    "talk2dino cache": "densevlm.config.talk2dino:Talk2DINOTrainConfig",
    "talk2dino train": "densevlm.config.talk2dino:Talk2DINOTrainConfig",
    "det train": "densevlm.config.detection:DetectionConfig", "det eval": "densevlm.config.detection:DetectionConfig",
    "shards": "densevlm.config.align:AlignConfig", "demo labels": "densevlm.config.demo:DemoConfig",
    "labels propose": "densevlm.config.labels:LabelsProposeConfig", "report": "densevlm.config.report:ReportConfig",
    "app": "densevlm.config.report:AppConfig", "compare": "densevlm.config.compare:CompareConfig",
}


def _config_class(command: str) -> type:
    module, name = CONFIGS[command].split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command.split(), "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_command_is_walked_and_every_config_command_is_mapped():
    assert {c.NAME for c in COMMANDS} <= set(PARSERS)
    with_config = {name for name, (sub, _) in PARSERS.items()
                   if any("--config" in a.option_strings for a in sub._actions)}
    assert with_config == set(CONFIGS), with_config ^ set(CONFIGS)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_runs_and_documents_every_option(command, capsys):
    sub, listed = PARSERS[command]
    assert len(listed) > 20, f"{command}: its parent lists it without a help line"
    text = _help(command, capsys)
    assert "exit codes:" in text and "75 training preempted" in _flat(text), f"{command}: no exit codes"
    assert sub.description and len(sub.description) > 20, f"{command}: no description"
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 8, f"{command} {action.option_strings}: no help"


def _printed_default(help_text: str) -> str | None:
    m = re.search(r"\(default: ([^);]+)\)", help_text)
    return m.group(1) if m else None


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_defaults_are_printed_and_match_the_parser(command, capsys):
    """An option with a real default (a number, a name) says it, and what it says is the parser's value."""
    sub, _ = PARSERS[command]
    text = _flat(_help(command, capsys))
    for action in sub._actions:
        default = action.default
        if not action.option_strings or action.dest == "help" or isinstance(action, argparse._StoreTrueAction):
            continue
        if default is None or default is argparse.SUPPRESS or isinstance(default, (bool, list)):
            continue
        rendered = _flat(action.help % {"default": default, "prog": sub.prog}) if "%(" in action.help else \
            _flat(action.help)
        assert rendered in text
        assert _printed_default(rendered) == f"{default}", \
            f"{command} {action.option_strings}: help must print its default {default!r}, says {rendered!r}"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_set_example_keys_are_keys_of_the_command_config(command, capsys):
    """Each command's --set example must be valid for that command's own config (eval's once suggested loop.*)."""
    from densevlm.config import apply_overrides

    text = _flat(_help(command, capsys))
    example = re.search(r"e\.g\. --set (.+?) \(repeatable", text).group(1).split()
    apply_overrides({}, example, _config_class(command))  # a ConfigError names the key the command lacks


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_config_folders_named_in_help_exist(command, capsys):
    text = _flat(_help(command, capsys))
    for folder in re.findall(r"see (configs/[\w/*.]+)", text):
        assert list(REPO.glob(folder.rstrip("/") if "*" in folder else folder)), f"{command}: {folder} missing"


def _examples() -> list[tuple[str, str]]:
    rows = []
    for command, (sub, _) in PARSERS.items():
        for line in (sub.description or "").splitlines():
            if line.startswith("example: densevlm "):
                rows.append((command, line[len("example: densevlm "):]))
    return rows


@pytest.mark.parametrize("command,example", _examples(), ids=[f"{c}: {e[:40]}" for c, e in _examples()])
def test_examples_parse_and_their_recipes_load(command, example):
    """An ``example:`` line is a command line of this command that parses, and the recipe it names loads."""
    from densevlm.config import load_config

    argv = shlex.split(example)
    args = build_parser().parse_args(argv)
    assert argv[:len(command.split())] == command.split() or command == "demo", f"{command}: example of another one"
    if getattr(args, "config", None):
        path = REPO / args.config
        assert path.is_file(), f"{command}: example recipe {args.config} does not exist"
        load_config(_config_class(command), path, [])


def test_top_level_help_lists_every_command_and_what_the_tool_does(capsys):
    text = _help("", capsys)
    for command in COMMANDS:
        assert re.search(rf"^\s+{command.NAME}\s+\S", text, re.M) or re.search(rf"^\s+{command.NAME}\n\s+\S", text,
                                                                                re.M), command.NAME
    usage = _flat(text.split("positional arguments")[0]).lower()
    for what in ("toy world", "pre-train", "densevlm", "clipself", "talk2dino", "detection", "semantic segmentation",
                 "export", "zoo"):
        assert what in usage, f"the top-level description does not mention {what!r}"


def test_demo_help_names_the_zoo_models_it_starts_from(capsys):
    """`densevlm demo` starts from the shipped zoo (it once said it pre-trains the toy CLIP): the help names the
    very zoo models the demo's models stage loads."""
    from densevlm.config.demo import DemoConfig
    from densevlm.tasks.demo import models_stage

    text = _flat(_help("demo", capsys))
    specs = models_stage(DemoConfig(), from_scratch=False)
    names = {spec.name for spec in specs.values()}
    assert names == {DemoConfig().student, DemoConfig().teacher}
    for name in names:
        assert name in text, f"demo --help does not name the zoo model {name}"
    assert not re.search(r"pre-trains? the toy CLIP", text.split("--from-scratch")[0]), \
        "demo --help says it pre-trains (only --from-scratch does)"
