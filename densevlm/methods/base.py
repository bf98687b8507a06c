"""The objective interface: every method is a small object plugged into the one training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """A scalar loss to back-propagate and detached scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """A training objective.

    ``step_model`` is the (possibly DDP-wrapped) :class:`~densevlm.engine.step_module.StepModule`. The objective
    must run every computation that needs gradients through ONE call ``step_model(fn, *args)``, where ``fn`` takes
    the bare model first: this is what lets DDP all-reduce gradients (the reference code bypassed the wrapper and
    its gradients never synced across GPUs).
    """

    def prepare(self, device: torch.device) -> None:
        """Move frozen teachers, text embeddings etc. to ``device`` (called once by the engine)."""

    def __call__(self, step_model: nn.Module, batch: Any) -> ObjectiveOutput:
        ...
