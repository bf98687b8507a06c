"""What the interactive explorer shows, as plain functions of arrays (the gradio page in :mod:`densevlm.app.ui` only
lays them out): dense segmentation by several models, the probability map of one class, the teacher's proposed
labels for regions.

Every image is segmented at ``image_size`` on its short side (dense CLIP, one window) and the logits are brought
back to the image's own size, as ``densevlm eval semseg`` does; class probabilities are ``softmax(cos / 0.01)``,
DenseVLM's teacher temperature, as the diagnostics draw them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densevlm.config.report import AppConfig, model_label, model_source
from densevlm.data.semseg import resize_short_side
from densevlm.data.transforms import to_tensor
from densevlm.evaluation.protocol import TEACHER_TEMPERATURE
from densevlm.evaluation.semseg_figures import class_palette, colourise
from densevlm.models import create_backbone
from densevlm.models.model_arg import spec_from_model_arg
from densevlm.segmenters.dense_clip import DenseCLIPSegmenter
from densevlm.segmenters.inference import predict
from densevlm.viz.figures import plt
from densevlm.vocab.embeddings import build_text_embeddings
from densevlm.vocab.templates import get_templates
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary

log = logging.getLogger(__name__)

#: The toy zoo, offered when no model is named.
TOY_MODELS = ("base=toy-student", "clipself=toy-teacher-clipself")
GAP = 8  # white pixels between the panels of a side-by-side image


def parse_classes(text: str, known: Optional[Vocabulary] = None) -> Vocabulary:
    """Comma-separated class names as a vocabulary; a name of ``known`` (the world's) keeps its thing/stuff flag,
    any other is a thing unless written ``name (stuff)``."""
    flags = {n.lower(): c.isthing for c in (known.classes if known else ()) for n in c.all_names}
    entries = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        stuff = name.lower().endswith("(stuff)")
        if stuff:
            name = name[: -len("(stuff)")].strip()
        isthing = False if stuff else flags.get(name.lower(), True)
        if any(e.name == name for e in entries):
            continue
        entries.append(ClassEntry(name, isthing=isthing))
    if len(entries) < 2:
        raise ValueError(f"classes: type at least two class names separated by commas, got {text!r}")
    return Vocabulary("typed", tuple(entries))


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 panels of one size in a row, ``GAP`` white pixels apart."""
    h = panels[0].shape[0]
    gap = np.full((h, GAP, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for i, p in enumerate(panels):
        row += ([gap] if i else []) + [p]
    return np.concatenate(row, axis=1)


def split_panels(image: np.ndarray, width: int) -> list[np.ndarray]:
    """The panels of a :func:`side_by_side` image whose panels are ``width`` pixels wide."""
    n = (image.shape[1] + GAP) // (width + GAP)
    return [image[:, i * (width + GAP): i * (width + GAP) + width] for i in range(n)]


def probability_image(prob: np.ndarray) -> np.ndarray:
    """(H, W) probabilities in [0, 1] -> (H, W, 3) uint8 through the magma colour map (0 dark, 1 bright)."""
    rgba = plt.get_cmap("magma")(np.clip(prob, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def legend_html(vocabulary: Vocabulary) -> str:
    """Colour swatches naming each class, in the palette of :func:`colourise`."""
    palette = class_palette(len(vocabulary))
    items = [f"<span style='display:inline-block;margin:2px 8px'><span style='display:inline-block;width:12px;"
             f"height:12px;background:rgb{tuple(int(v) for v in palette[i])};vertical-align:middle'></span> "
             f"{c.name}{'' if c.isthing else ' (stuff)'}</span>" for i, c in enumerate(vocabulary.classes)]
    return "<div class='legend'>" + "".join(items) + "</div>"


@dataclass
class Segmentation:
    """One model's view of one image: ``pred`` (H, W) class indices and ``probs`` (C, H, W) probabilities."""

    pred: np.ndarray
    probs: np.ndarray


class Explorer:
    """The models of the app, loaded once (lazily) and shared by every request; one request runs at a time."""

    def __init__(self, cfg: AppConfig, known: Optional[Vocabulary] = None) -> None:
        self.cfg = cfg
        entries = list(cfg.models) or list(TOY_MODELS)
        self.sources = {model_label(e): model_source(e) for e in entries}
        self.known = known
        self.templates = get_templates(cfg.templates)
        self._models: dict[str, Any] = {}
        self._text: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self.lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        return list(self.sources)

    def model(self, label: str) -> Any:
        """The backbone of a model label (or of the teacher, under its source), loaded on first use."""
        source = self.sources.get(label, label)
        if source not in self._models:
            self._models[source] = create_backbone(spec_from_model_arg(source)).eval()
        return self._models[source]

    def text(self, label: str, vocabulary: Vocabulary) -> torch.Tensor:
        key = (self.sources.get(label, label), tuple(vocabulary.names))
        if key not in self._text:
            self._text[key] = build_text_embeddings(self.model(label), vocabulary, self.templates, progress=False)
        return self._text[key]

    def canvas(self, image: np.ndarray, model: Any) -> torch.Tensor:
        """The image as the model sees it: normalised, short side at ``image_size`` (bilinear, as evaluation)."""
        x = to_tensor(_pil(image), model.image_mean, model.image_std)
        size = resize_short_side(tuple(x.shape[-2:]), self.cfg.image_size, 4 * self.cfg.image_size)
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        return x

    @torch.no_grad()
    def segment(self, label: str, image: np.ndarray, vocabulary: Vocabulary) -> Segmentation:
        """Dense segmentation of an (H, W, 3) uint8 image among ``vocabulary`` by model ``label``."""
        model = self.model(label)
        segmenter = DenseCLIPSegmenter(model, self.text(label, vocabulary), vocabulary.names)
        logits = predict(segmenter, [self.canvas(image, model)], [image.shape[:2]], mode="whole")[0]
        probs = torch.softmax(logits / TEACHER_TEMPERATURE, dim=0)
        return Segmentation(pred=logits.argmax(0).numpy(), probs=probs.numpy())

    @torch.no_grad()
    def grid_labels(self, image: np.ndarray, vocabulary: Vocabulary, *, top_k: int = 3) -> list[dict[str, Any]]:
        """The teacher's top-k labels of the ``grid`` x ``grid`` cells of an image (RoIAlign 1x1 of each cell on
        its dense map, softmax of cos / T over ``vocabulary``, as DenseVLM's targets); each row: the cell's box
        (x0, y0, x1, y1 in pixels), ``labels`` [(class, probability)], ``route`` of the best class (thing/stuff)
        and whether it ``passes`` the confidence threshold."""
        teacher = self.cfg.teacher
        model = self.model(teacher)
        x = self.canvas(image, model)
        h, w = x.shape[-2:]
        p = model.patch_size
        dense = model.encode_dense(F.pad(x, (0, -w % p, 0, -h % p))[None])
        g = self.cfg.grid
        # Cells in normalised coordinates of the padded canvas the dense map covers.
        H, W = h + (-h % p), w + (-w % p)
        cells = [(c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g) for r in range(g) for c in range(g)]
        boxes = torch.tensor([[x0 / W, y0 / H, x1 / W, y1 / H] for x0, y0, x1, y1 in cells], dtype=torch.float32)
        feats = F.normalize(model.pool_boxes(dense, [boxes]).float(), dim=-1)
        text = F.normalize(self.text(teacher, vocabulary).float(), dim=-1)
        probs = torch.softmax(feats @ text.T / TEACHER_TEMPERATURE, dim=-1)
        sy, sx = image.shape[0] / h, image.shape[1] / w
        rows = []
        for cell, prob in zip(cells, probs):
            top = torch.topk(prob, min(top_k, len(vocabulary)))
            best = int(top.indices[0])
            rows.append({"box": [round(cell[0] * sx), round(cell[1] * sy), round(cell[2] * sx), round(cell[3] * sy)],
                         "labels": [(vocabulary.names[int(i)], float(v)) for v, i in zip(top.values, top.indices)],
                         "route": "thing" if vocabulary.classes[best].isthing else "stuff",
                         "passes": float(top.values[0]) > self.cfg.threshold, "class_index": best})
        return rows


def labels_overlay(image: np.ndarray, rows: Sequence[dict[str, Any]], num_classes: int,
                   alpha: float = 0.5) -> np.ndarray:
    """The image with each region filled in its best class's colour (faint when it fails the threshold)."""
    palette = class_palette(num_classes)
    out = image.astype(np.float32).copy()
    for row in rows:
        x0, y0, x1, y1 = row["box"]
        a = alpha if row["passes"] else alpha / 3
        out[y0:y1, x0:x1] = (1 - a) * out[y0:y1, x0:x1] + a * palette[row["class_index"]]
        out[y0:y1, [x0, max(x0, x1 - 1)]] = 255
        out[[y0, max(y0, y1 - 1)], x0:x1] = 255
    return out.clip(0, 255).astype(np.uint8)


def segmentation_panels(segmentations: Sequence[Segmentation], num_classes: int) -> np.ndarray:
    """The models' predictions side by side, each class in its palette colour (no blending, so the page's image
    decodes back to class indices)."""
    palette = class_palette(num_classes)
    return side_by_side([colourise(s.pred, palette) for s in segmentations])


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def world_examples(world: Path, n: int) -> list[str]:
    """The first ``n`` val images of a toy world (the page's examples)."""
    return [str(p) for p in sorted((world / "images" / "val").glob("*.jpg"))[:n]]
