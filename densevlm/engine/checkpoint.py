"""Training-state checkpoints (model, optimiser, schedule, RNG), written atomically, one per epoch."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densevlm.utils.io import atomic_path, atomic_write_json, read_json

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, epoch: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/epoch_XXXX.pt`` atomically, then point ``latest.json`` at it, then prune old ones.

    The pointer is only moved once the file is complete, so a crash mid-write leaves the previous checkpoint
    as the one resumed from.
    """
    ckpt_dir = run_dir / CKPT_DIR
    path = ckpt_dir / f"epoch_{epoch:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    atomic_write_json(ckpt_dir / LATEST, {"epoch": epoch, "file": path.name})
    existing = sorted(p for p in ckpt_dir.glob("epoch_*.pt") if re.fullmatch(r"epoch_\d{4}\.pt", p.name))
    for old in existing[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    info = read_json(pointer, "checkpoint pointer")
    path = run_dir / CKPT_DIR / info["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which does not exist")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
