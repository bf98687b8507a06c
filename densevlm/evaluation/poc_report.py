"""The numbers of the proof-of-concept report: every model scored on one small labelled set, pixels and regions.

Per model, with one set of class text embeddings: region classification of the ground-truth segments
(:class:`~densevlm.evaluation.regions.RegionClassificationEvaluator`, boxes and masks; per-class accuracy and
the foreground bias of stuff regions) and dense-CLIP segmentation of the same images
(:class:`~densevlm.evaluation.semseg.SemSegEvaluator`: per-class IoU, detectron2's definitions), plus what the
report needs beyond the evaluations: per-image scores (to find the best and worst images), the confusion
matrices (the classes most confused) and the predictions of chosen images (the overlays).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from densevlm.config.evaluation import PanopticDataConfig
from densevlm.config.report import ReportConfig
from densevlm.config.semseg import SemSegDataConfig
from densevlm.data.labelled_set import LabelledSet
from densevlm.data.panoptic import PanopticRegionDataset
from densevlm.data.semseg import SemSegDataset, semseg_loader
from densevlm.evaluation.inference import inference_on_dataset
from densevlm.evaluation.regions import RegionClassificationEvaluator, run_region_evaluation
from densevlm.evaluation.semseg import SemSegEvaluator, SemSegPredictor, confusion_update
from densevlm.segmenters.dense_clip import DenseCLIPSegmenter
from densevlm.utils.device import module_device
from densevlm.vocab.embeddings import build_text_embeddings
from densevlm.vocab.templates import get_templates


def image_scores(confusion: np.ndarray) -> dict[str, float]:
    """Pixel accuracy and mIoU (percent) of one image's confusion matrix (rows: truth); the mean is over the
    classes present in its truth or its prediction, so a class the image lacks costs nothing unless predicted."""
    conf = np.asarray(confusion, dtype=np.float64)
    tp, gt, pred = np.diag(conf), conf.sum(1), conf.sum(0)
    present = (gt + pred) > 0
    iou = tp[present] / (gt + pred - tp)[present]
    total = gt.sum()
    return {"pACC": 100 * float(tp.sum() / total) if total else float("nan"),
            "mIoU": 100 * float(iou.mean()) if present.any() else float("nan")}


class PerImageSemSeg:
    """A :class:`SemSegEvaluator` that also keeps every image's scores (:func:`image_scores`) and the predictions
    of the images in ``keep`` (dataset indices), with the ``reset / process / evaluate`` shape."""

    def __init__(self, evaluator: SemSegEvaluator, keep: Sequence[int] = ()) -> None:
        self.evaluator, self.keep = evaluator, set(keep)
        self.reset()

    def reset(self) -> None:
        self.evaluator.reset()
        self.per_image: dict[int, dict[str, float]] = {}
        self.predictions: dict[int, np.ndarray] = {}

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        n = self.evaluator.num_classes
        for item, out in zip(inputs, outputs):
            own = torch.zeros(n, n, dtype=torch.long)
            confusion_update(own, out["pred"].cpu(), torch.as_tensor(item["label"]), self.evaluator.ignore_label)
            self.evaluator.confusion += own
            self.evaluator.images += 1
            self.per_image[int(item["index"])] = image_scores(own.numpy())
            if int(item["index"]) in self.keep:
                self.predictions[int(item["index"])] = out["pred"].cpu().numpy().astype(np.int32)

    def evaluate(self) -> dict[str, Any]:
        return self.evaluator.evaluate()


@dataclass
class ModelScores:
    """One model on the set: ``regions`` (the region evaluator's result: ``metrics``, ``per_class``, ...),
    ``semseg`` (``metrics`` and ``per_class`` as ``densevlm eval semseg`` writes them), the pixel and region
    (mask pooling) confusion matrices, per-image scores and the kept predictions."""

    label: str
    model: dict[str, Any]
    regions: dict[str, Any]
    semseg: dict[str, Any]
    pixel_confusion: np.ndarray
    region_confusion: np.ndarray
    per_image: dict[int, dict[str, float]]
    predictions: dict[int, np.ndarray] = field(default_factory=dict)


def semseg_dataset(labelled: LabelledSet, cfg: ReportConfig, mean: Sequence[float],
                   std: Sequence[float]) -> SemSegDataset:
    """The set's images and semantic labels, resized for inference as ``cfg.inference`` says."""
    data = SemSegDataConfig(image_root=str(labelled.image_root), label_root=str(labelled.semantic_root),
                            image_suffix=labelled.image_suffix, label_suffix=".png",
                            split_file=str(labelled.split_file), ignore_label=cfg.data.ignore_label)
    return SemSegDataset(data, len(labelled.vocabulary), mean, std, short_side=cfg.inference.short_side,
                         max_long_side=cfg.inference.max_long_side)


@torch.no_grad()
def score_model(label: str, model: Any, labelled: LabelledSet, cfg: ReportConfig, *,
                keep: Sequence[int] = (), progress: bool = False) -> ModelScores:
    """Region classification and segmentation of ``model`` (a loaded backbone, used where it is) on the set."""
    vocabulary = labelled.vocabulary
    was_training = model.training
    model.eval()
    try:
        text = build_text_embeddings(model, vocabulary, get_templates(cfg.templates), progress=False)
        device = module_device(model)
        region_data = PanopticDataConfig(panoptic_json=str(labelled.panoptic_json),
                                         panoptic_root=str(labelled.panoptic_root),
                                         image_root=str(labelled.image_root), image_size=cfg.image_size)
        dataset = PanopticRegionDataset(region_data, model.patch_size, vocabulary, image_mean=model.image_mean,
                                        image_std=model.image_std)
        regions = RegionClassificationEvaluator(vocabulary, text)
        run_region_evaluation(model, dataset, regions, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              device=device, progress=progress)
        region_result = regions.evaluate()

        segmenter = DenseCLIPSegmenter(model, text, vocabulary.names)
        pixels = semseg_dataset(labelled, cfg, segmenter.image_mean, segmenter.image_std)
        evaluator = PerImageSemSeg(SemSegEvaluator(vocabulary.names, novel=[c.novel for c in vocabulary.classes],
                                                   ignore_label=cfg.data.ignore_label), keep)
        inf = cfg.inference
        loader = semseg_loader(pixels, list(range(len(pixels))), cfg.num_workers,
                               batch_size=inf.batch_size if inf.mode == "whole" else max(1, inf.batch_size // 2))
        inference_on_dataset(SemSegPredictor(segmenter, inf, None), loader, evaluator, total=len(pixels),
                             desc=f"segmentation ({label})", progress=progress)
        evaluated = evaluator.evaluate()
    finally:
        model.train(was_training)
    metrics, conf = evaluated["metrics"], evaluated["confusion"]
    per_class = [{"index": i, "name": c.name, "isthing": c.isthing, "novel": c.novel,
                  "IoU": _finite(metrics[f"IoU-{c.name}"]), "ACC": _finite(metrics[f"ACC-{c.name}"]),
                  "gt_pixels": int(conf[i].sum()), "pred_pixels": int(conf[:, i].sum())}
                 for i, c in enumerate(vocabulary.classes)]
    info = {"name": getattr(model, "name", None), "weights_id": getattr(model, "weights_id", None),
            "source": getattr(model, "source", None)}
    return ModelScores(label=label, model=info, regions=region_result,
                       semseg={"metrics": metrics, "per_class": per_class, "counts": evaluated["counts"]},
                       pixel_confusion=conf, region_confusion=regions.confusion("maskpool"),
                       per_image=evaluator.per_image, predictions=evaluator.predictions)


def _finite(value: float) -> Optional[float]:
    return None if value is None or np.isnan(value) else float(value)


def most_confused(confusion: np.ndarray, names: Sequence[str], top: int) -> list[dict[str, Any]]:
    """The ``top`` (truth, prediction) pairs of different classes with the largest share of the truth's pixels
    (or regions): ``{"truth", "predicted", "count", "share"}`` (share in percent of the truth class's total)."""
    conf = np.asarray(confusion, dtype=np.float64)
    totals = conf.sum(1, keepdims=True)
    share = np.divide(conf, totals, out=np.zeros_like(conf), where=totals > 0)
    np.fill_diagonal(share, -1.0)
    order = np.argsort(-share, axis=None, kind="stable")
    out = []
    for flat in order[:top]:
        t, p = np.unravel_index(flat, conf.shape)
        if share[t, p] <= 0:
            break
        out.append({"truth": names[t], "predicted": names[p], "count": int(conf[t, p]),
                    "share": 100 * float(share[t, p])})
    return out


def best_and_worst(per_image: Mapping[int, Mapping[str, float]], n: int) -> tuple[list[int], list[int]]:
    """Dataset indices of the ``n`` best and ``n`` worst images by mIoU (ties by index; no image in both)."""
    ranked = sorted((i for i, s in per_image.items() if not np.isnan(s["mIoU"])),
                    key=lambda i: (-per_image[i]["mIoU"], i))
    n = min(n, len(ranked) // 2)
    return ranked[:n], ranked[len(ranked) - n:][::-1]


def summary_row(scores: ModelScores) -> dict[str, Optional[float]]:
    """The headline numbers of one model: mIoU (all / seen / novel), pACC, region macc top-1 (things by box and by
    mask, stuff by mask) and the mean p(correct) and p(most-confused thing) of stuff regions (foreground bias)."""
    m, r = scores.semseg["metrics"], scores.regions["metrics"]
    stuff = [row for row in scores.regions["per_class"] if not row["isthing"] and row.get("maskpool.regions")]
    row = {"mIoU": _finite(m["mIoU"]), "mIoU.seen": _finite(m.get("mIoU.seen", float("nan"))),
           "mIoU.novel": _finite(m.get("mIoU.novel", float("nan"))), "pACC": _finite(m["pACC"]),
           "rois.thing.macc1": r.get("rois.thing.macc1"), "maskpool.thing.macc1": r.get("maskpool.thing.macc1"),
           "maskpool.stuff.macc1": r.get("maskpool.stuff.macc1")}
    row["stuff.p_correct"] = float(np.mean([s["maskpool.p_correct"] for s in stuff])) if stuff else None
    row["stuff.p_thing"] = float(np.mean([s["maskpool.p_confused_thing"] for s in stuff])) if stuff else None
    return row
