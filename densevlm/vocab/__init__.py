"""Vocabularies with thing/stuff flags and synonyms, prompt templates, and class text embeddings (with a cache)."""

from densevlm.vocab.cache import (
    TextEmbeddingCache,
    embedding_metadata,
    get_text_embeddings,
    load_text_embeddings,
    save_text_embeddings,
)
from densevlm.vocab.commands import embed_text_main, text_embeddings_from_config
from densevlm.vocab.embeddings import NORMALIZATION, TextEncoder, build_text_embeddings, encode_texts
from densevlm.vocab.registry import BUILTIN_VOCABULARIES, get_vocabulary, list_vocabularies
from densevlm.vocab.templates import TemplateSet, get_templates, list_template_sets
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary, split_synonyms

__all__ = [
    "BUILTIN_VOCABULARIES",
    "ClassEntry",
    "NORMALIZATION",
    "TemplateSet",
    "TextEmbeddingCache",
    "TextEncoder",
    "Vocabulary",
    "build_text_embeddings",
    "embed_text_main",
    "embedding_metadata",
    "encode_texts",
    "get_templates",
    "get_text_embeddings",
    "get_vocabulary",
    "list_template_sets",
    "list_vocabularies",
    "load_text_embeddings",
    "save_text_embeddings",
    "split_synonyms",
    "text_embeddings_from_config",
]
