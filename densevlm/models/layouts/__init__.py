"""Checkpoint layouts: one module per layout, each holding its reader and its writer side by side.

This is the one loading boundary of the package (as timm's ``checkpoint_filter_fn``): every foreign layout is
recognised and converted here into the open_clip layout of the model being loaded, then loaded strictly; and
every layout we read we can also write (:func:`export_model`).

=================  ==================================================================  =========================
layout             what                                                                consumers
=================  ==================================================================  =========================
``open_clip``      open_clip state dict + model config JSON (``open_clip.py``)         SAN (open_clip 2.16),
                                                                                       ``open_clip.create_model``
``local-dir``      open_clip Hub folder: config + preprocess + safetensors             ``create_model("local-dir:…")``
``openai``         OpenAI CLIP state dict + ``input_resolution``/``context_length``/    CAT-Seg, OpenAI
                   ``vocab_size``, ViTs only (``openai.py``)                           ``build_model``
``eva_reference``  CLIPSelf/DenseVLM reference EVA-CLIP file, EVA02 only                F-ViT ``EvaCLIPViT``
                   (``eva_reference.py``)
=================  ==================================================================  =========================

Reading tries the state-dict layouts in :data:`READ_ORDER`; ``dense_clip`` (a ``DenseCLIP`` module's own state
dict, open_clip keys under ``clip.``) is a read-only variant of ``open_clip``; ``local-dir`` folders are read
whole by the factory (:func:`densevlm.models.create_backbone`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import torch
from torch import nn

from densevlm.models.checkpoints import META_MODEL_NAME, CheckpointLayoutError, LoadedCheckpoint, read_checkpoint
from densevlm.models.layouts import eva_reference, local_dir, openai
from densevlm.models.layouts import open_clip as open_clip_layout
from densevlm.models.layouts.base import ExportError, Layout

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP

__all__ = [
    "LAYOUTS", "READ_ORDER", "ExportError", "Layout", "convert_to_model_layout", "export_model",
    "infer_model_name", "load_checkpoint_into", "reload_spec", "writable_layouts",
]

#: every writable layout by its export name
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (open_clip_layout.LAYOUT, local_dir.LAYOUT, openai.LAYOUT, eva_reference.LAYOUT)
}
#: state-dict layouts in the order reading tries them (the most specific first, open_clip names last)
READ_ORDER: tuple[Layout, ...] = (
    eva_reference.LAYOUT, openai.LAYOUT, open_clip_layout.DENSE_CLIP_LAYOUT, open_clip_layout.LAYOUT,
)

_SAMPLE = 6  # how many keys an error message shows per list


# ----------------------------------------------------------------------------------------------- reading


def _sample(keys: set[str] | list[str]) -> str:
    """A few keys, taken round-robin across top-level groups (visual, text, ...) so every tower shows up."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(key.split(".")[0], []).append(key)
    picked: list[str] = []
    while len(picked) < min(_SAMPLE, len(keys)):
        for members in groups.values():
            if members and len(picked) < _SAMPLE:
                picked.append(members.pop(0))
    more = f" (+{len(keys) - len(picked)} more)" if len(keys) > len(picked) else ""
    return f"[{', '.join(picked)}]{more}"


def _mismatch_report(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Optional[str]:
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    wrong_shape = [
        f"{k}: {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(converted) & set(expected))
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {_sample(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {_sample(unexpected)}")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatches, e.g. {wrong_shape[:_SAMPLE]}")
    return "; ".join(parts) if parts else None


def convert_to_model_layout(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "state dict"
) -> tuple[dict[str, torch.Tensor], str]:
    """Find the layout of ``state_dict`` that fits ``model`` exactly; return (converted dict, layout name).

    Raises:
        CheckpointLayoutError: no layout gives exactly the model's keys and shapes; the message lists each
            layout tried with why it failed, including samples of missing and unexpected keys.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    expected = model.state_dict()
    attempts = []
    for layout in READ_ORDER:
        assert layout.detect is not None and layout.convert is not None
        reason = layout.detect(sd)
        if reason is not None:
            attempts.append(f"  - {layout.name} ({layout.description}): not detected, {reason}")
            continue
        try:
            converted = layout.convert(sd, model)
        except ValueError as err:
            attempts.append(f"  - {layout.name} ({layout.description}): {err}")
            continue
        # open_clip stores logit_scale as a 0-d or 1-d tensor depending on version; only the value matters
        for key in ("logit_scale", "logit_bias"):
            if key in converted and key in expected and converted[key].numel() == expected[key].numel():
                converted[key] = converted[key].reshape(expected[key].shape)
        report = _mismatch_report(converted, expected)
        if report is None:
            return converted, layout.name
        attempts.append(f"  - {layout.name} ({layout.description}): {report}")
    raise CheckpointLayoutError(
        f"{source}: matches no supported checkpoint layout for a {type(model).__name__} with "
        f"{len(expected)} state-dict entries. Layouts tried:\n" + "\n".join(attempts)
    )


def load_checkpoint_into(model: nn.Module, checkpoint: LoadedCheckpoint, model_name: str) -> str:
    """Convert and strictly load a read checkpoint into an open_clip model; returns the layout name.

    A file written by :func:`densevlm.models.checkpoints.save_weights` records the model name it was saved from;
    loading it into a different architecture name is refused even when the shapes happen to fit.
    """
    saved_name = checkpoint.metadata.get(META_MODEL_NAME)
    if saved_name is not None and saved_name != model_name:
        raise CheckpointLayoutError(
            f"{checkpoint.path}: was saved from model '{saved_name}', refusing to load it as '{model_name}'"
        )
    converted, layout = convert_to_model_layout(checkpoint.state_dict, model, source=str(checkpoint.path))
    model.load_state_dict(converted, strict=True)
    return layout


def infer_model_name(path: Path, checkpoint: Optional[LoadedCheckpoint] = None) -> str:
    """The open_clip name of the architecture a weights file holds, when the file (or its folder) says it.

    In order: a ``local-dir`` folder's config; the model name in a safetensors file's metadata; an open_clip
    config written beside the weights by the ``open_clip`` exporter (``<stem>.json``); a reference EVA checkpoint's
    shapes. Raises ConfigError when none applies.
    """
    from densevlm.config.core import ConfigError
    from densevlm.models.named_configs import register_config_file

    if local_dir.is_local_dir(path):
        return local_dir.read_local_dir(path)[0]
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    saved = checkpoint.metadata.get(META_MODEL_NAME)
    if saved:
        return saved
    sidecar = open_clip_layout.config_path(path)
    if sidecar.is_file() and sidecar != path:
        return register_config_file(sidecar)
    sd = checkpoint.state_dict
    if eva_reference.detect(sd) is None:
        return eva_reference.register_from_checkpoint(sd, str(path))
    raise ConfigError(
        f"{path}: the file does not say which architecture it holds (no model name in its metadata, no "
        f"'{sidecar.name}' config beside it, not a reference EVA checkpoint); give the model name"
    )


def register_config_path(path: Path) -> str:
    """Register a model-config JSON given as a model name: open_clip's format, or a reference ``eva_clip`` one."""
    from densevlm.config.core import ConfigError
    from densevlm.models.named_configs import register_config_file

    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"model name {path}: cannot read the model config ({err})") from None
    if eva_reference.is_reference_config(cfg):
        return eva_reference.register_reference_config_file(path, cfg)
    return register_config_file(path)


# ----------------------------------------------------------------------------------------------- writing


def writable_layouts(model: "DenseCLIP") -> list[str]:
    """Names of the layouts ``model`` can be exported to."""
    return [name for name, layout in LAYOUTS.items() if layout.incompatibility(model) is None]


def export_model(model: "DenseCLIP", layout_name: str, out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``model`` in ``layout_name`` at ``out``; return the paths written.

    Every tensor of the model is written (consumers' loaders are often ``strict=False`` and would not notice a
    missing one). Each output appears under its final name only when complete; an existing output is replaced
    only with ``overwrite``.

    Raises:
        ExportError: unknown layout, or the model cannot take it (the message names the layouts it can take).
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    layout = LAYOUTS.get(layout_name)
    if layout is None:
        raise ExportError(f"unknown layout '{layout_name}', expected one of {sorted(LAYOUTS)}")
    assert layout.incompatibility is not None and layout.outputs is not None and layout.write is not None
    reason = layout.incompatibility(model)
    if reason is not None:
        raise ExportError(
            f"model '{model.name}' ({model.family}) cannot be exported as '{layout_name}': {reason}. "
            f"Layouts this model can take: {writable_layouts(model)}"
        )
    out = Path(out)
    paths = layout.outputs(out)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    layout.write(model, out)
    return paths


def reload_spec(model: "DenseCLIP", layout_name: str, out: str | Path):
    """The :class:`ModelSpec` that reads an export of ``model`` back (the architecture as the files give it)."""
    from densevlm.config.model import ModelSpec
    from densevlm.models.named_configs import register_config

    out = Path(out)
    # The files hold weights only; the dense path (value, or a DeCLIP mode) is the reader's choice: the model's own.
    path = model.dense_last_block
    if layout_name == "open_clip":
        return ModelSpec(name=str(open_clip_layout.config_path(out)), pretrained=str(out), dense_last_block=path)
    if layout_name == "local-dir":
        return ModelSpec(pretrained=str(out), dense_last_block=path)
    # openai / eva_reference files hold no config: build the exported model's own architecture
    return ModelSpec(name=register_config(model.model_cfg, model.name), pretrained=str(out), dense_last_block=path)
