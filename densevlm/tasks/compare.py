"""``densevlm compare``: base, CLIPSelf, DenseVLM and DeCLIP students under one protocol, over N training seeds.

Same world, same base student, same training images, same evaluators (the base student is also scored on
DeCLIP's dense path untrained, column ``base-<mode>``, to separate what the path does from what training does): region classification (the six keys, seen
and novel), dense-CLIP segmentation (mIoU over all, seen, novel classes), and with ``with_detection`` the toy
detector's AP50-novel where detectron2 is installed. Talk2DINO is a column of the segmentation table, on the base
student's frozen backbone. The stages are the demo's (``tasks/demo.py``), reused on a re-run when finished with the
same config; seed ``k`` trains every method with ``loop.seed + k``. Writes ``compare.json``, ``compare.md`` and
``figures/compare.png`` under ``output_dir``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from densevlm.config import ConfigError, to_dict
from densevlm.config.compare import CompareConfig
from densevlm.utils.io import atomic_write_json, atomic_write_text

TUNED = ("clipself", "densevlm", "declip")
SEMSEG_KEYS = ("mIoU", "mIoU.seen", "mIoU.novel")
DETECTION_KEYS = ("AP50-novel", "AP50-base")
NEEDS = {  # what each method needs, for the README and the JSON
    "clipself": {"teacher": "frozen copy of the student", "vfm": None, "crops": True, "teacher_cache": False},
    "densevlm": {"teacher": "a stronger P-VLM + its text embeddings", "vfm": None, "crops": False,
                 "teacher_cache": True},
    "declip": {"teacher": "frozen copy of the student", "vfm": "DINOv2 (toy: toy-teacher's image tower)",
               "crops": True, "teacher_cache": False},
}


def stage_configs(cfg: CompareConfig, world: Path, specs: dict[str, Any], k: int) -> dict[str, Any]:
    """The three tuning stages of seed ``k`` (the demo's CLIPSelf and DenseVLM stages, and DeCLIP's)."""
    from densevlm.tasks.demo import align_configs
    from densevlm.tasks.demo_seeds import seed_config

    scfg = seed_config(cfg, k)
    clip, dense = align_configs(scfg, world, specs)
    declip = copy.deepcopy(cfg.declip)
    declip.output_dir = str(Path(scfg.output_dir) / "declip")
    declip.student = copy.deepcopy(specs["student"])
    declip.student.dense_last_block = declip.declip.mode
    declip.data.source.kind, declip.data.source.path, declip.data.source.split = "toyworld", str(world), "train"
    declip.loop.seed = cfg.declip.loop.seed + k
    return {"clipself": clip, "densevlm": dense, "declip": declip}


def _rows(per_seed: dict[str, list[dict[str, Any]]], fixed: dict[str, dict[str, Any]], keys: list[str]) -> dict:
    from densevlm.tasks.demo_seeds import spread

    rows = {}
    for key in keys:
        row = {m: spread([metrics.get(key) for metrics in per_seed[m]]) for m in per_seed}
        for name, metrics in fixed.items():
            row[name] = spread([metrics.get(key)])
        rows[key] = row
    return rows


def _cell(s: Optional[dict[str, Any]]) -> str:
    if not s or s["mean"] is None:
        return "-"
    return f"{s['mean']:.1f} ± {s['std']:.1f}" if s["std"] is not None else f"{s['mean']:.1f}"


def markdown_table(title: str, rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    lines = [f"**{title}**", "", "| key | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, row in rows.items():
        lines.append(f"| {key} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def ordering(rows: dict[str, dict[str, Any]], key: str) -> list[str]:
    """Columns of ``key`` by mean, best first."""
    row = rows.get(key, {})
    have = [(c, s["mean"]) for c, s in row.items() if s and s.get("mean") is not None]
    return [c for c, _ in sorted(have, key=lambda t: -t[1])]


def plot_compare(tables: dict[str, tuple[dict[str, dict[str, Any]], list[str]]], path: Path, seeds: int) -> Path:
    """One panel per table: a bar per column (mean) with its std, for each key."""
    from densevlm.viz.figures import plt, save_figure

    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 3.8 * len(tables)), squeeze=False)
    for ax, (title, (rows, columns)) in zip(axes[:, 0], tables.items()):
        width = 0.8 / len(columns)
        for j, col in enumerate(columns):
            means = [rows[k].get(col, {}).get("mean") if rows[k].get(col) else None for k in rows]
            stds = [rows[k].get(col, {}).get("std") if rows[k].get(col) else None for k in rows]
            x = np.arange(len(rows)) + (j - (len(columns) - 1) / 2) * width
            ax.bar(x, [m or 0.0 for m in means], width, yerr=[s or 0.0 for s in stds], capsize=2, label=col)
        ax.set_xticks(np.arange(len(rows)), list(rows), fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"base / CLIPSelf / DenseVLM / DeCLIP on toy val, mean ± std over {seeds} training seed(s)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run_compare(cfg: CompareConfig, *, fresh: bool = False, from_scratch: bool = False) -> dict[str, Any]:
    """Train (or reuse) the three tuned students per seed, evaluate all four, and write the table and figure."""
    from densevlm.models import create_backbone, run_dir_spec
    from densevlm.tasks.align import run_align
    from densevlm.tasks.demo import eval_stage, models_stage, semseg_stage, train_stage, world_stage
    from densevlm.tasks.demo_seeds import region_keys

    if cfg.seeds < 1:
        raise ConfigError(f"seeds: expected >= 1, got {cfg.seeds}")
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = world_stage(cfg, fresh)
    specs = models_stage(cfg, from_scratch)
    # The base student as it is, and on DeCLIP's dense path untrained ("base-qq"): what the path alone does.
    path_spec = copy.deepcopy(specs["student"])
    path_spec.dense_last_block = cfg.declip.declip.mode
    base = {"base": specs["student"], f"base-{path_spec.dense_last_block}": path_spec}
    base_model = {name: create_backbone(spec) for name, spec in base.items()}
    fixed_regions = {n: r["metrics"] for n, r in eval_stage(cfg, world, base, base_model, fresh).items()}
    fixed_semseg = {n: r["metrics"] for n, r in semseg_stage(cfg, world, base, base_model, fresh).items()}
    del base_model
    regions: dict[str, list] = {m: [] for m in TUNED}
    semseg: dict[str, list] = {m: [] for m in TUNED}
    detection: dict[str, list] = {m: [] for m in TUNED}
    train_seconds: dict[str, list] = {m: [] for m in TUNED}
    for k in range(cfg.seeds):
        stages = stage_configs(cfg, world, specs, k)
        for m, scfg in stages.items():
            metrics = train_stage(f"[seed {k}] {m}", scfg, run_align, fresh)
            train_seconds[m].append(metrics.get("train_seconds"))
        student_specs = {m: run_dir_spec(stages[m].output_dir) for m in TUNED}
        models = {m: create_backbone(spec) for m, spec in student_specs.items()}
        seed_cfg = copy.deepcopy(cfg)
        seed_cfg.output_dir = str(out / "seeds" / f"seed_{k}")
        for m, r in eval_stage(seed_cfg, world, student_specs, models, fresh).items():
            regions[m].append(r["metrics"])
        for m, r in semseg_stage(seed_cfg, world, student_specs, models, fresh).items():
            semseg[m].append(r["metrics"])
        del models
        if cfg.with_detection:
            from densevlm.tasks.demo_detection import detect_with

            for m in TUNED:
                detection[m].append(detect_with(seed_cfg, m, stages[m].output_dir, world, fresh)["metrics"])
    columns = [*base, *TUNED]
    region_rows = _rows(regions, fixed_regions, region_keys(regions["clipself"][0]))
    fixed_sem = dict(fixed_semseg)
    columns_sem = list(columns)
    if cfg.with_talk2dino:
        from densevlm.tasks.demo_talk2dino import run_talk2dino_demo

        t2d_cfg = copy.deepcopy(cfg)
        t2d_cfg.talk2dino.backbone = cfg.student  # the base student's frozen backbone, as the base column
        t2d = run_talk2dino_demo(t2d_cfg, fresh=fresh)["semseg"]
        fixed_sem["talk2dino"] = next(v for label, v in t2d.items() if label.lower().startswith("talk2dino"))
        columns_sem.append("talk2dino")
    semseg_rows = _rows(semseg, fixed_sem, list(SEMSEG_KEYS))
    tables = {"region classification (mean per-class accuracy, %)": (region_rows, columns),
              "semantic segmentation (mIoU, %)": (semseg_rows, columns_sem)}
    if cfg.with_detection:
        from densevlm.tasks.demo_detection import detect_with

        base_det = detect_with(cfg, "base", cfg.student, world, fresh)["metrics"]
        det_rows = _rows(detection, {"base": base_det}, list(DETECTION_KEYS))
        tables["open-vocabulary detection (AP50, %)"] = (det_rows, ["base", *TUNED])
    figure = plot_compare(tables, out / "figures" / "compare.png", cfg.seeds)
    seconds = round(time.time() - t0, 1)
    md = "\n\n".join(markdown_table(t, rows, cols) for t, (rows, cols) in tables.items())
    md += (f"\n\nmean ± sample std (ddof=1) over {cfg.seeds} training seed(s) (base and Talk2DINO do not depend on "
           f"the seed); {seconds:.0f}s in all.\n")
    summary = {
        "seeds": cfg.seeds, "tables": {t: rows for t, (rows, _) in tables.items()},
        "ordering": {t: {key: ordering(rows, key) for key in rows} for t, (rows, _) in tables.items()},
        "train_seconds": train_seconds, "needs": NEEDS, "figure": str(figure), "seconds": seconds,
        "config": to_dict(cfg),
    }
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", md)
    print("\n" + md)
    print(f"table {out / 'compare.md'}, {out / 'compare.json'}; figure {figure}; compare finished in {seconds:.0f}s")
    return summary
