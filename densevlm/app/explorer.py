"""What the interactive explorer shows, as plain functions of arrays (the gradio page in :mod:`densevlm.app.ui` only
lays them out): dense segmentation by several models, the probability map of one class, the teacher's proposed
labels for the regions of any region source (the grid at a chosen split, boxes or masks from a COCO region
file), computed by the labelling path itself (:func:`densevlm.tasks.labels.region_probabilities`).

Every image is segmented at ``image_size`` on its short side (dense CLIP, one window) and the logits are brought
back to the image's own size, as ``densevlm eval semseg`` does; class probabilities are ``softmax(cos / 0.01)``,
DenseVLM's teacher temperature, as the diagnostics draw them. The teacher labels regions on the labelling canvas
(longest side at ``image_size``, padded), as ``densevlm labels propose`` and training do.
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

from densevlm.config.regions import RegionSourceConfig
from densevlm.config.report import AppConfig, model_label, model_source
from densevlm.config.sources import ImageSourceConfig
from densevlm.data.region_sources import GridSpec, ImageRegions, build_region_source
from densevlm.data.semseg import resize_short_side
from densevlm.data.sources import ImageSource
from densevlm.data.teacher_cache import image_keys
from densevlm.data.transforms import to_tensor
from densevlm.evaluation.protocol import TEACHER_TEMPERATURE
from densevlm.evaluation.semseg_figures import class_palette, colourise
from densevlm.models import create_backbone
from densevlm.models.model_arg import spec_from_model_arg
from densevlm.segmenters.dense_clip import DenseCLIPSegmenter
from densevlm.segmenters.inference import predict
from densevlm.tasks.labels import region_probabilities, teacher_canvas
from densevlm.viz.figures import plt
from densevlm.vocab.embeddings import build_text_embeddings
from densevlm.vocab.templates import get_templates
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary

log = logging.getLogger(__name__)

#: The toy zoo, offered when no model is named.
TOY_MODELS = ("base=toy-student", "clipself=toy-teacher-clipself")
GAP = 8  # white pixels between the panels of a side-by-side image
GRID_CHOICE = "grid"
WORLD_MASKS = "masks: the example world's panoptic segments"
GRID_SPLITS = (2, 3, 4, 5, 6)  # the page's grid splits (the reference's max_split is 6)


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
        self.world: Optional[Path] = Path(cfg.world) if cfg.world else None  # the examples' toy world (serve sets it)
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

    def region_choices(self) -> dict[str, RegionSourceConfig]:
        """The region sources the page offers, by label: the grid, the example world's own panoptic segments
        (``masks``), and ``cfg.regions`` when it names a file."""
        choices = {GRID_CHOICE: RegionSourceConfig(kind="grid")}
        if self.world is not None:
            choices[WORLD_MASKS] = RegionSourceConfig(kind="masks", path=str(self.world / "annotations" /
                                                                            "panoptic_val.json"))
        if self.cfg.regions.kind != "grid":
            choices[f"{self.cfg.regions.kind}: {Path(self.cfg.regions.path).name}"] = self.cfg.regions
        return choices

    def _images_for(self, source: RegionSourceConfig, image_name: str) -> tuple[ImageSource, int, str]:
        """The image source a region file is matched against, the image's index and key (its name below the
        source's image root, as region files name it) in it: the example world when
        ``image_name`` is one of its val images, else the region file's own ``images`` (a COCO json)."""
        name = Path(image_name).name if image_name else ""
        if not name:
            raise ValueError(f"regions {source.kind}:{source.path}: the image has no file name to find its regions "
                             "by; choose an example (or type the name the region file gives the image)")
        candidates = []
        if self.world is not None:
            candidates.append(ImageSourceConfig(kind="toyworld", path=str(self.world), split="val"))
        candidates.append(ImageSourceConfig(kind="coco_json", path=source.path))
        for images_cfg in candidates:
            try:
                images = ImageSource(images_cfg)
            except (ValueError, FileNotFoundError, OSError):
                continue  # not a COCO json with its images on disk: the world is the only candidate
            keys = image_keys(images)
            names = [Path(k).name for k in keys]
            if name in names:
                return images, names.index(name), keys[names.index(name)]
        raise ValueError(f"regions {source.kind}:{source.path}: image {name!r} is neither an example of the toy "
                         f"world ({self.world}) nor an image on disk that the region file names")

    def regions(self, source: RegionSourceConfig, image: np.ndarray, *, split: int,
                image_name: str = "") -> tuple[ImageRegions, str]:
        """The regions of an (H, W, 3) image from ``source`` (the grid at ``split`` x ``split``, or a region file
        matched to the image by its file name ``image_name``, as the region sources match), and a line naming
        them."""
        height, width = image.shape[:2]
        if source.kind == "grid":
            if not 2 <= split <= 16:
                raise ValueError(f"grid split: expected an integer in [2, 16], got {split}")
            # The grid's cells depend on the image's size only: no image source is read.
            grid = build_region_source(source, None, GridSpec("densevlm", split))  # type: ignore[arg-type]
            reg = grid.regions(0, width, height)
            return reg, f"grid {split} x {split}"
        images, index, key = self._images_for(source, image_name)
        reg = build_region_source(source, images).regions(index, width, height)
        if len(reg) == 0:
            raise ValueError(f"regions {source.kind}:{source.path}: the file names no region for image "
                             f"{key!r} (top_k {source.top_k}, min_score {source.min_score})")
        return reg, f"{source.kind} from {Path(source.path).name}, image {key}"

    @torch.no_grad()
    def region_labels(self, image: np.ndarray, vocabulary: Vocabulary, regions: ImageRegions, *,
                      top_k: int = 3) -> list[dict[str, Any]]:
        """The teacher's top-k labels for each region of an (H, W, 3) uint8 image, computed as ``densevlm labels
        propose`` computes them (:func:`~densevlm.tasks.labels.region_probabilities` on the teacher's canvas of
        ``image_size``: pooled by box or by mask, softmax of cos / T over ``vocabulary``); each row: the region's
        ``box`` (x0, y0, x1, y1 pixels), ``mask`` (H, W bool, or None), ``probs`` (C,), ``labels`` [(class,
        probability)], ``route`` of the best class (thing/stuff), whether it ``passes`` the confidence threshold,
        ``class_index`` and the region's ``id`` in its source."""
        teacher = self.cfg.teacher
        model = self.model(teacher)
        size = self.cfg.image_size
        height, width = image.shape[:2]
        dense = model.encode_dense(teacher_canvas(model, _pil(image), size)[None])
        text = F.normalize(self.text(teacher, vocabulary).float(), dim=-1)
        probs = region_probabilities(model, dense, regions, width, height, size, text, TEACHER_TEMPERATURE)
        masks = regions.masks() if regions.masks is not None else None
        rows = []
        for k, prob in enumerate(probs):
            top = torch.topk(prob, min(top_k, len(vocabulary)))
            best = int(top.indices[0])
            x0, y0, x1, y1 = regions.boxes[k].tolist()
            rows.append({"box": [round(x0), round(y0), round(x1), round(y1)],
                         "mask": masks[k] if masks is not None else None, "probs": prob.numpy(),
                         "labels": [(vocabulary.names[int(i)], float(v)) for v, i in zip(top.values, top.indices)],
                         "route": "thing" if vocabulary.classes[best].isthing else "stuff",
                         "passes": float(top.values[0]) > self.cfg.threshold, "class_index": best,
                         "id": regions.ids[k]})
        return rows


def labels_overlay(image: np.ndarray, rows: Sequence[dict[str, Any]], num_classes: int,
                   alpha: float = 0.5) -> np.ndarray:
    """The image with each region (its mask, else its box) filled in its best class's colour (faint when it fails
    the threshold), box regions outlined in white."""
    palette = class_palette(num_classes)
    out = image.astype(np.float32).copy()
    for row in rows:
        a = alpha if row["passes"] else alpha / 3
        if row.get("mask") is not None:
            m = row["mask"]
            out[m] = (1 - a) * out[m] + a * palette[row["class_index"]]
            continue
        x0, y0, x1, y1 = row["box"]
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
