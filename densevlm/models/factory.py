"""The single door to a backbone: ``create_backbone(spec) -> DenseCLIP``.

Builds the open_clip model for ``spec.name`` (built-in configs plus the JSONs shipped in ``model_configs/``),
puts the requested weights in it (random init, an open_clip tag, a local file in any supported layout, or a run
directory) and wraps it in the :class:`DenseCLIP` subclass of its family.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import open_clip
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models.eva import Eva

from densevlm import zoo
from densevlm.config.core import ConfigError, from_dict, read_yaml, to_dict
from densevlm.config.model import ModelSpec
from densevlm.models.checkpoints import LoadedCheckpoint, read_checkpoint
from densevlm.utils.hashing import sha256_file
from densevlm.models.decoupled import DECOUPLED_MODES
from densevlm.models.dense_clip import DenseCLIP
from densevlm.models.eva import EvaDense
from densevlm.models.layouts import infer_model_name, load_checkpoint_into, register_config_path
from densevlm.models.layouts.local_dir import is_local_dir, read_local_dir
from densevlm.models.openclip_vit import OpenCLIPViTDense

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

#: names used by the CLIPSelf/DenseVLM reference fork (its ``eva_clip/model_configs``) -> open_clip names.
REFERENCE_NAME_ALIASES = {
    "EVA02-CLIP-B-16": "EVA02-B-16",
    "EVA02-CLIP-L-14": "EVA02-L-14",
    "EVA02-CLIP-L-14-336": "EVA02-L-14-336",
}

#: files a run directory must / may hold.
RUN_WEIGHTS = "weights.safetensors"
RUN_CONFIG = "config.yaml"

#: vision_cfg keys that mean something for a timm tower; open_clip silently ignores the ViT ones there.
_TIMM_VISION_KEYS = {
    "image_size", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
    "timm_drop", "timm_drop_path", "patch_dropout",
}
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def register_model_configs() -> None:
    """Make the JSON configs in ``model_configs/`` known to open_clip (idempotent).

    Afterwards ``open_clip.create_model("ToyCLIP-ViT-T-16", pretrained=<file>)`` works like a built-in name.
    """
    names = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_model_name(name: str) -> str:
    """Map a user or reference model name to a registered open_clip config name, or raise ConfigError.

    A path to a model-config JSON (open_clip's format, or a reference ``eva_clip`` config) registers it first.
    """
    if name.endswith(".json") and Path(name).expanduser().is_file():
        return register_config_path(Path(name).expanduser())
    resolved = zoo.architecture(name) or REFERENCE_NAME_ALIASES.get(name, name).replace("/", "-")
    available = open_clip.list_models()
    if resolved not in available:
        zoo_names = sorted(e.name for e in zoo.list_models())
        close = difflib.get_close_matches(resolved, available + zoo_names, n=3, cutoff=0.6)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(
            f"model name '{name}': no open_clip config or zoo model with that name.{hint} Zoo models: {zoo_names}; "
            f"reference names accepted: {sorted(REFERENCE_NAME_ALIASES)}; see open_clip.list_models() for the rest."
        )
    return resolved


def resolve_zoo_spec(spec: ModelSpec) -> ModelSpec:
    """A zoo name as ``name`` (with no ``pretrained``) or as ``pretrained`` means its verified shipped weights."""
    if spec.pretrained and zoo.is_zoo_name(spec.pretrained) and not Path(spec.pretrained).exists():
        entry = zoo.get_entry(spec.pretrained)
        if spec.name and resolve_model_name(spec.name) != entry.architecture:
            raise ConfigError(f"pretrained={spec.pretrained!r} is a zoo {entry.architecture} but name={spec.name!r} "
                              f"is {resolve_model_name(spec.name)}")
        return dataclasses.replace(spec, name=spec.name or entry.name,
                                   pretrained=str(zoo.weights_path(entry.name)))
    if not spec.pretrained and zoo.is_zoo_name(spec.name):
        return dataclasses.replace(spec, pretrained=str(zoo.weights_path(spec.name)))
    return spec


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _final_config(name: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(final model config, kwargs for open_clip.create_model) after applying ``overrides``."""
    base = open_clip.get_model_config(name)
    kwargs: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in ("vision_cfg", "text_cfg"):
            if key == "vision_cfg" and "timm_model_name" in base["vision_cfg"]:
                ignored = sorted(set(value) - _TIMM_VISION_KEYS)
                if ignored:
                    raise ConfigError(
                        f"model_overrides.vision_cfg: {ignored} have no effect on the timm tower of '{name}' "
                        f"(allowed: {sorted(_TIMM_VISION_KEYS)}); register a timm model for another size"
                    )
            kwargs[key] = _deep_merge(base[key], value)
        else:
            kwargs[key] = copy.deepcopy(value)
    return _deep_merge(base, kwargs), kwargs


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "initialized randomly" when built without weights; we load them right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    if active:
        root.addFilter(flt)
    try:
        yield
    finally:
        if active:
            root.removeFilter(flt)


def _run_model_section(config_path: Path) -> Optional[dict[str, Any]]:
    """The model spec recorded in a run's ``config.yaml``: its ``model`` (or ``student``) section."""
    data = read_yaml(config_path)
    for key in ("model", "student"):
        section = data.get(key)
        if isinstance(section, dict) and section.get("name"):
            return section
    return None


def _resolve_run_dir(run_dir: Path, spec: ModelSpec) -> tuple[Path, ModelSpec]:
    weights = run_dir / RUN_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"run directory {run_dir}: '{RUN_WEIGHTS}' not found (expected the run's weights there)")
    config = run_dir / RUN_CONFIG
    section = _run_model_section(config) if config.is_file() else None
    if not spec.name:
        if section is None:
            raise ConfigError(
                f"run directory {run_dir}: '{RUN_CONFIG}' has no 'model' section with a 'name'; "
                "give the model name in the spec"
            )
        arch = {k: section[k] for k in ("name", "force_quick_gelu", "model_overrides") if k in section}
        if section.get("dense_last_block") in DECOUPLED_MODES:  # a DeCLIP run: its weights go with its dense path
            arch["dense_last_block"] = section["dense_last_block"]
        try:
            spec = from_dict(ModelSpec, {**to_dict(spec), **arch})
        except ConfigError as err:
            raise ConfigError(f"{config}: model section: {err}") from None
    elif section is not None and resolve_model_name(str(section["name"])) != resolve_model_name(spec.name):
        raise ConfigError(
            f"run directory {run_dir}: trained model is '{section['name']}' but the spec asks for '{spec.name}'"
        )
    return weights, spec


def run_dir_spec(run_dir: str | Path) -> ModelSpec:
    """The complete spec (architecture, overrides, weights) of a finished run directory."""
    _, spec = _resolve_run_dir(Path(run_dir), ModelSpec(pretrained=str(run_dir)))
    return spec


def _pick_family(clip: torch.nn.Module, name: str = "", last_block: str = "value") -> type[DenseCLIP]:
    visual = getattr(clip, "visual", None)
    if isinstance(visual, TimmModel) and isinstance(getattr(visual, "trunk", None), Eva):
        return EvaDense
    if isinstance(visual, VisionTransformer):
        return OpenCLIPViTDense
    if last_block in DECOUPLED_MODES:  # asked for DeCLIP's dense path: say so, not only "unsupported tower"
        raise ValueError(
            f"model {name!r}: DeCLIP mode {last_block!r} decouples the last block of a ViT trunk, but its vision "
            f"tower is {type(visual).__name__}; modes this model supports: none (ViT trunks, open_clip "
            f"VisionTransformer or timm Eva, support {list(DECOUPLED_MODES)})")
    raise TypeError(
        f"vision tower {type(visual).__name__} is not supported; supported families: open_clip VisionTransformer "
        "(OpenAI/OpenCLIP ViTs) and timm Eva trunks in TimmModel (EVA02)"
    )


def _resolve_source(spec: ModelSpec) -> tuple[ModelSpec, str, Optional[Path], Optional[str]]:
    """(spec, open_clip name, weights file or None, pretrained tag or None) for a validated spec.

    An existing path wins over a tag of the same spelling; an empty ``pretrained`` means random init.
    """
    if not spec.pretrained:
        return spec, resolve_model_name(spec.name), None, None
    src = Path(spec.pretrained).expanduser()
    if is_local_dir(src):  # open_clip's Hub folder: its config names the architecture
        name, weights_file = read_local_dir(src)
        if spec.name and resolve_model_name(spec.name) != name:
            raise ConfigError(f"{src}: holds model '{name}' but the spec asks for '{spec.name}'")
        return spec, name, weights_file, None
    if src.is_dir():
        weights_file, spec = _resolve_run_dir(src, spec)
        return spec, resolve_model_name(spec.name), weights_file, None
    if not spec.name and src.is_file():
        return spec, infer_model_name(src), src, None
    name = resolve_model_name(spec.name)
    if src.is_file():
        return spec, name, src, None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if spec.pretrained in tags:
        return spec, name, None, spec.pretrained
    if src.suffix in _WEIGHT_SUFFIXES or "/" in spec.pretrained or "\\" in spec.pretrained:
        raise FileNotFoundError(f"pretrained weights not found: {src}")
    raise ConfigError(
        f"pretrained={spec.pretrained!r}: not a file or directory, and not an open_clip tag for '{name}' (tags: {tags})"
    )


def create_backbone(spec: Union[ModelSpec, str], *, device: Union[str, torch.device] = "cpu") -> DenseCLIP:
    """Build a :class:`DenseCLIP` for ``spec``, in eval mode, on ``device``.

    Args:
        spec: a :class:`ModelSpec`, a model name (random init), or a run directory path.
        device: where the model is placed after loading (weights are always read on the CPU).

    Raises:
        ConfigError: unknown model name or invalid spec.
        FileNotFoundError: ``pretrained`` looks like a path that does not exist, or a run directory lacks
            its weights.
        CheckpointLayoutError: the weights match no supported layout for the architecture.
    """
    if isinstance(spec, str):
        spec = ModelSpec(pretrained=spec) if Path(spec).is_dir() else ModelSpec(name=spec)
    try:
        spec.validate()
    except ValueError as err:
        raise ConfigError(f"model spec: {err}") from None
    register_model_configs()
    spec = resolve_zoo_spec(spec)
    spec, name, weights_file, tag = _resolve_source(spec)

    config, model_kwargs = _final_config(name, spec.model_overrides)
    checkpoint: Optional[LoadedCheckpoint] = read_checkpoint(weights_file) if weights_file is not None else None
    with _quiet_random_init(active=checkpoint is not None):
        clip = open_clip.create_model(
            name,
            pretrained=tag,
            precision=spec.precision,
            device="cpu",
            force_quick_gelu=spec.force_quick_gelu,
            cache_dir=spec.cache_dir,
            **model_kwargs,
        )

    load_info: dict[str, Any] = {}
    weights_sha256: Optional[str] = None
    source = "random init"
    if checkpoint is not None:
        layout = load_checkpoint_into(clip, checkpoint, name)
        load_info = {
            "layout": layout,
            "file_format": checkpoint.file_format,
            "wrapper": checkpoint.wrapper,
            "stripped_prefix": checkpoint.stripped_prefix,
            "extras": checkpoint.extras,
        }
        weights_sha256 = sha256_file(checkpoint.path)
        source = str(checkpoint.path)
    elif tag is not None:
        pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
        weights_path = open_clip.download_pretrained(pretrained_cfg, cache_dir=spec.cache_dir)
        weights_sha256 = sha256_file(weights_path)
        load_info = {"layout": "open_clip_tag", "tag": tag, "file": str(weights_path)}
        source = f"open_clip:{name}/{tag}"

    preprocess = open_clip.get_model_preprocess_cfg(clip)
    if spec.force_quick_gelu:
        config["quick_gelu"] = True
    context_length = int(config["text_cfg"].get("context_length", 77))
    family = _pick_family(clip, name, spec.dense_last_block)
    model = family(
        clip,
        name=name,
        tokenizer=open_clip.get_tokenizer(name, context_length=context_length),
        image_mean=preprocess["mean"],
        image_std=preprocess["std"],
        embed_dim=int(config["embed_dim"]),
        dense_last_block=spec.dense_last_block,
        source=source,
        weights_sha256=weights_sha256,
        load_info=load_info,
        model_cfg=config,
        preprocess_cfg=preprocess,
    )
    return model.to(device).eval()


def weights_identity(spec: ModelSpec) -> tuple[str, str]:
    """(open_clip model name, :attr:`DenseCLIP.weights_id`) of the model ``create_backbone(spec)`` would build,
    without building it: the weights file is hashed. Random-init specs have no stable identity (an error)."""
    try:
        spec.validate()
    except ValueError as err:
        raise ConfigError(f"model spec: {err}") from None
    register_model_configs()
    spec, name, weights_file, tag = _resolve_source(resolve_zoo_spec(spec))
    if weights_file is None and tag is not None:
        weights_file = Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag),
                                                          cache_dir=spec.cache_dir))
    if weights_file is None:
        raise ConfigError(f"model {name} has no pretrained weights (random init): its weights have no identity to "
                          "check a cache against; give it weights (a file, run directory, zoo name or tag)")
    return name, sha256_file(weights_file)[:16]
