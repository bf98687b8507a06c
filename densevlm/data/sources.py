"""Unlabelled image sources for region-language alignment: a COCO json, a folder, a Hugging Face dataset, the toy world.

DenseVLM needs images only (regions come from grids, names from the teacher), so every source reduces to
"give me image i". Missing images are an error naming the file, or with ``skip_bad_images`` a warning with a
count of skipped files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from densevlm.config.sources import ImageSourceConfig
from densevlm.data.images import ImageReadError, load_rgb
from densevlm.utils.io import read_json

__all__ = ["IMAGE_SUFFIXES", "ImageSource", "ImageSourceConfig"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageSource:
    """A list of images addressable by index."""

    def __init__(self, cfg: ImageSourceConfig) -> None:
        if not cfg.path:
            raise ValueError(f"data.source.path is required for a '{cfg.kind}' image source")
        self.cfg = cfg
        self.paths: list[Path] = []
        self.hf: Any = None
        if cfg.kind == "coco_json":
            data = read_json(cfg.path, "COCO json")
            if "images" not in data:
                raise ValueError(f"{cfg.path}: no 'images' list (expected a COCO-format json)")
            root = Path(cfg.image_root) if cfg.image_root else Path(cfg.path).parent
            self.paths = [root / img["file_name"] for img in data["images"]]
        elif cfg.kind == "toyworld":
            root = Path(cfg.path)
            data = read_json(root / "annotations" / f"captions_{cfg.split}.json", f"toy world '{cfg.split}' split")
            self.paths = [root / "images" / cfg.split / img["file_name"] for img in data["images"]]
        elif cfg.kind == "folder":
            root = Path(cfg.path)
            if not root.is_dir():
                raise FileNotFoundError(f"image folder not found: {root}")
            self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.paths:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found below {root}")
        elif cfg.kind == "hf_dataset":
            self.hf = _load_hf(cfg)
        if cfg.max_images is not None:
            self.paths = self.paths[: cfg.max_images]
            if self.hf is not None:
                self.hf = self.hf.select(range(min(cfg.max_images, len(self.hf))))
        if self.paths:
            missing = [p for p in self.paths if not p.is_file()]
            if missing and not cfg.skip_bad_images:
                raise ImageReadError(f"{len(missing)} image(s) of {cfg.path} are missing, e.g. {missing[0]}; "
                                     "set data.source.skip_bad_images=true to skip them")
            if missing:
                log.warning("skipping %d missing image(s) of %s (e.g. %s)", len(missing), cfg.path, missing[0])
                gone = set(missing)
                self.paths = [p for p in self.paths if p not in gone]
            self.skipped = len(missing)
        else:
            self.skipped = 0
        if len(self) == 0:
            raise ValueError(f"image source {cfg.kind}:{cfg.path} has no images")

    def __len__(self) -> int:
        return len(self.hf) if self.hf is not None else len(self.paths)

    def image_name(self, index: int) -> str:
        """The file (or dataset row) of image ``index``, for messages."""
        if self.hf is not None:
            return f"{self.cfg.path}[{index}]"
        return str(self.paths[index])

    def load(self, index: int) -> Image.Image:
        if self.hf is not None:
            img = self.hf[index][self.cfg.image_column]
            if not isinstance(img, Image.Image):
                raise ImageReadError(f"{self.cfg.path}[{index}].{self.cfg.image_column} is a {type(img).__name__}, "
                                     "expected an image")
            return img.convert("RGB")
        return load_rgb(self.paths[index])

    def load_or_skip(self, index: int, instead: str) -> Optional[Image.Image]:
        """Image ``index``; for an unreadable one, None when ``skip_bad_images`` is set (with a warning that says
        what the caller does ``instead``), else the :class:`ImageReadError` naming the file."""
        try:
            return self.load(index)
        except ImageReadError as err:
            if not self.cfg.skip_bad_images:
                raise
            log.warning("%s; skipped (data.source.skip_bad_images): %s", err, instead)
            return None


def _load_hf(cfg: ImageSourceConfig) -> Any:
    import datasets

    path = Path(cfg.path)
    if path.exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise KeyError(f"{path}: no split '{cfg.split}', it has {list(ds)}")
            ds = ds[cfg.split]
    else:  # a hub name: needs network access
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    if cfg.image_column not in ds.column_names:
        raise KeyError(f"{cfg.path}: no column '{cfg.image_column}', it has {ds.column_names}")
    return ds
