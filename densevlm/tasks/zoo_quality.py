"""The shipped zoo's quality on a small, re-measurable subset: the first images of toy val.

The manifest's headline region numbers are over all 500 toy-val images. ``subset_quality`` measures the same two
keys with the same protocol (reference region classification at the demo's 192 px, short templates) on the
first ``SUBSET_IMAGES`` val images only, which takes seconds on a CPU. ``densevlm zoo build`` records it in each
entry's manifest row (``ZooEntry.info["quality_subset"]``), and tests/test_zoo.py re-measures the shipped weights against it, so a change
to the weights, the loader, the dense path or the evaluator that moves the numbers is caught.

The subset's world is the zoo world's val split (images are a function of (seed, split, index), so a world
generated with no training images and ``SUBSET_IMAGES`` val images holds exactly those images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from densevlm.config import load_config
from densevlm.config.evaluation import RegionEvalConfig
from densevlm.config.model import ModelSpec
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.evaluation.regions import evaluate_regions
from densevlm.toyworld import generate_world
from densevlm.utils.io import atomic_write_json
from densevlm.zoo.registry import load_manifest, manifest_path

SUBSET_IMAGES = 100
SUBSET_IMAGE_SIZE = 192  # the demo's resolution
SUBSET_KEYS = ("rois.thing.macc1", "maskpool.stuff.macc1")


def subset_world(root: str | Path, world_recipe: Optional[str | Path] = None, workers: int = 0) -> Path:
    """Write the subset's world (no training images, the first ``SUBSET_IMAGES`` val images) under ``root``.

    ``world_recipe``: the zoo world's YAML (default: the statistics and seed of ``ToyWorldConfig``'s defaults,
    which the zoo world shares)."""
    cfg = load_config(ToyWorldConfig, world_recipe, ["num_train=0", f"num_val={SUBSET_IMAGES}",
                                                     f"workers={workers}"])
    root = Path(root)
    generate_world(cfg, root, overwrite=True, progress=False)
    return root


def subset_quality(model: Any, world: str | Path, output_dir: str | Path, device: str = "auto",
                   num_workers: int = 0) -> dict[str, Any]:
    """The two region keys of ``model`` (a zoo name, a run directory or a ``DenseCLIP``) on the subset."""
    world = Path(world)
    cfg = RegionEvalConfig(output_dir=str(output_dir), batch_size=25, num_workers=num_workers, device=device,
                           diagnostics=False)
    cfg.data.panoptic_json = str(world / "annotations" / "panoptic_val.json")
    cfg.data.image_root = str(world / "images" / "val")
    cfg.data.image_size = SUBSET_IMAGE_SIZE
    cfg.data.max_images = SUBSET_IMAGES
    cfg.text.vocabulary = str(world)
    cfg.text.templates = "short"
    if isinstance(model, (str, Path)):
        cfg.model = ModelSpec(name=str(model)) if not Path(model).is_dir() else ModelSpec(pretrained=str(model))
        model = None
    cfg.validate()
    result = evaluate_regions(model, cfg, progress=False)
    return {"images": SUBSET_IMAGES, "image_size": SUBSET_IMAGE_SIZE, "split": "toy val (first images)",
            **{k: round(float(result["metrics"][k]), 2) for k in SUBSET_KEYS}}


def record_subset_quality(world: str | Path, weights_dir: Optional[str | Path] = None, device: str = "auto",
                          scratch: str | Path = "runs/zoo_subset_quality") -> dict[str, dict[str, Any]]:
    """Measure every model of a zoo (the shipped one by default) on the subset and write the numbers into its
    manifest (``quality_subset`` in each row, atomically). For a zoo published before the build recorded them."""
    wdir = Path(weights_dir) if weights_dir is not None else None
    out = {name: subset_quality(name, world, Path(scratch) / name, device=device)
           for name in load_manifest(wdir)}
    mpath = manifest_path(wdir)
    manifest = json.loads(mpath.read_text())
    for name, quality in out.items():
        manifest["models"][name]["quality_subset"] = {  # a row's extra keys are its entry's info
            **quality, "measured": "the shipped fp16 weights, densevlm.tasks.zoo_quality.record_subset_quality"}
    atomic_write_json(mpath, manifest)
    return out
