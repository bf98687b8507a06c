"""Region classification: how well pooled dense features name ground-truth regions (DenseVLM Table 1).

The protocol follows the reference (CLIPSelf/DenseVLM ``zero_shot.py``): every kept ground-truth segment of a
panoptic split is pooled from the model's dense map, as a box (``rois``: RoIAlign 1×1, thing segments) and as
a mask (``maskpool``: token-weighted mean, things and stuff), classified by cosine against the text embeddings
of *all* classes of the vocabulary, and scored by mean per-class accuracy (macc, percent; the mean over classes
with at least one region) at top-1 and top-5, separately for thing and stuff classes. With an open-vocabulary
vocabulary (novel classes), the same numbers are also given over seen and over novel classes.

:class:`RegionClassificationEvaluator` has detectron2's ``reset / process / evaluate`` shape;
:func:`evaluate_regions` is the driver (build: :func:`place_region_model`, :func:`build_region_evaluator`; run:
:func:`run_region_evaluation` through :func:`~densevlm.evaluation.inference.inference_on_dataset`; report:
:func:`region_result`, :mod:`densevlm.evaluation.report`); :func:`format_table` prints one or several results
side by side.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from densevlm.config.core import to_dict
from densevlm.config.evaluation import RegionEvalConfig
from densevlm.data.panoptic import PanopticRegionDataset, region_loader
from densevlm.evaluation.inference import inference_on_dataset
from densevlm.evaluation.protocol import POOLINGS, TEACHER_TEMPERATURE, TOPK
from densevlm.evaluation.report import write_region_report
from densevlm.utils.device import module_device, resolve_device
from densevlm.vocab.commands import text_embeddings_from_config
from densevlm.vocab.registry import get_vocabulary
from densevlm.vocab.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

RESULT_FILE = "regions.json"


class RegionClassificationEvaluator:
    """Accumulates region classifications and reports mean per-class accuracies.

    Args:
        vocabulary: the classes; labels index its columns, its flags split thing/stuff and seen/novel.
        text_embeddings: (N, D) class embeddings in the vocabulary's order (L2-normalised here).
        temperature: softmax temperature of the per-class mean probabilities kept for diagnostics.
        poolings: pooling name -> region kinds it is scored on (default :data:`POOLINGS`).

    ``process(inputs, outputs)``: ``inputs`` is a collated batch (``labels`` and ``isthing``: one tensor per
    image); ``outputs`` maps a pooling name to the (R, D) region features of that batch, in image order and,
    within an image, in region order, covering only the regions of the pooling's kinds (``rois``: the thing
    regions). Features need not be normalised.
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        text_embeddings: torch.Tensor,
        *,
        temperature: float = TEACHER_TEMPERATURE,
        poolings: Optional[Mapping[str, Sequence[str]]] = None,
    ) -> None:
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] != len(vocabulary):
            raise ValueError(
                f"text embeddings: expected ({len(vocabulary)}, D) for vocabulary {vocabulary.name!r}, got shape "
                f"{tuple(text_embeddings.shape)}"
            )
        self.vocabulary = vocabulary
        self.text = F.normalize(text_embeddings.detach().float(), dim=-1)
        self.temperature = float(temperature)
        self.poolings = {k: tuple(v) for k, v in (poolings or POOLINGS).items()}
        self.num_classes = len(vocabulary)
        self.reset()

    def reset(self) -> None:
        n = self.num_classes
        self._labels: dict[str, list[torch.Tensor]] = {p: [] for p in self.poolings}
        self._ranks: dict[str, list[torch.Tensor]] = {p: [] for p in self.poolings}
        # Top-1 confusion and summed class probabilities per ground-truth class: C×C each, whatever the size
        # of the dataset, and all the diagnostics need.
        self._confusion = {p: torch.zeros(n, n, dtype=torch.long) for p in self.poolings}
        self._prob_sum = {p: torch.zeros(n, n, dtype=torch.float64) for p in self.poolings}
        self.images = 0

    def _select(self, inputs: Mapping[str, Any], pooling: str) -> torch.Tensor:
        kinds = self.poolings[pooling]
        labels = []
        for lab, thing in zip(inputs["labels"], inputs["isthing"]):
            lab, thing = torch.as_tensor(lab).long(), torch.as_tensor(thing).bool()
            keep = torch.zeros_like(thing)
            if "thing" in kinds:
                keep |= thing
            if "stuff" in kinds:
                keep |= ~thing
            labels.append(lab[keep])
        return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        self.images += len(inputs["labels"])
        for pooling, features in outputs.items():
            if pooling not in self.poolings:
                raise KeyError(f"unknown pooling {pooling!r}; expected one of {list(self.poolings)}")
            labels = self._select(inputs, pooling)
            if features.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{pooling}: got {features.shape[0]} region features for {labels.shape[0]} regions of kinds "
                    f"{self.poolings[pooling]} in the batch"
                )
            if labels.numel() == 0:
                continue
            if labels.max() >= self.num_classes or labels.min() < 0:
                raise ValueError(f"{pooling}: labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
            text = self.text.to(features.device)
            logits = F.normalize(features.float(), dim=-1) @ text.T  # (R, C) cosine
            true = logits.gather(1, labels.to(features.device).view(-1, 1))
            # Rank of the true class = other classes scoring at least as high; rank < k is a top-k hit. Counting
            # ties against the region keeps a degenerate (zero or NaN) feature from scoring as a hit.
            ranks = ((logits >= true).sum(1) - 1).cpu()
            ranks[~torch.isfinite(true.view(-1).cpu())] = self.num_classes
            self._labels[pooling].append(labels.cpu())
            self._ranks[pooling].append(ranks)
            pred = logits.argmax(1).cpu()
            self._confusion[pooling].index_put_((labels.cpu(), pred), torch.ones_like(pred), accumulate=True)
            probs = torch.softmax(logits / self.temperature, dim=1).double().cpu()
            self._prob_sum[pooling].index_add_(0, labels.cpu(), probs)

    # ------------------------------------------------------------------ results

    def _groups(self) -> list[tuple[str, torch.Tensor]]:
        """(suffix, class mask): thing and stuff, then their seen/novel parts when the vocabulary has novel classes."""
        thing = self.vocabulary.thing_mask
        novel = self.vocabulary.novel_mask
        groups = [("thing", thing), ("stuff", ~thing)]
        if bool(novel.any()):
            groups += [
                ("thing.seen", thing & ~novel), ("thing.novel", thing & novel),
                ("stuff.seen", ~thing & ~novel), ("stuff.novel", ~thing & novel),
            ]
        return groups

    def per_class_counts(self, pooling: str) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(regions per class, {k: top-k hits per class}) of one pooling."""
        n = self.num_classes
        if self._labels[pooling]:
            labels = torch.cat(self._labels[pooling])
            ranks = torch.cat(self._ranks[pooling])
        else:
            labels = ranks = torch.zeros(0, dtype=torch.long)
        regions = torch.bincount(labels, minlength=n)
        hits = {k: torch.bincount(labels[ranks < k], minlength=n) for k in TOPK}
        return regions, hits

    def evaluate(self) -> dict[str, Any]:
        """``metrics`` (macc, percent; None where a group has no region), ``counts``, ``per_class`` rows."""
        metrics: dict[str, Optional[float]] = {}
        counts: dict[str, int] = {"images": self.images}
        per_class: list[dict[str, Any]] = [
            {"index": i, "name": c.name, "id": c.id, "isthing": c.isthing, "novel": c.novel}
            for i, c in enumerate(self.vocabulary.classes)
        ]
        thing_cols = self.vocabulary.thing_mask
        for pooling, kinds in self.poolings.items():
            regions, hits = self.per_class_counts(pooling)
            acc = {k: hits[k].double() / regions.clamp(min=1).double() for k in TOPK}
            for suffix, class_mask in self._groups():
                if suffix.split(".")[0] not in kinds:
                    continue
                present = class_mask & (regions > 0)
                key = f"{pooling}.{suffix}"
                counts[f"{key}.regions"] = int(regions[class_mask].sum())
                counts[f"{key}.classes"] = int(present.sum())
                for k in TOPK:
                    metrics[f"{key}.macc{k}"] = float(acc[k][present].mean() * 100) if bool(present.any()) else None
            mean_prob = self._prob_sum[pooling] / regions.clamp(min=1).double().unsqueeze(1)
            for i, row in enumerate(per_class):
                n_i = int(regions[i])
                if ("thing" if row["isthing"] else "stuff") not in kinds:
                    continue
                row[f"{pooling}.regions"] = n_i
                for k in TOPK:
                    row[f"{pooling}.acc{k}"] = float(acc[k][i] * 100) if n_i else None
                if not n_i:
                    continue
                row[f"{pooling}.p_correct"] = float(mean_prob[i, i])
                # The thing class that takes the most probability from this class (itself excluded): for stuff,
                # the foreground bias of the paper ("sky" -> "building").
                p_things = mean_prob[i].clone()
                p_things[~thing_cols] = -1.0
                p_things[i] = -1.0
                j = int(p_things.argmax())
                row[f"{pooling}.confused_thing"] = self.vocabulary.classes[j].name
                row[f"{pooling}.confused_thing_index"] = j
                row[f"{pooling}.p_confused_thing"] = float(mean_prob[i, j])
                top1 = int(self._confusion[pooling][i].argmax())
                row[f"{pooling}.top_prediction"] = self.vocabulary.classes[top1].name
        return {"metrics": metrics, "counts": counts, "per_class": per_class, "temperature": self.temperature}

    def confusion(self, pooling: str) -> np.ndarray:
        """(C, C) top-1 confusion counts of one pooling (rows: ground truth)."""
        return self._confusion[pooling].numpy().copy()


# ---------------------------------------------------------------------- driver


def build_region_dataset(cfg: RegionEvalConfig, patch_size: int, image_mean: Sequence[float],
                         image_std: Sequence[float]) -> PanopticRegionDataset:
    """The panoptic region dataset of ``cfg``, labelled in ``cfg.text.vocabulary`` ('' = the json's categories)."""
    vocabulary = get_vocabulary(cfg.text.vocabulary) if cfg.text.vocabulary else None
    return PanopticRegionDataset(cfg.data, patch_size, vocabulary, image_mean=image_mean, image_std=image_std)


class RegionPooler:
    """The model step of region classification: a collated batch in, the pooled region features out.

    Thing boxes go to ``rois`` (RoIAlign 1×1), every mask to ``maskpool``, both from one dense map of
    ``model`` on ``device``.
    """

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device = model, device

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        model, device = self.model, self.device
        dense = model.encode_dense(batch["images"].to(device, non_blocking=True))
        thing_boxes = [b[t].to(device) for b, t in zip(batch["boxes"], batch["isthing"])]
        masks = [m.to(device) for m in batch["masks"]]
        return {"rois": model.pool_boxes(dense, thing_boxes), "maskpool": model.pool_masks(dense, masks)}


def run_region_evaluation(
    model: Any,
    dataset: PanopticRegionDataset,
    evaluator: RegionClassificationEvaluator,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool = True,
    max_batches: Optional[int] = None,
) -> dict[str, Any]:
    """Feed the batches of ``dataset`` through ``model`` into ``evaluator`` (thing boxes to ``rois``, every mask
    to ``maskpool``), after resetting it.

    Returns ``images`` processed and seconds: ``total``, ``data`` (waiting for the loader) and ``model`` (dense
    map, pooling, classification; the evaluator moves results to the CPU each batch, which synchronises CUDA,
    so the split is honest). ``max_batches`` stops early (warm-up runs).
    """
    loader = region_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    total = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    return inference_on_dataset(RegionPooler(model, device), loader, evaluator, total=total,
                                desc="region classification", progress=progress, max_batches=max_batches,
                                batch_images=lambda batch: len(batch["labels"]))


def place_region_model(model: Any, cfg: RegionEvalConfig) -> tuple[Any, torch.device]:
    """(model, device): ``cfg.model`` built on ``cfg.device`` when ``model`` is None; a model handed in stays
    where its owner put it when ``cfg.device`` is "auto" and is moved otherwise."""
    if model is None:
        from densevlm.models import create_backbone

        model = create_backbone(cfg.model)
        device = resolve_device(cfg.device)
        model = model.to(device)
    elif cfg.device == "auto":  # a model handed in stays where its owner put it
        device = module_device(model)
    else:
        device = resolve_device(cfg.device)
        model = model.to(device)
    return model, device


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode inside, given back in the mode it came in."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


def build_region_evaluator(model: Any, cfg: RegionEvalConfig, dataset: PanopticRegionDataset, *,
                           progress: bool = True) -> RegionClassificationEvaluator:
    """The evaluator of ``cfg`` over the text embeddings of the dataset's vocabulary, by ``model``."""
    vocabulary, text = text_embeddings_from_config(model, cfg.text, dataset.vocabulary, progress=progress)
    ids = vocabulary.ids
    if str(cfg.text.embeddings_path or "").endswith(".npy") and None not in ids and ids != sorted(ids):
        # Reference .npy files carry no class names; their rows follow ascending category id.
        logger.warning(
            "%s has no class metadata and vocabulary %r is not in ascending id order; check that its rows "
            "follow the vocabulary's order", cfg.text.embeddings_path, vocabulary.name,
        )
    return RegionClassificationEvaluator(vocabulary, text, temperature=cfg.temperature)


def region_result(evaluator: RegionClassificationEvaluator, model: Any, dataset: PanopticRegionDataset,
                  timing: Mapping[str, Any], cfg: RegionEvalConfig, device: torch.device) -> dict[str, Any]:
    """What ``regions.json`` holds: the evaluator's results, then model, data, vocabulary, timing and config."""
    vocabulary = evaluator.vocabulary
    result = evaluator.evaluate()
    result["model"] = {
        "name": getattr(model, "name", type(model).__name__),
        "weights_id": getattr(model, "weights_id", None),
        "source": getattr(model, "source", None),
        "patch_size": model.patch_size,
    }
    result["data"] = {
        "panoptic_json": str(dataset.json_path),
        "panoptic_root": str(dataset.png_root),
        "image_root": str(dataset.image_root),
        "image_size": cfg.data.image_size,
        "token_grid": dataset.grid,
        "images": len(dataset),
    }
    result["vocabulary"] = {
        "name": vocabulary.name,
        "fingerprint": vocabulary.fingerprint,
        "classes": len(vocabulary),
        "things": int(vocabulary.thing_mask.sum()),
        "novel": int(vocabulary.novel_mask.sum()),
    }
    result["timing"] = {
        "seconds": timing["total"], "data_seconds": timing["data"], "model_seconds": timing["model"],
        "images_per_s": timing["images"] / timing["total"] if timing["total"] > 0 else None,
        "device": str(device), "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
    }
    result["config"] = to_dict(cfg)
    return result


def evaluate_regions(model: Any, cfg: RegionEvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Region classification of ``model`` (a :class:`densevlm.models.DenseCLIP`; None builds ``cfg.model``).

    A model handed in stays on its device when ``cfg.device`` is "auto" and is moved otherwise; it is put in
    eval mode for the run and given back in the mode it came in.

    Writes ``<output_dir>/regions.json`` (metrics, counts, per-class table, model/data/vocabulary details,
    timing, config) and, with ``cfg.diagnostics``, the per-class table and the foreground-bias figure; prints
    the metric table. Returns what ``regions.json`` holds.
    """
    model, device = place_region_model(model, cfg)
    with _eval_mode(model):
        dataset = build_region_dataset(cfg, model.patch_size, model.image_mean, model.image_std)
        evaluator = build_region_evaluator(model, cfg, dataset, progress=progress)
        timing = run_region_evaluation(
            model, dataset, evaluator, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device,
            progress=progress,
        )
    result = region_result(evaluator, model, dataset, timing, cfg, device)
    write_region_report(result, Path(cfg.output_dir), RESULT_FILE, diagnostics=cfg.diagnostics)
    print(format_table(result))
    return result


# ---------------------------------------------------------------------- table


def _metrics_of(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(metrics, counts) of a result dict (``regions.json``) or of a bare metrics mapping."""
    if isinstance(obj.get("metrics"), Mapping):
        return obj["metrics"], obj.get("counts", {}) or {}
    return obj, {}


def _is_single(obj: Mapping[str, Any]) -> bool:
    if isinstance(obj.get("metrics"), Mapping):
        return True
    return all(v is None or isinstance(v, (int, float)) for v in obj.values())


def metric_rows(keys: Sequence[str]) -> list[str]:
    """Row names (``pooling.kind[.split]``) present among metric keys, in the Table 1 order."""
    prefixes = []
    for key in keys:
        head, _, tail = key.rpartition(".")
        if tail.startswith("macc") and head not in prefixes:
            prefixes.append(head)

    def order(prefix: str) -> tuple[int, int, int]:
        parts = prefix.split(".")
        pooling = list(POOLINGS).index(parts[0]) if parts[0] in POOLINGS else len(POOLINGS)
        kind = 0 if parts[1:2] == ["thing"] else 1
        split = {None: 0, "seen": 1, "novel": 2}.get(parts[2] if len(parts) > 2 else None, 3)
        return (split, pooling, kind)

    return sorted(prefixes, key=order)


def format_table(
    results: Mapping[str, Any], *, title: str = "region classification (mean per-class accuracy, %)"
) -> str:
    """A text table of macc top-1/top-5 per pooling and kind.

    ``results`` is one result (``regions.json`` dict or bare metrics mapping) or a mapping of model name ->
    result, printed side by side (e.g. base / CLIPSelf / DenseVLM). Missing values print as "-".
    """
    named = {"": results} if _is_single(results) else dict(results)
    columns = {name: _metrics_of(r) for name, r in named.items()}
    keys: list[str] = []
    for metrics, _ in columns.values():
        keys += [k for k in metrics if k not in keys]
    rows = metric_rows(keys)
    topk = sorted({int(k.rpartition("macc")[2]) for k in keys if "macc" in k})
    cell = 7
    # Each model's group of top-k columns is widened to fit its name; the first column takes the slack.
    widths = {name: [max(cell, len(name) + 1 - cell * (len(topk) - 1))] + [cell] * (len(topk) - 1)
              for name in columns}
    label_w = max([len(r) for r in rows] + [len("regions")]) + 2
    first_counts = next(iter(columns.values()))[1]
    count_head = f"{'regions':>9}" if first_counts else ""
    lines = [title]
    if any(columns):
        lines.append(" " * label_w + "".join(f"{name:>{sum(widths[name])}}" for name in columns))
    lines.append(" " * label_w + "".join(
        f"{'top' + str(k):>{w}}" for name in columns for k, w in zip(topk, widths[name])) + count_head)
    for row in rows:
        line = f"{row:<{label_w}}"
        for name, (metrics, _) in columns.items():
            for k, w in zip(topk, widths[name]):
                v = metrics.get(f"{row}.macc{k}")
                line += f"{v:>{w}.1f}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>{w}}"
        if first_counts:
            n = first_counts.get(f"{row}.regions")
            line += f"{n:>9d}" if isinstance(n, int) else f"{'-':>9}"
        lines.append(line)
    return "\n".join(lines)
