"""Checkpoint files: reading, layout detection, converters, strict loading and writing.

This is the one loading boundary of the package (as timm's ``checkpoint_filter_fn``): every foreign layout is
recognised and converted here into the open_clip layout of the model being loaded, then loaded strictly.
Nothing else in the package knows about foreign key names.

Supported layouts (tried in this order):

* ``eva_clip_reference``: checkpoints written by the CLIPSelf / DenseVLM reference code (a fork of open_clip
  2.16 with an ``eva_clip`` package): ``visual.blocks.*`` (EVA ViT), ``text.*``, ``logit_scale``. Converted into
  open_clip's EVA02 layout (timm ``Eva`` trunk under ``visual.trunk.``) with timm's ``checkpoint_filter_fn``
  (key renames ``mlp.w1/w2/w3/ffn_ln``, ``attn.inner_attn_ln``, ``q_bias/v_bias``). The RoPE buffers it holds
  are not loaded (the model recomputes them) but are checked against the model's RoPE configuration, so a
  checkpoint trained with other RoPE settings fails loudly instead of silently changing numerics.
* ``openai_clip``: a state dict of OpenAI's CLIP (open_clip key names plus ``input_resolution``,
  ``context_length``, ``vocab_size`` entries), which are dropped.
* ``dense_clip``: ``DenseCLIP.state_dict()`` (the open_clip keys under ``clip.``), e.g. a training checkpoint.
* ``open_clip``: open_clip's own layout, as saved by ``DenseCLIP.save_weights`` or open_clip's training code.

Every layout may come as a raw ``{name: tensor}`` dict or under a ``"state_dict"`` entry (the reference's
``{"epoch", "name", "state_dict", ...}`` files), with or without the ``module.`` prefix DDP adds. Torch files are
always read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from densevlm.models.positional import reference_rope_sincos
from densevlm.utils.io import atomic_save

#: safetensors metadata keys written by :func:`save_weights`.
META_MODEL_NAME = "densevlm.model_name"
META_LAYOUT = "densevlm.layout"

_SAMPLE = 6  # how many keys an error message shows per list


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


# --------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes first: numpy has no bfloat16, and this hashes the exact stored bits
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


# --------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class CheckpointLayout:
    """A known checkpoint key layout and its converter into the model's open_clip layout.

    ``detect`` returns None when the state dict looks like this layout, else the reason it does not;
    ``convert`` returns the state dict in open_clip layout for ``model`` (it may raise ``ValueError`` with a
    reason when the checkpoint cannot fit the model).
    """

    name: str
    description: str
    detect: Callable[[Mapping[str, torch.Tensor]], Optional[str]]
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def _detect_eva_reference(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if "visual.pos_embed" in sd and any(k.startswith("visual.blocks.") for k in sd):
        return None
    return "no 'visual.pos_embed' / 'visual.blocks.*' keys"


def _convert_eva_reference(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.eva import Eva, checkpoint_filter_fn

    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, Eva):
        raise ValueError(
            f"the checkpoint holds an EVA ViT but the model's vision tower is "
            f"{type(getattr(model, 'visual', None)).__name__}, not a timm Eva trunk (use an EVA02 model name)"
        )
    # Refuse the size mismatches timm's filter would silently resample: a strict load means the checkpoint
    # fits the architecture as it is.
    for key, target in (("visual.pos_embed", trunk.pos_embed), ("visual.patch_embed.proj.weight", trunk.patch_embed.proj.weight)):
        if key in sd and target is not None and tuple(sd[key].shape) != tuple(target.shape):
            raise ValueError(
                f"'{key}' has shape {tuple(sd[key].shape)}, the model expects {tuple(target.shape)}"
            )
    _check_reference_rope_buffers(sd, trunk)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    out = {f"visual.trunk.{k}": v for k, v in checkpoint_filter_fn(visual, trunk).items()}
    for key, value in sd.items():
        if not key.startswith("visual."):
            out[key] = value  # text.* and logit_scale already use open_clip's CustomTextCLIP names
    return out


def _check_reference_rope_buffers(sd: Mapping[str, torch.Tensor], trunk: nn.Module) -> None:
    """The reference stores its RoPE tables; they must equal what the model will compute at its native grid."""
    cos_keys = sorted(k for k in sd if k.startswith("visual.") and k.endswith("rope.freqs_cos"))
    if not cos_keys:
        return
    rope = getattr(trunk, "rope", None)
    if rope is None:
        raise ValueError(f"the checkpoint has RoPE buffers ('{cos_keys[0]}') but the model has no rotary embedding")
    ref = tuple(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
    sin, cos = reference_rope_sincos(tuple(trunk.patch_embed.grid_size), rope.dim, ref, float(rope.temperature))
    for cos_key in cos_keys:
        sin_key = cos_key[: -len("cos")] + "sin"
        for key, expected in ((cos_key, cos), (sin_key, sin)):
            stored = sd.get(key)
            if stored is None:
                continue
            if tuple(stored.shape) != tuple(expected.shape) or not torch.allclose(stored.float(), expected, atol=1e-5):
                raise ValueError(
                    f"'{key}' (shape {tuple(stored.shape)}) does not match the model's RoPE table for a "
                    f"{tuple(trunk.patch_embed.grid_size)} grid with pre-training grid {ref} (shape "
                    f"{tuple(expected.shape)}): the checkpoint was trained with other RoPE settings"
                )


_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _detect_openai(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if all(k in sd for k in _OPENAI_EXTRA_KEYS):
        return None
    return f"no {'/'.join(_OPENAI_EXTRA_KEYS)} entries"


def _convert_openai(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}


def _detect_dense_clip(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if all(k.startswith("clip.") for k in sd):
        return None
    return "keys do not all start with 'clip.'"


def _convert_dense_clip(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {k[len("clip."):]: v for k, v in sd.items()}


def _detect_any(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    return None


def _identity(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(sd)


LAYOUTS: tuple[CheckpointLayout, ...] = (
    CheckpointLayout(
        "eva_clip_reference",
        "CLIPSelf/DenseVLM reference EVA-CLIP (visual.blocks.*, text.*, logit_scale)",
        _detect_eva_reference,
        _convert_eva_reference,
    ),
    CheckpointLayout(
        "openai_clip",
        "OpenAI CLIP state dict (open_clip names + input_resolution/context_length/vocab_size)",
        _detect_openai,
        _convert_openai,
    ),
    CheckpointLayout(
        "dense_clip",
        "a DenseCLIP module's own state_dict() (open_clip keys under 'clip.')",
        _detect_dense_clip,
        _convert_dense_clip,
    ),
    CheckpointLayout("open_clip", "open_clip state dict (CLIP / CustomTextCLIP)", _detect_any, _identity),
)


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
    for layout in LAYOUTS:
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

    A file written by :func:`save_weights` records the model name it was saved from; loading it into a
    different architecture name is refused even when the shapes happen to fit.
    """
    saved_name = checkpoint.metadata.get(META_MODEL_NAME)
    if saved_name is not None and saved_name != model_name:
        raise CheckpointLayoutError(
            f"{checkpoint.path}: was saved from model '{saved_name}', refusing to load it as '{model_name}'"
        )
    converted, layout = convert_to_model_layout(checkpoint.state_dict, model, source=str(checkpoint.path))
    model.load_state_dict(converted, strict=True)
    return layout


# --------------------------------------------------------------------------------------------- writing


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, model_name: str | None = None
) -> Path:
    """Write an open_clip-layout state dict atomically: ``.safetensors`` (with metadata) or torch otherwise.

    The file loads with ``open_clip.create_model(model_name, pretrained=path)`` and with
    ``create_backbone(ModelSpec(model_name, pretrained=path))``.
    """
    p = Path(path)
    # clone: safetensors refuses tensors that share storage, and the file must not alias live parameters
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", META_LAYOUT: "open_clip"}
        if model_name is not None:
            metadata[META_MODEL_NAME] = model_name
        atomic_save(p, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    elif p.suffix in (".pt", ".pth", ".bin"):
        atomic_save(p, lambda tmp: torch.save(tensors, tmp))
    else:
        raise ValueError(f"{p}: unknown weights format '{p.suffix}', expected .safetensors, .pt, .pth or .bin")
    return p
