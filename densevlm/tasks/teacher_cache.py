"""``densevlm cache-teacher`` and the training side of the teacher-target cache (:mod:`densevlm.data.teacher_cache`).

The recipe says what the cache must match: the teacher spec (its weights are hashed, not loaded), the image size,
the grid scheme and the transform (the student's normalisation, which the teacher sees in training too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from densevlm.config.align import AlignConfig
from densevlm.config.core import ConfigError
from densevlm.data.region_sources import GridSpec, region_identity
from densevlm.data.sources import ImageSource
from densevlm.data.teacher_cache import (MANIFEST, TEXT_DIR, TeacherCache, build_teacher_cache, cache_metadata,
                                        image_keys, write_manifest)
from densevlm.models import create_backbone
from densevlm.models.factory import weights_identity

log = logging.getLogger(__name__)

#: Images per shard: 256 EVA02-L images are ~120 MB at fp16, small enough to lose little on an interruption.
SHARD_SIZE = 256


def recipe_cache_metadata(cfg: AlignConfig, mean: Any, std: Any) -> dict[str, Any]:
    """The cache metadata a DenseVLM recipe needs (``mean``/``std``: the student's input normalisation)."""
    if cfg.method != "densevlm" or cfg.teacher is None:
        raise ConfigError(f"teacher_cache: only DenseVLM recipes (method: densevlm, with a teacher) have a teacher "
                          f"cache, this one is method {cfg.method!r}")
    name, weights = weights_identity(cfg.teacher)
    style = cfg.method if cfg.data.grid_style == "auto" else cfg.data.grid_style
    regions = region_identity(cfg.data.regions, GridSpec(style, cfg.data.max_split))
    return cache_metadata(teacher_name=name, teacher_weights=weights, dense_last_block=cfg.teacher.dense_last_block,
                          image_size=cfg.data.image_size, grid_style=style, max_split=cfg.data.max_split,
                          mean=mean, std=std, regions=regions)


def check_cacheable(cfg: AlignConfig) -> None:
    """A teacher cache stores the grid's cells: a recipe whose regions come from a file runs the teacher online."""
    if cfg.data.regions.kind != "grid":
        raise ConfigError(f"teacher_cache: the cache stores the teacher's features of grid cells; data.regions.kind "
                          f"{cfg.data.regions.kind!r} runs the teacher online (set teacher_cache: null)")


def cache_exists(root: str) -> bool:
    return (Path(root) / MANIFEST).is_file()


def open_teacher_cache(cfg: AlignConfig, source: ImageSource, student: nn.Module,
                       feature_dim: Optional[int] = None) -> TeacherCache:
    """The recipe's cache, checked against the recipe and the dataset (see :class:`TeacherCache`).

    With ``feature_dim`` (the teacher's, for the lazy mode ``teacher_cache_missing: fill``) a folder without a
    cache is started empty: its manifest is written first.
    """
    meta = recipe_cache_metadata(cfg, student.image_mean, student.image_std)  # hashes the teacher's weights file
    if feature_dim is not None and not cache_exists(cfg.teacher_cache):
        write_manifest(Path(cfg.teacher_cache), meta, feature_dim, SHARD_SIZE, len(source))
    return TeacherCache(cfg.teacher_cache, meta, image_keys(source), missing=cfg.teacher_cache_missing)


class _Identity:
    """What the text-embedding cache keys on (model name and weights id), without the model."""

    def __init__(self, name: str, weights_id: str) -> None:
        self.name, self.weights_id = name, weights_id


def teacher_text_from_cache(cfg: AlignConfig, cache: TeacherCache) -> tuple[Any, torch.Tensor]:
    """The teacher's class embeddings for ``cfg.teacher_text`` without loading the teacher when they are cached.

    The teacher's identity is the one ``cache`` was opened with (its weights file is not hashed again).

    Looked up in ``teacher_text.embeddings_path``, else in ``teacher_text.cache_dir`` or the teacher cache's
    ``text/`` folder (``cache-teacher`` fills it for the recipe's vocabulary); on a miss (another vocabulary or
    template set) the teacher is built once for its text tower and the result is cached there.
    """
    from densevlm.vocab import get_templates, get_vocabulary, text_embeddings_from_config
    from densevlm.vocab.cache import TextEmbeddingCache, embedding_metadata

    tcfg = cfg.teacher_text
    if tcfg.embeddings_path is not None:
        return text_embeddings_from_config(None, tcfg)
    vocab = get_vocabulary(tcfg.vocabulary)
    templates = get_templates(tcfg.templates, this_is_prefix=tcfg.this_is_prefix)
    store = TextEmbeddingCache(tcfg.cache_dir or Path(cfg.teacher_cache) / TEXT_DIR)
    identity = _Identity(cache.meta["teacher"], cache.meta["teacher_weights"])
    emb = store.lookup(embedding_metadata(identity, vocab, templates))
    if emb is None:
        log.info("teacher text embeddings for vocabulary %s not cached: building the teacher once for them",
                 vocab.name)
        emb = store.get(create_backbone(cfg.teacher), vocab, templates, batch_size=tcfg.batch_size)
    return vocab, emb


def run_cache_teacher(cfg: AlignConfig, *, progress: bool = True) -> dict[str, Any]:
    """Build (or complete) the teacher cache of a DenseVLM recipe in ``cfg.teacher_cache``; returns a summary.

    Runs on every process of ``accelerate launch`` (each writes its share of the shards) or as one process.
    """
    from accelerate import Accelerator

    from densevlm.vocab.cache import TextEmbeddingCache
    from densevlm.vocab import get_templates, get_vocabulary

    if not cfg.teacher_cache:
        raise ConfigError("teacher_cache: set it to the folder to write (e.g. --set teacher_cache=cache/teacher)")
    check_cacheable(cfg)
    acc = Accelerator(cpu=cfg.loop.cpu)
    student = create_backbone(cfg.student)  # only for its input normalisation, which the teacher sees in training
    meta = recipe_cache_metadata(cfg, student.image_mean, student.image_std)
    del student
    teacher = create_backbone(cfg.teacher)
    if acc.is_main_process and cfg.teacher_text.embeddings_path is None:
        # The recipe's vocabulary, so that training from the cache never needs the teacher's text tower.
        tcfg = cfg.teacher_text
        TextEmbeddingCache(tcfg.cache_dir or Path(cfg.teacher_cache) / TEXT_DIR).get(
            teacher, get_vocabulary(tcfg.vocabulary), get_templates(tcfg.templates, this_is_prefix=tcfg.this_is_prefix),
            batch_size=tcfg.batch_size, progress=progress)
    summary = build_teacher_cache(teacher, ImageSource(cfg.data.source), cfg.teacher_cache, meta,
                                  shard_size=SHARD_SIZE, batch_size=cfg.loop.batch_size,
                                  num_workers=cfg.loop.num_workers, accelerator=acc, progress=progress)
    acc.end_training()
    return summary
