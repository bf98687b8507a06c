"""Talk2DINO's feature cache: frozen-encoder features of a captions dataset, on disk once, checked on reuse.

Layout of a cache folder::

    manifest.json                 written last: format, identity, sizes, shard list (a cache without it is partial)
    images-00000.safetensors      heads (n, H, D) per-head attention-pooled embeddings, avg (n, D); metadata:
    images-00001.safetensors      the identity's sha256, first image index, count (a resumed build keeps shards
    ...                           whose metadata match)
    text.safetensors              text (C, T) CLIP caption embeddings, image_index (C,) the image of each caption

The *identity* says what produced the features: the vision backbone (name, weights id, kind, last block), the
text model (name, weights id), the captions file (path and sha256), the image size and the storage dtype. A cache
whose identity differs from the run's is refused with the differing keys named, never silently reused. The
manifest, the identity check, the shard writer and the resumable build are those of the one sharded feature store
(:mod:`densevlm.data.stores`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from densevlm.data.images import load_rgb
from densevlm.data.transforms import resize_center_crop, to_tensor
from densevlm.data import stores
from densevlm.utils.io import read_json

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
TEXT_FILE = "text.safetensors"


class FeatureCacheError(stores.StoreError):
    """A feature cache cannot be used for this run (another backbone, text model, data, or a damaged file)."""


def identity_sha(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: cache <old> vs run <new>`` for every leaf that differs (dotted keys, sorted)."""
    return [f"{k}: cache {a!r} vs run {b!r}" for k, a, b in stores.metadata_diff(saved, wanted, nested=True)]


def read_manifest(cache_dir: str | Path) -> Optional[dict[str, Any]]:
    return stores.read_manifest(Path(cache_dir) / MANIFEST, "feature cache manifest")


def check_identity(cache_dir: str | Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise :class:`FeatureCacheError` naming every key in which the cache's identity differs from ``identity``."""
    if manifest.get("format") != CACHE_FORMAT:
        raise FeatureCacheError(f"feature cache {cache_dir}: format {manifest.get('format')!r}, expected "
                                f"{CACHE_FORMAT}; rebuild it (cache.rebuild=true)")
    diff = identity_diff(manifest.get("identity", {}), identity)
    if diff:
        raise FeatureCacheError(
            f"feature cache {cache_dir} was built from other inputs than this run's ({len(diff)} difference(s): "
            + "; ".join(diff[:6]) + "); set cache.rebuild=true to replace it, or another cache.dir")


@dataclass
class CaptionPairs:
    """The images of a captions json that have captions, their captions, and each caption's image."""

    images: list[Path]
    captions: list[str]
    image_index: list[int]


def read_caption_pairs(captions_json: str | Path, image_root: str | Path,
                       max_images: Optional[int] = None) -> CaptionPairs:
    """Images with at least one caption (json order), all their captions; errors name the file and what is wrong."""
    data = read_json(captions_json, "captions json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{captions_json}: expected a COCO captions json with an 'images' list")
    anns = data.get("annotations")
    if not isinstance(anns, list) or not any(isinstance(a, dict) and "caption" in a for a in anns):
        raise ValueError(f"{captions_json}: no captions ('annotations' entries with 'image_id' and 'caption'); "
                         "is this an instances or panoptic json instead of a captions json?")
    by_image: dict[Any, list[str]] = defaultdict(list)
    for i, ann in enumerate(anns):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{captions_json}: annotations[{i}] lacks 'image_id' or 'caption'")
        by_image[ann["image_id"]].append(str(ann["caption"]).strip())
    root = Path(image_root)
    images, captions, index = [], [], []
    missing = []
    for img in data["images"]:
        caps = by_image.get(img.get("id"))
        if not caps:
            continue
        if max_images is not None and len(images) >= max_images:
            break
        path = root / img["file_name"]
        if not path.is_file():
            missing.append(path)
            continue
        for cap in caps:
            captions.append(cap)
            index.append(len(images))
        images.append(path)
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {captions_json} are missing under {root}, "
                                f"e.g. {missing[0]}")
    if not images:
        raise ValueError(f"{captions_json}: no image with a caption")
    return CaptionPairs(images, captions, index)


def shard_name(i: int) -> str:
    return f"images-{i:05d}.safetensors"


def shard_is_done(path: Path, sha: str, start: int, count: int) -> bool:
    """A shard from an earlier (interrupted) build can be kept: its metadata match this build's."""
    meta = stores.shard_metadata_or_none(path)  # a damaged file is rebuilt, not trusted
    if meta is None:
        return False
    return meta.get("identity_sha") == sha and meta.get("start") == str(start) and meta.get("count") == str(count)


def shard_tensors(heads: torch.Tensor, avg: torch.Tensor, sha: str,
                  start: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One image shard's tensors and header metadata, for :func:`densevlm.data.stores.write_shard`."""
    tensors = {"heads": heads.contiguous(), "avg": avg.contiguous()}
    return tensors, {"identity_sha": sha, "start": str(start), "count": str(heads.shape[0])}


def write_text(cache_dir: Path, text: torch.Tensor, image_index: torch.Tensor, sha: str) -> None:
    tensors = {"text": text.float().contiguous(), "image_index": image_index.long().contiguous()}
    stores.write_shard(cache_dir / TEXT_FILE, tensors, {"identity_sha": sha})


def write_manifest(cache_dir: Path, identity: dict[str, Any], shards: list[dict[str, Any]], **sizes: Any) -> None:
    stores.write_manifest(cache_dir / MANIFEST, {"format": CACHE_FORMAT, "identity": identity,
                                                 "identity_sha": identity_sha(identity), **sizes, "shards": shards})


@dataclass
class FeatureCache:
    """A loaded cache: per-image ``heads`` (N, H, D) and ``avg`` (N, D), per-caption ``text`` and ``image_index``."""

    heads: torch.Tensor
    avg: torch.Tensor
    text: torch.Tensor
    image_index: torch.Tensor
    manifest: dict[str, Any]


def load_feature_cache(cache_dir: str | Path, identity: Optional[dict[str, Any]] = None) -> FeatureCache:
    """Read a complete cache (checked against ``identity`` when given); every shard's metadata is verified."""
    from safetensors import safe_open

    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise FeatureCacheError(f"feature cache {cache_dir}: no {MANIFEST} (not built, or its build did not finish)")
    if identity is not None:
        check_identity(cache_dir, manifest, identity)
    sha = manifest["identity_sha"]
    heads, avg = [], []
    for shard in manifest["shards"]:
        path = cache_dir / shard["file"]
        if not shard_is_done(path, sha, shard["start"], shard["count"]):
            raise FeatureCacheError(f"feature cache {cache_dir}: shard {path.name} is missing, damaged or from "
                                    "another build; set cache.rebuild=true")
        with safe_open(str(path), "pt") as fh:
            heads.append(fh.get_tensor("heads"))
            avg.append(fh.get_tensor("avg"))
    text_path = cache_dir / TEXT_FILE
    try:
        with safe_open(str(text_path), "pt") as fh:
            if (fh.metadata() or {}).get("identity_sha") != sha:
                raise FeatureCacheError(f"feature cache {cache_dir}: {TEXT_FILE} is from another build")
            text, image_index = fh.get_tensor("text"), fh.get_tensor("image_index")
    except (OSError, RuntimeError) as err:  # missing or unreadable
        raise FeatureCacheError(f"feature cache {cache_dir}: cannot read {TEXT_FILE} ({err})") from None
    cache = FeatureCache(torch.cat(heads), torch.cat(avg), text, image_index, manifest)
    if cache.heads.shape[0] != manifest["num_images"] or text.shape[0] != manifest["num_captions"]:
        raise FeatureCacheError(f"feature cache {cache_dir}: {cache.heads.shape[0]} images and {text.shape[0]} "
                                f"captions on disk, the manifest says {manifest['num_images']} and "
                                f"{manifest['num_captions']}")
    return cache


class CachedCaptionPairs(Dataset):
    """(caption embedding, its image's per-head embeddings) pairs of a :class:`FeatureCache`; one item a caption."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return int(self.cache.text.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = int(self.cache.image_index[index])
        return {"text": self.cache.text[index], "heads": self.cache.heads[image].float(), "index": index}


class CenterCropImages(Dataset):
    """The images of a feature-cache build, resized (short side) and centre-cropped to ``size``, normalised."""

    def __init__(self, paths: list[Path], size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.paths, self.size, self.mean, self.std = paths, size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(resize_center_crop(load_rgb(self.paths[i]), self.size), self.mean, self.std)
