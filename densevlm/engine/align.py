"""``densevlm train``: region-language alignment (DenseVLM or CLIPSelf) with the one training loop."""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import nn

from densevlm.config.align import AlignConfig
from densevlm.data.regions import GridRegionDataset
from densevlm.data.sources import ImageSource
from densevlm.engine.run_dir import prepare_run_dir_once
from densevlm.data.teacher_cache import TeacherCache
from densevlm.engine.teacher_cache import cache_exists, open_teacher_cache, teacher_text_from_cache
from densevlm.engine.trainer import FitResult, Trainer, resolve_precision
from densevlm.methods.clipself import CLIPSelfObjective
from densevlm.methods.densevlm import DenseVLMObjective
from densevlm.methods.regions import student_region_features
from densevlm.models import create_backbone, freeze_for_dense_tuning

log = logging.getLogger(__name__)

DEFAULT_MAX_BOXES = {"densevlm": 36, "clipself": 20}


def freeze_unused(model: nn.Module, image_size: int) -> list[str]:
    """Freeze trainable parameters the region path never reaches (e.g. q/k of a value-path last block).

    A tiny probe forward/backward finds them. Leaving them trainable would make DDP wait forever for their
    gradients (or need ``find_unused_parameters``, which costs a graph traversal every step).
    """
    was_training = model.training
    model.train()
    probe = torch.zeros(1, 3, image_size, image_size)
    box = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    student_region_features(model, probe, box).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    return unused


def training_vocabulary(cfg: AlignConfig, student: nn.Module, teacher: Optional[nn.Module],
                        cache: Optional[TeacherCache] = None) -> dict[str, Any]:
    """Student and teacher class embeddings of one training vocabulary, checked to agree class by class.

    With a teacher cache and no teacher model, the teacher's text embeddings come from the cache's text folder
    (built there by ``cache-teacher``, or on a miss by building the teacher's text tower once).
    """
    from densevlm.vocab import text_embeddings_from_config

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


def build_objective(cfg: AlignConfig, student: nn.Module, cache: Optional[TeacherCache] = None,
                    teacher: Optional[nn.Module] = None) -> tuple[Any, nn.Module, dict[str, Any]]:
    """The method's objective and its teacher (``teacher``: one already built, else built here when needed)."""
    if cfg.method == "densevlm":
        # With a complete teacher cache the teacher is not built at all; images missing from it need the teacher.
        if teacher is None and (cache is None or cache.missing):
            teacher = create_backbone(cfg.teacher)
        voc = training_vocabulary(cfg, student, teacher, cache)
        vocab = voc["vocabulary"]
        precision = resolve_precision(cfg.loop.precision, cfg.loop.cpu)
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        objective = DenseVLMObjective(teacher, voc["teacher_text"], voc["student_text"], vocab.thing_mask,
                                      temperature=cfg.densevlm.temperature, threshold=cfg.densevlm.threshold,
                                      teacher_autocast=autocast)
        if cache is not None and cfg.teacher_cache_missing == "fill":
            objective.cache_fill = cache
        info = {"vocabulary": vocab.name, "classes": len(vocab), "things": int(vocab.thing_mask.sum())}
        if cache is not None:
            info["teacher_cache"] = f"{cfg.teacher_cache} ({len(cache.rows) - cache.missing}/{len(cache.rows)} images)"
        return objective, teacher, info
    teacher = create_backbone(cfg.teacher) if cfg.teacher is not None else copy.deepcopy(student)
    return CLIPSelfObjective(teacher), teacher, {}


def run_align(cfg: AlignConfig, *, resume: bool = False, overwrite: bool = False,
              stop_after_epoch: Optional[int] = None, evaluate: Any = None,
              on_step: Any = None) -> FitResult:
    """Train ``cfg.student`` with ``cfg.method`` and write a run directory."""
    run_dir = prepare_run_dir_once(cfg.output_dir, cfg, cpu=cfg.loop.cpu, resume=resume, overwrite=overwrite)
    torch.manual_seed(cfg.loop.seed)  # random initialisations (tests, from-scratch runs) are part of the recipe
    student = create_backbone(cfg.student)
    source = ImageSource(cfg.data.source)
    cache, teacher = None, None
    if cfg.teacher_cache is not None:
        if cfg.teacher_cache_missing == "fill" and not cache_exists(cfg.teacher_cache):
            teacher = create_backbone(cfg.teacher)  # the lazy mode starts the cache: it needs the feature width
        cache = open_teacher_cache(cfg, source, student, feature_dim=teacher.embed_dim if teacher else None)
    # The teacher is built before freezing: CLIPSelf's teacher is a copy of the initial student.
    objective, teacher, info = build_objective(cfg, student, cache, teacher)
    n_blocks = len(student.visual_blocks())
    unlocked = n_blocks if cfg.unlocked_blocks < 0 else cfg.unlocked_blocks
    freeze_for_dense_tuning(student, unlocked)
    unused = freeze_unused(student, 4 * student.patch_size)
    if unused:
        log.info("frozen %d parameter(s) the region path never uses: %s", len(unused), ", ".join(unused[:6]))

    style = cfg.method if cfg.data.grid_style == "auto" else cfg.data.grid_style
    crop = (cfg.data.crop_size or teacher.native_image_size) if cfg.method == "clipself" else None
    dataset = GridRegionDataset(source, cfg.data.image_size, grid_style=style, max_split=cfg.data.max_split,
                                max_boxes=cfg.data.max_boxes or DEFAULT_MAX_BOXES[cfg.method], crop_size=crop,
                                mean=student.image_mean, std=student.image_std, seed=cfg.loop.seed,
                                teacher_cache=cache)
    if evaluate is None and cfg.eval.data.panoptic_json:
        evaluate = periodic_region_eval(cfg)
    trainer = Trainer(model=student, objective=objective, dataset=dataset, loop=cfg.loop, optim=cfg.optim,
                      run_dir=run_dir, evaluate=evaluate, export_state=lambda m: m.state_dict_for_export(),
                      ensemble_alpha=cfg.ensemble_alpha, on_step=on_step)
    trainer.accelerator.print(f"{cfg.method}: {len(dataset)} images at {cfg.data.image_size}px, "
                              f"{unlocked}/{n_blocks} blocks unlocked {info}")
    # DenseVLM's per-epoch train metrics (metrics.json "history") carry kept_fraction, thing/stuff region counts
    # and empty_batch, the fraction of batches where no region passed the teacher's threshold.
    result = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    if cache is not None:
        cache.flush()  # the lazy mode's last fills: the next run (or epoch, on resume) reads them
    return result


def periodic_region_eval(cfg: AlignConfig) -> Any:
    """Region classification on ``cfg.eval`` (the six reference keys), for the training loop."""
    from pathlib import Path

    from densevlm.config.evaluation import RegionEvalConfig
    from densevlm.evaluation.regions import evaluate_regions

    eval_cfg = RegionEvalConfig(output_dir=str(Path(cfg.output_dir) / "eval"), model=cfg.student,
                                data=cfg.eval.data, text=cfg.eval.text, batch_size=cfg.eval.batch_size,
                                num_workers=cfg.eval.num_workers, diagnostics=False)

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics = evaluate_regions(model, eval_cfg, progress=False)["metrics"]
        return {k: v for k, v in metrics.items() if v is not None}

    return evaluate
