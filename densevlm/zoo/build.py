"""``densevlm zoo build``: re-make the zoo from its recipes (world, two pre-trainings, the teacher's CLIPSelf).

Every stage is an ordinary ``densevlm`` command on a recipe in ``configs/``; the build only runs them in order
(the two pre-trainings side by side with ``parallel``), evaluates the results with the reference region
protocol, and, with ``publish_dir``, writes the fp16 zoo files and their manifest there. The shipped zoo is
never written unless it is named explicitly.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from densevlm.utils.io import read_json

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


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "densevlm.cli", *args]


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


def _run(cmd: list[str], log_file: Optional[Path]) -> subprocess.Popen:
    print("$ " + " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd), flush=True)
    if log_file is None:
        return subprocess.Popen(cmd, cwd=REPO_ROOT)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=open(log_file, "w"), stderr=subprocess.STDOUT)


def _wait(procs: dict[str, subprocess.Popen], logs: dict[str, Optional[Path]]) -> None:
    failed = []
    for name, proc in procs.items():
        if proc.wait() != 0:
            failed.append(f"{name} (exit {proc.returncode}" + (f", log {logs[name]})" if logs.get(name) else ")"))
    if failed:
        raise RuntimeError("zoo build stage failed: " + ", ".join(failed))


def _hardware() -> str:
    import torch

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
) -> dict[str, Any]:
    """Run the zoo recipes into ``root``; returns {zoo name: {"run_dir": ..., "info": provenance(...)}}.

    ``world_overrides`` / ``stage_overrides`` change recipe values (tests use them for a tiny build); a zoo
    published from an overridden build records the overrides in its commands.
    """
    root = Path(root).resolve()
    stage_overrides = stage_overrides or {}
    runs = {r.name: root / r.name for r in RECIPES}
    commands: dict[str, list[str]] = {}

    world_cmd = _cli("toyworld", "--config", WORLD_RECIPE, "--out", _paths(root)["world"], "--overwrite",
                     "--set", f"workers={world_workers or workers}", *world_overrides)
    _wait({"world": _run(world_cmd, None)}, {})

    def stage(recipe: ZooModelRecipe) -> list[str]:
        ov = _stage_overrides(recipe, root, runs, workers, stage_overrides.get(recipe.name, []))
        cmd = _cli(recipe.command, "--config", recipe.recipe, "--overwrite", "--set", *ov)
        commands[recipe.name] = [f"densevlm toyworld --config {WORLD_RECIPE} --out {_paths(root)['world']}"
                                 + "".join(f" {o}" for o in world_overrides),
                                 " ".join(["densevlm", *cmd[3:]])]
        return cmd

    # Each run's metrics.json records its own training time, which the manifest reports.
    pre = [r for r in RECIPES if r.command == "pretrain"]
    if parallel:
        logs = {r.name: runs[r.name].with_suffix(".log") for r in pre}
        _wait({r.name: _run(stage(r), logs[r.name]) for r in pre}, logs)
    else:
        for r in pre:
            _wait({r.name: _run(stage(r), None)}, {})
    for r in RECIPES:
        if r.command == "train":
            _wait({r.name: _run(stage(r), None)}, {})
            commands[r.name] = commands[r.base] + commands[r.name][1:]

    # Region classification of every model at the demo's resolution, the reference protocol.
    p = _paths(root)
    regions: dict[str, dict[str, float]] = {}
    for r in RECIPES:
        out_dir = root / "eval" / r.name
        cmd = _cli("eval", "regions", "--config", EVAL_RECIPE, "--set", f"output_dir={out_dir}",
                   f"model.name={r.architecture}", f"model.pretrained={runs[r.name]}",
                   f"data.panoptic_json={p['panoptic_val']}", f"data.image_root={p['val_images']}",
                   f"text.vocabulary={p['world']}", f"num_workers={workers}",
                   *stage_overrides.get("eval", []))
        _wait({f"eval {r.name}": _run(cmd, None)}, {})
        regions[r.name] = read_json(out_dir / "regions.json")["metrics"]

    # The same keys on the first images of toy val: what tests/test_zoo.py re-measures on the shipped weights.
    from densevlm.zoo.quality import subset_quality

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
    (root / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    if publish_dir is not None:
        from densevlm.zoo.publish import publish

        for r in RECIPES:
            publish(result[r.name]["run_dir"], r.name, architecture=r.architecture, info=result[r.name]["info"],
                    role=r.role, base=r.base, only_prefix=r.only_prefix, weights_dir=Path(publish_dir),
                    overwrite=overwrite)
    return result
