"""The teacher-target cache: the frozen teacher's region features of every grid cell of every training image.

DenseVLM's teacher sees un-augmented images and grid boxes that are a fixed function of (image size, grid choice,
cell), so its pooled, normalised region features are the same every epoch. The cache stores, for each image, the
feature of every cell of every grid choice (309 cells for the 17 DenseVLM choices; see
:func:`~densevlm.data.grid_boxes.cell_offsets`), so a training step only looks up the cells its sampler drew and
the teacher is never run (nor loaded). The features are vocabulary-independent: one cache serves any vocabulary
and template set (the logits against the teacher's text embeddings are computed online).

Layout of a cache folder::

    cache.json                  format, the metadata below, shard size, image count
    shard-00000.safetensors     "features" (n, cells, D) float16, rows in the shard's image order;
    shard-00001.safetensors     header metadata: the same metadata and the shard's image keys (JSON)
    fill-r000-<id>.safetensors  the same, written during training by teacher_cache_missing=fill (the lazy mode:
                                the first epoch fills the cache, later epochs read it), images in visiting order
    text/                       the teacher's text embeddings of the recipe's vocabulary (a text-embedding cache)

Metadata (checked on use, a mismatch is an error naming each differing field): the teacher's architecture,
weights hash and dense path, the image size, grid style and choices, the transform (resize-longest + pad, mean,
std) and the stored dtype. Shards are written atomically; building is resumable shard by shard and runs on
several processes with ``accelerate launch``. The manifest, the metadata check, the shard writer and the resumable
build are those of the one sharded feature store (:mod:`densevlm.data.stores`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from densevlm.data.grid_boxes import all_grid_cells, cell_offsets, grid_choices
from densevlm.data.sources import ImageSource
from densevlm.data.transforms import resize_longest_pad, to_tensor
from densevlm.data.stores import (StoreError, metadata_diff, plan_shards, shard_metadata, write_shard,
                                  write_shards)
from densevlm.data.stores import write_manifest as write_store_manifest
from densevlm.utils.io import read_json

log = logging.getLogger(__name__)

FORMAT = "densevlm.teacher_cache"
FORMAT_VERSION = 1
MANIFEST = "cache.json"
TEXT_DIR = "text"
FEATURES = "features"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TRANSFORM = "resize-longest (bicubic) + zero pad right/bottom"


class TeacherCacheError(StoreError):
    """A teacher cache that does not fit the run (other teacher, image size, grid, transform) or the dataset."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


#: Shards built by ``cache-teacher`` (image ranges) and those filled during training (images in visiting order).
SHARD_PATTERNS = ("shard-*.safetensors", "fill-*.safetensors")


def shard_files(root: Path) -> list[Path]:
    return sorted(p for pattern in SHARD_PATTERNS for p in root.glob(pattern))


def cache_metadata(*, teacher_name: str, teacher_weights: str, dense_last_block: str, image_size: int,
                   grid_style: str, max_split: int, mean: Sequence[float], std: Sequence[float],
                   dtype: str = "fp16", regions: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Everything the cached features depend on; the cache is used only when all of it matches the run.

    ``regions``: the identity of the run's region source (``data.regions``; None: the grid of ``grid_style`` and
    ``max_split``), so a cache built for one source is refused for another, naming both.
    """
    if dtype not in DTYPES:
        raise TeacherCacheError(f"teacher cache dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    choices = grid_choices(max_split, grid_style)
    return {
        "teacher": teacher_name, "teacher_weights": teacher_weights, "dense_last_block": dense_last_block,
        "image_size": int(image_size), "grid_style": grid_style, "max_split": int(max_split),
        "grid_choices": [list(c) for c in choices], "cells_per_image": cell_offsets(choices)[-1],
        "transform": {"resize": TRANSFORM, "mean": [round(float(m), 8) for m in mean],
                      "std": [round(float(s), 8) for s in std]},
        "dtype": dtype, "normalized": True,
        "regions": regions or {"kind": "grid", "grid_style": grid_style, "max_split": int(max_split)},
    }


def meta_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two metadata dicts (empty when they match)."""
    return [f"{key}: cache has {json.dumps(a)[:120]}, the run needs {json.dumps(b)[:120]}"
            for key, a, b in metadata_diff(stored, wanted)]


def image_keys(source: ImageSource) -> list[str]:
    """A stable name per image of ``source``: its path relative to the source's image root (or its row)."""
    if source.hf is not None:
        return [f"row:{i}" for i in range(len(source))]
    cfg = source.cfg
    if cfg.kind == "coco_json":
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.path).parent
    elif cfg.kind == "toyworld":
        root = Path(cfg.path) / "images" / cfg.split
    else:
        root = Path(cfg.path)
    root = root.resolve()
    keys = []
    for p in source.paths:
        p = p.resolve()
        keys.append(p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix())
    return keys


# --------------------------------------------------------------------------------------------- building
class _CanvasImages(Dataset):
    """(canvas tensor, original width, height, index) per image; None for an unreadable image when skipping."""

    def __init__(self, source: ImageSource, indices: list[int], image_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.source, self.indices, self.size, self.mean, self.std = source, indices, image_size, mean, std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Optional[tuple[torch.Tensor, int, int, int]]:
        index = self.indices[i]
        img = self.source.load_or_skip(index, "left out of the teacher cache")
        if img is None:
            return None
        canvas, _ = resize_longest_pad(img, self.size)
        return to_tensor(canvas, self.mean, self.std), img.width, img.height, index


def _collate(items: list) -> list:
    return [it for it in items if it is not None]


@torch.no_grad()
def cell_features(teacher: torch.nn.Module, images: torch.Tensor, sizes: Sequence[tuple[int, int]],
                  image_size: int, choices: list[tuple[int, int]],
                  autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, cells, D) float32 unit-norm teacher features of every grid cell of each image.

    ``sizes`` are the original (width, height); the boxes are those :func:`grid_boxes` would draw, bit for bit.
    """
    boxes = [all_grid_cells(w, h, image_size / max(w, h), image_size, choices).to(images.device) for w, h in sizes]
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        feats = teacher.pool_boxes(teacher.encode_dense(images), boxes)
    return F.normalize(feats.float(), dim=-1).view(len(sizes), boxes[0].shape[0], -1)


def shard_cell_features(teacher: torch.nn.Module, source: ImageSource, indices: list[int], meta: dict[str, Any], *,
                        batch_size: int, num_workers: int, device: torch.device,
                        autocast_dtype: Optional[torch.dtype] = None,
                        convert: Callable[[torch.Tensor], torch.Tensor] = lambda f: f.cpu(),
                        progress: Any = None) -> tuple[Optional[torch.Tensor], list[int]]:
    """``convert`` of the (B, cells, D) unit-norm features of every cell (:func:`cell_features`) of the images
    ``indices`` of ``source``, batch by batch, concatenated, and the indices of the images they belong to
    (unreadable images skipped when the source skips them); (None, []) when none was read. ``meta`` gives the
    image size, transform and grid choices (a cache's metadata); ``progress`` a tqdm bar to update."""
    loader = DataLoader(_CanvasImages(source, indices, meta["image_size"], meta["transform"]["mean"],
                                      meta["transform"]["std"]),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    choices = [tuple(c) for c in meta["grid_choices"]]
    out, rows = [], []
    for items in loader:
        if items:
            images = torch.stack([it[0] for it in items]).to(device)
            f = cell_features(teacher, images, [(it[1], it[2]) for it in items], meta["image_size"], choices,
                              autocast_dtype)
            out.append(convert(f))
            rows += [it[3] for it in items]
        if progress is not None:
            progress.update(len(items))
    return (torch.cat(out) if out else None), rows


def _shard_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        header = shard_metadata(path)
    except (SafetensorError, OSError) as err:
        raise TeacherCacheError(f"{path}: unreadable teacher-cache shard ({err}); delete it and rerun "
                                "`densevlm cache-teacher` (it rebuilds missing shards only)") from None
    if header.get("format") != FORMAT or "meta" not in header or "keys" not in header:
        raise TeacherCacheError(f"{path}: not a densevlm teacher-cache shard (no '{FORMAT}' header)")
    return json.loads(header["meta"]), json.loads(header["keys"])


def _check_manifest(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    manifest = read_json(root / MANIFEST, "teacher cache manifest")
    if manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{root / MANIFEST}: not a densevlm teacher cache (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{root / MANIFEST}: cache format version {manifest.get('format_version')}, this "
                                f"densevlm reads version {FORMAT_VERSION}; rebuild it with `densevlm cache-teacher`")
    diffs = meta_differences(manifest["meta"], meta)
    if diffs:
        raise TeacherCacheError(f"teacher cache {root} was built for other settings than this run's: "
                                + "; ".join(diffs) + ". Build a cache for this recipe with `densevlm cache-teacher` "
                                "into another folder (or point teacher_cache at the right one)")
    return manifest


def write_manifest(root: Path, meta: dict[str, Any], feature_dim: int, shard_size: int, num_images: int) -> None:
    """Create the cache's manifest, or check an existing one (same metadata) and keep its shard size."""
    if (root / MANIFEST).exists():
        manifest = _check_manifest(root, meta)
        if manifest["shard_size"] != shard_size:
            raise TeacherCacheError(f"{root / MANIFEST}: built with shard_size {manifest['shard_size']}, asked "
                                    f"for {shard_size}; resume with the same shard size or use another folder")
        if manifest.get("num_images") == num_images:
            return
    write_store_manifest(root / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta,
                                        "feature_dim": int(feature_dim), "shard_size": shard_size,
                                        "num_images": num_images})


def process_of(accelerator: Any) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of ``accelerator``, or of a single CPU process when it is None."""
    if accelerator is None:
        return 0, 1, torch.device("cpu")
    return accelerator.process_index, accelerator.num_processes, accelerator.device


def write_cell_shards(teacher: torch.nn.Module, source: ImageSource, root: Path, meta: dict[str, Any], *,
                      is_done: Callable[[int, Path], bool], convert: Callable[[torch.Tensor], torch.Tensor],
                      pack: Callable[[torch.Tensor, list[str]], tuple[dict[str, torch.Tensor], dict[str, str]]],
                      desc: str, shard_size: int, batch_size: int, num_workers: int, accelerator: Any,
                      autocast_dtype: Optional[torch.dtype], progress: bool) -> dict[str, Any]:
    """The build loop every per-cell teacher store shares: this process's shards (``s % world == rank``) not
    already done (``is_done(s, path)``), each from the teacher's cell features of its images (``convert``ed per
    batch by :func:`shard_cell_features`), ``pack``ed with the images' keys into tensors and a header, written
    atomically; then a barrier. Returns how many shards were written and kept here, images written, seconds."""
    rank, world, device = process_of(accelerator)
    keys = image_keys(source)
    path_of = lambda s: root / shard_name(s)  # noqa: E731
    mine, kept = plan_shards(range(rank, math.ceil(len(keys) / shard_size), world), path_of=path_of,
                             is_done=is_done)
    teacher = teacher.to(device).eval().requires_grad_(False)
    t0, n_images = time.time(), 0
    bar = tqdm(total=sum(min(shard_size, len(keys) - s * shard_size) for s in mine), unit="img",
               desc=f"{desc} [{rank}]", disable=not progress or rank != 0)

    def compute(s: int) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
        nonlocal n_images
        indices = list(range(s * shard_size, min((s + 1) * shard_size, len(keys))))
        values, rows = shard_cell_features(teacher, source, indices, meta, batch_size=batch_size,
                                           num_workers=num_workers, device=device, autocast_dtype=autocast_dtype,
                                           convert=convert, progress=bar)
        if values is None:
            return None
        n_images += len(rows)
        return pack(values, [keys[i] for i in rows])

    written = len(write_shards(mine, path_of=path_of, compute=compute))
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return {"written": written, "kept": len(kept), "images": n_images, "seconds": time.time() - t0}


def build_teacher_cache(teacher: torch.nn.Module, source: ImageSource, out_dir: str | os.PathLike,
                        meta: dict[str, Any], *, shard_size: int = 256, batch_size: int = 8, num_workers: int = 0,
                        accelerator: Any = None, autocast_dtype: Optional[torch.dtype] = None,
                        progress: bool = True) -> dict[str, Any]:
    """Write (or complete) the cache of ``teacher`` over ``source`` in ``out_dir``; returns a summary.

    Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)`` of the source. Each process of
    ``accelerator`` (a single process when None) writes the shards ``s`` with ``s % num_processes == rank``; shards
    already on disk with the same metadata and images are kept, so an interrupted build resumes. Each shard
    appears under its final name only once complete (atomic write).
    """
    root = Path(out_dir)
    rank, world, _ = process_of(accelerator)
    keys = image_keys(source)
    n_shards = math.ceil(len(keys) / shard_size)
    if rank == 0:
        write_manifest(root, meta, int(teacher.embed_dim), shard_size, len(keys))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    _check_manifest(root, meta)

    dtype = DTYPES[meta["dtype"]]

    def images_of(s: int) -> list[str]:
        return keys[s * shard_size:(s + 1) * shard_size]

    def is_done(s: int, path: Path) -> bool:
        if not path.exists():
            return False
        stored_meta, stored_keys = _shard_header(path)
        if not meta_differences(stored_meta, meta) and stored_keys == images_of(s):
            return True
        log.info("%s holds other images or settings; rebuilt", path)
        return False

    def pack(feats: torch.Tensor, shard_keys: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        header = {"format": FORMAT, "meta": json.dumps(meta), "keys": json.dumps(shard_keys)}
        return {FEATURES: feats.contiguous()}, header

    done = write_cell_shards(teacher, source, root, meta, is_done=is_done, convert=lambda f: f.to(dtype).cpu(),
                             pack=pack, desc="teacher cache", shard_size=shard_size, batch_size=batch_size,
                             num_workers=num_workers, accelerator=accelerator, autocast_dtype=autocast_dtype,
                             progress=progress)
    written, kept, n_images, seconds = done["written"], done["kept"], done["images"], done["seconds"]
    total_bytes = sum(p.stat().st_size for p in shard_files(root))
    return {"cache": str(root), "process": f"{rank + 1}/{world}", "images": len(keys), "shards": n_shards, "shards_written_here": written,
            "shards_kept_here": kept, "images_written_here": n_images, "seconds_here": round(seconds, 1),
            "bytes_on_disk": total_bytes, "bytes_per_image": round(total_bytes / max(1, len(keys))),
            "cells_per_image": meta["cells_per_image"], "dtype": meta["dtype"]}


# --------------------------------------------------------------------------------------------- reading
class TeacherCache:
    """Read access to a cache for one dataset: ``lookup(index, cells)`` gives the drawn cells' features.

    Opening checks the metadata against ``meta`` (the run's) and that every image of ``keys`` (the dataset's,
    see :func:`image_keys`) is cached. Missing images are an error naming how many and the first few, unless
    ``missing="online"``: then :meth:`lookup` flags them (``cached`` False) and the objective runs the teacher for
    them; :attr:`missing` counts them. ``missing="fill"`` is the lazy mode: the same, and the objective hands the
    features of every cell of those images to :meth:`add`, which writes them as ``fill-*`` shards of
    ``shard_size`` images; :meth:`sync` (at each epoch's start) writes what is pending and reads every process's
    new shards, so from the second epoch on the teacher is not run.
    """

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], keys: list[str], *,
                 missing: str = "error") -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise TeacherCacheError(f"teacher_cache: {self.root} is not a teacher cache (no {MANIFEST}); build one "
                                    "with `densevlm cache-teacher --config <this recipe>`, or set "
                                    "teacher_cache_missing=fill to fill it while training")
        manifest = _check_manifest(self.root, meta)
        self.meta, self.dim, self.cells = meta, int(manifest["feature_dim"]), int(meta["cells_per_image"])
        self.keys, self.mode, self.fill_size = keys, missing, int(manifest["shard_size"])
        self.shards: list[str] = []
        self.rows: list[Optional[tuple[int, int]]] = [None] * len(keys)
        self._handles: dict[int, Any] = {}
        self._pending: dict[int, torch.Tensor] = {}  # lazy mode: image index -> (cells, D) features to write
        self.refresh()
        absent = [k for k, r in zip(keys, self.rows) if r is None]
        if absent and missing == "error":
            raise TeacherCacheError(
                f"teacher cache {self.root}: {len(absent)} of {len(keys)} image(s) of the dataset are not cached, "
                f"e.g. {', '.join(absent[:5])}; complete it with `densevlm cache-teacher` on this recipe (it resumes), "
                "or set teacher_cache_missing=online to run the teacher for those images (=fill: and store them)")
        if absent:
            log.warning("teacher cache %s lacks %d of %d image(s) (e.g. %s); the teacher runs online for them%s",
                        self.root, len(absent), len(keys), ", ".join(absent[:3]),
                        " and they are added to the cache" if missing == "fill" else "")

    @property
    def missing(self) -> int:
        """Images of the dataset not (yet) in the cache's shards."""
        return sum(r is None for r in self.rows)

    def refresh(self) -> int:
        """Read the shards that appeared since the last look (another process's, or this one's fills); returns
        how many images they added."""
        where: dict[str, tuple[int, int]] = {}
        known = set(self.shards)
        for path in shard_files(self.root):
            if str(path) in known:
                continue
            stored, shard_keys = _shard_header(path)
            diffs = meta_differences(stored, self.meta)
            if diffs:
                raise TeacherCacheError(f"{path}: built for other settings than this run's: " + "; ".join(diffs))
            self.shards.append(str(path))
            for row, key in enumerate(shard_keys):
                where[key] = (len(self.shards) - 1, row)
        added = 0
        for i, key in enumerate(self.keys):
            if self.rows[i] is None and key in where:
                self.rows[i] = where[key]
                added += 1
        return added

    def cell_features(self, teacher: torch.nn.Module, images: torch.Tensor, sizes: Sequence[tuple[int, int]],
                      autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(B, cells, D) unit-norm features of every grid cell this cache stores, from ``teacher`` (see
        :func:`cell_features`): what the lazy mode computes for an uncached image and hands to :meth:`add`."""
        return cell_features(teacher, images, sizes, self.meta["image_size"],
                             [tuple(c) for c in self.meta["grid_choices"]], autocast_dtype)

    def add(self, index: int, features: torch.Tensor) -> None:
        """Lazy mode: queue the (cells, D) unit-norm features of image ``index`` (computed online) for the cache."""
        if self.mode != "fill" or self.rows[index] is not None or index in self._pending:
            return
        if tuple(features.shape) != (self.cells, self.dim):
            raise TeacherCacheError(f"teacher cache fill: image {self.keys[index]} has features of shape "
                                    f"{tuple(features.shape)}, the cache stores ({self.cells}, {self.dim})")
        self._pending[index] = features.detach().to("cpu", DTYPES[self.meta["dtype"]])
        if len(self._pending) >= self.fill_size:
            self.flush()

    def flush(self) -> Optional[Path]:
        """Write the queued features as one ``fill-*`` shard (atomically) and read it; None when nothing is queued."""
        if not self._pending:
            return None
        import uuid

        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        indices = sorted(self._pending)
        tensor = torch.stack([self._pending[i] for i in indices]).contiguous()
        header = {"format": FORMAT, "meta": json.dumps(self.meta), "keys": json.dumps([self.keys[i] for i in indices])}
        path = self.root / f"fill-r{rank:03d}-{uuid.uuid4().hex[:12]}.safetensors"
        write_shard(path, {FEATURES: tensor}, header)
        self._pending.clear()
        self.refresh()
        return path

    def sync(self) -> None:
        """Lazy mode, on every process at the same point (an epoch's start): write this process's pending
        features, wait for the others to write theirs, and read all new shards."""
        if self.mode != "fill":
            return
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        self.flush()
        if ready:
            dist.barrier()
        self.refresh()

    def __getstate__(self) -> dict[str, Any]:
        # File handles do not cross process boundaries (DataLoader workers open their own), nor do pending fills.
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_pending"] = {}
        return state

    def _slice(self, shard: int) -> Any:
        if shard not in self._handles:
            handle = safe_open(self.shards[shard], framework="pt")
            self._handles[shard] = (handle, handle.get_slice(FEATURES))  # the slice reads through the open file
        return self._handles[shard][1]

    def item_fields(self, index: int, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a dataset item carries from the cache: ``teacher_features`` and ``cached`` (see :meth:`lookup`)."""
        features, cached = self.lookup(index, cells)
        return {"teacher_features": features, "cached": cached}

    def lookup(self, index: int, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(cells), D) features of image ``index``'s cells (zero rows where ``cells`` is -1) and whether the
        image is cached (all zero and False if not)."""
        loc = self.rows[index]
        out = torch.zeros(len(cells), self.dim, dtype=DTYPES[self.meta["dtype"]])
        if loc is None:
            return out, torch.tensor(False)
        shard, row = loc
        feats = self._slice(shard)[row:row + 1][0]  # reads this image's row only (memory-mapped)
        valid = cells >= 0
        out[valid] = feats[cells[valid]]
        return out, torch.tensor(True)
