"""Entry points used by the CLI (``densevlm embed-text``) and by training/evaluation set-up."""

from __future__ import annotations

import logging
import os

import torch

from densevlm.config.vocab import TextEmbeddingConfig
from densevlm.vocab.cache import embedding_metadata, get_text_embeddings, load_text_embeddings, save_text_embeddings
from densevlm.vocab.embeddings import TextEncoder, check_text_encoder
from densevlm.vocab.registry import get_vocabulary
from densevlm.vocab.templates import get_templates
from densevlm.vocab.vocabulary import Vocabulary

logger = logging.getLogger(__name__)


def embed_text_main(
    model: TextEncoder,
    vocabulary_name: str | os.PathLike,
    templates_name: str | os.PathLike,
    out_path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    *,
    this_is_prefix: bool | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Build (or fetch from the cache) the class embeddings and, with ``out_path``, export them.

    ``out_path`` ending in ``.safetensors`` keeps the metadata (model, weights, vocabulary with class names and
    thing flags, templates); ``.npy`` writes the reference's plain (N, D) float32 array. Returns the tensor.
    """
    check_text_encoder(model)
    vocabulary = get_vocabulary(vocabulary_name)
    templates = get_templates(templates_name, this_is_prefix=this_is_prefix)
    emb = get_text_embeddings(model, vocabulary, templates, cache_dir, batch_size=batch_size, progress=progress)
    if out_path is not None:
        save_text_embeddings(out_path, emb, embedding_metadata(model, vocabulary, templates))
        logger.info("wrote text embeddings %s to %s", tuple(emb.shape), out_path)
    return emb


def text_embeddings_from_config(
    model: TextEncoder | None, cfg: TextEmbeddingConfig, vocabulary: Vocabulary | None = None, *,
    progress: bool = True,
) -> tuple[Vocabulary, torch.Tensor]:
    """The vocabulary and its (N, D) embeddings for ``cfg``: loaded from ``cfg.embeddings_path`` or built.

    ``vocabulary`` overrides ``cfg.vocabulary`` (e.g. the one a dataset defines). ``model`` may be None only
    when ``embeddings_path`` is set.
    """
    vocab = vocabulary if vocabulary is not None else get_vocabulary(cfg.vocabulary)
    if cfg.embeddings_path is not None:
        emb, meta = load_text_embeddings(cfg.embeddings_path, vocab, renormalize=cfg.renormalize)
        dim = getattr(model, "embed_dim", None)
        if dim is not None and emb.shape[1] != dim:
            raise ValueError(f"{cfg.embeddings_path}: text embeddings of dimension {emb.shape[1]}, but model "
                             f"{getattr(model, 'name', '?')} embeds into {dim} dimensions; the file was built by "
                             f"{meta.get('model_name', 'another model')}")
        if model is not None and meta.get("model_name") not in (None, model.name):
            logger.warning(
                "%s was built with model %s, used with %s: region and text embeddings may live in different spaces",
                cfg.embeddings_path, meta["model_name"], model.name,
            )
        return vocab, emb
    if model is None:
        raise ValueError("text embeddings: no model given and embeddings_path is not set; one of them is needed")
    templates = get_templates(cfg.templates, this_is_prefix=cfg.this_is_prefix)
    emb = get_text_embeddings(model, vocab, templates, cfg.cache_dir, batch_size=cfg.batch_size, progress=progress)
    return vocab, emb
