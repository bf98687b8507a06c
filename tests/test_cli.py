"""The command line as a package: every command registered once, the demo's tasks and its deprecated flags."""

from __future__ import annotations

import pytest

from densevlm.cli import COMMANDS, build_parser, main


def test_every_command_module_registers_one_parser():
    parser = build_parser()
    names = [c.NAME for c in COMMANDS]
    assert len(names) == len(set(names))
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == names
    for command in COMMANDS:
        assert callable(command.add_parser)


@pytest.mark.parametrize("argv, task, fresh", [
    (["demo"], None, False),
    (["demo", "--fresh"], None, True),
    (["demo", "regions", "--fresh"], "regions", True),
    (["demo", "--fresh", "detection"], "detection", True),
    (["demo", "detection", "--fresh"], "detection", True),
    (["demo", "talk2dino"], "talk2dino", False),
])
def test_demo_tasks_parse_with_their_options_on_either_side(argv, task, fresh):
    args = build_parser().parse_args(argv)
    assert (args.demo_task, args.fresh, args.seeds, args.config) == (task, fresh, None, None)


@pytest.fixture
def ran(monkeypatch):
    """The demo drivers replaced by recorders: which one a command line reaches."""
    import densevlm.tasks.demo
    import densevlm.tasks.demo_detection
    import densevlm.tasks.demo_seeds
    import densevlm.tasks.demo_talk2dino

    calls = []
    monkeypatch.setattr(densevlm.tasks.demo, "run_demo", lambda cfg, **kw: calls.append(("regions", kw)))
    monkeypatch.setattr(densevlm.tasks.demo_talk2dino, "run_talk2dino_demo", lambda cfg, **kw: calls.append(("talk2dino", kw)))
    monkeypatch.setattr(densevlm.tasks.demo_detection, "run_detection_stage",
                        lambda cfg, **kw: calls.append(("detection", kw)))
    monkeypatch.setattr(densevlm.tasks.demo_seeds, "run_seeds_demo", lambda cfg, n, **kw: calls.append((f"seeds{n}", kw)))
    return calls


@pytest.mark.parametrize("argv, expected, deprecated", [
    (["demo"], "regions", False),
    (["demo", "detection", "--from-scratch"], "detection", False),
    (["demo", "--detection"], "detection", True),
    (["demo", "--talk2dino", "--fresh"], "talk2dino", True),
    (["demo", "--seeds", "3"], "seeds3", False),
    (["demo", "regions", "--seeds", "2"], "seeds2", False),
])
def test_demo_tasks_reach_their_driver_and_old_flags_say_they_are_deprecated(ran, capsys, argv, expected,
                                                                             deprecated):
    assert main(argv) == 0
    assert [c[0] for c in ran] == [expected]
    err = capsys.readouterr().err
    assert ("is deprecated; run `densevlm demo" in err) == deprecated


@pytest.mark.parametrize("argv", [["demo", "--seeds", "2", "detection"], ["demo", "--talk2dino", "detection"]])
def test_demo_refuses_two_demos_at_once(ran, capsys, argv):
    assert main(argv) == 2 and not ran
    assert "config error" in capsys.readouterr().err
