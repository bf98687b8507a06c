"""Checkpoint files: reading any weights file into a flat state dict, hashing, and writing tensors atomically.

Which key layout a state dict is in, and how it is converted into (or written from) a model, is the business of
:mod:`densevlm.models.layouts`, one module per layout with its reader and writer side by side. This module only
knows file formats: ``.safetensors`` and torch files (``.pt/.pth/.bin``, always read with ``weights_only=True``),
holding a raw ``{name: tensor}`` dict or one under a ``"state_dict"`` entry (the reference's ``{"epoch", "name",
"state_dict", ...}`` files), with or without the ``module.`` prefix DDP adds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from densevlm.utils.io import atomic_save

#: safetensors metadata keys written by :func:`save_weights`.
META_MODEL_NAME = "densevlm.model_name"
META_LAYOUT = "densevlm.layout"


class CheckpointLayoutError(ValueError):
    """A checkpoint matches none of the supported layouts for the model; the message says why for each."""


@dataclass
class LoadedCheckpoint:
    """A state dict read from a file, plus what was learned about the file on the way."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    file_format: str  # "safetensors" | "torch"
    wrapper: str  # "raw" | "state_dict"
    stripped_prefix: str  # "" or "module."
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor entries beside "state_dict" (epoch, name)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata


# --------------------------------------------------------------------------------------------- reading


def _is_torchscript_archive(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in zf.namelist())


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a ``.safetensors`` or torch (``.pt/.pth/.bin``) checkpoint into a flat ``{name: tensor}`` dict.

    Accepts a raw state dict or a dict holding one under ``"state_dict"``; strips a ``module.`` prefix
    present on every key. Torch files are read with ``weights_only=True``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    metadata: dict[str, str] = {}
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as fh:
                metadata = dict(fh.metadata() or {})
                obj: Any = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{p}: not a readable safetensors file ({err})") from err
        file_format = "safetensors"
    else:
        if _is_torchscript_archive(p):
            raise ValueError(
                f"{p}: is a TorchScript archive (like OpenAI's original CLIP .pt files). These cannot be read "
                "with weights_only=True; use pretrained='openai' with a '-quickgelu' model name, or save the "
                "model's state dict as .safetensors first"
            )
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{p}: could not be read as a torch checkpoint with weights_only=True ({type(err).__name__}: {err})"
            ) from err
        file_format = "torch"

    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a dict of tensors or a dict with a 'state_dict' entry, got {type(obj).__name__}")
    extras: dict[str, Any] = {}
    wrapper = "raw"
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        extras = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, (Mapping, torch.Tensor))}
        obj = obj["state_dict"]
        wrapper = "state_dict"
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(value)  # e.g. OpenAI's input_resolution/context_length/vocab_size as plain ints
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{p}: entry '{key}' of the state dict is a {type(value).__name__}, expected a tensor "
                "(supported: a raw state dict or a dict with a 'state_dict' entry)"
            )
        state_dict[str(key)] = value
    if not state_dict:
        raise ValueError(f"{p}: the state dict is empty")
    prefix = ""
    if all(k.startswith("module.") for k in state_dict):
        prefix = "module."
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return LoadedCheckpoint(state_dict, p, file_format, wrapper, prefix, extras, metadata)


# --------------------------------------------------------------------------------------------- writing


def write_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Optional[Mapping[str, str]] = None,
    wrapper: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write tensors atomically as ``.safetensors`` (with ``metadata``) or a torch file.

    ``wrapper`` (torch files only) puts the tensors under ``"state_dict"`` beside the given plain entries, as
    the reference training code saves them. Tensors are cloned to contiguous CPU memory first: safetensors
    refuses shared storage, and the file must not alias live parameters.
    """
    p = Path(path)
    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if p.suffix == ".safetensors":
        if wrapper:
            raise ValueError(f"{p}: a safetensors file holds tensors only; write the wrapped layout as .pt")
        from safetensors.torch import save_file

        meta = {"format": "pt", **dict(metadata or {})}
        atomic_save(p, lambda tmp: save_file(data, str(tmp), metadata=meta))
    elif p.suffix in (".pt", ".pth", ".bin"):
        obj: Any = {**dict(wrapper), "state_dict": data} if wrapper else data
        atomic_save(p, lambda tmp: torch.save(obj, tmp))
    else:
        raise ValueError(f"{p}: unknown weights format '{p.suffix}', expected .safetensors, .pt, .pth or .bin")
    return p


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, model_name: str | None = None
) -> Path:
    """Write an open_clip-layout state dict atomically: ``.safetensors`` (with metadata) or torch otherwise.

    The file loads with ``open_clip.create_model(model_name, pretrained=path)`` and with
    ``create_backbone(ModelSpec(model_name, pretrained=path))``.
    """
    metadata = {META_LAYOUT: "open_clip"}
    if model_name is not None:
        metadata[META_MODEL_NAME] = model_name
    return write_tensors(state_dict, path, metadata=metadata if Path(path).suffix == ".safetensors" else None)
