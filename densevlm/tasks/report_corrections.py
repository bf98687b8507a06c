"""The report's corrections section: how many of the teacher's labels a reviewer changed, and what that changed
in the tuned model (the run with corrections against the same run without)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Optional

from densevlm.config.report import CorrectionsReportConfig
from densevlm.evaluation.poc_report import ModelScores, summary_row
from densevlm.evaluation.poc_report_page import html_table, plot_grouped_bars
from densevlm.tasks.corrections import FORMAT as CORRECTIONS_FORMAT
from densevlm.utils.io import read_json
from densevlm.vocab.vocabulary import Vocabulary


def _delta(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def corrections_section(cfg: CorrectionsReportConfig, scores: Mapping[str, ModelScores], vocabulary: Vocabulary,
                        figures: Path) -> dict[str, Any]:
    """Counts read from ``cfg.file`` and, when both runs are given, the change of every headline number and of
    each class's IoU and region accuracy (corrected classes first). Returns the numbers and the section's HTML."""
    counts = read_corrections_counts(Path(cfg.file), vocabulary)
    body = (f"<p>Corrections file <code>{html.escape(cfg.file)}</code>: "
            + html.escape(", ".join(f"{k}: {v}" for k, v in counts["totals"].items())) + "</p>")
    if counts["by_class"]:
        body += html_table(["corrected to class", "regions"], sorted(counts["by_class"].items(), key=lambda kv: -kv[1]))
    out: dict[str, Any] = {"file": cfg.file, **counts}
    if cfg.model and cfg.baseline:
        with_, without = scores[cfg.model], scores[cfg.baseline]
        a, b = summary_row(with_), summary_row(without)
        headline = {k: _delta(a[k], b[k]) for k in a}
        corrected = set(counts["by_class"])
        order = sorted(range(len(vocabulary)), key=lambda i: (vocabulary.names[i] not in corrected, i))
        per_class = []
        for i in order:
            iou = _delta(with_.semseg["per_class"][i]["IoU"], without.semseg["per_class"][i]["IoU"])
            acc = _delta(with_.regions["per_class"][i].get("maskpool.acc1"),
                         without.regions["per_class"][i].get("maskpool.acc1"))
            if iou is None and acc is None:
                continue
            per_class.append({"class": vocabulary.names[i], "corrected": vocabulary.names[i] in corrected,
                              "IoU.change": iou, "region_acc1.change": acc})
        out.update({"model": cfg.model, "baseline": cfg.baseline, "headline_change": headline,
                    "per_class_change": per_class})
        body += (f"<p>What they changed: <b>{html.escape(cfg.model)}</b> (tuned with the corrections) minus "
                 f"<b>{html.escape(cfg.baseline)}</b> (the same tuning without), in points.</p>"
                 + html_table(["metric", "change"], [[k, v] for k, v in headline.items()], digits=2)
                 + html_table(["class", "corrected", "IoU change", "region acc change"],
                              [[r["class"], "yes" if r["corrected"] else "", r["IoU.change"],
                                r["region_acc1.change"]] for r in per_class]))
        shown = [r for r in per_class if r["IoU.change"] is not None]
        if shown:
            path = plot_grouped_bars({"IoU change": [r["IoU.change"] for r in shown],
                                      "region acc change": [r["region_acc1.change"] for r in shown]},
                                     [r["class"] + (" (corrected)" if r["corrected"] else "") for r in shown],
                                     figures / "corrections_change.png", xlabel="points",
                                     title=f"{cfg.model} minus {cfg.baseline}", xlim=None)
            body += f"<p><img src='figures/{path.name}' alt='corrections change'></p>"
    out["html"] = body
    return out


def read_corrections_counts(path: Path, vocabulary: Vocabulary) -> dict[str, Any]:
    """How many regions a corrections file relabels, deletes and adds, and its class rules, by kind and by
    target class."""
    data = read_json(path, "corrections file")
    if not isinstance(data, dict) or data.get("format") != CORRECTIONS_FORMAT:
        raise ValueError(f"corrections.file: {path} is not a corrections file of `densevlm labels apply` (format "
                         f"{data.get('format') if isinstance(data, dict) else None!r}, expected "
                         f"{CORRECTIONS_FORMAT!r})")
    outside = sorted({r["class"] for r in data.get("regions", []) + data.get("added", [])
                      if "class" in r and r["class"] not in vocabulary.names})
    if outside:
        raise ValueError(f"corrections.file: {path} corrects regions to {outside}, which the report set's vocabulary "
                         f"{vocabulary.name!r} does not have")
    by_class: dict[str, int] = {}
    for r in data.get("regions", []):
        if r.get("action") == "relabel":
            by_class[r["class"]] = by_class.get(r["class"], 0) + 1
    for a in data.get("added", []):
        by_class[a["class"]] = by_class.get(a["class"], 0) + 1
    rules = data.get("rules") or {}
    totals = {**data.get("summary", {}), **{f"rules.{k}": len(v) for k, v in rules.items()}}
    return {"totals": totals, "by_class": by_class}
