"""The tuned backbone inside detectron2: a ``Backbone`` in ``BACKBONE_REGISTRY`` and its config keys.

detectron2 is optional and imported only when something from here is used; install it with ``make detectron2``.

    from detectron2.config import get_cfg
    from densevlm.integrations.detectron2 import add_densevlm_config
    cfg = get_cfg(); add_densevlm_config(cfg)                  # also registers the backbones
    cfg.MODEL.BACKBONE.NAME = "build_densevlm_fpn_backbone"   # or "build_densevlm_backbone" (no FPN)
    cfg.MODEL.DENSEVLM.MODEL = "runs/densevlm_vitb16"           # run dir, weights file, local-dir, zoo/open_clip name

Outputs: ``res2``..``res5`` (strides 4/8/16/32, F-ViT's pyramid from intermediate blocks) or, with the FPN builder,
``p2``..``p6``; plus ``clip``, the dense CLIP map in text space (stride 16, unit norm, the DenseVLM dense path).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DenseVLMBackbone", "DenseVLMFPN", "add_densevlm_config", "build_densevlm_backbone", "build_densevlm_fpn_backbone",
    "class_text_embeddings", "require_detectron2",
]

INSTALL_HINT = ("detectron2 is not installed: run `make detectron2` (upstream from source when GitHub is reachable, "
                "else the pure-Python package from PyPI's sal-detectron2 wheel; see tools/install_detectron2.sh)")


def require_detectron2() -> None:
    """Raise ImportError with the install command when detectron2 cannot be imported."""
    try:
        import detectron2.modeling  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err


def __getattr__(name: str) -> Any:
    # detectron2 is imported on first use of anything that needs it, so importing this package never requires it
    if name in ("DenseVLMBackbone", "DenseVLMFPN", "build_densevlm_backbone", "build_densevlm_fpn_backbone"):
        require_detectron2()
        from densevlm.integrations.detectron2 import backbone

        return getattr(backbone, name)
    if name == "add_densevlm_config":
        require_detectron2()
        from densevlm.integrations.detectron2 import backbone  # noqa: F401  (registers the two builders)
        from densevlm.integrations.detectron2.config import add_densevlm_config

        return add_densevlm_config
    if name == "class_text_embeddings":
        from densevlm.integrations.detectron2.text import class_text_embeddings

        return class_text_embeddings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
