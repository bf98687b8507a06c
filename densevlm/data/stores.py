"""One sharded feature store: the manifest, the identity check, the atomic shard writer and the resumable builder
shared by the teacher-target cache (:mod:`densevlm.data.teacher_cache`) and Talk2DINO's feature cache
(:mod:`densevlm.data.feature_cache`).

A store is a folder: a JSON manifest saying what produced the features (their *identity* or metadata), and
safetensors shards whose header metadata lets a resumed build keep the shards already written for the same
identity and items. Each file appears under its final name only once complete. The two caches keep their own
on-disk formats (file names, manifest and header fields); this module is how both are written and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import safetensors.torch
import torch
from safetensors import safe_open

from densevlm.utils.io import atomic_save, atomic_write_json, read_json


class StoreError(ValueError):
    """A feature store that does not fit the run (another identity), or a damaged file."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def metadata_diff(stored: dict[str, Any], wanted: dict[str, Any], *,
                  nested: bool = False) -> list[tuple[str, Any, Any]]:
    """(key, stored value, wanted value) for every key whose values differ, sorted by key; ``nested``: compare the
    leaves of nested dicts under dotted keys (``vision.weights_id``) instead of the top-level values."""
    a, b = (_flatten(stored), _flatten(wanted)) if nested else (stored, wanted)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_manifest(path: Path, what: str) -> Optional[dict[str, Any]]:
    """The manifest at ``path`` (None when there is none; a damaged one is an error naming ``what`` it is)."""
    return read_json(path, what) if path.is_file() else None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (key order as given: the bytes are a function of the content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one safetensors shard atomically (a failed write leaves no file under ``path``)."""
    atomic_save(path, lambda p: safetensors.torch.save_file(tensors, str(p), metadata=metadata))


def shard_metadata(path: Path) -> dict[str, str]:
    """A shard's header metadata; ``SafetensorError`` or :class:`OSError` when it is unreadable."""
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def shard_metadata_or_none(path: Path) -> Optional[dict[str, str]]:
    """A shard's header metadata, None when it is missing or unreadable (a damaged file is rebuilt, not trusted)."""
    if not path.is_file():
        return None
    try:
        return shard_metadata(path)
    except Exception:  # any damage means "rebuild it"
        return None


def plan_shards(shards: Iterable[int], *, path_of: Callable[[int], Path],
                is_done: Callable[[int, Path], bool]) -> tuple[list[int], list[int]]:
    """The resumable build's first half: (to build, kept), the shards already on disk for this build kept."""
    todo, kept = [], []
    for s in shards:
        (kept if is_done(s, path_of(s)) else todo).append(s)
    return todo, kept


def write_shards(todo: Iterable[int], *, path_of: Callable[[int], Path],
                 compute: Callable[[int], Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]]) -> list[int]:
    """The resumable build's second half: ``compute(s)`` (tensors and header metadata, or None for nothing to
    write) and write each shard atomically, in order, so an interrupted build keeps the shards it finished.
    Returns the shards written."""
    written = []
    for s in todo:
        out = compute(s)
        if out is not None:
            write_shard(path_of(s), *out)
            written.append(s)
    return written
