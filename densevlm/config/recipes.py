"""Which config class a recipe file is: a registry keyed by its folder under ``configs/`` (and, where one folder
holds two kinds, by a file-name prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from densevlm.config.align import AlignConfig
from densevlm.config.compare import CompareConfig
from densevlm.config.core import ConfigError
from densevlm.config.demo import DemoConfig
from densevlm.config.detection import DetectionConfig
from densevlm.config.evaluation import RegionEvalConfig
from densevlm.config.pretrain import PretrainConfig
from densevlm.config.report import ReportConfig
from densevlm.config.semseg import SemSegEvalConfig
from densevlm.config.talk2dino import Talk2DINOTrainConfig
from densevlm.config.toyworld import ToyWorldConfig

#: (folder, file-name prefix or None) -> config class; a prefixed kind wins over its folder's plain one.
RECIPE_KINDS: dict[tuple[str, Optional[str]], type] = {}


def register_recipe_kind(folder: str, cls: type, prefix: Optional[str] = None) -> None:
    """Recipes in ``configs/<folder>/`` (whose file names start with ``prefix``, if given) load as ``cls``."""
    RECIPE_KINDS[(folder, prefix)] = cls


for _folder, _cls, _prefix in (
    ("toyworld", ToyWorldConfig, None), ("pretrain", PretrainConfig, None), ("demo", DemoConfig, None),
    ("train", AlignConfig, None), ("eval", RegionEvalConfig, None), ("eval", SemSegEvalConfig, "semseg_"),
    ("det", DetectionConfig, None), ("talk2dino", Talk2DINOTrainConfig, None),
    ("talk2dino", SemSegEvalConfig, "semseg_"), ("report", ReportConfig, None), ("compare", CompareConfig, None),
):
    register_recipe_kind(_folder, _cls, _prefix)


def recipe_class(path: str | Path) -> type:
    """The config class of a recipe file, from its folder under configs/ (toyworld, pretrain, demo, ...)."""
    path = Path(path)
    folder = path.parent.name
    for (kind, prefix), cls in sorted(RECIPE_KINDS.items(), key=lambda kv: kv[0][1] is None):
        if kind == folder and (prefix is None or path.name.startswith(prefix)):
            return cls
    raise ConfigError(f"{path}: recipes live in configs/<kind>/ with kind one of "
                      f"{sorted({kind for kind, _ in RECIPE_KINDS})}")
