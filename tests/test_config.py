"""Typed configs: YAML loading, overrides, and errors that name the key, type or file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from densevlm.config import ConfigError, config_diff, load_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    name: str = "x"
    path: Optional[str] = None
    train: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.train.steps < 0:
            raise ValueError(f"train.steps must be >= 0, got {self.train.steps}")


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\ntrain:\n  lr: 1e-5\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Outer, f, ["train.steps=3", "tags=[a, b]", "path=/x"])
    assert cfg.name == "run" and cfg.train.lr == 1e-5 and cfg.train.steps == 3
    assert cfg.train.betas == (0.8, 0.9) and cfg.tags == ["a", "b"] and cfg.path == "/x"
    assert to_dict(cfg)["train"]["betas"] == [0.8, 0.9]


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*did you mean 'lr'"):
        load_config(Outer, None, ["train.lrr=1"])
    f = tmp_path / "c.yaml"
    f.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*unknown config key 'trian'.*did you mean 'train'"):
        load_config(Outer, f)


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'many'"):
        load_config(Outer, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train.mode: expected one of \['a', 'b'\], got 'c'"):
        load_config(Outer, None, ["train.mode=c"])
    with pytest.raises(ConfigError, match=r"train.betas: expected 2 items"):
        load_config(Outer, None, ["train.betas=[1, 2, 3]"])


def test_validate_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps must be >= 0"):
        load_config(Outer, None, ["train.steps=-1"])
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(Outer, None, ["train.steps"])


def test_base_inheritance_and_diff(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain: {steps: 5}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain: {lr: 0.5}\n")
    cfg = load_config(Outer, tmp_path / "child.yaml")
    assert (cfg.name, cfg.train.steps, cfg.train.lr) == ("base", 5, 0.5)
    assert config_diff(to_dict(cfg), to_dict(Outer())) == ["name", "train.lr", "train.steps"]


def test_shipped_recipes_load():
    """Every YAML recipe in configs/ loads into its config class without error."""
    from pathlib import Path

    from densevlm.config.recipes import recipe_class

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files, "no recipes found in configs/"
    for f in files:
        cls = recipe_class(f)
        load_config(cls, f)


def test_partial_section_refines_the_fields_own_default():
    """A YAML section that sets one key keeps the other values of the field's default, not the class defaults."""

    @dataclass
    class Parent:
        inner: Inner = field(default_factory=lambda: Inner(lr=0.5, steps=7))

    cfg = load_config(Parent, None, ["inner.mode=b"])
    assert (cfg.inner.lr, cfg.inner.steps, cfg.inner.mode) == (0.5, 7, "b")
