"""sha256 of files and of state dicts: the one hashing helper for checkpoints, the engine and the zoo."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    import torch  # torch is heavy; sha256_file (the zoo's listing and checks) does not need it

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes first: numpy has no bfloat16, and this hashes the exact stored bits
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
