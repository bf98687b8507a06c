"""Register model configs that are not shipped by name: an open_clip config JSON passed by path, a config read
from a ``local-dir`` export, an architecture built from a reference EVA config or from a checkpoint's shapes.

open_clip builds models only from names in its config registry, so each such config is registered under a name
(``open_clip.add_model_config``) and from then on goes through the one factory like a built-in one. A name that
is already registered with a *different* config is never overwritten: open_clip's registry is global, and
silently replacing ``ViT-B-16`` would change every later model of that name.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import open_clip

from densevlm.config.core import ConfigError

_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")
_generated_dir: Optional[Path] = None


def config_digest(cfg: dict[str, Any]) -> str:
    """Short stable hash of a config (key order does not matter)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _scratch_dir() -> Path:
    """A per-process folder for generated config files (open_clip registers files, not dicts)."""
    global _generated_dir
    if _generated_dir is None:
        _generated_dir = Path(tempfile.mkdtemp(prefix="densevlm-configs-"))
        atexit.register(shutil.rmtree, _generated_dir, True)
    return _generated_dir


def check_open_clip_config(cfg: Any, source: str) -> dict[str, Any]:
    """``cfg`` if it is an open_clip model config, else ConfigError naming ``source`` and the missing keys."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected an open_clip model config (a JSON object), got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{source}: not an open_clip model config, missing {missing} (expected {list(_REQUIRED)})")
    return cfg


def register_config(cfg: dict[str, Any], name: str, *, source: str = "config") -> str:
    """Register ``cfg`` with open_clip under ``name`` (or ``name-<hash>`` if ``name`` holds another config).

    Returns the registered name. Registering the same config twice is a no-op.
    """
    check_open_clip_config(cfg, source)
    trunk = cfg["vision_cfg"].get("timm_model_name") if isinstance(cfg["vision_cfg"], dict) else None
    if trunk:
        from densevlm.models.eva import register_eva02_trunk

        register_eva02_trunk(trunk)  # a trunk named after its architecture builds in any process
    existing = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if existing is not None and existing != cfg:
        name = f"{name}-{config_digest(cfg)}"
        existing = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if existing is None:
        path = _scratch_dir() / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=2))
        open_clip.add_model_config(path)
    return name


def register_config_file(path: str | Path) -> str:
    """Register an open_clip model-config JSON file under its file stem (see :func:`register_config`)."""
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{p}: cannot read the model config ({err})") from None
    return register_config(check_open_clip_config(cfg, str(p)), p.stem, source=str(p))
