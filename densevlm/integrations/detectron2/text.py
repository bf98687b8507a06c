"""Class text embeddings for a detectron2 dataset's metadata, from the backbone's own text tower."""

from __future__ import annotations

from typing import Any, Literal, Union

import torch

from densevlm.vocab import ClassEntry, Vocabulary, build_text_embeddings, get_templates, split_synonyms


def metadata_vocabulary(metadata: Any, kind: Literal["thing", "stuff"] = "thing") -> Vocabulary:
    """A :class:`Vocabulary` of ``metadata.thing_classes`` or ``metadata.stuff_classes`` (contiguous ids in order).

    ``metadata`` is a detectron2 ``Metadata`` or a registered dataset name. Names like ``"wardrobe, closet"`` are
    split into a primary name and synonyms, as the built-in vocabularies are.
    """
    if isinstance(metadata, str):
        from detectron2.data import MetadataCatalog

        metadata = MetadataCatalog.get(metadata)
    if kind not in ("thing", "stuff"):
        raise ValueError(f"kind: expected 'thing' or 'stuff', got {kind!r}")
    key = f"{kind}_classes"
    names = metadata.get(key, None) if hasattr(metadata, "get") else getattr(metadata, key, None)
    dataset = getattr(metadata, "name", "metadata")
    if not names:
        raise ValueError(f"dataset '{dataset}': metadata has no '{key}'")
    classes = []
    for index, text in enumerate(names):
        name, synonyms = split_synonyms(str(text))
        classes.append(ClassEntry(name=name, synonyms=synonyms, isthing=kind == "thing", id=index))
    return Vocabulary(name=f"{dataset}:{kind}", classes=tuple(classes))


def class_text_embeddings(
    model: Any,
    metadata: Any,
    *,
    kind: Literal["thing", "stuff"] = "thing",
    templates: Union[str, Any] = "vild",
    progress: bool = False,
) -> torch.Tensor:
    """(num_classes, embed_dim) unit-norm class embeddings in the order of the dataset's contiguous ids.

    ``model`` is a :class:`densevlm.models.DenseCLIP` or the detectron2 backbone that wraps one (``.clip``, or
    ``.bottom_up.clip`` for the FPN); ``templates`` a built-in template set name (``vild``, ``short``, ``single``)
    or a JSON file. Cosine logits against the backbone's ``clip`` map classify each location or region.
    """
    clip_model = getattr(getattr(model, "bottom_up", model), "clip", model)
    template_set = get_templates(templates) if isinstance(templates, str) else templates
    return build_text_embeddings(clip_model, metadata_vocabulary(metadata, kind), template_set, progress=progress)
