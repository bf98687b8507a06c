"""DenseVLM's parts for ``densevlm train``: the teacher targets (online, cached or filling a cache), the training
vocabulary of teacher and student, the decoupled-KL objective and grid regions."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from densevlm.config.align import AlignConfig
from densevlm.data.sources import ImageSource
from densevlm.data.region_sources import region_identity
from densevlm.data.teacher_cache import TeacherCache, image_keys
from densevlm.engine.trainer import resolve_precision
from densevlm.methods.densevlm import DenseVLMObjective
from densevlm.methods.teacher_targets import (CachedTeacherTargets, FillingTeacherTargets, OnlineTeacher,
                                              TeacherTargets)
from densevlm.models import create_backbone
from densevlm.tasks.methods import MethodParts, grid_dataset, register_method
from densevlm.tasks.corrections import load_corrections, read_corrections
from densevlm.tasks.labels import grid_spec, images_identity
from densevlm.tasks.teacher_cache import check_cacheable, cache_exists, open_teacher_cache, teacher_text_from_cache
from densevlm.vocab import text_embeddings_from_config

log = logging.getLogger(__name__)

DEFAULT_MAX_BOXES = 36


def training_vocabulary(cfg: AlignConfig, student: nn.Module, teacher: Optional[nn.Module],
                        cache: Optional[TeacherCache] = None) -> dict[str, Any]:
    """Student and teacher class embeddings of one training vocabulary, checked to agree class by class.

    With a teacher cache and no teacher model, the teacher's text embeddings come from the cache's text folder
    (built there by ``cache-teacher``, or on a miss by building the teacher's text tower once).
    """
    vocab_s, emb_s = text_embeddings_from_config(student, cfg.student_text)
    out: dict[str, Any] = {"vocabulary": vocab_s, "student_text": emb_s}
    if teacher is not None or cache is not None:
        vocab_t, emb_t = (text_embeddings_from_config(teacher, cfg.teacher_text) if teacher is not None
                          else teacher_text_from_cache(cfg, cache))
        # Length, order, names and flags must agree: the KL compares column i of one with column i of the other.
        vocab_t.check_compatible(vocab_s, "teacher and student vocabularies")
        out["teacher_text"] = emb_t
    if cfg.exclude_novel:
        keep = ~vocab_s.novel_mask
        out["vocabulary"] = vocab_s.seen()
        out["student_text"] = emb_s[keep]
        if "teacher_text" in out:
            out["teacher_text"] = out["teacher_text"][keep]
    return out


def teacher_targets(cfg: AlignConfig, teacher: Optional[nn.Module], cache: Optional[TeacherCache]) -> TeacherTargets:
    """Online without a cache; cached with one (the teacher for the images it lacks); filling it in the lazy mode."""
    precision = resolve_precision(cfg.loop.precision, cfg.loop.cpu)
    online = OnlineTeacher(teacher, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
    if cache is not None and cfg.teacher_cache_missing == "fill":
        return FillingTeacherTargets(online, cache)
    return CachedTeacherTargets(online)


def run_identity(cfg: AlignConfig) -> dict[str, Any]:
    """The images and regions of a recipe, as ``labels propose`` records them (corrections are keyed to them)."""
    return {"images": images_identity(cfg.data.source),
            "regions": region_identity(cfg.data.regions, grid_spec(cfg.data, cfg.method))}


def run_corrections(cfg: AlignConfig, source: ImageSource, vocab: Any) -> tuple[Any, dict[str, Any]]:
    """The recipe's ``teacher_targets.corrections`` for this run's images, regions and training vocabulary."""
    return load_corrections(cfg.teacher_targets.corrections, run_identity(cfg), vocab, image_keys(source))


@register_method("densevlm")
def build_densevlm(cfg: AlignConfig, student: nn.Module) -> MethodParts:
    """With a complete teacher cache the teacher is not built at all; images missing from it need the teacher."""
    source = ImageSource(cfg.data.source)
    if cfg.teacher_targets.corrections is not None:
        read_corrections(cfg.teacher_targets.corrections, run_identity(cfg))  # another source fails before any model
    cache, teacher = None, None
    if cfg.teacher_cache is not None and not cache_exists(cfg.teacher_cache):
        check_cacheable(cfg)  # an existing cache for another source is refused below, naming both
    if cfg.teacher_cache is not None:
        if cfg.teacher_cache_missing == "fill" and not cache_exists(cfg.teacher_cache):
            teacher = create_backbone(cfg.teacher)  # the lazy mode starts the cache: it needs the feature width
        cache = open_teacher_cache(cfg, source, student, feature_dim=teacher.embed_dim if teacher else None)
    if teacher is None and (cache is None or cache.missing):
        teacher = create_backbone(cfg.teacher)
    voc = training_vocabulary(cfg, student, teacher, cache)
    vocab = voc["vocabulary"]
    targets = teacher_targets(cfg, teacher, cache)
    corrections, added = None, {}
    info = {"vocabulary": vocab.name, "classes": len(vocab), "things": int(vocab.thing_mask.sum())}
    if cfg.teacher_targets.corrections is not None:
        corrections, extra = run_corrections(cfg, source, vocab)
        added, info["corrections"] = extra["added"], extra["summary"]
    objective = DenseVLMObjective(targets, voc["teacher_text"], voc["student_text"], vocab.thing_mask,
                                  temperature=cfg.densevlm.temperature, threshold=cfg.densevlm.threshold,
                                  corrections=corrections)
    if cache is not None:
        info["teacher_cache"] = f"{cfg.teacher_cache} ({len(cache.rows) - cache.missing}/{len(cache.rows)} images)"
    dataset = grid_dataset(cfg, source, student, default_max_boxes=DEFAULT_MAX_BOXES, teacher_cache=cache,
                           mask_patches=(teacher.patch_size,) if teacher is not None else (), added=added,
                           added_from=str(cfg.teacher_targets.corrections))
    return MethodParts(objective, dataset, targets, info)
