"""detectron2's ``COCOEvaluator`` with the open-vocabulary split: AP50 over novel and over base classes.

As the OV detection literature computes it (OVR-CNN, ViLD, Detic's OV-COCO evaluation): the detector scores all
classes at once (the generalized setting), COCO's evaluation gives a precision/recall table per class, and
``AP50-novel`` / ``AP50-base`` are the means of the per-class AP at IoU 0.5 (area "all", 100 detections) over the
novel / base classes that have ground truth. ``AP-novel`` / ``AP-base`` do the same for AP at IoU .50:.95.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator

SPLIT_KEYS = ("AP50-novel", "AP50-base", "AP-novel", "AP-base")


def per_class_ap(precision: np.ndarray) -> tuple[list[float], list[float]]:
    """(AP, AP50) per class, in percent, from COCOeval's ``eval["precision"]`` [iou, recall, class, area, maxdet];
    NaN for a class without ground truth (its precisions are -1)."""
    ap, ap50 = [], []
    for k in range(precision.shape[2]):
        for out, p in ((ap, precision[:, :, k, 0, -1]), (ap50, precision[0, :, k, 0, -1])):
            p = p[p > -1]
            out.append(float(np.mean(p) * 100) if p.size else float("nan"))
    return ap, ap50


def split_metrics(ap: Sequence[float], ap50: Sequence[float], novel: Sequence[bool]) -> dict[str, float]:
    """Means over novel and base classes (classes with NaN AP, i.e. no ground truth, are left out)."""

    def mean(values: Sequence[float], pick: bool) -> float:
        kept = [v for v, n in zip(values, novel) if n == pick and not math.isnan(v)]
        return float(np.mean(kept)) if kept else float("nan")

    return {"AP50-novel": mean(ap50, True), "AP50-base": mean(ap50, False),
            "AP-novel": mean(ap, True), "AP-base": mean(ap, False)}


class OVCOCOEvaluator(COCOEvaluator):
    """Boxes only; adds :data:`SPLIT_KEYS` and ``AP50-<class>`` from the metadata's ``novel_classes``.

    detectron2's pure-Python build has no fast COCOeval, so the official pycocotools one is used.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None) -> None:
        super().__init__(dataset_name, tasks=("bbox",), distributed=distributed, output_dir=output_dir,
                         use_fast_impl=False)
        meta = MetadataCatalog.get(dataset_name)
        novel = set(meta.get("novel_classes", []))
        self._novel = [c in novel for c in meta.thing_classes]

    def _derive_coco_results(self, coco_eval: Any, iou_type: str, class_names: Optional[list[str]] = None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if iou_type != "bbox":
            return results
        if coco_eval is None:  # no detection at all: every AP is NaN in COCOEvaluator, so are ours
            results.update({k: float("nan") for k in SPLIT_KEYS})
            return results
        ap, ap50 = per_class_ap(coco_eval.eval["precision"])
        results.update(split_metrics(ap, ap50, self._novel))
        for name, value in zip(class_names or [], ap50):
            results[f"AP50-{name}"] = value
        return results
