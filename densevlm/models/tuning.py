"""What trains during dense tuning, and how AdamW treats it.

``freeze_for_dense_tuning`` is the reference policy (``--lock-image --lock-image-unlocked-groups N`` calling
``EVAVisionTransformer.lock``, plus the text tower frozen in ``CustomCLIP.__init__``): everything frozen, then
only the last N vision blocks trainable. Patch embedding, position embedding, class token, final norm and the
projection head stay frozen, as do the text tower and ``logit_scale`` (the reference leaves ``logit_scale``
trainable but never uses it in the loss, so freezing it changes nothing and keeps it out of the optimizer).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from densevlm.models.dense_clip import DenseCLIP

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def freeze_for_dense_tuning(model: DenseCLIP, unlocked_blocks: int) -> list[str]:
    """Freeze all parameters, then unfreeze the last ``unlocked_blocks`` vision blocks.

    Args:
        model: the backbone.
        unlocked_blocks: number of trailing vision blocks to train, 0..len(model.visual_blocks()).
            (12 for DenseVLM B/16, i.e. every block; 24 for CLIPSelf L/14.)

    Returns:
        Names (as in ``model.named_parameters()``) of the parameters left trainable.
    """
    blocks = model.visual_blocks()
    if not 0 <= unlocked_blocks <= len(blocks):
        raise ValueError(f"unlocked_blocks: expected 0..{len(blocks)} for {model.name}, got {unlocked_blocks}")
    for param in model.parameters():
        param.requires_grad_(False)
    for block in blocks[len(blocks) - unlocked_blocks:]:
        for param in block.parameters():
            param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters a model's towers declare decay-free (position embeddings, class tokens)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if module is model or not callable(declare):
            continue
        for short in declare():
            names.add(f"{module_name}.{short}" if module_name else short)
    return names


def split_weight_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decay, no_decay) names of the trainable parameters.

    No decay, as in open_clip's training (``p.ndim < 2 or bn/ln/bias/logit_scale``) and the reference's
    "no wd on gains/biases/logit_scale": every 1-d parameter (norm gains, biases, layer-scale gammas), the
    parameters of normalisation layers, ``logit_scale``/``logit_bias``, and the embedding-like tokens the
    towers list in ``no_weight_decay()`` (position embeddings, class tokens). Everything else decays.
    """
    no_decay_names = _no_weight_decay_names(model)
    norm_params = {
        id(p) for module in model.modules() if isinstance(module, _NORM_TYPES) for p in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            param.ndim < 2
            or id(param) in norm_params
            or leaf.startswith("bias") or name.endswith("_bias")
            or leaf in ("logit_scale", "logit_bias")
            or name in no_decay_names
        ):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def param_groups_for_adamw(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` for weight matrices, 0 for the rest (see :func:`split_weight_decay`).

    Only trainable parameters are included; empty groups are left out.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    params = dict(model.named_parameters())
    decay, no_decay = split_weight_decay(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": float(weight_decay)},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
