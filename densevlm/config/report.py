"""Config of the proof-of-concept report (``densevlm report``) and of the interactive explorer (``densevlm app``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from densevlm.config.core import ConfigError
from densevlm.config.regions import RegionSourceConfig
from densevlm.config.semseg import SemSegInferenceConfig


@dataclass
class LabelledSetConfig:
    """A small labelled set (20 to 200 images is the intended size): a COCO panoptic json or semantic PNGs.

    Panoptic: ``panoptic_json`` (its ``categories`` are the classes unless ``classes`` names a vocabulary),
    ``panoptic_root`` ('' = the json path without ``.json``) and ``image_root``.
    Semantic: ``label_root`` (one PNG of class indices per image, ``ignore_label`` where nothing is labelled),
    ``image_root`` and ``classes`` (a vocabulary name or file, in label order; its thing/stuff flags split the
    regions). An image ``<image_root>/<stem><image_suffix>`` has the label ``<label_root>/<stem><label_suffix>``.
    ``max_images``: the first N images only (null: all).
    """

    panoptic_json: str = ""
    panoptic_root: str = ""
    image_root: str = ""
    label_root: str = ""
    classes: str = ""
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"
    ignore_label: int = 255
    max_images: Optional[int] = None

    @property
    def kind(self) -> str:
        return "panoptic" if self.panoptic_json else "semantic"

    def validate(self) -> None:
        if bool(self.panoptic_json) == bool(self.label_root):
            raise ConfigError("data: give either data.panoptic_json (a COCO panoptic set) or data.label_root (semantic "
                              f"PNGs), got panoptic_json={self.panoptic_json!r}, label_root={self.label_root!r}")
        if self.label_root and not self.classes:
            raise ConfigError("data.classes: semantic PNGs need their class list (a vocabulary name or file, in "
                              "label order)")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"data.max_images: expected null or an integer >= 1, got {self.max_images}")

    def check_paths(self) -> None:
        if not self.image_root:
            raise ConfigError("data.image_root: required, got an empty string")


@dataclass
class CorrectionsReportConfig:
    """The reviewed labels behind one of the models: ``file`` (written by ``densevlm labels apply``), ``model`` (the
    label of the model tuned with them) and ``baseline`` (the label of the same tuning without them)."""

    file: str = ""
    model: str = ""
    baseline: str = ""


@dataclass
class ReportConfig:
    """``densevlm report``: one HTML page comparing models on a small labelled set.

    ``models``: ``label=model`` entries (or a bare model, labelled by its name), in the order the page shows
    them; a model is a zoo name, a run directory, a weights file or an export.
    ``templates``: the prompt templates of the class text embeddings.
    ``image_size``: the region evaluation's canvas (resize longest side and pad).
    ``inference``: how segmentation runs over an image (as ``densevlm eval semseg``).
    ``focus``: the model whose per-image mIoU ranks the best and worst images ('' = the last model);
    ``best_worst``: how many of each are drawn.
    """

    output_dir: str = "runs/report"
    data: LabelledSetConfig = field(default_factory=LabelledSetConfig)
    models: list[str] = field(default_factory=list)
    corrections: CorrectionsReportConfig = field(default_factory=CorrectionsReportConfig)
    templates: str = "short"
    image_size: int = 512
    inference: SemSegInferenceConfig = field(default_factory=SemSegInferenceConfig)
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    focus: str = ""
    best_worst: int = 3
    most_confused: int = 8

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models: expected at least one 'label=model' entry (a zoo name, run directory, weights "
                              "file or export), e.g. --set \"models=[base=toy-student]\"")
        labels = [model_label(m) for m in self.models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"models: the labels {dup} are used twice; write 'label=model' to tell them apart")
        c = self.corrections
        if c.file:
            for key in ("model", "baseline"):
                value = getattr(c, key)
                if value and value not in labels:
                    raise ConfigError(f"corrections.{key}: {value!r} is not one of the model labels {labels}")
        if self.focus and self.focus not in labels:
            raise ConfigError(f"focus: {self.focus!r} is not one of the model labels {labels}")
        for key in ("image_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        for key in ("best_worst", "most_confused", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(self, key)}")
        if not self.output_dir:
            raise ConfigError("output_dir: required, got an empty string")


def model_label(entry: str) -> str:
    """The label of a ``models`` entry: the part before ``=``, else the model's last path part."""
    if "=" in entry:
        return entry.split("=", 1)[0].strip()
    return entry.rstrip("/").split("/")[-1]


def model_source(entry: str) -> str:
    """The model of a ``models`` entry (zoo name, run directory, weights file, export)."""
    return entry.split("=", 1)[1].strip() if "=" in entry else entry.strip()


@dataclass
class AppConfig:
    """``densevlm app``: the interactive explorer (gradio), served on ``host``:``port`` only.

    ``models``: ``label=model`` entries the page offers ([] = the toy zoo); ``teacher``: the model proposing
    labels for regions; ``world``: the toy world whose val images are the examples ('' = a small one generated
    under ``output_dir``); ``classes``: the default class names ('' = the world's); ``image_size``: the short side
    images are segmented at; ``grid``: the default split of the grid region source (``grid`` x ``grid`` cells, the
    reference's ``max_split`` cells; the page offers 2..6); ``regions``: a region file the page offers besides the
    grid and the example world's own panoptic segments (``kind`` boxes or masks with its ``path``, as
    ``data.regions`` of a recipe; the default ``grid`` adds none);
    ``threshold``: DenseVLM's confidence threshold shown beside each label; ``request_timeout``: seconds a
    request may run before it is refused.
    """

    output_dir: str = "runs/app"
    host: str = "127.0.0.1"
    port: int = 7860
    models: list[str] = field(default_factory=list)
    teacher: str = "toy-teacher-clipself"
    world: str = ""
    classes: str = ""
    templates: str = "short"
    image_size: int = 192
    grid: int = 3
    regions: RegionSourceConfig = field(default_factory=RegionSourceConfig)
    threshold: float = 0.3
    examples: int = 6
    request_timeout: float = 60.0

    def validate(self) -> None:
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"host: the app binds the loopback address only (127.0.0.1), got {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535 (0 = a free port), got {self.port}")
        if self.image_size < 16:
            raise ConfigError(f"image_size: expected an integer >= 16, got {self.image_size}")
        if not 2 <= self.grid <= 16:
            raise ConfigError(f"grid: expected an integer in [2, 16] (DenseVLM's grid has no 1 x 1 cell), got "
                              f"{self.grid}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold: expected a probability in [0, 1], got {self.threshold}")
        if not self.request_timeout > 0:
            raise ConfigError(f"request_timeout: expected seconds > 0, got {self.request_timeout}")
