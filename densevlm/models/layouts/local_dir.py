"""The ``local-dir`` layout: open_clip's Hub folder, ``open_clip_config.json`` + ``open_clip_model.safetensors``.

``open_clip.create_model("local-dir:<dir>")`` (and ``create_model_and_transforms``) builds the model from the
folder's ``model_cfg``, loads the weights strictly and takes the preprocessing (size, mean, std, interpolation,
resize mode) from its ``preprocess_cfg``; FC-CLIP-style loaders that pass a model name through open_clip take it
the same way. The folder also records the densevlm model name, so ``create_backbone`` and ``--model <dir>`` read it
back under the same name.

A model whose EVA trunk densevlm built from a reference config or checkpoint names it ``densevlm_eva02_w…`` (the
name spells the architecture); plain open_clip builds it after
``densevlm.models.eva.register_eva02_trunk(<that name>)``. Built-in EVA02 names need nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from densevlm.config.core import ConfigError
from densevlm.models.checkpoints import META_LAYOUT, write_tensors
from densevlm.models.layouts.base import Layout, tensor_dict
from densevlm.models.named_configs import check_open_clip_config, register_config
from densevlm.utils.io import atomic_dir

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
NAME_KEY = "densevlm_model_name"  # ignored by open_clip


def is_local_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_local_dir(path: Path) -> tuple[str, Path]:
    """Register the folder's model config with open_clip; return (model name, weights file)."""
    config_file = path / CONFIG_FILE
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_file}: cannot read ({err})") from None
    if not isinstance(data, dict) or "model_cfg" not in data:
        raise ConfigError(f"{config_file}: expected a JSON object with 'model_cfg' (open_clip's local-dir layout)")
    cfg = check_open_clip_config(data["model_cfg"], f"{config_file}: model_cfg")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"local-dir {path}: '{WEIGHTS_FILE}' not found beside '{CONFIG_FILE}'")
    name = register_config(cfg, str(data.get(NAME_KEY) or path.name), source=str(config_file))
    return name, weights


def preprocess_cfg(model: "DenseCLIP") -> dict[str, Any]:
    cfg = dict(model.preprocess_cfg)
    cfg.update(mean=list(model.image_mean), std=list(model.image_std))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def incompatibility(model: "DenseCLIP") -> Optional[str]:
    return None


def outputs(out: Path) -> list[Path]:
    return [out]


def write(model: "DenseCLIP", out: Path) -> None:
    config = {"model_cfg": model.model_cfg, "preprocess_cfg": preprocess_cfg(model), NAME_KEY: model.name}
    with atomic_dir(out) as tmp:
        # no model name in the weights' metadata: the folder's config is the architecture, whatever name it gets
        write_tensors(tensor_dict(model), tmp / WEIGHTS_FILE, metadata={META_LAYOUT: "open_clip"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


LAYOUT = Layout(
    name="local-dir",
    description=f"open_clip Hub folder ({CONFIG_FILE} with model_cfg/preprocess_cfg + {WEIGHTS_FILE})",
    incompatibility=incompatibility,
    outputs=outputs,
    write=write,
)
