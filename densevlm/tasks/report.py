"""``densevlm report``: a proof-of-concept report of several models on a small labelled set, as one HTML page.

1. the set in both forms (:func:`~densevlm.data.labelled_set.prepare_labelled_set`; a class of the vocabulary
   without any label is a warning listing them);
2. every model scored (:func:`~densevlm.evaluation.poc_report.score_model`): per-class IoU, region accuracy,
   foreground bias, confusion; the focus model first, so the best and worst images are known before the others
   run and only their predictions are kept;
3. the figures and ``index.html`` (with ``report.json``) in ``output_dir``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from densevlm.config.core import to_dict
from densevlm.config.report import ReportConfig, model_label, model_source
from densevlm.data.images import load_rgb
from densevlm.data.labelled_set import LabelledSet, prepare_labelled_set
from densevlm.data.semseg import read_label
from densevlm.evaluation.diagnostics import foreground_bias, format_foreground_bias, plot_foreground_bias
from densevlm.evaluation.poc_report import ModelScores, best_and_worst, most_confused, score_model, summary_row
from densevlm.evaluation.poc_report_page import html_table, plot_grouped_bars, plot_image_rows, write_html
from densevlm.evaluation.report import json_safe
from densevlm.models import create_backbone
from densevlm.models.model_arg import spec_from_model_arg
from densevlm.tasks.report_corrections import corrections_section
from densevlm.utils.device import resolve_device
from densevlm.utils.io import atomic_write_json

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("mIoU", "mIoU.seen", "mIoU.novel", "pACC", "rois.thing.macc1", "maskpool.thing.macc1",
                "maskpool.stuff.macc1")


def _markdown_table_html(markdown: str) -> str:
    """A markdown table (the diagnostics' foreground-bias table) as HTML."""
    lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    header, rows = [c.strip() for c in lines[0]], [[c.strip() for c in line] for line in lines[2:]]
    return html_table(header, rows)


def _score_all(cfg: ReportConfig, labelled: LabelledSet, progress: bool) -> tuple[dict[str, ModelScores],
                                                                                     list[int], list[int]]:
    entries = {model_label(m): model_source(m) for m in cfg.models}
    focus = cfg.focus or list(entries)[-1]
    order = [focus] + [m for m in entries if m != focus]
    device = resolve_device(cfg.device)
    scores: dict[str, ModelScores] = {}
    best: list[int] = []
    worst: list[int] = []
    for label in order:
        t0 = time.time()
        model = create_backbone(spec_from_model_arg(entries[label])).to(device)
        keep = range(len(labelled.stems)) if label == focus else best + worst
        scores[label] = score_model(label, model, labelled, cfg, keep=keep, progress=progress)
        if label == focus:
            best, worst = best_and_worst(scores[label].per_image, cfg.best_worst)
            chosen = set(best + worst)
            scores[label].predictions = {i: p for i, p in scores[label].predictions.items() if i in chosen}
        log.info("report: %s (%s) scored in %.1fs: mIoU %.1f", label, entries[label], time.time() - t0,
                 scores[label].semseg["metrics"]["mIoU"])
    return {label: scores[label] for label in entries}, best, worst


def _image_rows(labelled: LabelledSet, scores: Mapping[str, ModelScores], indices: list[int], kind: str,
                focus: str) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        stem = labelled.stems[i]
        rows.append({"image": np.asarray(load_rgb(labelled.image_root / f"{stem}{labelled.image_suffix}")),
                     "label": read_label(labelled.semantic_root / f"{stem}.png"),
                     "preds": {m: s.predictions[i] for m, s in scores.items()},
                     "title": f"{kind}: {stem} ({focus} mIoU {scores[focus].per_image[i]['mIoU']:.0f})"})
    return rows


def run_report(cfg: ReportConfig, *, progress: bool = False) -> dict[str, Any]:
    """Score ``cfg.models`` on ``cfg.data`` and write ``index.html``, its PNGs and ``report.json`` into
    ``cfg.output_dir``. Returns what ``report.json`` holds."""
    t0 = time.time()
    out = Path(cfg.output_dir)
    figures = out / "figures"
    labelled = prepare_labelled_set(cfg.data, out / "set")
    vocabulary = labelled.vocabulary
    names = vocabulary.names
    scores, best, worst = _score_all(cfg, labelled, progress)
    labels = list(scores)
    focus = cfg.focus or labels[-1]
    warnings = []
    if labelled.unlabelled_classes:
        warnings.append(f"the report set ({len(labelled.stems)} images) has no labels for "
                        f"{len(labelled.unlabelled_classes)} class(es) of the vocabulary: "
                        f"{', '.join(labelled.unlabelled_classes)}; their IoU and accuracy are not defined")
    if not 20 <= len(labelled.stems) <= 200:
        warnings.append(f"the report set has {len(labelled.stems)} images; 20 to 200 is the size this report is "
                        "made for (fewer: per-class numbers are noisy)")

    summary = {m: summary_row(s) for m, s in scores.items()}
    labelled_idx = [i for i, n in enumerate(labelled.class_pixels) if n > 0]
    shown = [names[i] + (" *" if vocabulary.classes[i].novel else "") for i in labelled_idx]
    iou = {m: [s.semseg["per_class"][i]["IoU"] for i in labelled_idx] for m, s in scores.items()}
    region_acc = {m: [s.regions["per_class"][i].get("maskpool.acc1") for i in labelled_idx] for m, s in scores.items()}
    paths: dict[str, Optional[Path]] = {
        "summary": plot_grouped_bars({m: [summary[m][k] for k in SUMMARY_KEYS] for m in labels}, SUMMARY_KEYS,
                                     figures / "summary.png", xlabel="%", title="headline numbers per model"),
        "class_iou": plot_grouped_bars(iou, shown, figures / "class_iou.png", xlabel="IoU (%)",
                                       title="per-class IoU (dense segmentation; * novel)"),
        "region_accuracy": plot_grouped_bars(region_acc, shown, figures / "region_accuracy.png",
                                             xlabel="top-1 accuracy (%)",
                                             title="per-class region accuracy (ground-truth masks, mask pooling)"),
        "foreground_bias": None, "best_worst": None,
    }
    regions_by_model = {m: s.regions for m, s in scores.items()}
    if any(foreground_bias(r) for r in regions_by_model.values()):
        paths["foreground_bias"] = plot_foreground_bias(regions_by_model, figures / "foreground_bias.png")
    if best:
        rows = _image_rows(labelled, scores, best, "best", focus) + _image_rows(labelled, scores, worst, "worst",
                                                                                 focus)
        paths["best_worst"] = plot_image_rows(rows, labels, names, figures / "best_worst.png")
    confused = {m: {"pixels": most_confused(s.pixel_confusion, names, cfg.most_confused),
                    "regions": most_confused(s.region_confusion, names, cfg.most_confused)}
                for m, s in scores.items()}
    corrections = corrections_section(cfg.corrections, scores, vocabulary, figures) if cfg.corrections.file else None

    result = {
        "models": {m: {"model": model_source(e), "name": scores[m].model["name"],
                       "weights_id": scores[m].model["weights_id"], "weights": scores[m].model["source"]}
                   for m, e in zip(labels, cfg.models)},
        "set": {"kind": cfg.data.kind, "images": len(labelled.stems), "classes": len(vocabulary),
                "vocabulary": vocabulary.name, "labelled_pixels": {n: int(p) for n, p in
                                                                   zip(names, labelled.class_pixels)},
                "unlabelled_classes": labelled.unlabelled_classes},
        "summary": summary,
        "per_class": [{"class": names[i], "isthing": vocabulary.classes[i].isthing,
                       "novel": vocabulary.classes[i].novel,
                       **{f"{m}.IoU": scores[m].semseg["per_class"][i]["IoU"] for m in labels},
                       **{f"{m}.region_acc1": scores[m].regions["per_class"][i].get("maskpool.acc1") for m in labels}}
                      for i in range(len(names))],
        "foreground_bias": {m: foreground_bias(r) for m, r in regions_by_model.items()},
        "most_confused": confused,
        "best_images": [labelled.stems[i] for i in best], "worst_images": [labelled.stems[i] for i in worst],
        "focus": focus, "corrections": corrections, "warnings": warnings,
        "figures": {k: str(p.relative_to(out)) for k, p in paths.items() if p is not None},
        "seconds": round(time.time() - t0, 1), "config": to_dict(cfg),
    }
    atomic_write_json(out / "report.json", json_safe(result))
    _write_page(out, result, paths, labels, regions_by_model)
    for w in warnings:
        log.warning("report: %s", w)
    return result


def _img(paths: Mapping[str, Optional[Path]], key: str, out: Path) -> str:
    p = paths.get(key)
    return f"<p><img src='{p.relative_to(out)}' alt='{key}'></p>" if p is not None else ""


def _write_page(out: Path, result: Mapping[str, Any], paths: Mapping[str, Optional[Path]], labels: list[str],
                regions: Mapping[str, Any]) -> None:
    s = result["set"]
    intro = (f"<p>{s['images']} labelled images ({s['kind']}), {s['classes']} classes (vocabulary "
             f"<code>{s['vocabulary']}</code>); models: "
             + ", ".join(f"<b>{m}</b> (<code>{result['models'][m]['model']}</code>)" for m in labels) + "</p>")
    intro += "".join(f"<p class='warn'>warning: {w}</p>" for w in result["warnings"])
    summary_rows = [[k] + [result["summary"][m][k] for m in labels] for k in SUMMARY_KEYS]
    summary_rows += [[k] + [result["summary"][m][k] for m in labels] for k in ("stuff.p_correct", "stuff.p_thing")]
    per_class = [[r["class"] + (" *" if r["novel"] else ""), "thing" if r["isthing"] else "stuff"]
                 + [r[f"{m}.IoU"] for m in labels] + [r[f"{m}.region_acc1"] for m in labels]
                 for r in result["per_class"]]
    sections = [
        ("Summary", html_table(["metric (%; p: mean probability)"] + labels, summary_rows, digits=2)
         + _img(paths, "summary", out)),
        ("Per-class IoU and region accuracy",
         "<p>IoU: dense segmentation of every pixel among all classes. Region accuracy: each ground-truth mask "
         "pooled from the dense features and named among all classes (top-1). * novel.</p>"
         + html_table(["class", "kind"] + [f"IoU {m}" for m in labels] + [f"region acc {m}" for m in labels],
                      per_class)
         + _img(paths, "class_iou", out) + _img(paths, "region_accuracy", out)),
    ]
    if paths.get("foreground_bias") is not None:
        sections.append(("Foreground bias of stuff regions",
                         "<p>Per stuff class: the mean probability of the correct class and of the thing class that "
                         "takes the most of it (softmax of cosine / 0.01 over all classes). DenseVLM's claim: "
                         "separating foreground and background lowers the second.</p>"
                         + _markdown_table_html(format_foreground_bias(regions))
                         + _img(paths, "foreground_bias", out)))
    confused = ""
    for m in labels:
        pairs = result["most_confused"][m]
        confused += (f"<h3>{m}</h3>" + html_table(
            ["truth", "predicted as", "share of truth's pixels (%)"],
            [[p["truth"], p["predicted"], p["share"]] for p in pairs["pixels"]])
            + html_table(["truth", "predicted as", "share of truth's regions (%)"],
                         [[p["truth"], p["predicted"], p["share"]] for p in pairs["regions"]]))
    sections.append(("The classes most confused", confused))
    if paths.get("best_worst") is not None:
        sections.append(("Best and worst images",
                         f"<p>Ranked by the per-image mIoU of <b>{result['focus']}</b>: "
                         f"best {', '.join(result['best_images'])}; worst {', '.join(result['worst_images'])}.</p>"
                         + _img(paths, "best_worst", out)))
    if result["corrections"] is not None:
        sections.append(("Corrected labels and what they changed", result["corrections"]["html"]))
    write_html(out / "index.html", "densevlm proof-of-concept report", sections, intro=intro)
