"""The reference region-classification protocol's constants, shared by the evaluator and its diagnostics."""

from __future__ import annotations

#: pooling name -> the region kinds it is scored on (``rois`` on thing boxes only, as in Table 1's "Boxes").
POOLINGS: dict[str, tuple[str, ...]] = {"rois": ("thing",), "maskpool": ("thing", "stuff")}
TOPK: tuple[int, ...] = (1, 5)
#: DenseVLM's teacher temperature: softmax(cos / 0.01) gives the class probabilities of the diagnostics.
TEACHER_TEMPERATURE = 0.01
