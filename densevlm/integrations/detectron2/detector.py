"""``densevlm det train|eval``: the open-vocabulary detector trained and evaluated with detectron2's own machinery.

:func:`detectron2_config` turns a :class:`~densevlm.config.detection.DetectionConfig` into detectron2's config;
:class:`OVTrainer` is detectron2's ``DefaultTrainer`` (data loading, augmentations, LR schedule, hooks, writers,
``DetectionCheckpointer``, ``COCOEvaluator``) with the open-vocabulary evaluator, AdamW, atomic checkpoints and a
progress bar; :func:`run_detection` runs it under detectron2's ``launch`` (one process per GPU).

Outputs in ``output_dir``: ``config.yaml`` (ours) and ``detectron2_config.yaml`` (the resolved detectron2 config),
``model_final.pth`` (+ ``last_checkpoint``), ``det_metrics.json`` (AP, AP50, AP50-novel, AP50-base, per class),
``ap50_per_class.png``, detectron2's ``metrics.json`` / ``log.txt`` and TensorBoard events.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from densevlm.config import to_dict
from densevlm.config.detection import DetectionConfig
from densevlm.engine.run_dir import discard_failed_run, missing_top
from densevlm.integrations.detectron2 import require_detectron2
from densevlm.utils.device import resolve_device

log = logging.getLogger(__name__)

RESULT_FILE = "det_metrics.json"
HEADLINE = ("AP", "AP50", "AP50-novel", "AP50-base")


def register_splits(cfg: DetectionConfig) -> tuple[str, str]:
    """Register the training and test splits of ``cfg.data``; their catalog names."""
    from densevlm.integrations.detectron2.datasets import register_ov_split

    d = cfg.data
    train = register_ov_split(d.kind, d.root, d.train_json, d.train_images, "train", train=True,
                              novel_in_train=d.novel_in_train, limit=d.max_train_images)
    test = register_ov_split(d.kind, d.root, d.val_json, d.val_images, "val", train=False, limit=d.max_val_images)
    return train, test


def _device(cfg: DetectionConfig) -> str:
    # "auto" resolves as everywhere; an explicit device is handed to detectron2 as written.
    return str(resolve_device("auto")) if cfg.device == "auto" else cfg.device


def training_images(train_name: str) -> int:
    """Images the trainer iterates over: detectron2 drops those without a (non-crowd) annotation."""
    from detectron2.data import DatasetCatalog

    return sum(any(not a.get("iscrowd", 0) for a in r["annotations"]) for r in DatasetCatalog.get(train_name))


def detectron2_config(cfg: DetectionConfig, train_name: str, test_name: str, num_train_images: Optional[int] = None):
    """detectron2's ``CfgNode`` for ``cfg`` (frozen); ``num_train_images`` turns epochs into iterations."""
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from densevlm.integrations.detectron2 import add_densevlm_config
    from densevlm.integrations.detectron2.ov_heads import add_ov_detector_config

    c = get_cfg()
    add_densevlm_config(c)
    add_ov_detector_config(c)
    b, h, s, i = cfg.backbone, cfg.head, cfg.solver, cfg.input
    if not b.model:
        raise ValueError("backbone.model: required (a run directory, weights file, local-dir export or zoo name)")
    c.MODEL.DEVICE = _device(cfg)
    c.MODEL.META_ARCHITECTURE = "OpenVocabRCNN"
    c.MODEL.WEIGHTS = cfg.weights
    c.MODEL.MASK_ON = False
    c.MODEL.PIXEL_MEAN, c.MODEL.PIXEL_STD = list(b.pixel_mean), list(b.pixel_std)
    c.INPUT.FORMAT = "RGB"
    c.MODEL.BACKBONE.NAME = "build_densevlm_fpn_backbone"
    c.MODEL.DENSEVLM.MODEL, c.MODEL.DENSEVLM.NAME = b.model, b.name
    c.MODEL.DENSEVLM.OUT_INDICES = list(b.out_indices)
    c.MODEL.DENSEVLM.TOKEN_STRIDE, c.MODEL.DENSEVLM.FROZEN = b.token_stride, b.frozen
    c.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    c.MODEL.FPN.OUT_CHANNELS = h.fpn_channels
    c.MODEL.ANCHOR_GENERATOR.SIZES = [[size] for size in h.anchor_sizes]
    c.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"][: len(h.anchor_sizes)]
    c.MODEL.RPN.BATCH_SIZE_PER_IMAGE = h.rpn_batch_size_per_image
    c.MODEL.RPN.PRE_NMS_TOPK_TRAIN, c.MODEL.RPN.PRE_NMS_TOPK_TEST = h.rpn_pre_nms_topk_train, h.rpn_pre_nms_topk_test
    c.MODEL.RPN.POST_NMS_TOPK_TRAIN = h.rpn_post_nms_topk_train
    c.MODEL.RPN.POST_NMS_TOPK_TEST = h.rpn_post_nms_topk_test
    c.MODEL.ROI_HEADS.NAME = "OpenVocabROIHeads"
    c.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    c.MODEL.ROI_HEADS.NUM_CLASSES = len(MetadataCatalog.get(test_name).thing_classes)
    c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = h.roi_batch_size_per_image
    c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = h.score_thresh_test
    c.MODEL.ROI_HEADS.NMS_THRESH_TEST = h.nms_thresh_test
    c.TEST.DETECTIONS_PER_IMAGE = h.detections_per_image
    c.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    c.MODEL.ROI_BOX_HEAD.NUM_CONV, c.MODEL.ROI_BOX_HEAD.CONV_DIM = h.num_conv, h.conv_dim
    c.MODEL.ROI_BOX_HEAD.NUM_FC, c.MODEL.ROI_BOX_HEAD.FC_DIM = 1, h.fc_dim
    c.MODEL.ROI_BOX_HEAD.NORM = h.norm
    c.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True  # one box per region, whatever class names it later
    c.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    o = c.MODEL.OV_DETECTOR
    o.LEARNED_TEMPERATURE, o.LEARN_BACKGROUND = h.learned_temperature, h.learn_background
    o.VLM_BRANCH, o.VLM_TEMPERATURE, o.ALPHA, o.BETA = h.vlm_branch, h.vlm_temperature, h.alpha, h.beta
    o.TEMPLATES, o.CLASS_EMBEDDINGS = h.templates, h.class_embeddings or ""
    c.INPUT.MIN_SIZE_TRAIN, c.INPUT.MAX_SIZE_TRAIN = (i.train_size,), i.train_size
    c.INPUT.MIN_SIZE_TEST, c.INPUT.MAX_SIZE_TEST = i.test_size, i.test_size
    c.INPUT.RANDOM_FLIP = "horizontal" if i.random_flip else "none"
    c.DATASETS.TRAIN, c.DATASETS.TEST = (train_name,), (test_name,)
    c.DATALOADER.NUM_WORKERS = cfg.num_workers
    per_epoch = (num_train_images or 0) / s.ims_per_batch
    if s.max_iter is not None:
        max_iter = s.max_iter
    elif num_train_images:
        max_iter = max(1, math.ceil(s.epochs * per_epoch))
    else:
        max_iter = 1  # evaluation only: no training schedule
    c.SOLVER.IMS_PER_BATCH = s.ims_per_batch
    c.SOLVER.BASE_LR, c.SOLVER.WEIGHT_DECAY, c.SOLVER.MOMENTUM = s.lr, s.weight_decay, s.momentum
    c.SOLVER.MAX_ITER = max_iter
    c.SOLVER.STEPS = tuple(sorted({round(e * per_epoch) for e in s.lr_decay_epochs if 0 < round(e * per_epoch) < max_iter}))
    c.SOLVER.GAMMA = s.gamma
    c.SOLVER.WARMUP_ITERS = min(s.warmup_iters, max_iter)
    # 0: model_final.pth only (PeriodicCheckpointer always writes it; a period past the end adds nothing)
    c.SOLVER.CHECKPOINT_PERIOD = s.checkpoint_period or max_iter + 1
    c.SOLVER.AMP.ENABLED = s.amp
    c.SOLVER.CLIP_GRADIENTS.ENABLED = s.clip_grad is not None
    if s.clip_grad is not None:
        c.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, c.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "full_model", s.clip_grad
    c.SOLVER.OPTIMIZER = s.optimizer  # read by OVTrainer.build_optimizer
    c.TEST.EVAL_PERIOD = cfg.eval_period
    c.SEED = cfg.seed
    c.OUTPUT_DIR = cfg.output_dir
    if cfg.detectron2:
        c.merge_from_list(list(cfg.detectron2))
    c.freeze()
    return c


def _trainer_class():
    """:class:`OVTrainer`, defined on first use so importing this module never needs detectron2."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultTrainer, HookBase
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
    from detectron2.utils import comm

    from densevlm.integrations.detectron2.evaluation import OVCOCOEvaluator
    from densevlm.utils.io import atomic_path, atomic_write_text

    class AtomicCheckpointer(DetectionCheckpointer):
        """``DetectionCheckpointer`` whose files appear under their names only once complete; loading is strict
        (a checkpoint of another backbone or class list is an error naming the tensors, not a silent skip)."""

        def save(self, name: str, **kwargs: Any) -> None:
            if not self.save_dir or not self.save_to_disk:
                return
            data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()},
                    **kwargs}
            path = Path(self.save_dir) / f"{name}.pth"
            self.logger.info("Saving checkpoint to %s", path)
            with atomic_path(path) as tmp:
                torch.save(data, tmp)
            self.tag_last_checkpoint(path.name)

        def tag_last_checkpoint(self, last_filename_basename: str) -> None:
            atomic_write_text(Path(self.save_dir) / "last_checkpoint", last_filename_basename)

        def _load_file(self, f: str) -> dict[str, Any]:
            if f.endswith(".pth"):  # ours: tensors, numbers and the trainer's state dicts
                return torch.load(f, map_location="cpu", weights_only=False)
            return super()._load_file(f)

        def _load_model(self, checkpoint: Any):
            incompatible = super()._load_model(checkpoint)
            problems = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
            problems += [f"missing {k}" for k in incompatible.missing_keys]
            problems += [f"unexpected {k}" for k in incompatible.unexpected_keys]
            if problems:
                raise ValueError(f"detector checkpoint does not fit this detector (another backbone, text dimension "
                                 f"or class list?): {'; '.join(problems[:6])}"
                                 + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""))
            return incompatible

    class ProgressHook(HookBase):
        """A tqdm bar over the iterations with the total loss (main process only)."""

        def before_train(self) -> None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter, desc="det train",
                             disable=not comm.is_main_process(), dynamic_ncols=True)

        def after_step(self) -> None:
            history = self.trainer.storage.histories().get("total_loss")
            if history is not None:
                self._bar.set_postfix(loss=f"{history.median(20):.3f}", refresh=False)
            self._bar.update(1)

        def after_train(self) -> None:
            self._bar.close()

    class OVTrainer(DefaultTrainer):
        """detectron2's ``DefaultTrainer`` with the open-vocabulary evaluator, AdamW and atomic checkpoints."""

        def build_hooks(self):
            old = self.checkpointer  # DefaultTrainer made a plain DetectionCheckpointer just before this call
            self.checkpointer = AtomicCheckpointer(old.model, old.save_dir, **old.checkpointables)
            return [*super().build_hooks(), ProgressHook()]

        @classmethod
        def build_evaluator(cls, cfg, dataset_name: str, output_folder: Optional[str] = None):
            return OVCOCOEvaluator(dataset_name, distributed=True)

        @classmethod
        def build_optimizer(cls, cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
            params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR,
                                                  weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                                  bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                                                  weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
                                                  # decay would pull the temperature to 1 and the background to 0
                                                  overrides={"log_temperature": {"weight_decay": 0.0},
                                                             "background_embedding": {"weight_decay": 0.0}})
            if cfg.SOLVER.OPTIMIZER == "adamw":
                optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
            else:
                optimizer = torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                                            nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
            if cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model":
                return _full_model_clipping(optimizer, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
            return maybe_add_gradient_clipping(cfg, optimizer)

    OVTrainer.Checkpointer = AtomicCheckpointer
    return OVTrainer


def _full_model_clipping(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.optim.Optimizer:
    """Clip the global gradient norm over every parameter before each step (F-ViT's ``grad_clip``)."""
    base = type(optimizer)

    class FullModelClipped(base):  # type: ignore[misc, valid-type]
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    optimizer.__class__ = FullModelClipped
    return optimizer


def _result_metrics(results: Any, test_name: str) -> dict[str, float]:
    bbox = dict(results.get(test_name, results)).get("bbox", {}) if results else {}
    return {k: float(v) for k, v in bbox.items()}


def _write_outputs(cfg: DetectionConfig, metrics: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    from densevlm.integrations.detectron2.figures import plot_ap50_per_class
    from densevlm.utils.io import atomic_write_json

    out = Path(cfg.output_dir)
    result = {"config": to_dict(cfg), "metrics": metrics, **extra}
    atomic_write_json(out / RESULT_FILE, result)
    plot_ap50_per_class(metrics, extra.get("novel_classes", []), out / "ap50_per_class.png",
                        title=f"{Path(cfg.backbone.model).name or cfg.backbone.model}: AP50 per class")
    return result


def _main(cfg: DetectionConfig, mode: Literal["train", "eval"], resume: bool) -> dict[str, Any]:
    """One process of ``launch``: register the splits, build, train and/or evaluate."""
    from detectron2.utils import comm

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if mode == "eval" and not cfg.weights:  # checked before output_dir is made, so a rerun is not blocked
        raise ValueError("weights: `densevlm det eval` needs a detector checkpoint (e.g. runs/det/model_final.pth)")
    if mode == "eval" and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"weights: detector checkpoint not found: {cfg.weights}")
    train_name, test_name = register_splits(cfg)
    num_images = training_images(train_name) if mode == "train" else None
    d2cfg = detectron2_config(cfg, train_name, test_name, num_images)
    out = Path(cfg.output_dir)
    created = missing_top(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_in(cfg, mode, resume, d2cfg, train_name, test_name, num_images)
    except BaseException:
        # nothing worth keeping yet (no detector checkpoint): remove what this run created, so a rerun just works
        if created is not None and comm.is_main_process() and not any(out.glob("*.pth")):
            discard_failed_run(out, created)
        raise


def _run_in(cfg: DetectionConfig, mode: Literal["train", "eval"], resume: bool, d2cfg: Any, train_name: str,
            test_name: str, num_images: Optional[int]) -> dict[str, Any]:
    """The body of :func:`_main` once ``output_dir`` exists: logs, configs, training and/or evaluation."""
    from detectron2.data import MetadataCatalog
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    from densevlm.config import save_config
    from densevlm.utils.io import atomic_write_text

    out = Path(cfg.output_dir)
    rank = comm.get_rank()
    # what detectron2's default_setup does, with both configs written atomically beside each other
    setup_logger(str(out), distributed_rank=rank, name="fvcore")
    setup_logger(str(out), distributed_rank=rank)
    if comm.is_main_process():
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "detectron2_config.yaml", d2cfg.dump())
    seed_all_rng(cfg.seed + rank)
    trainer_cls = _trainer_class()
    t0 = time.time()
    extra: dict[str, Any] = {"novel_classes": list(MetadataCatalog.get(test_name).novel_classes),
                             "classes": list(MetadataCatalog.get(test_name).thing_classes)}
    if mode == "train":
        trainer = trainer_cls(d2cfg)
        trainer.resume_or_load(resume=resume)
        # DefaultTrainer.train returns the final evaluation only when TEST.EXPECTED_RESULTS is set; its EvalHook
        # keeps it in _last_eval_results either way
        results = trainer.train() or getattr(trainer, "_last_eval_results", None)
        extra.update(train_seconds=round(time.time() - t0, 1), max_iter=d2cfg.SOLVER.MAX_ITER,
                     train_images=num_images, weights=str(Path(cfg.output_dir) / "model_final.pth"))
    else:
        model = trainer_cls.build_model(d2cfg)
        trainer_cls.Checkpointer(model, save_dir=cfg.output_dir).load(cfg.weights, checkpointables=[])
        results = trainer_cls.test(d2cfg, model)
        extra.update(eval_seconds=round(time.time() - t0, 1), weights=cfg.weights)
    if not comm.is_main_process():
        return {}
    return _write_outputs(cfg, _result_metrics(results, test_name), extra)


def run_detection(cfg: DetectionConfig, mode: Literal["train", "eval"] = "train", *,
                  resume: bool = False) -> dict[str, Any]:
    """Train (then evaluate) or evaluate the detector; ``cfg.num_gpus`` processes via detectron2's ``launch``.

    Returns what ``det_metrics.json`` holds (in the main process; ``{}`` when several processes ran it).
    """
    require_detectron2()
    from detectron2.engine import launch

    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if cfg.num_gpus > 1:
        launch(_main, cfg.num_gpus, num_machines=1, machine_rank=0, dist_url="auto", args=(cfg, mode, resume))
        path = Path(cfg.output_dir) / RESULT_FILE
        from densevlm.utils.io import read_json

        return read_json(path) if path.is_file() else {}
    return _main(copy.deepcopy(cfg), mode, resume)


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """Markdown table of :data:`HEADLINE` per row (backbone), in percent."""
    lines = [title] if title else []
    lines.append("| backbone | " + " | ".join(HEADLINE) + " |")
    lines.append("| --- |" + " ---: |" * len(HEADLINE))
    for name, metrics in rows.items():
        cells = [f"{metrics.get(k, float('nan')):.1f}" for k in HEADLINE]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
