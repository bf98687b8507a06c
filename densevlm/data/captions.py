"""Image-caption pairs from any COCO-captions-format json (COCO, the toy world, your own)."""

from __future__ import annotations

import logging
import random
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from densevlm.data.images import ImageReadError, load_rgb
from densevlm.data.transforms import CLIP_MEAN, CLIP_STD, random_resized_crop, to_tensor
from densevlm.utils.io import read_json

log = logging.getLogger(__name__)


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A per-item random stream fixed by (seed, epoch, index): augmentation independent of worker scheduling."""
    return random.Random(zlib.crc32(f"{seed}/{epoch}/{index}".encode()))


class CaptionDataset(Dataset):
    """COCO captions json → (image tensor, one caption) pairs.

    Each epoch draws one of the image's captions and a random crop. Missing images are an error naming the
    file, or with ``skip_bad_images`` a warning with the count of skipped files.
    """

    def __init__(self, captions_json: str | Path, image_root: str | Path, image_size: int, *,
                 train: bool = True, crop_scale: tuple[float, float] = (0.8, 1.0), hflip: bool = True,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 skip_bad_images: bool = False, seed: int = 0) -> None:
        data = read_json(captions_json, "captions json")
        for key in ("images", "annotations"):
            if key not in data:
                raise ValueError(f"{captions_json}: missing key '{key}' (expected COCO captions format)")
        self.image_root = Path(image_root)
        self.image_size, self.train, self.crop_scale, self.hflip = image_size, train, crop_scale, hflip
        self.mean, self.std, self.seed, self.epoch = mean, std, seed, 0
        self.skip_bad_images = skip_bad_images
        captions: dict[int, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            try:
                captions[ann["image_id"]].append(str(ann["caption"]).strip())
            except KeyError as err:
                raise ValueError(f"{captions_json}: annotation {ann.get('id')} lacks key {err}") from None
        self.items: list[tuple[Path, list[str]]] = []
        missing = []
        for img in data["images"]:
            caps = captions.get(img["id"])
            if not caps:
                continue
            path = self.image_root / img["file_name"]
            if not path.is_file():
                missing.append(path)
                continue
            self.items.append((path, caps))
        if missing and not skip_bad_images:
            raise ImageReadError(
                f"{len(missing)} image(s) listed in {captions_json} are missing under {self.image_root}, "
                f"e.g. {missing[0]}; set data.skip_bad_images=true to skip them"
            )
        self.skipped = len(missing)
        if missing:
            log.warning("skipping %d missing image(s) listed in %s (e.g. %s)", len(missing), captions_json, missing[0])
        if not self.items:
            raise ValueError(f"{captions_json}: no image with a caption was found under {self.image_root}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def image_name(self, index: int) -> str:
        return str(self.items[index][0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        path, caps = self.items[index]
        try:
            img = load_rgb(path)
        except ImageReadError:
            if not self.skip_bad_images:
                raise
            log.warning("unreadable image %s skipped; using another item", path)
            return self[(index + 1) % len(self)]
        rng = item_rng(self.seed, self.epoch, index)
        if self.train:
            img = random_resized_crop(img, self.image_size, rng, scale=self.crop_scale, hflip=self.hflip)
            caption = caps[rng.randrange(len(caps))]
        else:
            img = img.resize((self.image_size, self.image_size))
            caption = caps[0]
        return to_tensor(img, self.mean, self.std), caption, index


class CaptionCollator:
    """Stacks images and tokenises captions (picklable, so it runs in data-loader workers)."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, str, int]]) -> dict[str, Any]:
        images = torch.stack([it[0] for it in items])
        texts = [it[1] for it in items]
        index = torch.tensor([it[2] for it in items])
        return {"images": images, "tokens": self.tokenizer(texts), "texts": texts, "index": index}
