"""Training-state checkpoints: written atomically, checksummed, the last N kept, resumed from the newest good one.

A checkpoint is one ``torch.save`` file, ``checkpoints/step_XXXXXXXX.pt``, holding everything an exact continuation
needs (model, optimiser, schedule, grad scaler, every process's RNG states, the position inside the epoch). The
pointer file ``checkpoints/latest.json`` lists the kept checkpoints newest last, each with its sha256; it is only
rewritten once a checkpoint file is complete under its final name, so a kill at any moment leaves a pointer to
complete files. On resume each file's sha256 is checked before it is loaded (with ``weights_only=True``: no code
runs on load); a corrupted or truncated one is refused with its path and the previous one is used instead.

accelerate's ``save_state`` is not used: it writes a folder of files (so no single checksum and no atomic
rename) and restores its RNG files with ``weights_only=False``, i.e. it unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from densevlm.utils.hashing import sha256_file
from densevlm.utils.io import atomic_path, atomic_write_json, read_json

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
_NAME = re.compile(r"step_\d{8}\.pt")


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory can be resumed from; the message names each file and why."""


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU (and CUDA, where present) random states, as tensors and numbers."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _entries(run_dir: Path) -> list[dict[str, Any]]:
    """The pointer's checkpoint list, oldest first ([] when there is no pointer)."""
    pointer = run_dir / CKPT_DIR / LATEST
    if not pointer.is_file():
        return []
    try:
        info = read_json(pointer, "checkpoint pointer")
    except ValueError as err:
        raise CheckpointError(f"{err}; delete it to resume from nothing, or restore it") from None
    if isinstance(info, dict) and isinstance(info.get("checkpoints"), list):
        return info["checkpoints"]
    if isinstance(info, dict) and "file" in info:  # the earlier one-file pointer, without a checksum
        return [{"file": info["file"], "sha256": None, "epoch": info.get("epoch")}]
    raise CheckpointError(f"{pointer}: expected a 'checkpoints' list, got {str(info)[:200]}")


def save_checkpoint(run_dir: Path, state: dict[str, Any], *, step: int, keep: int,
                    reason: str = "step") -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically, record its sha256 in ``latest.json``, keep the last ``keep``.

    ``reason`` ("step", "epoch", "preempt") is recorded in the pointer for people reading it.
    """
    ckpt_dir = run_dir / CKPT_DIR
    path = ckpt_dir / f"step_{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
    entry = {"file": path.name, "sha256": digest, "step": step, "epoch": state.get("epoch"),
             "epoch_complete": bool(state.get("epoch_complete")), "reason": reason}
    entries = [e for e in _entries(run_dir) if e.get("file") != path.name] + [entry]
    kept = entries[-keep:]
    atomic_write_json(ckpt_dir / LATEST, {"latest": path.name, "checkpoints": kept})
    # Prune after the pointer moved: files no longer listed (and any orphan left by a kill between a checkpoint's
    # rename and its pointer update).
    names = {e["file"] for e in kept}
    for old in ckpt_dir.iterdir():
        if (_NAME.fullmatch(old.name) or re.fullmatch(r"epoch_\d{4}\.pt", old.name)) and old.name not in names:
            old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint the pointer lists (not verified; see :func:`load_latest_good`), or None."""
    entries = _entries(Path(run_dir))
    return Path(run_dir) / CKPT_DIR / entries[-1]["file"] if entries else None


def verify_checkpoint(path: Path, sha256: Optional[str]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` if it is missing or its sha256 differs from the recorded one."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is listed in {LATEST} but does not exist")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(f"checkpoint {path} is corrupted or truncated: sha256 {actual[:12]}... differs "
                                  f"from the {sha256[:12]}... recorded when it was written")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with code in it, ...: refuse, naming the file
        raise CheckpointError(f"cannot load checkpoint {path}: {str(err).splitlines()[0][:300]}") from None


def load_latest_good(run_dir: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint whose sha256 matches and that loads, with its state; None if the run has none.

    A refused checkpoint is logged with its path and the reason, and the previous one is tried. If every listed
    checkpoint is refused, :class:`CheckpointError` names them all.
    """
    run_dir = Path(run_dir)
    entries = _entries(run_dir)
    refused: list[str] = []
    for entry in reversed(entries):
        path = run_dir / CKPT_DIR / entry["file"]
        try:
            verify_checkpoint(path, entry.get("sha256"))
            state = load_checkpoint(path)
        except CheckpointError as err:
            refused.append(str(err))
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        if refused:
            log.warning("resuming from %s (step %s) instead of the newest checkpoint", path, entry.get("step"))
        return path, state
    if refused:
        raise CheckpointError("no usable checkpoint: " + "; ".join(refused))
    return None
