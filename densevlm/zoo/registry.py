"""The model zoo: pre-trained toy CLIPs shipped inside the package, like the checkpoints users download.

``densevlm/zoo/weights/manifest.json`` lists every model: its open_clip architecture, its fp16 safetensors file
and that file's sha256, the recipe and world config that made it, how long it trained, its measured quality and
the command that reproduces it. A file is checked against its sha256 before any weight is used.

An entry may hold only some tensors (``"base"``: another entry supplies the rest). The CLIPSelf-tuned teacher
ships its vision tower only, since CLIPSelf never changes the text tower; the full checkpoint is assembled once
into the cache (``$DENSEVLM_CACHE``, default ``~/.cache/densevlm``) and checked against its own sha256.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from densevlm.utils.hashing import sha256_file, sha256_state_dict
from densevlm.utils.io import atomic_save, read_json

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # the shipped zoo
ZOO_DIR_ENV = "DENSEVLM_ZOO"  # points the zoo at another folder (a zoo you built and published yourself)
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
QUALITY_KEYS = ("zeroshot.thing.top1", "zeroshot.stuff.top1", "regions.rois.thing.macc1", "regions.maskpool.stuff.macc1")


class ZooError(ValueError):
    """Unknown zoo name, missing or corrupted zoo weights, or a malformed manifest."""


@dataclass
class ZooEntry:
    """One shipped model (a row of the manifest)."""

    name: str
    architecture: str  # open_clip model name (a config in densevlm/models/model_configs)
    file: str  # safetensors file, relative to the manifest's folder
    sha256: str
    role: str = ""
    base: Optional[str] = None  # entry whose tensors complete this one's (None: the file is a full checkpoint)
    full_sha256: Optional[str] = None  # sha256_state_dict of the assembled checkpoint (entries with a base)
    info: dict[str, Any] = field(default_factory=dict)  # recipe, world, steps, wall time, metrics, command, ...

    @property
    def params(self) -> Optional[int]:
        return self.info.get("params")

    def quality(self) -> str:
        """The headline numbers of the manifest: zero-shot thing / stuff and the two region keys (toy val, %)."""
        m = self.info.get("metrics", {})
        return ", ".join(f"{k.replace('zeroshot.', 'zs.').replace('regions.', '')} {m[k]:.1f}" for k in QUALITY_KEYS
                         if k in m)


def zoo_dir(weights_dir: Optional[Path] = None) -> Path:
    """The zoo folder: ``weights_dir`` if given, else ``$DENSEVLM_ZOO``, else the package's own."""
    return Path(weights_dir or os.environ.get(ZOO_DIR_ENV) or WEIGHTS_DIR)


def manifest_path(weights_dir: Optional[Path] = None) -> Path:
    return zoo_dir(weights_dir) / MANIFEST_FILE


def load_manifest(weights_dir: Optional[Path] = None) -> dict[str, ZooEntry]:
    """The zoo's entries by name (an empty zoo when no manifest is shipped)."""
    path = manifest_path(weights_dir)
    if not path.is_file():
        return {}
    stat = path.stat()
    # Every model-name resolution asks the zoo; the file is parsed again only when it changes.
    return dict(_parse_manifest(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parse_manifest(path: str, mtime_ns: int, size: int) -> dict[str, ZooEntry]:
    data = read_json(path, "zoo manifest")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("models"), dict):
        raise ZooError(f"{path}: expected {{'format': {MANIFEST_FORMAT}, 'models': {{name: entry}}}}")
    entries = {}
    for name, row in data["models"].items():
        missing = [k for k in ("architecture", "file", "sha256") if k not in row]
        if missing:
            raise ZooError(f"{path}: model '{name}' lacks {missing}")
        known = {"architecture", "file", "sha256", "role", "base", "full_sha256"}
        entries[name] = ZooEntry(name=name, **{k: row[k] for k in known if k in row},
                                 info={k: v for k, v in row.items() if k not in known})
    for entry in entries.values():
        if entry.base is not None and entry.base not in entries:
            raise ZooError(f"{path}: model '{entry.name}' has base '{entry.base}', which is not in the manifest")
    return entries


def list_models(weights_dir: Optional[Path] = None) -> list[ZooEntry]:
    return list(load_manifest(weights_dir).values())


def is_zoo_name(name: Optional[str], weights_dir: Optional[Path] = None) -> bool:
    return bool(name) and name in load_manifest(weights_dir)


def get_entry(name: str, weights_dir: Optional[Path] = None) -> ZooEntry:
    entries = load_manifest(weights_dir)
    if name not in entries:
        available = ", ".join(sorted(entries)) or "none (no manifest at " + str(manifest_path(weights_dir)) + ")"
        raise ZooError(f"unknown zoo model '{name}'; available: {available} (see `densevlm zoo list`)")
    return entries[name]


def architecture(name: str, weights_dir: Optional[Path] = None) -> Optional[str]:
    """The open_clip architecture of zoo model ``name``, or None when ``name`` is not a zoo name."""
    entries = load_manifest(weights_dir)
    return entries[name].architecture if name in entries else None


def verified_file(entry: ZooEntry, weights_dir: Optional[Path] = None) -> Path:
    """The entry's own file, after checking it exists and matches the manifest's sha256."""
    path = zoo_dir(weights_dir) / entry.file
    if not path.is_file():
        raise ZooError(f"zoo model '{entry.name}': weights file {path} is missing (expected sha256 {entry.sha256}); "
                       "reinstall the package or rebuild it with `densevlm zoo build`")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ZooError(f"zoo model '{entry.name}': weights file {path} is corrupted: sha256 {actual}, "
                       f"expected {entry.sha256}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("DENSEVLM_CACHE", Path.home() / ".cache" / "densevlm")) / "zoo"


def weights_path(name: str, weights_dir: Optional[Path] = None) -> Path:
    """A verified full checkpoint of zoo model ``name`` (assembled into the cache for entries with a base)."""
    entry = get_entry(name, weights_dir)
    own = verified_file(entry, weights_dir)
    if entry.base is None:
        return own
    if not entry.full_sha256:
        raise ZooError(f"zoo model '{name}': manifest entry has a base but no full_sha256")
    from safetensors.torch import load_file, save_file

    # The assembled file is checked by the hash of its tensors (names, dtypes, shapes, bytes), which does not
    # depend on how a safetensors version lays out the file.
    target = cache_dir() / f"{name}-{entry.full_sha256[:16]}.safetensors"
    if target.is_file() and sha256_state_dict(load_file(str(target))) == entry.full_sha256:
        return target
    state = load_file(str(weights_path(entry.base, weights_dir)))
    state.update(load_file(str(own)))
    actual = sha256_state_dict(state)
    if actual != entry.full_sha256:
        raise ZooError(f"zoo model '{name}': {entry.file} on top of '{entry.base}' gives tensors with sha256 "
                       f"{actual}, expected {entry.full_sha256}")
    atomic_save(target, lambda p: save_file(state, str(p), metadata={"zoo_model": name}))
    return target
