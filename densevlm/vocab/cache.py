"""Text-embedding files: export/import (ours and the reference's ``.npy``) and an on-disk cache.

A cache file is a safetensors file with one tensor, ``embeddings`` (N, D) float32, and string metadata naming
everything the embeddings depend on. It is reused only when every one of those matches the request; otherwise
it is rebuilt and the reason is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors
import safetensors.torch
import torch

from densevlm.utils.io import atomic_save
from densevlm.vocab.embeddings import NORMALIZATION, TextEncoder, build_text_embeddings, check_text_encoder
from densevlm.vocab.templates import TemplateSet
from densevlm.vocab.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

FILE_FORMAT = "densevlm.text_embeddings"
FORMAT_VERSION = "1"
TENSOR_KEY = "embeddings"

# The metadata a cached file must match to be reused (vocabulary and template *names* only pick the file).
KEY_FIELDS = (
    "format_version",
    "model_name",
    "weights_id",
    "vocabulary_fingerprint",
    "templates_fingerprint",
    "normalization",
)


def embedding_metadata(model: TextEncoder, vocabulary: Vocabulary, templates: TemplateSet) -> dict[str, str]:
    """The string metadata stored with embeddings built by :func:`build_text_embeddings`."""
    return {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model.name,
        "weights_id": model.weights_id,
        "vocabulary_name": vocabulary.name,
        "vocabulary_fingerprint": vocabulary.fingerprint,
        "num_classes": str(len(vocabulary)),
        "class_names": json.dumps(vocabulary.names, ensure_ascii=False),
        "thing_mask": "".join("1" if t else "0" for t in vocabulary.thing_list),
        "templates_name": templates.name,
        "templates_fingerprint": templates.fingerprint,
        "templates_count": str(len(templates)),
        "this_is_prefix": str(templates.this_is_prefix).lower(),
        "normalization": NORMALIZATION,
    }


# -- export / import ------------------------------------------------------------------------------------------
def save_text_embeddings(path: str | os.PathLike, embeddings: torch.Tensor, meta: Mapping[str, Any]) -> None:
    """Write (N, D) embeddings atomically: ``.safetensors`` with ``meta`` as metadata, or a reference ``.npy``.

    Non-string metadata values are stored as JSON. The ``.npy`` format (what the reference code loads with
    ``--embed-path``) has no room for metadata, so ``meta`` is not written there.
    """
    p = Path(path)
    emb = _check_matrix(embeddings, str(p)).detach().to("cpu", torch.float32).contiguous()
    if p.suffix == ".npy":
        array = emb.numpy()

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a handle, so numpy does not append ".npy" to the temporary name
                np.save(fh, array, allow_pickle=False)

        atomic_save(p, write_npy)
    elif p.suffix == ".safetensors":
        str_meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        atomic_save(p, lambda tmp: safetensors.torch.save_file({TENSOR_KEY: emb}, str(tmp), metadata=str_meta))
    else:
        raise ValueError(f"{p}: unsupported text-embedding file type {p.suffix!r}; use .safetensors or .npy")


def load_text_embeddings(
    path: str | os.PathLike, vocabulary: Vocabulary | None = None, *, renormalize: bool = False
) -> tuple[torch.Tensor, dict[str, str]]:
    """Read (N, D) float32 embeddings and their metadata from ``.safetensors`` (ours) or ``.npy`` (reference).

    With ``vocabulary``, the row count must equal its length, and a safetensors file that records a vocabulary
    fingerprint must match it. ``renormalize`` L2-normalises rows: the reference's 316-class files are not
    unit norm (0.89-0.96), so leave it off to reproduce the reference's logits, turn it on to compare with ours.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text-embedding file not found: {p}")
    if p.suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{p}: not a plain numeric .npy array ({err})") from None
        emb = torch.from_numpy(np.ascontiguousarray(array))
        meta = {"format": "npy", "source": str(p)}
    elif p.suffix == ".safetensors":
        emb, meta = _read_safetensors(p)
    else:
        raise ValueError(f"{p}: unsupported text-embedding file type {p.suffix!r}; expected .safetensors or .npy")
    emb = _check_matrix(emb, str(p)).to(torch.float32)
    if vocabulary is not None:
        if emb.shape[0] != len(vocabulary):
            raise ValueError(
                f"{p}: has {emb.shape[0]} rows (shape {tuple(emb.shape)}) but vocabulary {vocabulary.name!r} has "
                f"{len(vocabulary)} classes; the file was built for another vocabulary"
            )
        recorded = meta.get("vocabulary_fingerprint")
        if recorded is not None and recorded != vocabulary.fingerprint:
            raise ValueError(
                f"{p}: built for vocabulary {meta.get('vocabulary_name', '?')!r} (fingerprint {recorded[:12]}), "
                f"which has the same size as {vocabulary.name!r} but other classes or flags "
                f"(fingerprint {vocabulary.fingerprint[:12]})"
            )
    if renormalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb, meta


def _read_safetensors(p: Path) -> tuple[torch.Tensor, dict[str, str]]:
    try:
        with safetensors.safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            keys = list(fh.keys())
            if TENSOR_KEY in keys:
                key = TENSOR_KEY
            elif len(keys) == 1:  # a file written by another tool with a single matrix
                key = keys[0]
            else:
                raise ValueError(f"{p}: expected a tensor named {TENSOR_KEY!r} (or exactly one tensor), found {keys}")
            return fh.get_tensor(key), meta
    except safetensors.SafetensorError as err:
        raise ValueError(f"{p}: not a readable safetensors file ({err})") from None


def _check_matrix(emb: Any, where: str) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor of shape (N, D), got {type(emb).__name__}")
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"{where}: expected text embeddings of shape (N, D), got {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise ValueError(f"{where}: expected floating-point embeddings, got {emb.dtype}")
    return emb


# -- cache ----------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


class TextEmbeddingCache:
    """A directory of cached text embeddings, one safetensors file per (model, weights, vocabulary, templates).

    File names are ``{model}--{vocabulary}--{templates}--{key}.safetensors``: readable, and ``key`` (a hash of
    :data:`KEY_FIELDS`) keeps several weights of one model side by side. On a miss, files of the same
    model/vocabulary/templates names are inspected to log why they do not fit.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path_for(self, meta: Mapping[str, str]) -> Path:
        key = hashlib.sha256(json.dumps([meta[f] for f in KEY_FIELDS]).encode("utf-8")).hexdigest()[:16]
        return self.root / f"{self._stem(meta)}--{key}.safetensors"

    @staticmethod
    def _stem(meta: Mapping[str, str]) -> str:
        return "--".join(_slug(meta[k]) for k in ("model_name", "vocabulary_name", "templates_name"))

    def lookup(self, meta: Mapping[str, str]) -> torch.Tensor | None:
        """The cached tensor if a file matches every key field of ``meta``, else None (with the reason logged)."""
        path = self.path_for(meta)
        if path.is_file():
            try:
                emb, cached = load_text_embeddings(path)
            except (ValueError, TypeError) as err:
                logger.warning("text-embedding cache %s is unreadable, rebuilding: %s", path, err)
                return None
            diffs = _differences(cached, meta)
            if not diffs and emb.shape[0] == int(meta["num_classes"]):
                logger.info("text embeddings from cache %s", path)
                return emb
            logger.info("text-embedding cache %s does not match (%s); rebuilding", path, "; ".join(diffs) or "size")
            return None
        siblings = sorted(self.root.glob(f"{self._stem(meta)}--*.safetensors"))
        if not siblings:
            logger.info(
                "no cached text embeddings for model %s, vocabulary %s, templates %s in %s; building",
                meta["model_name"], meta["vocabulary_name"], meta["templates_name"], self.root,
            )
        for other in siblings:
            try:
                with safetensors.safe_open(str(other), framework="pt") as fh:
                    reason = "; ".join(_differences(dict(fh.metadata() or {}), meta)) or "key collision"
            except safetensors.SafetensorError as err:
                reason = f"unreadable ({err})"
            logger.info("text-embedding cache %s not reused: %s", other, reason)
        return None

    def store(self, embeddings: torch.Tensor, meta: Mapping[str, str]) -> Path:
        path = self.path_for(meta)
        save_text_embeddings(path, embeddings, meta)
        return path

    def get(
        self,
        model: TextEncoder,
        vocabulary: Vocabulary,
        templates: TemplateSet,
        *,
        batch_size: int = 256,
        progress: bool = True,
    ) -> torch.Tensor:
        """Cached embeddings if valid, else build them with :func:`build_text_embeddings` and store them."""
        check_text_encoder(model)
        meta = embedding_metadata(model, vocabulary, templates)
        if not model.weights_id:
            # Without a weights identity two different checkpoints would share a file: do not cache at all.
            logger.warning("model %s has an empty weights_id; text embeddings are built, not cached", model.name)
            return build_text_embeddings(model, vocabulary, templates, batch_size=batch_size, progress=progress)
        cached = self.lookup(meta)
        if cached is not None:
            return cached
        emb = build_text_embeddings(model, vocabulary, templates, batch_size=batch_size, progress=progress)
        path = self.store(emb, meta)
        logger.info("cached text embeddings %s in %s", tuple(emb.shape), path)
        return emb


def _differences(cached: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    out = []
    for field in KEY_FIELDS:
        a, b = cached.get(field), wanted.get(field)
        if a != b:
            if field.endswith("fingerprint"):
                a, b = (a or "")[:12], (b or "")[:12]
            out.append(f"{field}: cached {a!r}, wanted {b!r}")
    return out


def get_text_embeddings(
    model: TextEncoder,
    vocabulary: Vocabulary,
    templates: TemplateSet,
    cache_dir: str | os.PathLike | None,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Embeddings (N, D) for ``vocabulary``: from ``cache_dir`` when a matching file is there, else built.

    ``cache_dir=None`` disables caching.
    """
    if cache_dir is None:
        return build_text_embeddings(model, vocabulary, templates, batch_size=batch_size, progress=progress)
    return TextEmbeddingCache(cache_dir).get(model, vocabulary, templates, batch_size=batch_size, progress=progress)


__all__ = [
    "TextEmbeddingCache",
    "embedding_metadata",
    "get_text_embeddings",
    "load_text_embeddings",
    "save_text_embeddings",
]
