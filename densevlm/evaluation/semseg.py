"""Open-vocabulary semantic segmentation: mIoU, fwIoU, mACC, pACC and per-class IoU, as detectron2 defines them.

:class:`SemSegEvaluator` has detectron2's ``reset / process / evaluate`` shape and accumulates a confusion matrix
(ignore-label pixels left out); under ``torch.distributed`` (``accelerate launch``) ``evaluate`` sums the matrices
of all processes. :func:`semseg_metrics` turns a matrix into detectron2's ``SemSegEvaluator`` numbers (classes
without ground-truth pixels are left out of every mean, so a false positive of an absent class costs nothing,
unlike mmseg's ``nanmean`` over predicted classes), plus ``mIoU.seen`` / ``mIoU.novel`` when the vocabulary has
novel classes. When detectron2 is installed, :class:`Detectron2SemSegEvaluator` runs its own evaluator on the same
predictions.

:func:`evaluate_semseg` is the driver (a model or a config in, metrics out), one job per step: build
(:func:`prepare_segmenter`: the segmenter registered under ``cfg.segmenter``, its arguments read from the recipe
here), run (:func:`run_semseg` through :func:`~densevlm.evaluation.inference.inference_on_dataset`), report
(:func:`semseg_result`, :mod:`densevlm.evaluation.report`); :func:`format_table` prints one result or several
side by side.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from densevlm.config.core import ConfigError, from_dict, read_yaml, to_dict
from densevlm.config.model import ModelSpec
from densevlm.config.semseg import SemSegEvalConfig
from densevlm.config.talk2dino import Talk2DINOVisionConfig
from densevlm.data.semseg import SemSegDataset, semseg_loader
from densevlm.evaluation.inference import inference_on_dataset
from densevlm.evaluation.report import write_semseg_report
from densevlm.methods.talk2dino import read_projection
from densevlm.models import create_backbone
from densevlm.segmenters import Segmenter, get_segmenter
from densevlm.segmenters.inference import add_background, window_logits
from densevlm.utils.device import resolve_device

logger = logging.getLogger(__name__)

RESULT_FILE = "semseg.json"
SUMMARY_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")
SPLIT_KEYS = ("mIoU.seen", "mIoU.novel")


# ---------------------------------------------------------------------- metrics


def semseg_metrics(confusion: np.ndarray, class_names: Sequence[str],
                   novel: Optional[Sequence[bool]] = None) -> dict[str, float]:
    """detectron2's ``SemSegEvaluator.evaluate`` numbers (percent) from a (C, C) confusion matrix (rows: truth).

    ``mIoU``, ``fwIoU``, ``IoU-<class>``, ``mACC``, ``pACC``, ``ACC-<class>``; a class without ground-truth
    pixels has NaN IoU and accuracy and is left out of the means. With ``novel`` flags (and at least one novel
    class), also ``mIoU.seen`` and ``mIoU.novel``: the mean IoU over the valid classes of each group.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if conf.shape != (n, n):
        raise ValueError(f"confusion matrix: expected ({n}, {n}) for {n} classes, got {conf.shape}")
    tp = np.diag(conf)
    pos_gt = conf.sum(axis=1)
    pos_pred = conf.sum(axis=0)
    acc = np.full(n, np.nan)
    iou = np.full(n, np.nan)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total = pos_gt.sum()
    nan = float("nan")
    res: dict[str, float] = {
        "mIoU": 100 * float(iou[iou_valid].sum() / iou_valid.sum()) if iou_valid.any() else nan,
        "fwIoU": 100 * float((iou[iou_valid] * pos_gt[iou_valid] / total).sum()) if total else nan,
    }
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = 100 * float(iou[i])
    res["mACC"] = 100 * float(acc[acc_valid].sum() / acc_valid.sum()) if acc_valid.any() else nan
    res["pACC"] = 100 * float(tp.sum() / total) if total else nan
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = 100 * float(acc[i])
    if novel is not None and any(novel):
        flags = np.asarray(novel, dtype=bool)
        for key, group in (("mIoU.seen", ~flags), ("mIoU.novel", flags)):
            sel = iou_valid & group
            res[key] = 100 * float(iou[sel].mean()) if sel.any() else nan
    return res


def confusion_update(confusion: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor, ignore_label: int) -> None:
    """Add the (H, W) prediction against the (H, W) ground truth to a (C, C) int64 matrix (rows: truth), in place."""
    n = confusion.shape[0]
    gt = gt.to(pred.device).long().flatten()
    pred = pred.long().flatten()
    keep = gt != ignore_label
    if bool(((gt[keep] < 0) | (gt[keep] >= n)).any()):
        bad = torch.unique(gt[keep][(gt[keep] < 0) | (gt[keep] >= n)])
        raise ValueError(f"ground truth holds value(s) {bad[:10].tolist()} outside the {n} classes and the ignore "
                         f"label {ignore_label}")
    counts = torch.bincount(gt[keep] * n + pred[keep], minlength=n * n)
    confusion += counts.view(n, n).to(confusion.device)


class SemSegEvaluator:
    """Confusion-matrix evaluator with detectron2's ``reset / process / evaluate`` shape.

    ``process(inputs, outputs)``: per image, ``inputs[i]["sem_seg"]`` the (H, W) ground truth (class indices,
    ``ignore_label`` elsewhere) and ``outputs[i]`` either ``{"sem_seg": (C, H, W) logits}`` (argmax taken here,
    as detectron2) or ``{"pred": (H, W) class indices}``. ``evaluate()`` sums the matrices of all processes when
    ``torch.distributed`` is initialised, then returns :func:`semseg_metrics` (identical on every process).
    """

    def __init__(self, class_names: Sequence[str], *, novel: Optional[Sequence[bool]] = None,
                 ignore_label: int = 255) -> None:
        self.class_names = list(class_names)
        self.novel = list(novel) if novel is not None else None
        self.ignore_label = int(ignore_label)
        self.reset()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        self.images = 0
        self.skipped: list[str] = []

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            pred = out["pred"] if "pred" in out else out["sem_seg"].argmax(dim=0)
            gt = torch.as_tensor(np.asarray(inp["sem_seg"]))
            if tuple(pred.shape) != tuple(gt.shape):
                raise ValueError(f"{inp.get('file_name', 'image')}: prediction {tuple(pred.shape)} and ground truth "
                                 f"{tuple(gt.shape)} differ in size")
            if "sem_seg" in out and out["sem_seg"].shape[0] != self.num_classes:
                raise ValueError(f"logits have {out['sem_seg'].shape[0]} classes, the evaluator {self.num_classes}")
            confusion_update(self.confusion, pred, gt, self.ignore_label)
            self.images += 1

    def skip(self, file_name: str) -> None:
        """Count an image left out (``on_bad_sample: skip``)."""
        self.skipped.append(file_name)

    def _synchronize(self) -> tuple[torch.Tensor, int, int]:
        conf, images, skipped = self.confusion, self.images, len(self.skipped)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            packed = torch.cat([conf.flatten(), torch.tensor([images, skipped])])
            if torch.distributed.get_backend() == "nccl":
                packed = packed.cuda()
            torch.distributed.all_reduce(packed)
            packed = packed.cpu()
            conf = packed[:-2].view_as(conf)
            images, skipped = int(packed[-2]), int(packed[-1])
        return conf, images, skipped

    def evaluate(self) -> dict[str, Any]:
        """``metrics`` (percent), ``counts`` (images, skipped, pixels) and the summed ``confusion`` (numpy)."""
        conf, images, skipped = self._synchronize()
        conf_np = conf.numpy()
        metrics = semseg_metrics(conf_np, self.class_names, self.novel)
        counts = {"images": images, "skipped": skipped, "pixels": int(conf_np.sum())}
        return {"metrics": metrics, "counts": counts, "confusion": conf_np}


class Detectron2SemSegEvaluator:
    """detectron2's own ``SemSegEvaluator`` fed with our predictions and our label reader.

    A dataset named after the split and vocabulary is registered in ``DatasetCatalog`` (its records: image and
    label file names) with ``stuff_classes`` and ``ignore_label`` metadata; the ground truth is read by our
    ``read_label`` (through ``sem_seg_loading_fn``, which also sidesteps the NumPy-2 defect of the pure-Python
    detectron2 build, see INTEGRATION.md §8), so label conventions such as ``reduce_zero_label`` apply.
    """

    def __init__(self, name: str, records: Sequence[Mapping[str, str]], class_names: Sequence[str], *,
                 ignore_label: int = 255, reduce_zero_label: bool = False) -> None:
        try:
            from detectron2.data import DatasetCatalog, MetadataCatalog
            from detectron2.evaluation import SemSegEvaluator as D2SemSegEvaluator
        except ImportError as err:  # a RuntimeError, so the CLI prints the message rather than a traceback
            raise RuntimeError(f"metrics_backend: detectron2 is not importable ({err}); install it with "
                               "`make detectron2` or set metrics_backend: densevlm") from None
        from densevlm.data.semseg import read_label

        records = [{"file_name": r["file_name"], "sem_seg_file_name": r["sem_seg_file_name"]} for r in records]
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(stuff_classes=list(class_names), ignore_label=int(ignore_label),
                                      evaluator_type="sem_seg")

        def load(path: str, dtype: Any = int) -> np.ndarray:
            return read_label(path, reduce_zero_label=reduce_zero_label, ignore_label=ignore_label).astype(dtype)

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.evaluator = D2SemSegEvaluator(name, distributed=distributed, sem_seg_loading_fn=load)
        self.reset()

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        self.evaluator.process([{"file_name": i["file_name"]} for i in inputs],
                               [{"sem_seg": o["sem_seg"]} for o in outputs])

    def evaluate(self) -> Optional[dict[str, float]]:
        """detectron2's ``sem_seg`` metrics (None on non-main processes, as detectron2)."""
        res = self.evaluator.evaluate()
        return dict(res["sem_seg"]) if res else None


def detectron2_available() -> bool:
    try:
        import detectron2.evaluation  # noqa: F401
    except ImportError:
        return False
    return True


def compare_metrics(ours: Mapping[str, float], theirs: Mapping[str, float], tol: float = 1e-6) -> list[str]:
    """Keys of detectron2's result whose values differ from ours by more than ``tol`` (NaN equals NaN)."""
    out = []
    for key, value in theirs.items():
        if key not in ours:
            continue  # boundary-IoU keys detectron2 adds when OpenCV is installed
        a, b = float(ours[key]), float(value)
        if not ((math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol):
            out.append(f"{key}: ours {a!r}, detectron2 {b!r}")
    return out


# ---------------------------------------------------------------------- driver


def semseg_vocabularies(cfg: SemSegEvalConfig) -> tuple[Any, Any, Optional[int]]:
    """(vocabulary scored, vocabulary text-embedded, background index or None) of a config.

    With the background rule the class named ``inference.background.name`` gets a constant score instead of a
    text embedding, so it is left out of the text vocabulary.
    """
    from densevlm.vocab.registry import get_vocabulary

    vocabulary = get_vocabulary(cfg.text.vocabulary)
    bg = cfg.inference.background
    if not bg.enabled:
        return vocabulary, vocabulary, None
    hits = [i for i, c in enumerate(vocabulary.classes) if c.name == bg.name]
    if len(hits) != 1:
        raise ConfigError(
            f"inference.background.name: the background rule needs exactly one class named {bg.name!r} in vocabulary "
            f"{vocabulary.name!r} (found {len(hits)}); its first classes are {vocabulary.names[:5]}"
        )
    keep = [i for i in range(len(vocabulary)) if i != hits[0]]
    return vocabulary, vocabulary.subset(keep, name=f"{vocabulary.name}.no_{bg.name}"), hits[0]


def _dense_clip_arguments(model: Any, cfg: SemSegEvalConfig, device: Optional[torch.device]) -> dict[str, Any]:
    """``model``: the one handed in (moved unless ``cfg.device`` is "auto") or ``cfg.model`` built on ``device``."""
    if model is None:
        model = create_backbone(cfg.model)
        model = model.to(device if device is not None else resolve_device(cfg.device))
    elif cfg.device != "auto":
        model = model.to(resolve_device(cfg.device))
    return {"model": model}


def _talk2dino_arguments(model: Any, cfg: SemSegEvalConfig, device: Optional[torch.device]) -> dict[str, Any]:
    """ψ, the backbone spec and the CLIP text model from ``cfg.talk2dino.psi``: a run directory records the
    backbone and the text model (``cfg.talk2dino.vision`` and ``cfg.model`` override them, and are required with
    a bare ψ file); ``model``, when given, is the text model."""
    t = cfg.talk2dino
    if not t.psi:
        raise ConfigError("talk2dino.psi: required with segmenter 'talk2dino' (a `densevlm talk2dino train` run "
                          "directory or a ψ weights file)")
    vision, text_spec = t.vision, cfg.model if (cfg.model.name or cfg.model.pretrained) else None
    run_config = Path(t.psi) / "config.yaml"
    if run_config.is_file():
        recorded = read_yaml(run_config)
        if vision is None:
            vision = from_dict(Talk2DINOVisionConfig, recorded["vision"])
        if text_spec is None and model is None:
            text_spec = from_dict(ModelSpec, recorded["text"])
    if vision is None:
        raise ConfigError(f"talk2dino.vision: required when talk2dino.psi ({t.psi}) is a weights file, not a run "
                          "directory")
    text_model = model
    if text_model is None:
        if text_spec is None:
            raise ConfigError(f"model: the CLIP text model is required when talk2dino.psi ({t.psi}) is a weights "
                              "file, not a run directory")
        text_model = create_backbone(text_spec, device=device or "cpu")
    return {"psi": read_projection(t.psi), "vision": vision, "text_model": text_model, "device": device}


#: segmenter name -> the reader of its arguments from a config (the recipe is read here, not by the segmenter);
#: a registered segmenter without an entry gets ``model`` as dense CLIP does.
SEGMENTER_ARGUMENTS: dict[str, Callable[[Any, SemSegEvalConfig, Optional[torch.device]], dict[str, Any]]] = {
    "dense_clip": _dense_clip_arguments,
    "talk2dino": _talk2dino_arguments,
}


def build_semseg_segmenter(model: Any, cfg: SemSegEvalConfig, text_vocabulary: Any, *,
                           device: Optional[torch.device] = None, progress: bool = True) -> Segmenter:
    """The segmenter registered as ``cfg.segmenter``, built by its ``from_config`` over the text vocabulary.

    ``model``: dense CLIP's backbone or Talk2DINO's text model (None builds the config's); ``device``: where a
    model built here goes (default: ``cfg.device`` resolved).
    """
    cls = get_segmenter(cfg.segmenter)
    arguments = SEGMENTER_ARGUMENTS.get(cfg.segmenter, _dense_clip_arguments)(model, cfg, device)
    return cls.from_config(cfg, text_vocabulary, progress=progress, **arguments)


def prepare_segmenter(model: Any, cfg: SemSegEvalConfig, text_vocabulary: Any, *, segmenter: Any = None,
                      state: Any = None, progress: bool = True) -> Segmenter:
    """The segmenter of an evaluation: ``segmenter`` as handed in (moved unless ``cfg.device`` is "auto") or
    built by :func:`build_semseg_segmenter` on the process's device; checked against the text vocabulary."""
    if segmenter is None:
        device = state.device if (state is not None and cfg.device == "auto") else resolve_device(cfg.device)
        segmenter = build_semseg_segmenter(model, cfg, text_vocabulary, device=device, progress=progress)
    elif cfg.device != "auto":
        segmenter = segmenter.to(resolve_device(cfg.device))
    if segmenter.num_classes != len(text_vocabulary):
        raise ValueError(f"the segmenter scores {segmenter.num_classes} classes, vocabulary {text_vocabulary.name!r} "
                         f"(without background) has {len(text_vocabulary)}")
    return segmenter


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _start_processes(cfg: SemSegEvalConfig) -> Any:
    """accelerate's process state (initialises the process group under ``accelerate launch`` / torchrun)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=cfg.device == "cpu")


class SemSegPredictor:
    """The model step of segmentation: a batch of dataset items in, per item not skipped its logits at the
    label's size (``sem_seg``, background channel inserted) and their argmax (``pred``)."""

    def __init__(self, segmenter: Segmenter, inference: Any, bg_index: Optional[int]) -> None:
        self.segmenter, self.inference, self.bg_index = segmenter, inference, bg_index

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
        inf = self.inference
        good = [item for item in batch if "skipped" not in item]
        logits = window_logits(self.segmenter, [item["image"] for item in good], mode=inf.mode,
                               crop_size=inf.crop_size, stride=inf.stride, batch_size=inf.batch_size)
        outputs = []
        for item, lg in zip(good, logits):
            if self.bg_index is not None:
                lg = add_background(lg, self.bg_index, inf.background.score)
            if tuple(lg.shape[-2:]) != item["label"].shape:
                lg = torch.nn.functional.interpolate(lg[None], size=item["label"].shape, mode="bilinear",
                                                     align_corners=False)[0]
            outputs.append({"sem_seg": lg, "pred": lg.argmax(0)})
        return outputs


class SemSegRunEvaluator:
    """Our :class:`SemSegEvaluator`, optionally detectron2's, and the figure samples, fed by one batch.

    ``process(inputs, outputs)``: ``inputs`` the dataset items of a batch (skipped ones counted as skipped),
    ``outputs`` :class:`SemSegPredictor`'s for the items not skipped. ``reset`` also counts the images known to
    be skipped before the run (``pre_skipped``: missing labels). ``evaluate()`` -> (ours, detectron2's or None).
    """

    def __init__(self, evaluator: SemSegEvaluator, d2: Optional[Detectron2SemSegEvaluator], *,
                 pre_skipped: Sequence[str] = (), figures: int = 0) -> None:
        self.evaluator, self.d2 = evaluator, d2
        self.pre_skipped, self.figures = list(pre_skipped), int(figures)
        self.reset()

    def reset(self) -> None:
        self.evaluator.reset()
        if self.d2 is not None:
            self.d2.reset()
        for file_name in self.pre_skipped:
            self.evaluator.skip(file_name)
        self.figure_samples: list[dict[str, Any]] = []

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        for item in inputs:
            if "skipped" in item:
                self.evaluator.skip(item["file_name"])
        good = [item for item in inputs if "skipped" not in item]
        for item, out in zip(good, outputs):
            pred = out["pred"]
            pair = [{"sem_seg": item["label"], "file_name": item["file_name"]}]
            self.evaluator.process(pair, [{"pred": pred}])
            if self.d2 is not None:
                self.d2.process(pair, [{"sem_seg": out["sem_seg"]}])
            if len(self.figure_samples) < self.figures:
                self.figure_samples.append({"file_name": item["file_name"], "label": item["label"],
                                            "pred": pred.cpu().numpy().astype(np.int32)})

    def evaluate(self) -> tuple[dict[str, Any], Optional[dict[str, float]]]:
        ours = self.evaluator.evaluate()
        return ours, (self.d2.evaluate() if self.d2 is not None else None)


def build_semseg_run(cfg: SemSegEvalConfig, segmenter: Segmenter, vocabulary: Any, *,
                     main: bool) -> tuple[SemSegDataset, SemSegRunEvaluator]:
    """The dataset of ``cfg`` (normalised as the segmenter expects) and the evaluators of the run."""
    inf = cfg.inference
    dataset = SemSegDataset(cfg.data, len(vocabulary), segmenter.image_mean, segmenter.image_std,
                            short_side=inf.short_side, max_long_side=inf.max_long_side)
    class_names = vocabulary.names
    novel = [c.novel for c in vocabulary.classes]
    evaluator = SemSegEvaluator(class_names, novel=novel, ignore_label=cfg.data.ignore_label)
    d2 = None
    backend = cfg.metrics_backend
    if backend == "detectron2" or (backend == "auto" and detectron2_available()):
        records = [{"file_name": str(s.image), "sem_seg_file_name": str(s.label)} for s in dataset.samples]
        name = f"densevlm_semseg_{Path(cfg.data.label_root).name}_{vocabulary.fingerprint[:12]}_{len(records)}"
        d2 = Detectron2SemSegEvaluator(name, records, class_names, ignore_label=cfg.data.ignore_label,
                                       reduce_zero_label=cfg.data.reduce_zero_label)
    # Every process lists the images without a label; one counts them.
    pre_skipped = [str(sample.image) for sample in dataset.missing_labels] if main else []
    run = SemSegRunEvaluator(evaluator, d2, pre_skipped=pre_skipped, figures=cfg.figures if main else 0)
    return dataset, run


def run_semseg(segmenter: Segmenter, dataset: SemSegDataset, run: SemSegRunEvaluator, cfg: SemSegEvalConfig,
               bg_index: Optional[int], *, rank: int, world: int, progress: bool) -> dict[str, Any]:
    """Segment this process's shard (images rank, rank + world, ...) into ``run``; the timing of
    :func:`~densevlm.evaluation.inference.inference_on_dataset`. The segmenter runs in eval mode and every
    module gets its own mode back (a model handed in keeps its own)."""
    inf = cfg.inference
    shard = list(range(rank, len(dataset), world))
    images_per_batch = inf.batch_size if inf.mode == "whole" else max(1, inf.batch_size // 2)
    loader = semseg_loader(dataset, shard, cfg.num_workers, batch_size=images_per_batch)
    modes = {m: m.training for m in segmenter.modules()}
    segmenter.eval()
    try:
        return inference_on_dataset(SemSegPredictor(segmenter, inf, bg_index), loader, run, total=len(shard),
                                    desc="semantic segmentation", progress=progress)
    finally:
        for module, mode in modes.items():
            module.training = mode


def semseg_result(evaluated: Mapping[str, Any], theirs: Optional[Mapping[str, float]], *, segmenter: Segmenter,
                  model: Any, dataset: SemSegDataset, vocabulary: Any, bg_index: Optional[int],
                  timing: Mapping[str, Any], cfg: SemSegEvalConfig, world: int) -> dict[str, Any]:
    """What ``semseg.json`` holds, from our evaluator's results and detectron2's (or None)."""
    metrics = evaluated["metrics"]
    result: dict[str, Any] = {"metrics": metrics, "counts": evaluated["counts"], "metrics_backend": "densevlm"}
    if theirs is not None:
        result["metrics_backend"] = "detectron2"
        result["detectron2"] = theirs
        differ = compare_metrics(metrics, theirs)
        if differ:
            logger.error("detectron2's SemSegEvaluator and ours disagree: %s", "; ".join(differ[:5]))
            result["detectron2_disagreement"] = differ
    conf = evaluated["confusion"]
    result["per_class"] = [
        {"index": i, "name": c.name, "isthing": c.isthing, "novel": c.novel,
         "IoU": metrics[f"IoU-{c.name}"] if not math.isnan(metrics[f"IoU-{c.name}"]) else None,
         "ACC": metrics[f"ACC-{c.name}"] if not math.isnan(metrics[f"ACC-{c.name}"]) else None,
         "gt_pixels": int(conf[i].sum()), "pred_pixels": int(conf[:, i].sum()),
         "background_rule": i == bg_index}
        for i, c in enumerate(vocabulary.classes)
    ]
    model_obj = getattr(segmenter, "model", model)
    result["model"] = {"segmenter": type(segmenter).__name__, "name": getattr(model_obj, "name", None),
                       "weights_id": getattr(model_obj, "weights_id", None),
                       "source": getattr(model_obj, "source", None)}
    result["data"] = {"image_root": cfg.data.image_root, "label_root": cfg.data.label_root,
                      "images": len(dataset), "missing_labels": len(dataset.missing_labels)}
    result["vocabulary"] = {"name": vocabulary.name, "fingerprint": vocabulary.fingerprint,
                            "classes": len(vocabulary), "novel": int(sum(c.novel for c in vocabulary.classes)),
                            "background_index": bg_index}
    result["inference"] = to_dict(cfg.inference)
    seconds = timing["total"]
    result["timing"] = {"seconds": seconds, "data_seconds": timing["data"], "model_seconds": timing["model"],
                        "images_per_s": timing["images"] / seconds if seconds > 0 else None,
                        "processes": world, "device": str(segmenter.device)}
    result["config"] = to_dict(cfg)
    return result


@torch.no_grad()
def evaluate_semseg(model: Any, cfg: SemSegEvalConfig, *, progress: bool = True, segmenter: Any = None,
                    write: bool = True) -> dict[str, Any]:
    """Segment the split of ``cfg`` with a training-free segmenter and score it (detectron2's definitions).

    Args:
        model: a loaded :class:`densevlm.models.DenseCLIP` (kept on its device when ``cfg.device`` is "auto",
            put in eval mode for the run and given back in its mode), or None to build ``cfg.model``.
        cfg: the evaluation config (``cfg.text.vocabulary`` names the classes in label order).
        segmenter: a ready :class:`densevlm.segmenters.Segmenter` over the text vocabulary (``model`` and
            ``cfg.text`` are then unused).
        write: write ``semseg.json``, ``per_class.csv`` and the figures into ``cfg.output_dir`` (main process).

    Under ``accelerate launch`` every process evaluates its shard (images rank, rank + world, ...) and the
    confusion matrices are summed, so every process returns the same metrics.

    Returns ``metrics`` (``mIoU``, ``fwIoU``, ``mACC``, ``pACC``, ``IoU-<class>``, ``ACC-<class>``, and
    ``mIoU.seen`` / ``mIoU.novel`` when the vocabulary has novel classes, all percent), ``per_class`` rows,
    ``counts``, ``model``, ``data``, ``vocabulary``, ``inference``, ``timing`` and ``config``.
    """
    state = _start_processes(cfg)
    rank, world = _distributed()
    main = rank == 0
    vocabulary, text_vocabulary, bg_index = semseg_vocabularies(cfg)
    segmenter = prepare_segmenter(model, cfg, text_vocabulary, segmenter=segmenter, state=state,
                                  progress=progress and main)
    dataset, run = build_semseg_run(cfg, segmenter, vocabulary, main=main)
    timing = run_semseg(segmenter, dataset, run, cfg, bg_index, rank=rank, world=world, progress=progress and main)
    evaluated, theirs = run.evaluate()
    result = semseg_result(evaluated, theirs, segmenter=segmenter, model=model, dataset=dataset,
                           vocabulary=vocabulary, bg_index=bg_index, timing=timing, cfg=cfg, world=world)
    if main and write:
        write_semseg_report(result, Path(cfg.output_dir), RESULT_FILE, figure_samples=run.figure_samples,
                            class_names=vocabulary.names, figures=bool(cfg.figures))
    return result


# ---------------------------------------------------------------------- table


def _fmt(value: Any, width: int) -> str:
    if isinstance(value, (int, float)) and not math.isnan(value):
        return f"{value:>{width}.1f}"
    return f"{'-':>{width}}"


def format_table(results: Mapping[str, Any], *, title: str = "semantic segmentation (%)",
                 per_class_limit: int = 40) -> str:
    """A text table of mIoU (all / seen / novel), fwIoU, mACC, pACC.

    ``results`` is one result (from :func:`evaluate_semseg`) or a mapping of model name -> result, printed side by
    side (base / CLIPSelf / DenseVLM). A single result with at most ``per_class_limit`` classes also lists the
    per-class IoU.
    """
    single = isinstance(results.get("metrics"), Mapping)
    named = {"": results} if single else dict(results)
    keys = [k for k in ("mIoU", *SPLIT_KEYS, "fwIoU", "mACC", "pACC")
            if any(k in r["metrics"] for r in named.values())]
    widths = {name: max(8, len(name) + 2) for name in named}
    label_w = 14
    lines = [title]
    if not single:
        lines.append(" " * label_w + "".join(f"{name:>{widths[name]}}" for name in named))
    for key in keys:
        lines.append(f"{key:<{label_w}}" + "".join(_fmt(r["metrics"].get(key), widths[n]) for n, r in named.items()))
    if single and len(results.get("per_class", [])) <= per_class_limit:
        lines.append("")
        lines.append(f"{'class':<24}{'IoU':>8}{'ACC':>8}  split")
        for row in results["per_class"]:
            split = "novel" if row.get("novel") else "seen"
            lines.append(f"{row['name'][:23]:<24}{_fmt(row['IoU'] if row['IoU'] is not None else float('nan'), 8)}"
                         f"{_fmt(row['ACC'] if row['ACC'] is not None else float('nan'), 8)}  {split}")
    return "\n".join(lines)
