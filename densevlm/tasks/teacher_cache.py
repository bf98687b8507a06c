"""``densevlm cache-teacher`` and the training side of the teacher-target cache (:mod:`densevlm.data.teacher_cache`)
and of the compact target store (:mod:`densevlm.data.compact_cache`), per the recipe's ``teacher_targets.kind``.

The recipe says what the cache must match: the teacher spec (its weights are hashed, not loaded), the image size,
the grid scheme and the transform (the student's normalisation, which the teacher sees in training too); a compact
store also the teacher vocabulary, templates, temperature and k.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from densevlm.config.align import AlignConfig
from densevlm.config.core import ConfigError
from densevlm.data.compact_cache import (CompactTargetStore, build_compact_targets, check_existing_store,
                                         compact_metadata)
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
    return cache_metadata(teacher_name=name, teacher_weights=weights, dense_last_block=cfg.teacher.dense_last_block,
                          image_size=cfg.data.image_size, grid_style=style, max_split=cfg.data.max_split,
                          mean=mean, std=std)


def cache_exists(root: str) -> bool:
    return (Path(root) / MANIFEST).is_file()


def recipe_teacher_vocabulary(cfg: AlignConfig) -> tuple[Any, Any]:
    """The teacher's training vocabulary (its seen classes with ``exclude_novel``) and template set."""
    from densevlm.vocab import get_templates, get_vocabulary

    tcfg = cfg.teacher_text
    vocab = get_vocabulary(tcfg.vocabulary)
    return (vocab.seen() if cfg.exclude_novel else vocab), get_templates(tcfg.templates,
                                                                          this_is_prefix=tcfg.this_is_prefix)


def recipe_compact_metadata(cfg: AlignConfig, mean: Any, std: Any) -> dict[str, Any]:
    """The identity of the compact store a DenseVLM recipe needs (:func:`compact_metadata`)."""
    vocab, templates = recipe_teacher_vocabulary(cfg)
    return compact_metadata(recipe_cache_metadata(cfg, mean, std), vocabulary=vocab.name,
                            vocabulary_fingerprint=vocab.fingerprint, classes=len(vocab), templates=templates.name,
                            templates_fingerprint=templates.fingerprint, temperature=cfg.densevlm.temperature,
                            k=cfg.teacher_targets.k)


def _open_exact(cfg: AlignConfig, source: ImageSource, student: nn.Module, feature_dim: Optional[int]) -> Any:
    meta = recipe_cache_metadata(cfg, student.image_mean, student.image_std)  # hashes the teacher's weights file
    if feature_dim is not None and not cache_exists(cfg.teacher_cache):
        write_manifest(Path(cfg.teacher_cache), meta, feature_dim, SHARD_SIZE, len(source))
    return TeacherCache(cfg.teacher_cache, meta, image_keys(source), missing=cfg.teacher_cache_missing)


def _open_compact(cfg: AlignConfig, source: ImageSource, student: nn.Module, feature_dim: Optional[int]) -> Any:
    meta = recipe_compact_metadata(cfg, student.image_mean, student.image_std)
    return CompactTargetStore(cfg.teacher_cache, meta, image_keys(source))


#: teacher_targets.kind -> how its store is opened for training.
OPENERS: dict[str, Callable[[AlignConfig, ImageSource, nn.Module, Optional[int]], Any]] = {
    "exact": _open_exact, "compact": _open_compact}


def open_teacher_cache(cfg: AlignConfig, source: ImageSource, student: nn.Module,
                       feature_dim: Optional[int] = None) -> Any:
    """The recipe's target store (a :class:`TeacherCache`, or a :class:`CompactTargetStore` for
    ``teacher_targets.kind: compact``), checked against the recipe and the dataset.

    With ``feature_dim`` (the teacher's, for the lazy mode ``teacher_cache_missing: fill``) a folder without an
    exact cache is started empty: its manifest is written first.
    """
    return OPENERS[cfg.teacher_targets.kind](cfg, source, student, feature_dim)


class _Identity:
    """What the text-embedding cache keys on (model name and weights id), without the model."""

    def __init__(self, name: str, weights_id: str) -> None:
        self.name, self.weights_id = name, weights_id


def teacher_text_from_cache(cfg: AlignConfig, cache: Any) -> tuple[Any, torch.Tensor]:
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


def _build_exact(cfg: AlignConfig, teacher: nn.Module, source: ImageSource, mean: Any, std: Any,
                 teacher_text: Callable[[], torch.Tensor], acc: Any, progress: bool) -> dict[str, Any]:
    return build_teacher_cache(teacher, source, cfg.teacher_cache, recipe_cache_metadata(cfg, mean, std),
                               shard_size=SHARD_SIZE, batch_size=cfg.loop.batch_size,
                               num_workers=cfg.loop.num_workers, accelerator=acc, progress=progress)


def _build_compact(cfg: AlignConfig, teacher: nn.Module, source: ImageSource, mean: Any, std: Any,
                   teacher_text: Callable[[], torch.Tensor], acc: Any, progress: bool) -> dict[str, Any]:
    meta = recipe_compact_metadata(cfg, mean, std)  # k out of range is refused here, before anything is written
    return build_compact_targets(teacher, source, cfg.teacher_cache, meta, teacher_text(), shard_size=SHARD_SIZE,
                                 batch_size=cfg.loop.batch_size, num_workers=cfg.loop.num_workers,
                                 accelerator=acc, progress=progress)


def _preflight_compact(cfg: AlignConfig, mean: Any, std: Any) -> None:
    # k out of range, or a folder holding a store of another identity, is refused before anything is written
    check_existing_store(cfg.teacher_cache, recipe_compact_metadata(cfg, mean, std))


#: teacher_targets.kind -> how ``cache-teacher`` builds its store, and what it checks before writing anything.
BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {"exact": _build_exact, "compact": _build_compact}
PREFLIGHT: dict[str, Callable[[AlignConfig, Any, Any], None]] = {"exact": lambda cfg, mean, std: None,
                                                                 "compact": _preflight_compact}


def run_cache_teacher(cfg: AlignConfig, *, progress: bool = True) -> dict[str, Any]:
    """Build (or complete) the teacher cache of a DenseVLM recipe in ``cfg.teacher_cache`` (the exact features, or
    with ``teacher_targets.kind: compact`` the top-k targets); returns a summary (a compact store's includes the
    tail mass it drops, max and mean per cell).

    Runs on every process of ``accelerate launch`` (each writes its share of the shards) or as one process.
    """
    from accelerate import Accelerator

    from densevlm.vocab import get_templates, get_vocabulary, text_embeddings_from_config
    from densevlm.vocab.cache import TextEmbeddingCache

    if not cfg.teacher_cache:
        raise ConfigError("teacher_cache: set it to the folder to write (e.g. --set teacher_cache=cache/teacher)")
    acc = Accelerator(cpu=cfg.loop.cpu)
    student = create_backbone(cfg.student)  # only for its input normalisation, which the teacher sees in training
    mean, std = student.image_mean, student.image_std
    del student
    PREFLIGHT[cfg.teacher_targets.kind](cfg, mean, std)
    teacher = create_backbone(cfg.teacher)
    tcfg = cfg.teacher_text
    vocab = get_vocabulary(tcfg.vocabulary)  # the full one: the text-embedding cache keys on it
    templates = get_templates(tcfg.templates, this_is_prefix=tcfg.this_is_prefix)
    text_store = TextEmbeddingCache(tcfg.cache_dir or Path(cfg.teacher_cache) / TEXT_DIR)
    if acc.is_main_process and tcfg.embeddings_path is None:
        # The recipe's vocabulary, so that training from the cache never needs the teacher's text tower.
        text_store.get(teacher, vocab, templates, batch_size=tcfg.batch_size, progress=progress)

    def teacher_text() -> torch.Tensor:
        """The teacher's embeddings of the training vocabulary (seen classes with exclude_novel)."""
        if tcfg.embeddings_path is not None:
            emb = text_embeddings_from_config(teacher, tcfg)[1]
        else:
            emb = text_store.get(teacher, vocab, templates, batch_size=tcfg.batch_size, progress=False)
        return emb[~vocab.novel_mask] if cfg.exclude_novel else emb

    summary = BUILDERS[cfg.teacher_targets.kind](cfg, teacher, ImageSource(cfg.data.source), mean, std,
                                                 teacher_text, acc, progress)
    acc.end_training()
    return summary
