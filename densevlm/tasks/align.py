"""``densevlm train``: region-language alignment with the one training loop; the method (``cfg.method``) is chosen
in the :data:`~densevlm.tasks.methods.METHODS` registry (DenseVLM, CLIPSelf)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from densevlm.config.align import AlignConfig
from densevlm.config.core import ConfigError
from densevlm.engine.run_dir import check_run_dir, run_directory
from densevlm.engine.trainer import FitResult, Trainer
from densevlm.methods.regions import student_region_features
from densevlm.models import create_backbone, freeze_for_dense_tuning
from densevlm.tasks import clipself as _clipself, declip as _declip, densevlm as _densevlm  # noqa: F401  (they register)
from densevlm.tasks.methods import METHODS

log = logging.getLogger(__name__)


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


def run_align(cfg: AlignConfig, *, resume: bool = False, overwrite: bool = False,
              stop_after_epoch: Optional[int] = None, evaluate: Any = None,
              on_step: Any = None) -> FitResult:
    """Train ``cfg.student`` with ``cfg.method`` and write a run directory.

    The models, vocabularies and data are built before the run directory exists, so bad input leaves no
    directory behind; a failure later, before the first checkpoint, removes it again (see run_directory).
    """
    check_run_dir(cfg.output_dir, cfg, resume=resume, overwrite=overwrite)  # a refusal comes first
    torch.manual_seed(cfg.loop.seed)  # random initialisations (tests, from-scratch runs) are part of the recipe
    student = create_backbone(cfg.student)
    if cfg.method not in METHODS:
        raise ConfigError(f"method: expected one of {sorted(METHODS)}, got {cfg.method!r}")
    # Built before freezing: CLIPSelf's teacher is a copy of the initial student.
    parts = METHODS[cfg.method](cfg, student)
    n_blocks = len(student.visual_blocks())
    unlocked = n_blocks if cfg.unlocked_blocks < 0 else cfg.unlocked_blocks
    freeze_for_dense_tuning(student, unlocked)
    unused = freeze_unused(student, 4 * student.patch_size)
    if unused:
        log.info("frozen %d parameter(s) the region path never uses: %s", len(unused), ", ".join(unused[:6]))
    if evaluate is None and cfg.eval.data.panoptic_json:
        evaluate = periodic_region_eval(cfg)
    targets = parts.teacher_targets
    with run_directory(cfg.output_dir, cfg, cpu=cfg.loop.cpu, resume=resume, overwrite=overwrite) as run_dir:
        trainer = Trainer(model=student, objective=parts.objective, dataset=parts.dataset, loop=cfg.loop,
                          optim=cfg.optim, run_dir=run_dir, evaluate=evaluate,
                          export_state=lambda m: m.state_dict_for_export(), ensemble_alpha=cfg.ensemble_alpha,
                          on_step=on_step, callbacks=[targets] if targets is not None else [])
        trainer.accelerator.print(f"{cfg.method}: {len(parts.dataset)} images at {cfg.data.image_size}px, "
                                  f"{unlocked}/{n_blocks} blocks unlocked {parts.info}")
        # DenseVLM's per-epoch train metrics (metrics.json "history") carry kept_fraction, thing/stuff region
        # counts and empty_batch, the fraction of batches where no region passed the teacher's threshold.
        result = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    if targets is not None:
        targets.close()  # the lazy mode's last fills: the next run (or epoch, on resume) reads them
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
