"""Turn a finished run directory into a zoo entry: fp16 safetensors beside the manifest, sha256, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from densevlm.utils.hashing import sha256_file, sha256_state_dict
from densevlm.utils.io import atomic_save, atomic_write_json, read_json
from densevlm.zoo.registry import (
    MANIFEST_FORMAT,
    ZooError,
    get_entry,
    manifest_path,
    verified_file,
    zoo_dir,
)


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.half() if torch.is_floating_point(v) else v).contiguous() for k, v in state.items()}


def check_publish(names: list[str], weights_dir: Optional[Path] = None, overwrite: bool = False) -> None:
    """Refuse now what :func:`publish` would refuse at the end of a build: an unreadable manifest, or entries of
    these names without ``overwrite``."""
    mpath = manifest_path(zoo_dir(weights_dir))
    if not mpath.exists():
        return
    manifest = read_json(mpath, "zoo manifest")
    models = manifest.get("models") if isinstance(manifest, dict) else None
    if not isinstance(models, dict):
        raise ZooError(f"{mpath}: expected a JSON object with a 'models' object")
    taken = [n for n in names if n in models]
    if taken and not overwrite:
        names = ", ".join(f"'{n}'" for n in taken)
        what = f"zoo model {names} already exists" if len(taken) == 1 else f"zoo models {names} already exist"
        raise ZooError(f"{mpath}: {what}; pass --overwrite to replace, or publish into another folder")


def publish(
    run_dir: str | Path,
    name: str,
    *,
    architecture: str,
    info: dict[str, Any],
    role: str = "",
    base: Optional[str] = None,
    only_prefix: Optional[str] = None,
    weights_dir: Optional[Path] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``<weights_dir>/<name>.safetensors`` (fp16) from ``run_dir`` and record it in the manifest.

    Args:
        run_dir: a run directory holding ``weights.safetensors`` (open_clip layout).
        name: the zoo name.
        architecture: the open_clip model name the weights belong to.
        info: provenance and quality (recipe, world, steps, wall time, metrics, command, ...).
        base, only_prefix: ship only the tensors whose names start with ``only_prefix``; the entry ``base``
            supplies the others (they must be bit-identical to its fp16 tensors, which is checked).
        weights_dir: the zoo folder (default: the package's); ``--from-scratch`` builds never write there.
        overwrite: replace an existing entry of that name.
    """
    from safetensors.torch import load_file, save_file

    wdir = zoo_dir(weights_dir)
    mpath = manifest_path(wdir)
    check_publish([name], wdir, overwrite)
    manifest = read_json(mpath, "zoo manifest") if mpath.is_file() else {"format": MANIFEST_FORMAT, "models": {}}
    src = Path(run_dir) / "weights.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"run directory {run_dir}: weights.safetensors not found")
    full = _half(load_file(str(src)))
    shipped = full
    row: dict[str, Any] = {"architecture": architecture, "file": f"{name}.safetensors", "role": role}
    if base is not None:
        if not only_prefix:
            raise ValueError("an entry with a base needs only_prefix (the tensors it ships)")
        base_state = load_file(str(verified_file(get_entry(base, wdir), wdir)))
        if set(base_state) != set(full):
            raise ZooError(f"run {run_dir} and zoo model '{base}' hold different tensor names")
        changed = [k for k in full if not k.startswith(only_prefix) and not torch.equal(full[k], base_state[k])]
        if changed:
            raise ZooError(f"run {run_dir} changed {len(changed)} tensors outside '{only_prefix}' relative to "
                           f"'{base}' (e.g. {changed[:3]}); it cannot ship as a '{only_prefix}' delta")
        shipped = {k: v for k, v in full.items() if k.startswith(only_prefix)}
        row.update(base=base, full_sha256=sha256_state_dict(full))
    target = wdir / row["file"]
    atomic_save(target, lambda p: save_file(shipped, str(p), metadata={"zoo_model": name,
                                                                       "architecture": architecture}))
    row["sha256"] = sha256_file(target)
    row["bytes"] = target.stat().st_size
    row["params"] = int(sum(v.numel() for v in full.values()))
    row["dtype"] = "float16"
    row.update(info)
    manifest["models"][name] = row
    atomic_write_json(mpath, manifest)
    return target
