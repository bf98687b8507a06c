"""The one report writer of the evaluations: result JSON, per-class tables (CSV / markdown) and figures.

Region classification writes ``regions.json`` and, with diagnostics, its per-class table and foreground-bias
figure; semantic segmentation writes ``semseg.json`` (NaN as null), ``per_class.csv`` and, with figures, the
overlays and per-class IoU bars. The printed text tables are each evaluation's ``format_table``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from densevlm.utils.io import atomic_write_json, atomic_write_text

# The figure and diagnostics modules are imported when a report asks for them: they pull in matplotlib.


def json_safe(obj: Any) -> Any:
    """NaN (a class without ground truth) as null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_result_json(path: Path, result: Mapping[str, Any], *, nan_as_null: bool = False) -> None:
    """``result`` as JSON at ``path`` (atomically); ``nan_as_null`` writes NaN as null (:func:`json_safe`)."""
    atomic_write_json(path, json_safe(result) if nan_as_null else result)


def write_region_report(result: Mapping[str, Any], out_dir: Path, file_name: str, *, diagnostics: bool) -> None:
    """``regions.json`` and, with ``diagnostics``, the per-class table and the foreground-bias figure."""
    write_result_json(out_dir / file_name, result)
    if diagnostics:
        from densevlm.evaluation.diagnostics import write_diagnostics

        write_diagnostics(result, out_dir)


def write_semseg_report(result: Mapping[str, Any], out_dir: Path, file_name: str, *,
                        figure_samples: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                        figures: bool) -> None:
    """``semseg.json`` (NaN as null) and, with ``figures``, the overlays of ``figure_samples`` (file name, label,
    prediction) and the per-class figure and CSV; without, ``per_class.csv`` only."""
    write_result_json(out_dir / file_name, result, nan_as_null=True)
    if figures:
        from densevlm.data.images import load_rgb
        from densevlm.evaluation.semseg_figures import write_semseg_figures

        samples = [{"image": np.asarray(load_rgb(s["file_name"])), "label": s["label"], "pred": s["pred"],
                    "name": Path(s["file_name"]).name} for s in figure_samples]
        write_semseg_figures(result, samples, class_names, out_dir)
    else:
        from densevlm.evaluation.semseg_figures import per_class_csv

        atomic_write_text(out_dir / "per_class.csv", per_class_csv(result))
