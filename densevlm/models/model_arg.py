"""The one reading of a ``--model`` argument (``densevlm export``, ``MODEL.DENSEVLM.MODEL``) as a model spec."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from densevlm.config.model import ModelSpec


def spec_from_model_arg(model: str, name: Optional[str] = None) -> Union[ModelSpec, str]:
    """What :func:`densevlm.models.create_backbone` takes for ``model`` (+ an optional architecture ``name``).

    A weights file is read with ``name`` when given, else with the architecture the file states (its metadata, the
    config beside it, a reference EVA checkpoint's shapes). Anything else (a run directory, a local-dir export, a
    zoo or open_clip model name) goes to the factory as it is, which resolves it the way every command does.
    """
    if not model:
        raise ValueError("model: expected a run directory, a weights file, a local-dir export or a model name")
    if Path(model).expanduser().is_file():
        return ModelSpec(name=name or "", pretrained=model)
    if name:
        return ModelSpec(name=name, pretrained=model)
    return model
