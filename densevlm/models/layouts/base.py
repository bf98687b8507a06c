"""What every checkpoint layout module provides, and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP

StateDict = dict[str, torch.Tensor]


class ExportError(ValueError):
    """A model cannot be written in the requested layout; the message names the layouts it can take."""


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: how to recognise and convert it on reading, and how to write a model in it.

    Reading (state-dict layouts; None for layouts that are read as a whole folder by the factory):
        ``detect(sd)`` returns None when ``sd`` looks like this layout, else the reason it does not.
        ``convert(sd, clip)`` returns ``sd`` in the open_clip layout of ``clip`` (ValueError with a reason when
        the checkpoint cannot fit it).
    Writing (None for read-only variants):
        ``incompatibility(model)`` returns None when ``model`` can be written, else why not.
        ``outputs(out)`` lists the paths an export to ``out`` creates (checked against overwriting first).
        ``write(model, out)`` writes them, each atomically.
    """

    name: str
    description: str
    detect: Optional[Callable[[Mapping[str, torch.Tensor]], Optional[str]]] = None
    convert: Optional[Callable[[StateDict, nn.Module], StateDict]] = None
    incompatibility: Optional[Callable[["DenseCLIP"], Optional[str]]] = None
    outputs: Optional[Callable[[Path], list[Path]]] = None
    write: Optional[Callable[["DenseCLIP", Path], None]] = None

    @property
    def readable(self) -> bool:
        return self.detect is not None

    @property
    def writable(self) -> bool:
        return self.write is not None


def require_suffix(out: Path, suffixes: tuple[str, ...], layout: str) -> None:
    if out.suffix not in suffixes:
        raise ExportError(f"--out {out}: the '{layout}' layout is written as {' or '.join(suffixes)}, got '{out.suffix}'")


def tensor_dict(model: "DenseCLIP") -> StateDict:
    """The open_clip state dict of ``model``, detached (every tensor of the model, buffers included)."""
    return {k: v.detach() for k, v in model.clip.state_dict().items()}


