"""Config of the class text embeddings a model classifies regions against (``densevlm.vocab``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from densevlm.config.core import ConfigError


@dataclass
class TextEmbeddingConfig:
    """Which classes, which prompts, and where embeddings come from.

    ``vocabulary``: a built-in name (``coco_ade_316``, ``coco_panoptic``, ``ade20k_150``, ``coco_stuff_171``,
    ``pascal_context_59``, ``voc_21``, ``cityscapes_19``), a vocabulary JSON, a COCO-panoptic json or a
    toy-world root. ``templates``: ``vild`` (63, alias ``hand_craft``), ``short`` (7), ``single`` or a JSON file.
    ``this_is_prefix``: null keeps the template set's own default (on for vild/short, as the reference).
    ``embeddings_path``: a precomputed ``.safetensors`` or reference ``.npy`` file used instead of building;
    ``renormalize`` L2-normalises its rows (the reference's 316-class files are not unit norm).
    ``cache_dir``: where built embeddings are cached (null: no cache).
    """

    vocabulary: str = "coco_ade_316"
    templates: str = "vild"
    this_is_prefix: bool | None = None
    embeddings_path: str | None = None
    renormalize: bool = False
    cache_dir: str | None = None
    batch_size: int = 256

    def validate(self) -> None:
        if not self.vocabulary:
            raise ConfigError("vocabulary: expected a built-in name or a path, got an empty string")
        if not self.templates:
            raise ConfigError("templates: expected a template-set name or a JSON path, got an empty string")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.embeddings_path is not None and Path(self.embeddings_path).suffix not in (".safetensors", ".npy"):
            raise ConfigError(
                f"embeddings_path: expected a .safetensors or .npy file, got {self.embeddings_path!r}"
            )
