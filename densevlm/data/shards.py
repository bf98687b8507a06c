"""Image shards in the `webdataset <https://github.com/webdataset/webdataset>`_ tar format, with a manifest.

A shard folder holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``manifest.json``. Each tar holds one
sample per source image, its files sharing the sample's key (the source index, nine digits): the image
(``<key>.jpg`` / ``.png``: the source file's own bytes where it is a JPEG or PNG, else encoded as PNG), its facts
(``<key>.json``: index, name, width, height) and a *payload* of named arrays (``<key>.<name>.npy``), e.g. the
compact teacher targets of the image. webdataset writes the tars (``TarWriter``) and iterates and decodes them
(``tar_file_iterator``, ``group_by_keys``, ``autodecode``); this module adds what it leaves to the user: which
samples a reader takes (see :mod:`densevlm.data.stream`), the manifest (count and sha256 per shard, the payload's
identity), resumable and parallel writing, and errors that name the shard.

Writing: shard ``s`` holds source images ``[s * shard_size, (s + 1) * shard_size)``. Each shard is written under a
temporary name, renamed when complete, then its sidecar ``shard-XXXXXX.json`` (count, sha256, bytes) is written;
a shard with a sidecar that matches its file is done, so a killed write resumes where it stopped, and several
processes (``workers``, or several machines with ``part``/``parts``) write disjoint shards. The manifest is written
last, once every shard is done: a folder without one is unfinished.

Reading goes through fsspec, so shards can be a local folder or object storage (``s3://``, ``gs://``, ...; the
fsspec filesystem package of that store must be installed).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from densevlm.data.sources import ImageSource
from densevlm.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "densevlm-shards/1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d{6})\.tar$")


class ShardError(ValueError):
    """A shard or manifest that cannot be used: damaged, unfinished, or written for something else."""


def shard_name(s: int) -> str:
    return f"shard-{s:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


class Payload(Protocol):
    """What a shard stores beside each image (e.g. the compact teacher targets of its cells).

    ``identity`` says what produced the arrays (teacher, vocabulary, k, ...): it goes into the manifest and a reader
    that expects another identity is refused. ``arrays`` is called with the images of one shard, in order.
    """

    name: str
    identity: dict[str, Any]

    def arrays(self, images: list[Image.Image], indices: list[int]) -> list[dict[str, np.ndarray]]:
        ...

    def item_fields(self, arrays: dict[str, np.ndarray], cells: Any) -> dict[str, Any]:
        """The training item's fields from one sample's stored arrays, for its drawn grid ``cells``."""
        ...


class NoPayload:
    """Images only (the teacher then runs online, or a separate teacher cache serves the targets)."""

    name = "none"
    identity: dict[str, Any] = {}

    def arrays(self, images: list[Image.Image], indices: list[int]) -> list[dict[str, np.ndarray]]:
        return [{} for _ in images]

    def item_fields(self, arrays: dict[str, np.ndarray], cells: Any) -> dict[str, Any]:
        return {}


#: payload name -> ``build(recipe, student) -> Payload``. ``student`` is None when writing (the identity is then
#: the one of what the arrays are copied from) and the trained model when reading (the identity the run needs).
PayloadBuilder = Callable[[Any, Any], Payload]
PAYLOADS: dict[str, PayloadBuilder] = {"none": lambda recipe, student: NoPayload()}


def register_payload(name: str) -> Callable[[PayloadBuilder], PayloadBuilder]:
    def register(build: PayloadBuilder) -> PayloadBuilder:
        if name in PAYLOADS:
            raise ValueError(f"shard payload {name!r} is registered twice")
        PAYLOADS[name] = build
        return build
    return register


# ---------------------------------------------------------------------------------------------------- writing
def _image_entry(source: ImageSource, index: int, img: Image.Image) -> tuple[str, bytes]:
    """The stored image: the source file's own bytes for a JPEG or PNG file (no re-encoding loss), else PNG."""
    if source.hf is None:
        path = source.paths[index]
        ext = path.suffix.lower().lstrip(".")
        if ext in ("jpg", "jpeg", "png"):
            return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_done(out: Path, s: int) -> Optional[dict[str, Any]]:
    """The sidecar of shard ``s`` when the shard is complete (its size matches), else None."""
    side = out / shard_name(s).replace(".tar", ".json")
    tar = out / shard_name(s)
    if not side.is_file() or not tar.is_file():
        return None
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("bytes") == tar.stat().st_size else None


def write_shard(source: ImageSource, payload: Payload, out: Path, s: int, shard_size: int) -> dict[str, Any]:
    """Write shard ``s`` (atomically) and its sidecar; returns the sidecar (name, count, sha256, bytes, first)."""
    first, stop = s * shard_size, min((s + 1) * shard_size, len(source))
    indices, images = [], []
    for i in range(first, stop):
        img = source.load_or_skip(i, "left out of the shard")
        if img is not None:
            indices.append(i)
            images.append(img)
    arrays = payload.arrays(images, indices)
    target = out / shard_name(s)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh, wds.TarWriter(fh, encoder=False) as sink:
            for i, img, arr in zip(indices, images, arrays):
                ext, data = _image_entry(source, i, img)
                sample: dict[str, Any] = {"__key__": sample_key(i), ext: data,
                                          "json": json.dumps({"index": i, "name": source.image_name(i),
                                                              "width": img.width, "height": img.height}).encode()}
                for name, a in arr.items():
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
                    sample[f"{name}.npy"] = buf.getvalue()
                sink.write(sample)
    info = {"name": target.name, "count": len(indices), "first": first, "sha256": _sha256(target),
            "bytes": target.stat().st_size}
    atomic_write_json(out / target.name.replace(".tar", ".json"), info)
    return info


def manifest_for(out: Path, n_shards: int, *, source: str, shard_size: int, payload: Payload) -> dict[str, Any]:
    """The manifest of a folder whose shards are all done (a missing one is an error naming it)."""
    shards = []
    for s in range(n_shards):
        info = shard_done(out, s)
        if info is None:
            raise ShardError(f"{out / shard_name(s)} is not written yet (or its file and sidecar disagree); "
                             "rerun `densevlm shards write` to finish it")
        shards.append({k: info[k] for k in ("name", "count", "first", "sha256", "bytes")})
    return {"format": FORMAT, "source": source, "shard_size": shard_size,
            "count": sum(x["count"] for x in shards), "payload": {"name": payload.name, "identity": payload.identity},
            "shards": shards}


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ShardSet:
    """An opened manifest: the shard URLs, their counts and checksums, and the payload's identity."""

    root: str
    manifest: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def url(self, s: int) -> str:
        return f"{self.root.rstrip('/')}/{self.shards[s]['name']}"

    def check_payload(self, name: str, identity: dict[str, Any]) -> None:
        """Refuse shards whose payload was made for something else, naming every key that differs."""
        stored = self.manifest.get("payload", {})
        if stored.get("name") != name:
            raise ShardError(f"{self.root}/{MANIFEST}: payload is {stored.get('name')!r}, this run expects {name!r}")
        have, want = stored.get("identity", {}), json.loads(json.dumps(identity))  # (tuples read back as lists)
        diff = [f"{k}: shards have {json.dumps(have.get(k))[:150]}, the run has {json.dumps(want.get(k))[:150]}"
                for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        if diff:
            raise ShardError(f"{self.root}/{MANIFEST} was written for another {name} identity: " + "; ".join(diff))


def open_shards(root: str) -> ShardSet:
    """Read and check ``root/manifest.json`` (``root``: a folder or an fsspec URL)."""
    url = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        with fsspec.open(url, "rt") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {url} (write it with `densevlm shards write`; a folder "
                                "with shards and no manifest is an unfinished write)") from None
    except json.JSONDecodeError as err:
        raise ShardError(f"{url}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("count", "shards"):
        if key not in manifest:
            raise ShardError(f"{url}: no {key!r}")
    if sum(int(x["count"]) for x in manifest["shards"]) != int(manifest["count"]):
        raise ShardError(f"{url}: 'count' {manifest['count']} is not the sum of the shards' counts")
    return ShardSet(root, manifest)


class _HashingReader(io.RawIOBase):
    """A file object that hashes what is read through it (the shard's sha256 is checked as it streams)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.hash, self.bytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.bytes += n
        return n

    def drain(self) -> None:
        for chunk in iter(lambda: self.raw.read(1 << 20), b""):
            self.hash.update(chunk)
            self.bytes += len(chunk)


_DECODE = wds.autodecode.Decoder([wds.autodecode.imagehandler("pilrgb")])


def read_shard(shards: ShardSet, s: int, skip: int = 0) -> Iterator[dict[str, Any]]:
    """The decoded samples of shard ``s`` from its ``skip``-th on: ``image`` (PIL RGB), ``index``, ``name``,
    ``width``, ``height``, ``payload`` ({name: array}).

    The whole file is read (the skipped samples undecoded) and checked against the manifest as it streams: a tar
    that does not parse, holds another number of samples, or whose sha256 differs raises :class:`ShardError`
    naming the shard and what was wrong (after the samples read before the damage).
    """
    url, info = shards.url(s), shards.shards[s]
    try:
        fh = fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise ShardError(f"shard {url} (listed in {MANIFEST}) is missing") from None
    reader = _HashingReader(fh)
    n = 0
    try:
        stream = io.BufferedReader(reader, 1 << 16)
        for raw in group_by_keys({**f, "__url__": url} for f in tar_file_iterator(stream)):
            n += 1
            if n <= skip:
                continue
            sample = _DECODE(raw)
            meta = sample["json"]
            image_key = next((k for k in ("jpg", "png") if k in sample), None)
            if image_key is None:
                raise ShardError(f"shard {url}: sample {raw['__key__']} has no image (jpg or png)")
            yield {"image": sample[image_key], "index": int(meta["index"]), "name": meta.get("name", ""),
                   "width": int(meta["width"]), "height": int(meta["height"]),
                   "payload": {k[:-4]: v for k, v in sample.items() if k.endswith(".npy")}}
        reader.drain()
    except ShardError:
        raise
    except Exception as err:  # tarfile.ReadError, a truncated stream, an undecodable image or array
        raise ShardError(f"shard {url} is damaged after {n} sample(s): {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:300] if str(err) else ''}") from None
    finally:
        fh.close()
    if n != info["count"]:
        raise ShardError(f"shard {url} holds {n} sample(s), {MANIFEST} says {info['count']} (truncated?)")
    got = reader.hash.hexdigest()
    if got != info["sha256"]:
        raise ShardError(f"shard {url}: sha256 {got} disagrees with {MANIFEST} ({info['sha256']})")


def list_written(out: Path) -> list[int]:
    """The shard numbers present in ``out`` (for messages)."""
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := _SHARD.match(p.name))) if out.is_dir() else []


def shard_count(n_images: int, shard_size: int) -> int:
    return max(1, -(-n_images // shard_size))


def describe_source(source: ImageSource) -> str:
    return f"{source.cfg.kind}:{source.cfg.path}" + (f" ({source.cfg.split})" if source.cfg.kind == "toyworld" else "")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
