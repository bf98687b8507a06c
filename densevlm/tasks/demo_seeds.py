"""``densevlm demo --seeds N``: the demo's CLIPSelf vs DenseVLM comparison over N training seeds, timed.

The world, the base student, the teacher and the evaluation are the one-seed demo's; only the two tuning stages
change, N times: seed ``k`` (0..N-1) trains with ``loop.seed`` = the recipe's ``loop.seed`` + k (0..N-1 with the
shipped recipes, seed 0 is the one-seed demo's recipe). Layout under the demo's ``output_dir``:

- ``seeds/seed_<k>/{clipself,densevlm}/``: the tuning runs of seed k; ``seeds/seed_<k>/{eval,semseg}/<method>/``:
  their region classification (the demo's protocol) and dense-CLIP segmentation. Each is reused on a re-run when
  its config (and, for an evaluation, the student's weights) is unchanged, as the one-seed demo's stages are;
- ``eval/{base,teacher}``, ``semseg/{base,teacher}``: base and teacher evaluated once (they do not depend on the
  training seed), the very folders of the one-seed demo, so either command reuses the other's;
- ``seeds.json`` (written atomically): per key, each method's per-seed values, mean and standard deviation, base
  and teacher, the difference and the verdict; ``figures/seeds_spread.png``: the spread per key.

Spread and verdict. ``std`` is the sample standard deviation over seeds (``ddof=1``); with one seed it is not
defined: ``null`` in the JSON, ``-`` in the table, and no verdict is given (``ahead: null``). For every key,
``diff`` = mean(DenseVLM) - mean(CLIPSelf); when ``|diff| <= max(std(CLIPSelf), std(DenseVLM))`` the key is a
``tie`` (the difference is not larger than the seed-to-seed spread), otherwise the method with the higher mean is
``ahead``. Computed on the unrounded values.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from densevlm.config import ConfigError, to_dict
from densevlm.config.demo import DemoConfig
from densevlm.utils.io import atomic_write_json

METHODS = ("clipself", "densevlm")
SEMSEG_KEYS = ("mIoU", "mIoU.seen", "mIoU.novel")
TIE_RULE = ("diff = mean(densevlm) - mean(clipself); tie when |diff| <= max(std(clipself), std(densevlm)), "
            "std = sample standard deviation over seeds (ddof=1); otherwise the higher mean is ahead; "
            "no verdict (null) with one seed")


def seed_dir(cfg: DemoConfig, k: int) -> Path:
    return Path(cfg.output_dir) / "seeds" / f"seed_{k}"


def seed_config(cfg: DemoConfig, k: int) -> DemoConfig:
    """The demo config of seed ``k``: its outputs in ``seeds/seed_<k>``, both tunings at ``loop.seed + k``."""
    s = copy.deepcopy(cfg)
    s.output_dir = str(seed_dir(cfg, k))
    s.clipself.loop.seed = cfg.clipself.loop.seed + k
    s.densevlm.loop.seed = cfg.densevlm.loop.seed + k
    return s


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else None


def spread(values: Sequence[Any]) -> dict[str, Any]:
    """Per-seed values, their mean and sample standard deviation (None with one seed or a missing value)."""
    vals = [_number(v) for v in values]
    if any(v is None for v in vals) or not vals:
        return {"values": vals, "mean": None, "std": None}
    arr = np.asarray(vals, dtype=float)
    return {"values": vals, "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None}


def verdict(clip: dict[str, Any], dense: dict[str, Any]) -> tuple[Optional[float], Optional[str]]:
    """(diff, ahead): DenseVLM's mean minus CLIPSelf's, and "clipself" / "densevlm" / "tie" (None: no spread)."""
    if clip["mean"] is None or dense["mean"] is None:
        return None, None
    diff = dense["mean"] - clip["mean"]
    if clip["std"] is None or dense["std"] is None:
        return diff, None
    if abs(diff) <= max(clip["std"], dense["std"]):
        return diff, "tie"
    return diff, "densevlm" if diff > 0 else "clipself"


def compare(per_seed: dict[str, list[dict[str, Any]]], fixed: dict[str, dict[str, Any]],
            keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per key: each method's spread over seeds, base and teacher (seed-independent), diff and verdict."""
    rows = {}
    for key in keys:
        row: dict[str, Any] = {m: spread([metrics.get(key) for metrics in per_seed[m]]) for m in METHODS}
        for name, metrics in fixed.items():
            row[name] = _number(metrics.get(key))
        row["diff"], row["ahead"] = verdict(row["clipself"], row["densevlm"])
        rows[key] = row
    return rows


def region_keys(metrics: dict[str, Any]) -> list[str]:
    """Every macc key of the demo's region table, in its row order (top-1 before top-5 within a row)."""
    from densevlm.evaluation.regions import metric_rows

    keys = [k for k in metrics if k.rpartition(".")[2].startswith("macc")]
    topk = sorted({int(k.rpartition("macc")[2]) for k in keys})
    return [f"{row}.macc{k}" for row in metric_rows(keys) for k in topk if f"{row}.macc{k}" in metrics]


def _label(key: str) -> str:
    head, _, tail = key.rpartition(".")
    return f"{head} top{tail[4:]}" if tail.startswith("macc") else key


def format_seeds_table(rows: dict[str, dict[str, Any]], title: str) -> str:
    """Mean ± std per method, base and teacher, diff (DenseVLM - CLIPSelf) and the verdict, one row per key."""
    def num(v: Optional[float], w: int) -> str:
        return f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"

    def ms(s: dict[str, Any]) -> str:
        std = f"{s['std']:4.1f}" if s["std"] is not None else f"{'-':>4}"
        return f"{num(s['mean'], 7)} ± {std}" if s["mean"] is not None else f"{'-':>14}"

    label_w = max([len(_label(k)) for k in rows] + [8]) + 2
    lines = [title, " " * label_w + f"{'base':>7}{'clipself':>14}{'densevlm':>14}{'teacher':>9}{'diff':>7}  ahead"]
    for key, r in rows.items():
        diff = f"{r['diff']:>+7.1f}" if r["diff"] is not None else f"{'-':>7}"
        lines.append(f"{_label(key):<{label_w}}{num(r.get('base'), 7)}{ms(r['clipself'])}{ms(r['densevlm'])}"
                     f"{num(r.get('teacher'), 9)}{diff}  {r['ahead'] or '-'}")
    return "\n".join(lines)


def plot_seeds(regions: dict[str, dict[str, Any]], semseg: dict[str, dict[str, Any]], n: int, path: Path) -> Path:
    """One figure of the spread: per key, each seed's value as a dot and mean ± std as a bar, the two methods side
    by side; panels for region top-1, region top-5 and segmentation. The verdict is under each key."""
    from densevlm.viz.figures import plt, save_figure

    panels = []
    for k in sorted({key.rpartition("macc")[2] for key in regions}, key=int):
        panels.append((f"region classification, top-{k} (mean per-class accuracy, %)",
                       {key: r for key, r in regions.items() if key.endswith(f".macc{k}")}))
    panels.append(("semantic segmentation (%)", semseg))
    widths = [max(len(p[1]), 3) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.9 * max(widths) + 1.5), 3.3 * len(panels)),
                             squeeze=False)
    colours = {"clipself": "tab:blue", "densevlm": "tab:orange"}
    jitter = np.linspace(-0.06, 0.06, n) if n > 1 else np.zeros(1)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        for i, (key, r) in enumerate(rows.items()):
            for j, method in enumerate(METHODS):
                x = i + (j - 0.5) * 0.38
                s = r[method]
                vals = [v for v in s["values"] if v is not None]
                ax.scatter(x + jitter[:len(vals)], vals, s=14, color=colours[method], alpha=0.75, zorder=3,
                           label=f"{method} (one dot per seed)" if i == 0 else None)
                if s["mean"] is not None:
                    ax.errorbar(x + 0.13, s["mean"], yerr=s["std"] or 0.0, fmt="_", markersize=12, capsize=4,
                                color=colours[method], elinewidth=2, zorder=4,
                                label=f"{method} mean ± std" if i == 0 else None)
        ticks = [_label(k).replace(".", "\n", 1).replace(" top", "\ntop") + f"\n{r['ahead'] or '-'}"
                 for k, r in rows.items()]
        ax.set_xticks(range(len(rows)), ticks, fontsize=7)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"CLIPSelf vs DenseVLM over {n} training seed{'s' if n != 1 else ''} (under each key: who is "
                 "ahead; tie when |diff| <= max std)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _training(metrics: dict[str, Any], run_dir: str, seed: int, weights_id: str) -> dict[str, Any]:
    return {"run_dir": run_dir, "seed": seed, "weights_id": weights_id, "steps": metrics.get("global_step"),
            "seconds": metrics.get("train_seconds"), **metrics["history"][-1].get("train", {})}


def run_seeds_demo(cfg: DemoConfig, seeds: int, *, fresh: bool = False, from_scratch: bool = False) -> dict[str, Any]:
    """Tune CLIPSelf and DenseVLM with ``seeds`` training seeds, evaluate each, and compare mean ± std.

    A key is a tie when ``|mean(DenseVLM) - mean(CLIPSelf)| <= max(std(CLIPSelf), std(DenseVLM))`` (sample std over
    seeds, ddof=1); with one seed std is undefined (None) and no verdict is given. See the module docstring for the
    layout; returns what ``seeds.json`` holds.
    """
    from densevlm.tasks.demo import align_configs, eval_stage, models_stage, semseg_stage, train_stage, world_stage
    from densevlm.tasks.align import run_align
    from densevlm.models import create_backbone, run_dir_spec

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: expected a number of training seeds >= 1, got {seeds!r}")
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = world_stage(cfg, fresh)
    specs = models_stage(cfg, from_scratch)
    fixed_specs = {"base": specs["student"], "teacher": specs["teacher"]}
    fixed_models = {name: create_backbone(spec) for name, spec in fixed_specs.items()}
    # Base and teacher do not depend on the training seed: evaluated once, in the one-seed demo's folders.
    fixed_regions = eval_stage(cfg, world, fixed_specs, fixed_models, fresh)
    fixed_semseg = semseg_stage(cfg, world, fixed_specs, fixed_models, fresh)
    del fixed_models

    regions: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    semseg: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    runs: dict[str, dict[str, Any]] = {}
    for k in range(seeds):
        scfg = seed_config(cfg, k)
        clip_cfg, dense_cfg = align_configs(scfg, world, specs)
        print(f"[seed {k + 1}/{seeds}] loop.seed: CLIPSelf {clip_cfg.loop.seed}, DenseVLM {dense_cfg.loop.seed} "
              f"-> {scfg.output_dir}")
        trained = {"clipself": train_stage(f"[3] CLIPSelf (student, seed {k})", clip_cfg, run_align, fresh),
                   "densevlm": train_stage(f"[4] DenseVLM (student, seed {k})", dense_cfg, run_align, fresh)}
        stage_cfgs = {"clipself": clip_cfg, "densevlm": dense_cfg}
        student_specs = {m: run_dir_spec(stage_cfgs[m].output_dir) for m in METHODS}
        models = {m: create_backbone(spec) for m, spec in student_specs.items()}
        r = eval_stage(scfg, world, student_specs, models, fresh)
        s = semseg_stage(scfg, world, student_specs, models, fresh)
        for m in METHODS:
            regions[m].append(r[m]["metrics"])
            semseg[m].append(s[m]["metrics"])
        runs[f"seed_{k}"] = {m: _training(trained[m], stage_cfgs[m].output_dir, stage_cfgs[m].loop.seed,
                                          models[m].weights_id) for m in METHODS}
        del models

    region_rows = compare(regions, {n: r["metrics"] for n, r in fixed_regions.items()},
                          region_keys(regions["clipself"][0]))
    semseg_rows = compare(semseg, {n: r["metrics"] for n, r in fixed_semseg.items()}, SEMSEG_KEYS)
    figure = plot_seeds(region_rows, semseg_rows, seeds, out / "figures" / "seeds_spread.png")
    seconds = round(time.time() - t0, 1)
    summary = {
        "seeds": seeds,
        "training_seeds": {m: [runs[f"seed_{k}"][m]["seed"] for k in range(seeds)] for m in METHODS},
        "std": "sample standard deviation over seeds (ddof=1); null with one seed",
        "tie_rule": TIE_RULE,
        "regions": region_rows,
        "semseg": semseg_rows,
        "runs": runs,
        "fixed": {name: {"spec": to_dict(spec), "regions": str(Path(cfg.output_dir) / "eval" / name),
                         "semseg": str(Path(cfg.output_dir) / "semseg" / name)} for name, spec in fixed_specs.items()},
        "figure": str(figure),
        "seconds": seconds,
    }
    atomic_write_json(out / "seeds.json", summary)
    spread_note = "mean ± sample std" if seeds > 1 else "one seed: std not defined, no verdict"
    print("\n[5] " + format_seeds_table(
        region_rows, title=f"region classification on toy val over {seeds} training seed{'s' if seeds > 1 else ''} "
        f"(mean per-class accuracy, %; {spread_note}; base and teacher do not depend on the seed; "
        "diff = DenseVLM - CLIPSelf; tie when |diff| <= max std)"))
    print("\n[6] " + format_seeds_table(
        semseg_rows, title=f"semantic segmentation on toy val over {seeds} training seed{'s' if seeds > 1 else ''} "
        f"(dense CLIP, %; {spread_note})"))
    print(f"\nper-seed runs in {out / 'seeds'}/seed_*/; summary {out / 'seeds.json'}; figure {figure}")
    print(f"seeds demo ({seeds} seed{'s' if seeds > 1 else ''}) finished in {seconds:.0f}s")
    return summary
