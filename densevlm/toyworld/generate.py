"""Generate a toy world on disk (:func:`generate_world`) and read its description back (:func:`load_world`).

Layout under ``root`` (image ids are unique across splits; stems are the 12-digit image id)::

    world.json                               version, resolved config, category table, split sizes
    images/{split}/<stem>.jpg
    annotations/captions_{split}.json        COCO captions
    annotations/instances_{split}.json       COCO instances (things; compressed-RLE masks of visible parts)
    annotations/panoptic_{split}.json        COCO panoptic
    annotations/panoptic_{split}/<stem>.png  RGB-encoded segment ids (id = R + 256 G + 256^2 B)
    annotations/semantic_{split}/<stem>.png  category index in world.json order (0..N-1), 255 = unlabeled

A world with ``object_centric_share`` > 0 also holds object-centric close-ups in its train split, after the
scenes (ids after every scene of both splits, ``"kind": "object"`` in their image entries; world.json's
``object_images`` counts them). See :mod:`densevlm.toyworld.closeup`.

The world is written into a temporary sibling directory (``.<name>.*.tmp``, see
:func:`densevlm.utils.io.atomic_dir`) and renamed onto ``root`` at the end, so a crashed run never leaves a
half-written world behind; files inside that directory are written directly, because the rename of the whole
directory is what makes the result atomic. The staging directory is removed on any Python exception (Ctrl-C
included); only a process killed outright (SIGKILL, SIGTERM) can leave one behind, next to ``root``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from densevlm.config.core import to_dict
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld.categories import categories, supercategory
from densevlm.toyworld.closeup import closeup_image_id, render_closeup
from densevlm.toyworld.render import render_image
from densevlm.toyworld.writers import coco_files, dump_json, image_record, segment_ids, write_image_files
from densevlm.utils.io import atomic_dir, read_json

WORLD_VERSION = 1
SPLITS = ("train", "val")
OBJECTS = "objects"  # the part of the work that renders the close-ups (they go to the train split)

# Fork on Linux: workers start at once and need not re-import the caller's __main__ (spawn cannot do that for
# a script read from stdin, and a pool whose workers fail to start waits forever). The workers use only
# numpy and PIL, never the caller's threads (as PyTorch's DataLoader workers, which fork too).
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"

# Per-process state of the workers (set by _init_worker): the config, the staging root and category maps.
_STATE: dict[str, Any] = {}


def split_paths(root: str | os.PathLike, split: str) -> dict[str, Path]:
    """Where the files of ``split`` live in a toy world (the layout above)."""
    r = Path(root)
    ann = r / "annotations"
    return {
        "images": r / "images" / split,
        "captions": ann / f"captions_{split}.json",
        "instances": ann / f"instances_{split}.json",
        "panoptic_json": ann / f"panoptic_{split}.json",
        "panoptic": ann / f"panoptic_{split}",
        "semantic": ann / f"semantic_{split}",
    }


def _init_worker(cfg: ToyWorldConfig, staging: str) -> None:
    table = categories(cfg)
    _STATE.update(
        cfg=cfg,
        root=Path(staging),
        category_ids={c["name"]: c["id"] for c in table},
        category_index={c["name"]: i for i, c in enumerate(table)},
        colours={c["name"]: c["color"] for c in table},
    )


def _work(task: tuple[str, str, int, int]) -> tuple[str, dict[str, Any]]:
    """Render image ``index`` of ``part`` (a split's scenes, or the close-ups), write its image and label PNGs
    into ``split``, return the part and the image's JSON record."""
    part, split, index, image_id = task
    cfg: ToyWorldConfig = _STATE["cfg"]
    rendered = render_closeup(cfg, index) if part == OBJECTS else render_image(cfg, split, index)
    ids = segment_ids(rendered.rng, rendered, _STATE["colours"])
    write_image_files(rendered, _STATE["root"], split, image_id, ids, _STATE["category_index"], cfg.jpeg_quality)
    return part, image_record(rendered, image_id, ids, _STATE["category_ids"])


def _merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """One COCO file of a split from those of its scenes and of its close-ups (images and annotations after)."""
    out = dict(first)
    for key in ("images", "annotations"):
        out[key] = first[key] + second[key]
    return out


def _check_target(root: Path, overwrite: bool) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"toy world root {root} exists and is not a directory")
    if not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"toy world root {root} already exists and is not empty; pass overwrite=True "
            "(--overwrite) to replace it, or choose another directory"
        )
    if not (root / "world.json").is_file():
        # Overwriting replaces the directory wholesale: never do that to something that is not a toy world.
        raise FileExistsError(
            f"refusing to overwrite {root}: it is not empty and holds no world.json, so it is not a toy world"
        )


def generate_world(
    cfg: ToyWorldConfig, root: str | os.PathLike, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Render and write a whole toy world under ``root``; returns the content of its ``world.json``.

    Refuses an existing non-empty ``root`` unless ``overwrite`` (and even then only replaces a directory
    that is a toy world). Uses ``cfg.workers`` processes (0 = in-process); the result is byte-identical for
    any number of workers.
    """
    cfg.validate()
    root = Path(root).absolute()
    _check_target(root, overwrite)
    table = categories(cfg)
    try:
        with atomic_dir(root) as staging:
            for split in SPLITS:
                for key in ("images", "panoptic", "semantic"):
                    split_paths(staging, split)[key].mkdir(parents=True, exist_ok=True)
            # Scenes of train, then of val, then the close-ups (train images, ids after every scene).
            num_closeups = cfg.num_closeups()
            tasks = [("train", "train", i, i + 1) for i in range(cfg.num_train)]
            tasks += [("val", "val", i, cfg.num_train + i + 1) for i in range(cfg.num_val)]
            tasks += [(OBJECTS, "train", j, closeup_image_id(cfg, j)) for j in range(num_closeups)]
            records: dict[str, list[dict[str, Any]]] = {s: [] for s in (*SPLITS, OBJECTS)}
            with tqdm(total=len(tasks), desc="toyworld", unit="img", disable=not progress, dynamic_ncols=True) as bar:
                if cfg.workers == 0:
                    _init_worker(cfg, str(staging))
                    try:
                        for split, record in map(_work, tasks):
                            records[split].append(record)
                            bar.update(1)
                    finally:
                        _STATE.clear()
                else:
                    ctx = multiprocessing.get_context(_START_METHOD)
                    chunk = max(1, min(32, len(tasks) // (cfg.workers * 8)))
                    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, str(staging))) as pool:
                        for split, record in pool.imap(_work, tasks, chunksize=chunk):  # imap keeps task order
                            records[split].append(record)
                            bar.update(1)
            supers = {c["name"]: supercategory(c["name"]) for c in table}
            # Annotation ids are unique across splits, like image ids; the close-ups' follow the val split's, so
            # that the ids of every scene annotation do not depend on the close-ups.
            caption_id, instance_id = 1, 1
            files: dict[str, tuple[dict, dict, dict]] = {}
            for part in (*SPLITS, OBJECTS):
                files[part] = coco_files(records[part], table, supers, caption_id, instance_id)
                caption_id += len(files[part][0]["annotations"])
                instance_id += len(files[part][1]["annotations"])
            if num_closeups:
                files["train"] = tuple(_merge(a, b) for a, b in zip(files["train"], files[OBJECTS]))
            for split in SPLITS:
                caps, inst, pan = files[split]
                paths = split_paths(staging, split)
                dump_json(caps, paths["captions"])
                dump_json(inst, paths["instances"])
                dump_json(pan, paths["panoptic_json"])
            world = {
                "version": WORLD_VERSION,
                "config": to_dict(cfg),
                "categories": table,
                "splits": {"train": cfg.num_train + num_closeups, "val": cfg.num_val},  # images per split
                "object_images": {"train": num_closeups, "val": 0},  # of which close-ups (kind 'object')
            }
            dump_json(world, staging / "world.json", indent=2)
    except OSError as err:  # a full disk, a quota: say where, and that nothing was left behind
        raise OSError(err.errno, f"cannot write the toy world {root}: {err.strerror or err} (the staging folder "
                                 "was removed; nothing was written)") from err
    return world


def load_world(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``<root>/world.json``, checking that it is a toy world of a version this code understands."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"toy world not found: {r} is not a directory (create one with `densevlm toyworld`)")
    path = r / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {r} is not a toy world (create one with `densevlm toyworld`)")
    world = read_json(path, "toy world description")
    if not isinstance(world, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(world).__name__}")
    if world.get("version") != WORLD_VERSION:
        raise ValueError(f"{path}: unsupported toy world version {world.get('version')!r}, expected {WORLD_VERSION}")
    for key, kind in (("config", dict), ("categories", list), ("splits", dict)):
        if not isinstance(world.get(key), kind):
            raise ValueError(f"{path}: missing or invalid '{key}' (expected a JSON {kind.__name__})")
    objects = world.get("object_images", {})  # absent in worlds written before close-ups existed: none
    if not isinstance(objects, dict) or any(not isinstance(objects.get(k, 0), int) for k in SPLITS):
        raise ValueError(f"{path}: invalid 'object_images' (expected a JSON object of counts per split)")
    for i, c in enumerate(world["categories"]):
        missing = [k for k in ("id", "name", "isthing", "novel", "synonyms", "preferred_stuff", "color") if k not in c]
        if missing:
            raise ValueError(f"{path}: categories[{i}] lacks {missing}")
    return world
