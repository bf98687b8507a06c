"""``densevlm demo``: the whole pipeline on the toy world, on a CPU, in minutes, from the model zoo.

Stages (each reused on a re-run when its outputs exist and its config is unchanged):
1. generate the toy world (its val images were never seen by the zoo models);
2. the models: the shipped student-size toy CLIP and DenseVLM's teacher, the shipped CLIPSelf-tuned
   teacher-size toy CLIP (``--from-scratch``: re-made from the zoo recipes first, hours on a CPU);
3. CLIPSelf-tune the student (the baseline);
4. DenseVLM-tune the student with the teacher, on the seen classes only;
5. region classification of base, CLIPSelf, DenseVLM and the teacher on toy val (six keys, seen and novel),
   the table, and figures: toy images with panoptic overlays, foreground bias before and after, per-token
   probability maps;
6. training-free semantic segmentation (dense CLIP) of the same four models: mIoU over all, seen and novel
   classes, per-class IoU bars and prediction overlays.

``densevlm demo --seeds N`` (tasks/demo_seeds.py) repeats stages 3-6 of the students over N training seeds and
reports mean ± std; ``demo detection`` and ``demo talk2dino`` are separate stages too (demo_detection.py,
demo_talk2dino.py).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from densevlm.config import to_dict
from densevlm.config.demo import DemoConfig
from densevlm.config.model import ModelSpec
from densevlm.engine.run_dir import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from densevlm.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)


def _stage_done(run_dir: Path, cfg: Any) -> bool:
    """A training stage is reusable when it finished (weights + metrics) with exactly this config.

    The saved config is read back through its class, so a field added to the config since (at its default)
    does not make a finished stage run again."""
    from densevlm.config import from_dict

    saved = run_dir / CONFIG_FILE
    if not ((run_dir / WEIGHTS_FILE).is_file() and (run_dir / METRICS_FILE).is_file() and saved.is_file()):
        return False
    try:
        return to_dict(from_dict(type(cfg), yaml.safe_load(saved.read_text()))) == to_dict(cfg)
    except (ValueError, TypeError, KeyError):  # a key this version no longer has: not the same stage
        return False


def world_stage(cfg: DemoConfig, fresh: bool) -> Path:
    from densevlm.toyworld import generate_world

    root = Path(cfg.output_dir) / "toyworld"
    world_file = root / "world.json"
    if world_file.is_file() and not fresh and read_json(world_file)["config"] == to_dict(cfg.world):
        print(f"[1] toy world: reusing {root}")
        return root
    t0 = time.time()
    generate_world(cfg.world, root, overwrite=True)
    print(f"[1] toy world: {cfg.world.num_train} train + {cfg.world.num_val} val images in {time.time() - t0:.1f}s "
          f"-> {root}")
    return root


def models_stage(cfg: DemoConfig, from_scratch: bool) -> dict[str, ModelSpec]:
    """The base student and the teacher: zoo models, or the same recipes re-run into the demo folder."""
    from densevlm import zoo

    if not from_scratch:
        specs = {}
        for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
            entry = zoo.get_entry(name)
            zoo.weights_path(name)  # checks the sha256 now, not in the middle of a stage
            print(f"[2] {role}: zoo model '{name}' ({entry.architecture}, {entry.info.get('steps')} steps, "
                  f"{entry.info.get('wall_seconds', 0):.0f}s on {entry.info.get('hardware', '?')}; {entry.quality()})")
            specs[role] = ModelSpec(name=name)
        return specs
    from densevlm.tasks.zoo_build import RECIPES, build_zoo

    root = Path(cfg.output_dir) / "zoo_from_scratch"
    by_name = {r.name: r for r in RECIPES}
    missing = [n for n in (cfg.student, cfg.teacher) if n not in by_name]
    if missing:
        raise ValueError(f"--from-scratch re-makes the zoo's recipes {sorted(by_name)}; no recipe for {missing}")
    done = root / "build.json"
    if done.is_file():
        print(f"[2] models from scratch: reusing {root}")
        result = read_json(done)
    else:
        print(f"[2] models from scratch: running the zoo recipes into {root} (the shipped zoo is not touched). "
              "On 2 CPU cores this takes about 30 hours (the zoo was made in 15 minutes on one H200 GPU); "
              "see `densevlm zoo list` for each model's recipe and time")
        b = cfg.zoo_build
        result = build_zoo(root, workers=b.workers, world_overrides=tuple(b.world_overrides),
                           stage_overrides=b.stage_overrides)
    from densevlm.models import run_dir_spec

    return {role: run_dir_spec(result[n]["run_dir"]) for role, n in (("student", cfg.student), ("teacher", cfg.teacher))}


def train_stage(label: str, stage_cfg: Any, run: Any, fresh: bool) -> dict[str, Any]:
    """Run a training job (``run(cfg, overwrite=True)``) unless its run directory already holds its result."""
    run_dir = Path(stage_cfg.output_dir)
    if not fresh and _stage_done(run_dir, stage_cfg):
        print(f"{label}: reusing {run_dir}")
        return read_json(run_dir / METRICS_FILE)
    t0 = time.time()
    result = run(stage_cfg, overwrite=True)
    print(f"{label}: {result.global_step} steps in {time.time() - t0:.0f}s -> {run_dir}")
    return result.metrics


def world_figure(world: Path, out: Path, n: int) -> Path:
    """Toy val images beside their panoptic overlays, titled with one caption each."""
    from densevlm.viz.figures import image_grid

    captions = read_json(world / "annotations" / "captions_val.json")
    panoptic = read_json(world / "annotations" / "panoptic_val.json")
    first_caption: dict[int, str] = {}
    for ann in captions["annotations"]:
        first_caption.setdefault(ann["image_id"], ann["caption"])
    cats = {c["id"]: c for c in panoptic["categories"]}
    images, titles = [], []
    rng = np.random.default_rng(0)
    for img_info, ann in list(zip(panoptic["images"], panoptic["annotations"]))[:n]:
        img = np.asarray(Image.open(world / "images" / "val" / img_info["file_name"]).convert("RGB"))
        pan = np.asarray(Image.open(world / "annotations" / "panoptic_val" / ann["file_name"]).convert("RGB"),
                         dtype=np.int64)
        ids = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]
        overlay = img.astype(float).copy()
        labels = []
        for seg in ann["segments_info"]:
            colour = rng.integers(0, 255, 3)
            mask = ids == seg["id"]
            overlay[mask] = 0.45 * overlay[mask] + 0.55 * colour
            labels.append(cats[seg["category_id"]]["name"])
        images += [img, overlay.astype(np.uint8)]
        titles += [first_caption.get(img_info["id"], ""), "panoptic: " + ", ".join(sorted(set(labels)))]
    return image_grid(images, titles, out, cols=4)


def align_configs(cfg: DemoConfig, world: Path, specs: dict[str, ModelSpec]) -> tuple[Any, Any]:
    """The CLIPSelf (baseline) and DenseVLM stage configs, linked to the world and the models."""
    out = Path(cfg.output_dir)
    clip = copy.deepcopy(cfg.clipself)
    clip.output_dir = str(out / "clipself")
    clip.student = copy.deepcopy(specs["student"])
    clip.data.source.kind, clip.data.source.path, clip.data.source.split = "toyworld", str(world), "train"
    dense = copy.deepcopy(cfg.densevlm)
    dense.output_dir = str(out / "densevlm")
    dense.student = copy.deepcopy(specs["student"])
    dense.teacher = copy.deepcopy(specs["teacher"])
    dense.student_text.vocabulary = dense.teacher_text.vocabulary = str(world)
    dense.data.source.kind, dense.data.source.path, dense.data.source.split = "toyworld", str(world), "train"
    return clip, dense


def eval_vocabulary(cfg: DemoConfig, world: Path) -> str:
    """The classes the demo evaluates and draws: by default the world's own, with their novel flags."""
    return cfg.eval.text.vocabulary or str(world)


def eval_stage(cfg: DemoConfig, world: Path, specs: dict[str, ModelSpec], models: dict[str, Any],
               fresh: bool) -> dict[str, Any]:
    """Region classification of each model; reused when config and weights are unchanged."""
    from densevlm.config.evaluation import PanopticDataConfig, RegionEvalConfig
    from densevlm.evaluation.regions import evaluate_regions

    results = {}
    for name, spec in specs.items():
        text = copy.deepcopy(cfg.eval.text)
        text.vocabulary = eval_vocabulary(cfg, world)
        ecfg = RegionEvalConfig(
            output_dir=str(Path(cfg.output_dir) / "eval" / name),
            model=spec,
            data=PanopticDataConfig(panoptic_json=str(world / "annotations" / "panoptic_val.json"),
                                    image_root=str(world / "images" / "val"), image_size=cfg.eval.image_size,
                                    max_images=cfg.eval.max_images),
            text=text, batch_size=cfg.eval.batch_size, num_workers=2, device="cpu",
        )
        model = models[name]
        saved = Path(ecfg.output_dir) / "regions.json"
        if not fresh and saved.is_file():
            old = read_json(saved)
            if old.get("config") == to_dict(ecfg) and old.get("model", {}).get("weights_id") == model.weights_id:
                results[name] = old
                continue
        results[name] = evaluate_regions(model, ecfg, progress=True)
    return results


def semseg_stage(cfg: DemoConfig, world: Path, specs: dict[str, ModelSpec], models: dict[str, Any],
                 fresh: bool) -> dict[str, Any]:
    """Dense-CLIP semantic segmentation of each model on toy val; reused when config and weights are unchanged."""
    from densevlm.config.semseg import SemSegEvalConfig, toyworld_data
    from densevlm.config.vocab import TextEmbeddingConfig
    from densevlm.evaluation.semseg import RESULT_FILE, evaluate_semseg

    results = {}
    for name, spec in specs.items():
        scfg = SemSegEvalConfig(
            output_dir=str(Path(cfg.output_dir) / "semseg" / name), model=spec,
            data=toyworld_data(world, "val", max_images=cfg.semseg.max_images),
            text=TextEmbeddingConfig(vocabulary=eval_vocabulary(cfg, world), templates=cfg.semseg.templates),
            inference=copy.deepcopy(cfg.semseg.inference), num_workers=2, device="cpu",
            metrics_backend="densevlm", figures=cfg.semseg.figures,
        )
        saved = Path(scfg.output_dir) / RESULT_FILE
        if not fresh and saved.is_file():
            old = read_json(saved)
            if old.get("config") == to_dict(scfg) and old.get("model", {}).get("weights_id") == models[name].weights_id:
                results[name] = old
                continue
        results[name] = evaluate_semseg(models[name], scfg, progress=True)
    return results


def bias_figures(cfg: DemoConfig, world: Path, models: dict[str, Any], results: dict[str, Any],
                 figures: Path) -> list[Path]:
    """Foreground bias before/after, and per-token probability maps of one image under every model."""
    from densevlm.evaluation.diagnostics import dense_probabilities, foreground_bias, plot_foreground_bias
    from densevlm.evaluation.diagnostics import plot_probability_maps
    from densevlm.vocab import get_templates, get_vocabulary
    from densevlm.vocab.embeddings import build_text_embeddings

    paths = [plot_foreground_bias(results, figures / "foreground_bias.png")]
    # The stuff class the base model confuses most with a thing, and a val image showing both.
    rows = sorted(foreground_bias(results["base"]), key=lambda r: -r["p_thing"])
    if not rows:
        return paths
    stuff, thing = rows[0]["class"], rows[0]["thing"]
    panoptic = read_json(world / "annotations" / "panoptic_val.json")
    names = {c["id"]: c["name"] for c in panoptic["categories"]}
    pick = panoptic["images"][0]
    for img_info, ann in zip(panoptic["images"], panoptic["annotations"]):
        present = {names[s["category_id"]] for s in ann["segments_info"]}
        if stuff in present and thing in present:
            pick = img_info
            break
    image = Image.open(world / "images" / "val" / pick["file_name"]).convert("RGB")
    vocab = get_vocabulary(eval_vocabulary(cfg, world))
    templates = get_templates(cfg.eval.text.templates)
    maps, crop = {}, None
    for name, model in models.items():
        text = build_text_embeddings(model, vocab, templates, progress=False)
        maps[name], crop = dense_probabilities(model, image, text, image_size=cfg.eval.image_size)
    paths.append(plot_probability_maps(crop, maps, vocab, stuff, figures / "probability_maps.png",
                                       title=f"{pick['file_name']}: p({stuff}) where the base model sees {thing}"))
    return paths


def run_demo(cfg: DemoConfig, *, fresh: bool = False, from_scratch: bool = False) -> dict[str, Any]:
    from densevlm.tasks.align import run_align
    from densevlm.evaluation.regions import format_table
    from densevlm.evaluation.semseg import format_table as format_semseg
    from densevlm.models import create_backbone, run_dir_spec

    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = world_stage(cfg, fresh)
    specs = models_stage(cfg, from_scratch)
    clip_cfg, dense_cfg = align_configs(cfg, world, specs)
    clip = train_stage("[3] CLIPSelf (student)", clip_cfg, run_align, fresh)
    dense = train_stage("[4] DenseVLM (student)", dense_cfg, run_align, fresh)
    eval_specs = {"base": specs["student"], "clipself": run_dir_spec(clip_cfg.output_dir),
                  "densevlm": run_dir_spec(dense_cfg.output_dir), "teacher": specs["teacher"]}
    # Loaded once, for the evaluation and the figures.
    models = {name: create_backbone(spec) for name, spec in eval_specs.items()}
    results = eval_stage(cfg, world, eval_specs, models, fresh)
    segmentation = semseg_stage(cfg, world, eval_specs, models, fresh)

    figures = out / "figures"
    world_figure(world, figures / "toyworld_val.png", cfg.grid_images)
    bias_figures(cfg, world, models, results, figures)
    seconds = round(time.time() - t0, 1)
    summary = {
        "models": {name: {"spec": to_dict(spec), "weights_id": models[name].weights_id}
                   for name, spec in eval_specs.items()},
        "regions": {name: r["metrics"] for name, r in results.items()},
        "semseg": {name: {k: r["metrics"].get(k) for k in ("mIoU", "mIoU.seen", "mIoU.novel", "fwIoU", "mACC",
                                                            "pACC")} for name, r in segmentation.items()},
        "densevlm_training": {"steps": dense.get("global_step"), "seconds": dense.get("train_seconds"),
                              **dense["history"][-1].get("train", {})},
        "clipself_training": {"steps": clip.get("global_step"), "seconds": clip.get("train_seconds"),
                              **clip["history"][-1].get("train", {})},
        "seconds": seconds,
    }
    atomic_write_json(out / "summary.json", summary)
    print("\n[5] " + format_table(results, title="region classification on toy val (mean per-class accuracy, %; "
                                   "novel classes never named during alignment; teacher = DenseVLM's teacher)"))
    print("\n[6] " + format_semseg(segmentation, title="semantic segmentation on toy val (dense CLIP, training-free, "
                                  "%; every pixel classified among all 28 classes)"))
    print(f"\nfigures in {figures} and {out / 'semseg'}/*/; TensorBoard: tensorboard --logdir {cfg.output_dir}")
    print(f"demo finished in {seconds:.0f}s")
    return summary
