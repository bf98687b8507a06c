"""``densevlm pretrain``: contrastive image-text pre-training of a CLIP on any COCO-captions dataset."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from densevlm.config.core import ConfigError
from densevlm.config.pretrain import PretrainConfig
from densevlm.data.captions import CaptionCollator, CaptionDataset
from densevlm.engine.run_dir import check_run_dir, run_directory
from densevlm.engine.trainer import FitResult, Trainer
from densevlm.evaluation.zero_shot import image_zero_shot
from densevlm.methods.contrastive import ContrastiveObjective
from densevlm.models import create_backbone
from densevlm.vocab import get_templates

log = logging.getLogger(__name__)


def zero_shot_eval(model: Any, cfg: PretrainConfig, image_size: int, progress: bool = True) -> dict[str, Any]:
    """Image-level zero-shot on the eval split with prompt-ensembled text embeddings from the current weights."""
    from densevlm.vocab import build_text_embeddings, get_templates, get_vocabulary

    vocab = get_vocabulary(cfg.eval.vocabulary or cfg.eval.panoptic_json)
    text = build_text_embeddings(model, vocab, get_templates(cfg.eval.templates), progress=False)
    return image_zero_shot(model, text, vocab, cfg.eval.panoptic_json, cfg.eval.image_root, image_size,
                           batch_size=cfg.eval.batch_size, max_images=cfg.eval.max_images, progress=progress)


def run_pretrain(cfg: PretrainConfig, *, resume: bool = False, overwrite: bool = False,
                 stop_after_epoch: Optional[int] = None) -> FitResult:
    """Pre-train ``cfg.model`` and write a run directory (config.yaml, weights.safetensors, metrics.json, tb)."""
    try:  # an unknown template set fails before anything runs, not after training (config holds no vocab code)
        get_templates(cfg.eval.templates)
    except ValueError as err:
        raise ConfigError(f"eval: {err}") from None
    if not cfg.data.captions_json or not cfg.data.image_root:
        raise ValueError("pretrain needs data.captions_json (a COCO captions json) and data.image_root (the folder "
                         "its file_name entries are in); set them in the config or with --set")
    check_run_dir(cfg.output_dir, cfg, resume=resume, overwrite=overwrite)  # a refusal comes first
    torch.manual_seed(cfg.loop.seed)  # the random initialisation is part of the recipe
    model = create_backbone(cfg.model)
    size = cfg.data.image_size or model.native_image_size
    # The data is read before the run directory exists: a bad captions file or a missing image leaves nothing.
    dataset = CaptionDataset(
        cfg.data.captions_json, cfg.data.image_root, size, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
        mean=model.image_mean, std=model.image_std, skip_bad_images=cfg.data.skip_bad_images, seed=cfg.loop.seed,
    )
    confusion: dict[str, Any] = {}

    def evaluate(m: Any) -> dict[str, float]:
        result = zero_shot_eval(m, cfg, size)
        confusion.update(result["confusion"])
        return result["metrics"]

    with run_directory(cfg.output_dir, cfg, cpu=cfg.loop.cpu, resume=resume, overwrite=overwrite) as run_dir:
        trainer = Trainer(
            model=model,
            objective=ContrastiveObjective(),
            dataset=dataset,
            collate_fn=CaptionCollator(model.tokenizer),
            loop=cfg.loop,
            optim=cfg.optim,
            run_dir=run_dir,
            evaluate=evaluate if cfg.eval.panoptic_json else None,
            export_state=lambda m: m.state_dict_for_export(),
            on_step=lambda step, m: ContrastiveObjective.clamp_logit_scale(m),
        )
        result = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    if confusion and trainer.accelerator.is_main_process:
        from densevlm.viz.figures import plot_confusion
        from densevlm.vocab import get_vocabulary

        vocab = get_vocabulary(cfg.eval.vocabulary or cfg.eval.panoptic_json)
        for kind, cm in confusion.items():
            plot_confusion(cm, vocab, kind, run_dir / "figures" / f"zero_shot_confusion_{kind}.png")
    return result
