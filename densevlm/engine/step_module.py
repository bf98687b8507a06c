"""Route every trainable forward through the distributed wrapper."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


class StepModule(nn.Module):
    """Wraps the trained model so that an objective's forward runs inside ``DDP.forward``.

    ``step_module(fn, *args)`` calls ``fn(model, *args)``. Wrapping this module with DDP (accelerate does it)
    means every objective, whatever model methods it calls (``encode_dense``, ``pool_boxes`` ...), gets its
    gradients all-reduced across processes. Calling ``model.module.encode_dense`` directly would not.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)
