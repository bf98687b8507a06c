"""Finding a vocabulary by name or path: built-ins, our JSON files, COCO-panoptic jsons and toy-world roots."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from densevlm.vocab.vocabulary import FORMAT, Vocabulary, entry_from_mapping

_DATA_DIR = Path(__file__).resolve().parent / "data"

# Canonical name -> package data file. Copied from the reference's tools/openseg_classes.py lists (via
# shared/docs/vocabularies.json), with comma lists split into name + synonyms and every flag written out.
BUILTIN_VOCABULARIES: dict[str, str] = {
    "coco_panoptic": "coco_panoptic.json",
    "ade20k_150": "ade20k_150.json",
    "coco_stuff_171": "coco_stuff_171.json",
    "pascal_context_59": "pascal_context_59.json",
    "voc_21": "voc_21.json",
    "voc_20": "voc_20.json",  # voc_21 without background (derived here, for the VOC-20 benchmark)
    "pascal_context_60": "pascal_context_60.json",  # background + pascal_context_59 (Context-60 benchmark)
    "cityscapes_19": "cityscapes_19.json",
    "coco_ade_316": "coco_ade_316.json",
}

# The reference's constant names, so a reader of its scripts finds the same list here.
_ALIASES: dict[str, str] = {
    "coco_panoptic_133": "coco_panoptic",
    "COCO_CATEGORIES": "coco_panoptic",
    "ADE20K_150_CATEGORIES": "ade20k_150",
    "COCO_STUFF_CATEGORIES": "coco_stuff_171",
    "PASCAL_CTX_59_CATEGORIES": "pascal_context_59",
    "PASCAL_VOC_21_CATEGORIES": "voc_21",
    "CITYSCAPES_CATEGORIES": "cityscapes_19",
    "COCO_STUFF_ADE20k_Thing204_STUFF112": "coco_ade_316",
}

WORLD_FILE = "world.json"


def list_vocabularies() -> list[str]:
    """Canonical names of the built-in vocabularies."""
    return list(BUILTIN_VOCABULARIES)


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> Vocabulary:
    # Vocabulary is immutable, so one shared instance per name is safe.
    return Vocabulary.from_json(_DATA_DIR / BUILTIN_VOCABULARIES[name])


def get_vocabulary(name_or_path: str | os.PathLike, *, default_isthing: bool | None = None) -> Vocabulary:
    """Resolve a vocabulary from a built-in name or a path.

    Accepted:
      * a built-in name (:func:`list_vocabularies`, e.g. ``"coco_ade_316"``) or a reference constant name;
      * a JSON file in our format (``{"format": "densevlm.vocabulary", "name", "classes": [...]}``);
      * a COCO-panoptic-format JSON: its ``categories`` with ``id``, ``name`` and ``isthing``;
      * a toy-world root directory (or its ``world.json``): ``categories`` with ``id``, ``name``, ``isthing``,
        ``novel``, ``synonyms``.

    ``default_isthing`` fills a missing ``isthing`` in category lists (e.g. ``True`` for a COCO *instances*
    json, whose categories are all things); left at None a missing flag is an error naming the file.
    """
    text = os.fspath(name_or_path)
    key = _ALIASES.get(text, text)
    if key in BUILTIN_VOCABULARIES:
        return _load_builtin(key)
    path = Path(text).expanduser()
    if path.is_dir():
        world = path / WORLD_FILE
        if not world.is_file():
            raise FileNotFoundError(
                f"vocabulary directory {path} has no {WORLD_FILE}; expected a toy-world root "
                f"(or pass a built-in name: {', '.join(list_vocabularies())})"
            )
        return vocabulary_from_categories_file(world, default_name=path.name, default_isthing=default_isthing)
    if path.is_file():
        return vocabulary_from_file(path, default_isthing=default_isthing)
    looks_like_path = path.suffix == ".json" or os.sep in text
    if looks_like_path:
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    raise ValueError(
        f"unknown vocabulary {text!r}: not a built-in and no such file or directory. "
        f"Built-ins: {', '.join(list_vocabularies())}"
    )


def vocabulary_from_file(path: str | os.PathLike, *, default_isthing: bool | None = None) -> Vocabulary:
    """Read a vocabulary JSON in our format or as a category list (COCO panoptic, toy-world world.json)."""
    p = Path(path)
    data = _read(p)
    if isinstance(data, dict) and "classes" in data:
        return Vocabulary.from_dict(data, source=str(p))
    if isinstance(data, dict) and "categories" in data:
        return _from_categories(data, p, default_name=p.stem, default_isthing=default_isthing)
    found = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise ValueError(
        f"{p}: not a vocabulary: expected key 'classes' (format {FORMAT!r}) or 'categories' "
        f"(COCO panoptic / toy-world world.json), found {found}"
    )


def vocabulary_from_categories_file(
    path: str | os.PathLike, *, default_name: str | None = None, default_isthing: bool | None = None
) -> Vocabulary:
    """Read the ``categories`` list of a COCO-style json or a toy-world ``world.json``."""
    p = Path(path)
    data = _read(p)
    if not isinstance(data, dict) or "categories" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{p}: expected an object with key 'categories', found {found}")
    return _from_categories(data, p, default_name=default_name or p.stem, default_isthing=default_isthing)


def _from_categories(
    data: dict[str, Any], path: Path, *, default_name: str, default_isthing: bool | None
) -> Vocabulary:
    cats = data["categories"]
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{path}: key 'categories' must be a non-empty list, got {cats!r:.80}")
    entries = []
    for i, cat in enumerate(cats):
        where = f"{path}: categories[{i}]"
        entry = entry_from_mapping(cat, where, require_isthing=False, default_isthing=default_isthing)
        if entry.id is None:
            raise ValueError(f"{where} ({entry.name!r}): key 'id' is missing; COCO-style categories need an id")
        entries.append(entry)
    # A world.json may carry its own name; a COCO json's 'info' is free text, so the file stem names it there.
    name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else default_name
    vocab = Vocabulary(name, tuple(entries))
    try:  # duplicate category ids would make dataset labels ambiguous: fail here, naming the file
        vocab.id_to_index()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return vocab


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
