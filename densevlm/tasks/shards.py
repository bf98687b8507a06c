"""``densevlm shards write``: a recipe's image source into webdataset tar shards with their payload and a manifest.

Resumable (shards already written for the same source are kept) and parallel: ``workers`` processes on this
machine, and ``parts`` machines each writing the shards ``s`` with ``s % parts == part``; the manifest is written
by the process that finds every shard done.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from densevlm.config.align import AlignConfig
from densevlm.config.core import ConfigError
from densevlm.data.compact_cache import MANIFEST as COMPACT_MANIFEST, CompactTargetStore
from densevlm.data.regions import ShardRegionItems
from densevlm.data.shards import (MANIFEST, PAYLOADS, Payload, ShardError, describe_source, manifest_for,
                                  open_shards, register_payload, shard_count, shard_done, write_shard)
from densevlm.data.sources import ImageSource
from densevlm.data.stream import ShardStream
from densevlm.data.teacher_cache import image_keys
from densevlm.methods.compact_targets import BATCH_IDS, BATCH_PROBS, BATCH_TAIL
from densevlm.tasks.teacher_cache import recipe_compact_metadata
from densevlm.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

_STATE: dict[str, Any] = {}  # a writer process's source and payload, built once per process


def build_payload(cfg: AlignConfig, student: Any = None) -> Payload:
    """The recipe's shard payload: for writing (``student`` None) or for training ``student``."""
    if cfg.data.shard_payload not in PAYLOADS:
        raise ConfigError(f"data.shard_payload: expected one of {sorted(PAYLOADS)}, got {cfg.data.shard_payload!r}")
    return PAYLOADS[cfg.data.shard_payload](cfg, student)


@register_payload("compact")
class CompactPayload:
    """Each image's compact teacher targets (every grid cell's top-k ids and probabilities and its tail mass),
    copied from the recipe's compact target store (``teacher_targets.kind: compact``, ``teacher_cache``: built by
    ``densevlm cache-teacher``); a streamed item carries its drawn cells' rows under the keys
    :class:`~densevlm.methods.teacher_targets.CompactTeacherTargets` reads."""

    name = "compact"

    def __init__(self, cfg: AlignConfig, student: Any = None) -> None:
        if cfg.teacher_targets.kind != "compact" or not cfg.teacher_cache:
            raise ConfigError("data.shard_payload=compact needs teacher_targets.kind=compact and teacher_cache set "
                              "to the compact target store (`densevlm cache-teacher` builds it)")
        self.cfg, self._store = cfg, None
        if student is None:  # writing: what the store was built for (checked against the recipe when opened)
            manifest = read_json(Path(cfg.teacher_cache) / COMPACT_MANIFEST, "compact target store manifest")
            self.identity: dict[str, Any] = manifest["meta"]
        else:
            self.identity = recipe_compact_metadata(cfg, student.image_mean, student.image_std)

    def _open(self) -> CompactTargetStore:
        if self._store is None:
            source = ImageSource(self.cfg.data.source)
            self._store = CompactTargetStore(self.cfg.teacher_cache, self.identity, image_keys(source))
        return self._store

    def arrays(self, images: list[Any], indices: list[int]) -> list[dict[str, np.ndarray]]:
        store = self._open()
        every_cell = torch.arange(store.cells)
        out = []
        for i in indices:
            ids, probs, tail = store.lookup(i, every_cell)
            out.append({"ids": ids.numpy(), "probs": probs.numpy(), "tail": tail.numpy()})
        return out

    def item_fields(self, arrays: dict[str, np.ndarray], cells: torch.Tensor) -> dict[str, torch.Tensor]:
        valid = cells >= 0
        rows = cells.clamp(min=0).long()
        fields = {}
        for key, name in ((BATCH_IDS, "ids"), (BATCH_PROBS, "probs"), (BATCH_TAIL, "tail")):
            value = torch.from_numpy(arrays[name])[rows]
            value[~valid] = 0  # padding, as the store's lookup gives it
            fields[key] = value
        return {**fields, "cached": torch.tensor(True)}


def _init(cfg: AlignConfig) -> None:
    _STATE["source"] = ImageSource(cfg.data.source)
    _STATE["payload"] = build_payload(cfg)


def _write(args: tuple[str, int, int]) -> dict[str, Any]:
    out, s, shard_size = args
    return write_shard(_STATE["source"], _STATE["payload"], Path(out), s, shard_size)


def _check_folder(out: Path, identity: dict[str, Any]) -> None:
    """A folder holding shards of another source or payload is refused (resuming mixes nothing)."""
    stamp = out / "write.json"
    if stamp.is_file():
        have = json.loads(stamp.read_text())
        if have != identity:
            diff = [k for k in sorted(set(have) | set(identity)) if have.get(k) != identity.get(k)]
            raise ShardError(f"{out} holds shards written with other settings ({', '.join(diff)}: "
                             f"{[have.get(k) for k in diff]} there, {[identity.get(k) for k in diff]} now); "
                             "give another data.shards folder")
    else:
        atomic_write_json(stamp, identity)


def write_shards(cfg: AlignConfig, *, workers: int = 1, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """Write the shards of ``cfg.data.source`` into ``cfg.data.shards`` that are not written yet; the summary."""
    if not cfg.data.shards:
        raise ConfigError("data.shards: the folder to write the shards into is required")
    if "://" in cfg.data.shards:
        raise ConfigError(f"data.shards: shards are written to a local folder (copy it to {cfg.data.shards} "
                          "afterwards), got a URL")
    if not 0 <= part < parts:
        raise ConfigError(f"--part {part} must be in [0, --parts {parts})")
    t0 = time.time()
    out = Path(cfg.data.shards)
    source = ImageSource(cfg.data.source)  # a missing or bad source fails before the shard folder exists
    payload = build_payload(cfg)
    out.mkdir(parents=True, exist_ok=True)
    n = shard_count(len(source), cfg.data.shard_size)
    _check_folder(out, {"source": describe_source(source), "images": len(source), "shard_size": cfg.data.shard_size,
                        "payload": payload.name, "identity": payload.identity})
    todo = [s for s in range(n) if s % parts == part and shard_done(out, s) is None]
    done_before = sum(1 for s in range(n) if s % parts == part) - len(todo)
    written: list[dict[str, Any]] = []
    jobs = [(str(out), s, cfg.data.shard_size) for s in todo]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_init, initargs=(cfg,)) as pool:
            written = list(pool.imap_unordered(_write, jobs))
    else:
        _STATE.update(source=source, payload=payload)
        written = [_write(job) for job in jobs]
    summary: dict[str, Any] = {"folder": str(out), "shards": n, "written_now": len(written),
                               "already_done": done_before, "images_written_now": sum(w["count"] for w in written),
                               "seconds": round(time.time() - t0, 2)}
    if all(shard_done(out, s) is not None for s in range(n)):
        manifest = manifest_for(out, n, source=describe_source(source), shard_size=cfg.data.shard_size,
                                payload=payload)
        atomic_write_json(out / MANIFEST, manifest)
        summary.update(manifest=str(out / MANIFEST), count=manifest["count"],
                       bytes=sum(x["bytes"] for x in manifest["shards"]))
    else:
        summary["manifest"] = None  # other parts still to write; the last one to finish writes it
    if source.skipped:
        summary["skipped_images"] = source.skipped
    return summary




def shard_dataset(cfg: AlignConfig, student: Any, *, default_max_boxes: int,
                  crop_size: Optional[int] = None) -> ShardStream:
    """The recipe's grid-region training items streamed from ``cfg.data.shards`` (the payload checked to be the
    recipe's own: shards written for another vocabulary, teacher or k are refused)."""
    shards = open_shards(cfg.data.shards)
    payload = build_payload(cfg, student)
    shards.check_payload(payload.name, payload.identity)
    style = cfg.method if cfg.data.grid_style == "auto" else cfg.data.grid_style
    items = ShardRegionItems(cfg.data.image_size, grid_style=style, max_split=cfg.data.max_split,
                             max_boxes=cfg.data.max_boxes or default_max_boxes, crop_size=crop_size,
                             mean=student.image_mean, std=student.image_std, seed=cfg.loop.seed,
                             payload_items=payload.item_fields if payload.name != "none" else None)
    return ShardStream(shards, items, seed=cfg.loop.seed, skip_bad_shards=cfg.data.skip_bad_shards,
                       on_epoch=items.set_epoch)
