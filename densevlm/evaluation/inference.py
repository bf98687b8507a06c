"""One inference loop for every evaluation, as detectron2's ``inference_on_dataset``.

``model`` is any callable from a loader batch to the outputs its evaluator expects; ``evaluator`` has the
``reset / process(inputs, outputs) / evaluate`` shape. The loop owns the progress bar and the timing split
(waiting for the loader vs. running the model and the evaluator); device placement belongs to ``model``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
from tqdm.auto import tqdm


class DatasetEvaluator(Protocol):
    """detectron2's evaluator shape."""

    def reset(self) -> None: ...

    def process(self, inputs: Any, outputs: Any) -> None: ...

    def evaluate(self) -> Any: ...


@torch.no_grad()
def inference_on_dataset(model: Callable[[Any], Any], loader: Iterable[Any], evaluator: DatasetEvaluator, *,
                         total: int, desc: str, progress: bool = True, max_batches: Optional[int] = None,
                         batch_images: Callable[[Any], int] = len) -> dict[str, float]:
    """Reset ``evaluator``, then feed every batch of ``loader`` through ``model`` into ``evaluator.process``.

    Args:
        total: images the progress bar counts to; desc: its label.
        max_batches: stop after this many batches (warm-up runs).
        batch_images: images in a batch (for the bar and the throughput).

    Returns seconds ``total``, ``data`` (waiting for the loader) and ``model`` (the model and ``process``; an
    evaluator that moves results to the CPU synchronises CUDA, so the split is honest), and ``images``.
    The evaluator's results are left for the caller to ``evaluate()``.
    """
    evaluator.reset()
    timing = {"total": 0.0, "data": 0.0, "model": 0.0, "images": 0}
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        tick = time.perf_counter()
        for n, batch in enumerate(loader):
            if max_batches is not None and n >= max_batches:
                break
            got = time.perf_counter()
            timing["data"] += got - tick
            evaluator.process(batch, model(batch))
            tick = time.perf_counter()
            timing["model"] += tick - got
            images = batch_images(batch)
            timing["images"] += images
            bar.update(images)
    timing["total"] = time.perf_counter() - start
    return timing
