"""``densevlm zoo build``: re-make the zoo from its recipes (world, two pre-trainings, the teacher's CLIPSelf).

Every stage is the library call behind an ordinary ``densevlm`` command (``generate_world``, ``run_pretrain``,
``run_align``, ``evaluate_regions``) on a recipe in ``configs/``; the build runs them in order (the two
pre-trainings side by side in two processes with ``parallel``), evaluates the results with the reference region
protocol, and, with ``publish_dir``, writes the fp16 zoo files and their manifest there. The shipped zoo is
never written unless it is named explicitly. The manifest records each model's stages as ``densevlm`` command
lines a user can re-run from a checkout.

The recipes stay in the repository's ``configs/`` (README and the recorded commands name them there; a copy
inside the package would be a second source of truth). They are found next to the package in a checkout, or in
``recipes_dir`` (a folder holding ``configs/``'s layout) when the package is installed without them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from densevlm.config import ConfigError, load_config
from densevlm.config.align import AlignConfig
from densevlm.config.evaluation import RegionEvalConfig
from densevlm.config.pretrain import PretrainConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.tasks.align import run_align
from densevlm.tasks.pretrain import run_pretrain
from densevlm.evaluation.regions import evaluate_regions
from densevlm.tasks.zoo_quality import subset_quality
from densevlm.toyworld import generate_world
from densevlm.utils.io import atomic_write_json, read_json
from densevlm.zoo.publish import check_publish, publish

REPO_ROOT = Path(__file__).resolve().parents[2]

WORLD_RECIPE = "configs/toyworld/zoo.yaml"
EVAL_RECIPE = "configs/eval/regions_toy_zoo.yaml"


@dataclass(frozen=True)
class ZooModelRecipe:
    name: str
    architecture: str
    command: str  # "pretrain" or "train"
    recipe: str
    role: str
    base: Optional[str] = None  # zoo entry this one is tuned from (and ships a delta over)
    only_prefix: Optional[str] = None


RECIPES = (
    ZooModelRecipe("toy-student", "ToyCLIP-ViT-S-16", "pretrain", "configs/pretrain/zoo_student.yaml",
                   "student-size base CLIP (as EVA02-B/16 in the paper)"),
    ZooModelRecipe("toy-teacher", "ToyCLIP-ViT-B-12", "pretrain", "configs/pretrain/zoo_teacher.yaml",
                   "teacher-size base CLIP (as EVA02-L/14-336 in the paper)"),
    ZooModelRecipe("toy-teacher-clipself", "ToyCLIP-ViT-B-12", "train", "configs/train/clipself_zoo_teacher.yaml",
                   "CLIPSelf-tuned teacher-size CLIP: DenseVLM's teacher (the paper's P-VLM); ships its vision "
                   "tower, the text tower is toy-teacher's", base="toy-teacher", only_prefix="visual."),
)


def _paths(root: Path) -> dict[str, str]:
    world = root / "toyworld_zoo"
    return {
        "world": str(world),
        "captions": str(world / "annotations" / "captions_train.json"),
        "train_images": str(world / "images" / "train"),
        "panoptic_val": str(world / "annotations" / "panoptic_val.json"),
        "val_images": str(world / "images" / "val"),
    }


def _stage_overrides(recipe: ZooModelRecipe, root: Path, runs: dict[str, Path], workers: int,
                     extra: list[str]) -> list[str]:
    p = _paths(root)
    out = [f"output_dir={runs[recipe.name]}", f"loop.num_workers={workers}"]
    if recipe.command == "pretrain":
        out += [f"data.captions_json={p['captions']}", f"data.image_root={p['train_images']}",
                f"eval.panoptic_json={p['panoptic_val']}", f"eval.image_root={p['val_images']}",
                f"eval.vocabulary={p['world']}"]
    else:
        out += [f"student.pretrained={runs[recipe.base]}", f"data.source.path={p['world']}",
                f"eval.data.panoptic_json={p['panoptic_val']}", f"eval.data.image_root={p['val_images']}",
                f"eval.text.vocabulary={p['world']}"]
    return out + extra


def recipe_path(recipe: str, recipes_dir: Optional[str | Path] = None) -> Path:
    """The file of ``recipe`` (a path like ``configs/pretrain/zoo_student.yaml``), or a ConfigError naming it."""
    base = Path(recipes_dir) if recipes_dir is not None else REPO_ROOT / "configs"
    path = base / Path(recipe).relative_to("configs")
    if not path.is_file():
        raise ConfigError(
            f"zoo build: recipe {recipe} not found (looked for {path}). The zoo's recipes live in the repository's "
            "configs/ folder, which an installed package does not ship: run from a checkout of densevlm or pass "
            "recipes_dir=<a copy of configs/>")
    return path


#: the library call behind each ``densevlm`` command a stage runs: (config class, job)
JOBS: dict[str, tuple[type, Callable[..., Any]]] = {
    "pretrain": (PretrainConfig, lambda cfg: run_pretrain(cfg, overwrite=True)),
    "train": (AlignConfig, lambda cfg: run_align(cfg, overwrite=True)),
}


def _run_job(command: str, recipe_file: Path, overrides: list[str]) -> None:
    cls, job = JOBS[command]
    job(load_config(cls, recipe_file, overrides))


def _stage(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one stage in this process; any failure (a bad override too) names the stage, as a failed command did."""
    try:
        return fn(*args)
    except Exception as err:
        raise RuntimeError(f"zoo build stage failed: {name} ({type(err).__name__}: {err})") from err


def _job_process(command: str, recipe_file: str, overrides: list[str], log_file: str) -> None:
    """A pre-training in a process of its own, its output (Python's and native) in ``log_file``."""
    with open(log_file, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=log)
        logging.getLogger("densevlm").setLevel(logging.INFO)
        try:
            _run_job(command, Path(recipe_file), overrides)
        except ConfigError as err:
            print(f"densevlm {command}: config error: {err}", file=log)
            sys.exit(2)
        except BaseException:
            traceback.print_exc(file=log)
            sys.exit(1)


def _run_side_by_side(jobs: dict[str, tuple[str, Path, list[str]]], logs: dict[str, Path]) -> None:
    """Run ``{name: (command, recipe file, overrides)}`` in parallel processes (spawned: the parent holds
    torch's thread pools, which a fork would copy half-made); raise naming every one that failed."""
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    for name, (command, recipe_file, overrides) in jobs.items():
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        procs[name] = ctx.Process(target=_job_process, args=(command, str(recipe_file), overrides, str(logs[name])),
                                  name=f"zoo build {name}")
        procs[name].start()
    failed = []
    for name, proc in procs.items():
        proc.join()
        if proc.exitcode != 0:
            failed.append(f"{name} (exit {proc.exitcode}, log {logs[name]})")
    if failed:
        raise RuntimeError("zoo build stage failed: " + ", ".join(failed))


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}, {torch.get_num_threads()} CPU threads"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def provenance(recipe: ZooModelRecipe, metrics: dict[str, Any], regions: dict[str, float], hardware: str,
               command: str, world_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest's record of how a zoo model was made and how good it is.

    ``metrics`` is the run's ``metrics.json`` (its training time, final zero-shot numbers and per-epoch history,
    which becomes the learning curve); ``regions`` the region-classification metrics at the demo's resolution.
    """
    zero_shot = {k: v for k, v in metrics.get("final", {}).items() if k.startswith("zeroshot.")}
    curve = [{"epoch": h["epoch"], "step": h["step"], "loss": h.get("train", {}).get("loss"),
              **{k: v for k, v in h.get("eval", {}).items() if k.startswith("zeroshot.") or k.endswith("macc1")}}
             for h in metrics.get("history", [])]
    return {
        "recipe": recipe.recipe,
        "world": WORLD_RECIPE,
        "world_overrides": list(world_overrides),
        "steps": metrics.get("global_step"),
        "epochs": len(metrics.get("history", [])),
        "wall_seconds": round(metrics["train_seconds"], 1),
        "hardware": hardware,
        "metrics": {**zero_shot, **{f"regions.{k}": v for k, v in regions.items()}},
        "curve": curve,
        "command": command,
        "rebuild": "densevlm zoo build",
    }


def build_zoo(
    root: str | Path = "runs/zoo_build",
    *,
    workers: int = 2,
    world_workers: Optional[int] = None,
    parallel: bool = False,
    publish_dir: Optional[str | Path] = None,
    overwrite: bool = False,
    world_overrides: tuple[str, ...] = (),
    stage_overrides: Optional[dict[str, list[str]]] = None,
    recipes_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Run the zoo recipes into ``root``; returns {zoo name: {"run_dir": ..., "info": provenance(...)}}.

    ``world_overrides`` / ``stage_overrides`` change recipe values (tests use them for a tiny build); a zoo
    published from an overridden build records the overrides in its commands. ``recipes_dir``: where the
    recipes are when the package is not a checkout (see :func:`recipe_path`). With ``parallel`` the two
    pre-trainings run in spawned processes, each writing ``<root>/<name>.log``; a script that calls this must
    do so under ``if __name__ == "__main__":``, as any spawning program (the ``densevlm`` command does).
    """
    root = Path(root).resolve()
    # What would fail hours later is refused now: a root that is a file, and a publish the manifest refuses.
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"zoo build root {root}: exists and is not a folder")
    if publish_dir is not None:
        check_publish([r.name for r in RECIPES], Path(publish_dir), overwrite)
    stage_overrides = stage_overrides or {}
    runs = {r.name: root / r.name for r in RECIPES}
    commands: dict[str, list[str]] = {}
    files = {r.recipe: recipe_path(r.recipe, recipes_dir) for r in RECIPES}
    files.update({rec: recipe_path(rec, recipes_dir) for rec in (WORLD_RECIPE, EVAL_RECIPE)})
    p = _paths(root)

    world_ov = [f"workers={world_workers or workers}", *world_overrides]
    print(f"$ densevlm toyworld --config {WORLD_RECIPE} --out {p['world']} --overwrite --set {' '.join(world_ov)}",
          flush=True)
    _stage("world", lambda: generate_world(load_config(ToyWorldConfig, files[WORLD_RECIPE], world_ov), p["world"],
                                           overwrite=True))

    def stage(recipe: ZooModelRecipe) -> list[str]:
        """The stage's overrides; records (and prints) the command line that re-runs it."""
        ov = _stage_overrides(recipe, root, runs, workers, stage_overrides.get(recipe.name, []))
        line = " ".join(["densevlm", recipe.command, "--config", recipe.recipe, "--overwrite", "--set", *ov])
        commands[recipe.name] = [f"densevlm toyworld --config {WORLD_RECIPE} --out {p['world']}"
                                 + "".join(f" {o}" for o in world_overrides), line]
        print("$ " + line, flush=True)
        return ov

    # Each run's metrics.json records its own training time, which the manifest reports.
    pre = [r for r in RECIPES if r.command == "pretrain"]
    if parallel:
        logs = {r.name: runs[r.name].with_suffix(".log") for r in pre}
        _run_side_by_side({r.name: (r.command, files[r.recipe], stage(r)) for r in pre}, logs)
    else:
        for r in pre:
            _stage(r.name, _run_job, r.command, files[r.recipe], stage(r))
    for r in RECIPES:
        if r.command == "train":
            _stage(r.name, _run_job, r.command, files[r.recipe], stage(r))
            commands[r.name] = commands[r.base] + commands[r.name][1:]

    # Region classification of every model at the demo's resolution, the reference protocol.
    regions: dict[str, dict[str, float]] = {}
    for r in RECIPES:
        out_dir = root / "eval" / r.name
        ov = [f"output_dir={out_dir}", f"model.name={r.architecture}", f"model.pretrained={runs[r.name]}",
              f"data.panoptic_json={p['panoptic_val']}", f"data.image_root={p['val_images']}",
              f"text.vocabulary={p['world']}", f"num_workers={workers}", *stage_overrides.get("eval", [])]
        print(f"$ densevlm eval regions --config {EVAL_RECIPE} --set {' '.join(ov)}", flush=True)
        regions[r.name] = _stage(f"eval {r.name}", lambda ov=ov: evaluate_regions(
            None, load_config(RegionEvalConfig, files[EVAL_RECIPE], ov), progress=True))["metrics"]

    # The same keys on the first images of toy val: what tests/test_zoo.py re-measures on the shipped weights.
    subset = {r.name: subset_quality(runs[r.name], p["world"], root / "eval_subset" / r.name, num_workers=workers)
              for r in RECIPES}
    result: dict[str, Any] = {}
    hardware = _hardware()
    for r in RECIPES:
        hw = hardware + (" (pre-trainings side by side)" if parallel and r.command == "pretrain" else "")
        result[r.name] = {
            "run_dir": str(runs[r.name]),
            "info": {**provenance(r, read_json(runs[r.name] / "metrics.json"), regions[r.name], hw,
                                  " && ".join(commands[r.name]), world_overrides),
                     "quality_subset": subset[r.name]},
        }
    atomic_write_json(root / "build.json", result)
    if publish_dir is not None:
        for r in RECIPES:
            publish(result[r.name]["run_dir"], r.name, architecture=r.architecture, info=result[r.name]["info"],
                    role=r.role, base=r.base, only_prefix=r.only_prefix, weights_dir=Path(publish_dir),
                    overwrite=overwrite)
    return result
