"""The compact teacher-target store: per grid cell, the teacher's top-k classes of a fixed vocabulary.

Beside the exact teacher cache (:mod:`densevlm.data.teacher_cache`: every cell's features, 474,769 bytes per
EVA02-L image) this store keeps only what DenseVLM's loss needs, each cell's class distribution
p_T = softmax(cos(f, text) / T), as its top-k class ids and probabilities plus the tail mass of the other classes
(:mod:`densevlm.methods.compact_targets`; the loss reads it as top-k plus a uniform tail). Cells, grid and images
are those of the exact cache (309 cells for DenseVLM's 17 grid choices), so the dataset looks up the drawn cells
the same way.

Layout of a store folder::

    targets.json              format, identity (below), k, vocabulary size, shard size, image count, and after a
                              build the tail mass dropped: max and mean over every cell of every image
    shard-00000.safetensors   "ids" (n, cells, k) int16 (int32 past 32768 classes), "probs" (n, cells, k) float32,
                              "tail" (n, cells) float32; header: the identity, the shard's image keys, its tail
                              mass statistics

Identity (checked on use; a mismatch is an error naming each differing field): everything the exact cache's
features depend on (teacher, weights, dense path, image size, grid, transform) and the vocabulary (name, class
count, hash of its names and flags), the templates (name, hash), the temperature and k. A store is a function of
all of them: another vocabulary, template set, temperature or k needs another store.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from densevlm.data.sources import ImageSource
from densevlm.data.stores import StoreError, metadata_diff, read_manifest, shard_metadata, write_manifest
from densevlm.data.teacher_cache import image_keys, process_of, write_cell_shards
from densevlm.methods.compact_targets import (BATCH_IDS, BATCH_PROBS, BATCH_TAIL, check_k, compact_distribution,
                                              id_dtype)

FORMAT = "densevlm.compact_targets"
FORMAT_VERSION = 1
MANIFEST = "targets.json"
IDS, PROBS, TAIL = "ids", "probs", "tail"
#: How the loss completes the stored top-k (see densevlm.methods.compact_targets).
TAIL_RULE = "uniform"


class CompactStoreError(StoreError):
    """A compact target store that does not fit the run (other teacher, vocabulary, templates, temperature, k)."""


def compact_metadata(teacher_meta: dict[str, Any], *, vocabulary: str, vocabulary_fingerprint: str,
                     classes: int, templates: str, templates_fingerprint: str, temperature: float,
                     k: int) -> dict[str, Any]:
    """The store's identity: the exact cache's (``teacher_meta`` of
    :func:`~densevlm.data.teacher_cache.cache_metadata`, less its stored dtype) and what the distribution depends
    on beyond the features: the vocabulary (name, fingerprint over names, synonyms and flags, class count), the
    templates (name, fingerprint), the temperature and ``k``, which must be in [1, classes]."""
    check_k(k, classes)
    base = {key: v for key, v in teacher_meta.items() if key not in ("dtype", "normalized")}
    return {**base,
            "vocabulary": {"name": vocabulary, "classes": int(classes), "fingerprint": vocabulary_fingerprint},
            "templates": {"name": templates, "fingerprint": templates_fingerprint},
            "temperature": float(temperature), "k": int(k), "tail": TAIL_RULE, "probs_dtype": "fp32"}


def identity_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities, leaf by leaf (``vocabulary.sha256``, ``k``)."""
    return [f"{key}: store has {json.dumps(a)[:120]}, the run needs {json.dumps(b)[:120]}"
            for key, a, b in metadata_diff(stored, wanted, nested=True)]


def _check_manifest(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    manifest = read_manifest(root / MANIFEST, "compact target store manifest")
    if manifest is None:
        raise CompactStoreError(f"{root} is not a compact target store (no {MANIFEST}); build one with "
                                "`densevlm cache-teacher --config <recipe> --set teacher_targets.kind=compact`")
    if manifest.get("format") != FORMAT:
        raise CompactStoreError(f"{root / MANIFEST}: not a densevlm compact target store (format "
                                f"{manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CompactStoreError(f"{root / MANIFEST}: store format version {manifest.get('format_version')}, this "
                                f"densevlm reads version {FORMAT_VERSION}; rebuild it")
    diffs = identity_differences(manifest["meta"], meta)
    if diffs:
        raise CompactStoreError(f"compact target store {root} was built for other settings than this run's: "
                                + "; ".join(diffs) + ". Build a store for this recipe with `densevlm cache-teacher` "
                                "into another folder (or point teacher_cache at the right one)")
    return manifest


def check_existing_store(root: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Refuse ``root`` when it holds a store (or anything with its manifest name) for another identity; a folder
    without a manifest passes (a new store)."""
    if (Path(root) / MANIFEST).exists():
        _check_manifest(Path(root), meta)


def _shard_header(path: Path) -> dict[str, Any]:
    try:
        header = shard_metadata(path)
    except (SafetensorError, OSError) as err:
        raise CompactStoreError(f"{path}: unreadable compact-target shard ({err}); delete it and rerun "
                                "`densevlm cache-teacher` (it rebuilds missing shards only)") from None
    if header.get("format") != FORMAT or not {"meta", "keys", "tail"} <= set(header):
        raise CompactStoreError(f"{path}: not a densevlm compact-target shard (no '{FORMAT}' header)")
    return {"meta": json.loads(header["meta"]), "keys": json.loads(header["keys"]),
            "tail": json.loads(header["tail"])}


def shard_files(root: Path) -> list[Path]:
    return sorted(root.glob("shard-*.safetensors"))


def tail_summary(root: Path) -> dict[str, Any]:
    """Max and mean tail mass per cell over every shard of the store (from the shard headers)."""
    cells, total, worst = 0, 0.0, 0.0
    for path in shard_files(root):
        t = _shard_header(path)["tail"]
        cells, total, worst = cells + t["cells"], total + t["sum"], max(worst, t["max"])
    return {"tail_mass_max": worst, "tail_mass_mean": total / max(1, cells), "cells": cells}


def build_compact_targets(teacher: torch.nn.Module, source: ImageSource, out_dir: str | os.PathLike,
                          meta: dict[str, Any], teacher_text: torch.Tensor, *, shard_size: int = 256,
                          batch_size: int = 8, num_workers: int = 0, accelerator: Any = None,
                          autocast_dtype: Optional[torch.dtype] = None, progress: bool = True) -> dict[str, Any]:
    """Write (or complete) the compact store of ``teacher`` over ``source`` in ``out_dir``; returns a summary with
    bytes per image and the tail mass dropped (also written to the manifest).

    ``teacher_text``: (V, D) the teacher's class embeddings of the vocabulary ``meta`` names (same order). Shards,
    processes and resuming as :func:`~densevlm.data.teacher_cache.build_teacher_cache`. Nothing is written when
    the identity is refused (k out of range, another store in the folder).
    """
    root = Path(out_dir)
    vocab_size = int(meta["vocabulary"]["classes"])
    if teacher_text.shape[0] != vocab_size:
        raise CompactStoreError(f"compact targets: the teacher's text embeddings have {teacher_text.shape[0]} "
                                f"classes, the store's vocabulary {meta['vocabulary']['name']!r} {vocab_size}")
    check_k(meta["k"], vocab_size)
    rank, world, device = process_of(accelerator)
    keys = image_keys(source)
    n_shards = math.ceil(len(keys) / shard_size)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, "k": int(meta["k"]),
                "vocab_size": vocab_size, "shard_size": shard_size, "num_images": len(keys)}
    if rank == 0:
        if (root / MANIFEST).exists():
            old = _check_manifest(root, meta)
            if old["shard_size"] != shard_size:
                raise CompactStoreError(f"{root / MANIFEST}: built with shard_size {old['shard_size']}, asked for "
                                        f"{shard_size}; resume with the same shard size or use another folder")
        write_manifest(root / MANIFEST, manifest)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    _check_manifest(root, meta)

    text = torch.nn.functional.normalize(teacher_text.float(), dim=-1).to(device)
    temperature, k = float(meta["temperature"]), int(meta["k"])

    def images_of(s: int) -> list[str]:
        return keys[s * shard_size:(s + 1) * shard_size]

    def is_done(s: int, path: Path) -> bool:
        if not path.exists():
            return False
        header = _shard_header(path)
        return not identity_differences(header["meta"], meta) and header["keys"] == images_of(s)

    def compact(features: torch.Tensor) -> torch.Tensor:
        # (B, cells, D) unit-norm -> (B, cells, 2k + 1) packed [ids, probs, tail] on the CPU, float64 holds the ids
        dist = compact_distribution(features @ text.t() / temperature, k)
        return torch.cat([dist.ids.double(), dist.probs.double(), dist.tail.double().unsqueeze(-1)], -1).cpu()

    def pack(packed: torch.Tensor, shard_keys: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {IDS: packed[..., :k].to(id_dtype(vocab_size)).contiguous(),
                   PROBS: packed[..., k:2 * k].float().contiguous(), TAIL: packed[..., 2 * k].float().contiguous()}
        tail = tensors[TAIL]
        stats = {"max": float(tail.max()), "sum": float(tail.double().sum()), "cells": tail.numel()}
        header = {"format": FORMAT, "meta": json.dumps(meta), "keys": json.dumps(shard_keys),
                  "tail": json.dumps(stats)}
        return tensors, header

    done = write_cell_shards(teacher, source, root, meta, is_done=is_done, convert=compact, pack=pack,
                             desc="compact targets", shard_size=shard_size, batch_size=batch_size,
                             num_workers=num_workers, accelerator=accelerator, autocast_dtype=autocast_dtype,
                             progress=progress)
    tail = tail_summary(root)
    if rank == 0:
        write_manifest(root / MANIFEST, {**manifest, "tail_mass": tail})
    total_bytes = sum(p.stat().st_size for p in shard_files(root))
    return {"store": str(root), "kind": "compact", "process": f"{rank + 1}/{world}", "images": len(keys),
            "shards": n_shards, "shards_written_here": done["written"], "shards_kept_here": done["kept"],
            "images_written_here": done["images"], "seconds_here": round(done["seconds"], 1),
            "bytes_on_disk": total_bytes, "bytes_per_image": round(total_bytes / max(1, len(keys))),
            "cells_per_image": meta["cells_per_image"], "k": k, "vocabulary_size": vocab_size,
            "tail_mass_max": tail["tail_mass_max"], "tail_mass_mean": tail["tail_mass_mean"]}


class CompactTargetStore:
    """Read access to a compact store for one dataset: :meth:`item_fields` gives the drawn cells' top-k targets.

    Opening checks the identity against ``meta`` (the run's, :func:`compact_metadata`) and that every image of
    ``keys`` (the dataset's, :func:`~densevlm.data.teacher_cache.image_keys`) is in the store; a missing image is
    an error naming how many and the first few (the teacher is not run for compact targets).
    """

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], keys: list[str]) -> None:
        self.root = Path(root)
        manifest = _check_manifest(self.root, meta)
        self.meta, self.keys = meta, keys
        self.k, self.cells = int(manifest["k"]), int(meta["cells_per_image"])
        self.id_dtype = id_dtype(int(manifest["vocab_size"]))
        self.tail_mass = manifest.get("tail_mass")
        self.shards: list[str] = []
        where: dict[str, tuple[int, int]] = {}
        for path in shard_files(self.root):
            header = _shard_header(path)
            diffs = identity_differences(header["meta"], meta)
            if diffs:
                raise CompactStoreError(f"{path}: built for other settings than this run's: " + "; ".join(diffs))
            self.shards.append(str(path))
            for row, key in enumerate(header["keys"]):
                where[key] = (len(self.shards) - 1, row)
        self.rows = [where.get(key) for key in keys]
        absent = [key for key, r in zip(keys, self.rows) if r is None]
        if absent:
            raise CompactStoreError(
                f"compact target store {self.root}: {len(absent)} of {len(keys)} image(s) of the dataset are not in "
                f"it, e.g. {', '.join(absent[:5])}; complete it with `densevlm cache-teacher` on this recipe (it "
                "resumes)")
        self._handles: dict[int, Any] = {}

    @property
    def missing(self) -> int:
        """Images of the dataset not in the store (always 0: opening refuses an incomplete store)."""
        return sum(r is None for r in self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles do not cross process boundaries (loader workers open their own)
        return state

    def _slices(self, shard: int) -> Any:
        if shard not in self._handles:
            handle = safe_open(self.shards[shard], framework="pt")
            self._handles[shard] = (handle, {name: handle.get_slice(name) for name in (IDS, PROBS, TAIL)})
        return self._handles[shard][1]

    def lookup(self, index: int, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(len(cells), k) ids, (len(cells), k) probs and (len(cells),) tail mass of image ``index``'s cells
        (zero where ``cells`` is -1)."""
        shard, row = self.rows[index]
        parts = self._slices(shard)
        valid = cells >= 0
        ids = torch.zeros(len(cells), self.k, dtype=self.id_dtype)
        probs = torch.zeros(len(cells), self.k)
        tail = torch.zeros(len(cells))
        ids[valid] = parts[IDS][row:row + 1][0][cells[valid]]
        probs[valid] = parts[PROBS][row:row + 1][0][cells[valid]]
        tail[valid] = parts[TAIL][row:row + 1][0][cells[valid]]
        return ids, probs, tail

    def item_fields(self, index: int, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a dataset item carries from the store (the keys :class:`CompactTeacherTargets` reads)."""
        ids, probs, tail = self.lookup(index, cells)
        return {BATCH_IDS: ids, BATCH_PROBS: probs, BATCH_TAIL: tail, "cached": torch.tensor(True)}
