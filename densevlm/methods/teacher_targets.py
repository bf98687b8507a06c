"""Where DenseVLM's teacher region targets come from: one interface, four implementations.

- :class:`OnlineTeacher`: the frozen teacher runs on the batch's images and pools its dense map over the boxes.
- :class:`CachedTeacherTargets`: the batch carries the cached features of its drawn cells (``teacher_features``,
  looked up by the dataset in a :class:`~densevlm.data.teacher_cache.TeacherCache`); images the cache lacks
  (``teacher_cache_missing: online``) go to the online teacher.
- :class:`FillingTeacherTargets`: the same, and the teacher's features of every cell of those images are handed to
  the cache (``teacher_cache_missing: fill``); :meth:`~FillingTeacherTargets.on_epoch_start`, which the trainer
  calls on every process at each epoch's start, writes them, waits for the other processes and reads all new
  shards, so from the second epoch on the teacher is not run.
- :class:`CompactTeacherTargets`: the batch carries each drawn cell's compact target (top-k class ids and
  probabilities and the tail mass, :mod:`densevlm.methods.compact_targets`), looked up in a compact target store.

Each gives, per batch, a :class:`TeacherRegionTargets`: :class:`RegionFeatures` (the teacher's region features,
scored against the teacher's text at the objective's temperature) or :class:`RegionDistribution` (the class
distribution itself). Both answer :meth:`~TeacherRegionTargets.logits`, the teacher's log-probabilities over the
vocabulary up to a per-region constant, which is all the objective reads.

The objective (:class:`~densevlm.methods.densevlm.DenseVLMObjective`) gets one of these injected and does no file
I/O itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.methods.compact_targets import (BATCH_IDS, BATCH_PROBS, BATCH_TAIL, CompactDistribution,
                                              compact_logits)


class TeacherRegionTargets(Protocol):
    """The teacher's targets of a batch's valid boxes (``per_image_boxes`` order)."""

    online_images: int  # how many of the batch's images needed the online teacher

    def logits(self, teacher_text: torch.Tensor, temperature: float) -> torch.Tensor:
        """(R, V) float32 teacher log-probabilities over the vocabulary, up to a per-region additive constant
        (``teacher_text``: (V, D_T) unit-norm class embeddings; ``temperature``: DenseVLM's T)."""
        ...


@dataclass
class RegionFeatures:
    """Exact targets: the teacher's region features (R, D_T), not necessarily normalised."""

    features: torch.Tensor
    online_images: int

    def logits(self, teacher_text: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.normalize(self.features.float(), dim=-1) @ teacher_text.t() / temperature


@dataclass
class RegionDistribution:
    """Compact targets: each region's teacher distribution as top-k plus a uniform tail (fixed at build time for
    the store's vocabulary and temperature; ``teacher_text`` gives only the vocabulary size)."""

    distribution: CompactDistribution
    online_images: int

    def logits(self, teacher_text: torch.Tensor, temperature: float) -> torch.Tensor:
        return compact_logits(self.distribution, teacher_text.shape[0])


class TeacherTargets(Protocol):
    """The teacher's region targets of a batch, and the hooks the trainer calls."""

    def prepare(self, device: torch.device) -> None:
        """Move what runs on the device there (called once, through the objective's ``prepare``)."""

    def targets(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> TeacherRegionTargets:
        """The targets of the batch's valid boxes (``per_image_boxes`` order)."""
        ...

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer on every process before each epoch's first batch."""

    def close(self) -> None:
        """Called by the task after training (write what is pending)."""


class OnlineTeacher:
    """The frozen teacher run on every batch (``teacher`` None: a batch that needs it is an error)."""

    def __init__(self, teacher: Optional[nn.Module], autocast: Optional[torch.dtype] = None) -> None:
        self.teacher, self.autocast = teacher, autocast

    def prepare(self, device: torch.device) -> None:
        if self.teacher is not None:
            self.teacher.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def region_features(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """The online teacher's region features (sum K_i, D_T), not normalised."""
        if self.teacher is None:
            raise RuntimeError("DenseVLM objective built without a teacher, but a batch needs it (no cached "
                               "teacher features for some of its images)")
        dtype = self.autocast
        with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return self.teacher.pool_boxes(self.teacher.encode_dense(images), boxes).float()

    def features(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum K_i, D_T) features of the batch's valid boxes, and how many images needed the online teacher."""
        return self.region_features(batch["image"], boxes), len(batch["image"])

    def targets(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> TeacherRegionTargets:
        return RegionFeatures(*self.features(batch, boxes))

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class CachedTeacherTargets:
    """Cached features where the batch carries them (``teacher_features``, ``cached``); the online teacher for the
    images the cache lacks, and for batches without cached features."""

    def __init__(self, online: OnlineTeacher) -> None:
        self.online = online

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self.online.teacher

    def prepare(self, device: torch.device) -> None:
        self.online.prepare(device)

    def targets(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> TeacherRegionTargets:
        return RegionFeatures(*self.features(batch, boxes))

    @torch.no_grad()
    def features(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum K_i, D_T) features of the batch's valid boxes, and how many images needed the online teacher."""
        images = batch["image"]
        if "teacher_features" not in batch:
            return self.online.features(batch, boxes)
        cached = batch["cached"].bool()
        feats = batch["teacher_features"].float()
        if not bool(cached.all()):
            online = (~cached).nonzero().flatten().tolist()
            feats = feats.clone()
            self.fill_uncached(batch, boxes, online, feats)
        return feats[batch["valid"]], len(images) - int(cached.sum())

    def fill_uncached(self, batch: dict[str, Any], boxes: list[torch.Tensor], online: list[int],
                      feats: torch.Tensor) -> None:
        """Write the online teacher's features of the uncached images' valid boxes into ``feats``."""
        computed = self.online.region_features(batch["image"][online], [boxes[i] for i in online])
        for i, part in zip(online, computed.split([len(boxes[i]) for i in online])):
            feats[i, batch["valid"][i]] = part

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class FillingTeacherTargets(CachedTeacherTargets):
    """The lazy mode: uncached images' features of every cell are computed once and added to ``cache`` (a
    :class:`~densevlm.data.teacher_cache.TeacherCache` opened with ``missing="fill"``: ``cell_features``, ``add``,
    ``sync``, ``flush``; this module imports no cache module)."""

    def __init__(self, online: OnlineTeacher, cache: Any) -> None:
        super().__init__(online)
        self.cache = cache

    def fill_uncached(self, batch: dict[str, Any], boxes: list[torch.Tensor], online: list[int],
                      feats: torch.Tensor) -> None:
        """The teacher's features of every cell of the uncached images, handed to the cache; the drawn cells' rows
        (the same boxes, bit for bit) go into ``feats``."""
        if self.online.teacher is None:
            raise RuntimeError("DenseVLM objective filling a teacher cache needs the teacher")
        sizes = [(int(w), int(h)) for w, h in batch["size"][online].tolist()]
        full = self.cache.cell_features(self.online.teacher, batch["image"][online], sizes, self.online.autocast)
        for j, i in enumerate(online):
            valid = batch["valid"][i]
            feats[i, valid] = full[j][batch["cells"][i][valid]]
            self.cache.add(int(batch["index"][i]), full[j])

    def on_epoch_start(self, epoch: int) -> None:
        # Last epoch's fills are written and read (after every process wrote its own) before this epoch's loader
        # workers copy the cache.
        self.cache.sync()

    def close(self) -> None:
        self.cache.flush()  # the last fills: the next run (or epoch, on resume) reads them


class CompactTeacherTargets:
    """Compact targets carried by the batch (``teacher_topk_ids``, ``teacher_topk_probs``, ``teacher_tail``:
    (B, max_boxes, k), (B, max_boxes, k), (B, max_boxes), zero for padding), looked up by the dataset in a compact
    target store (:class:`~densevlm.data.compact_cache.CompactTargetStore`) opened for every image of the
    dataset. The teacher is never run: a compact store fixes the vocabulary and temperature at build time."""

    def prepare(self, device: torch.device) -> None:
        pass

    def targets(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> TeacherRegionTargets:
        if BATCH_IDS not in batch:
            raise RuntimeError(f"compact teacher targets: the batch carries no {BATCH_IDS!r}; the dataset must be "
                               "opened with the compact target store (teacher_targets.kind: compact)")
        valid = batch["valid"]
        dist = CompactDistribution(batch[BATCH_IDS][valid], batch[BATCH_PROBS][valid].float(),
                                   batch[BATCH_TAIL][valid].float())
        return RegionDistribution(dist, 0)

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


def as_teacher_targets(teacher: Any, autocast: Optional[torch.dtype] = None) -> TeacherTargets:
    """``teacher`` when it is already :class:`TeacherTargets`; a module (or None) becomes the online teacher that
    also reads cached features from batches carrying them."""
    if hasattr(teacher, "targets") and hasattr(teacher, "on_epoch_start"):
        return teacher
    return CachedTeacherTargets(OnlineTeacher(teacher, autocast))
