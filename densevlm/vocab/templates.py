"""Prompt template sets that turn a class name into sentences for the text encoder.

A template holds ``{}`` for the class name and may hold ``{article}`` ("a"/"an", chosen from the name).
Names are normalised as the reference does before formatting: ``_`` becomes a space, ``/`` becomes " or ",
the text is lower-cased and a trailing dot is dropped.

**The "This is " prefix.** The reference (ViLD's script as adapted by CLIPSelf/DenseVLM,
``tools/generate_text_embeddings.py``) prepends "This is " to every formatted sentence that starts with "a" or
"the" (so "a photo of a cat." becomes "This is a photo of a cat." and "an embroidered cat." becomes
"This is an embroidered cat."; "There is a cat in the scene." is unchanged; the test is case-sensitive).
Each :class:`TemplateSet` carries the flag; the built-in ``vild`` and ``short`` sets default to it on (what
the reference did), ``single`` defaults to off (plain CLIP "a photo of a cat."). ``get_templates(name,
this_is_prefix=...)`` overrides it. The flag is part of :attr:`TemplateSet.fingerprint`, so caches built with
and without it never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Bumped whenever name normalisation or the prefix rule changes, so old caches stop matching.
PROMPT_RULES_VERSION = 1

# ViLD's 63 hand-crafted detection prompts (data, reproduced verbatim, in the reference's order).
VILD_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
)

# A 7-prompt subset of the above for quick runs: scene-level phrasing (useful for stuff) plus the size and
# crop variants that matter for regions. Chosen by us, not from a paper.
SHORT_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of {article} {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a cropped photo of the {}.",
)

SINGLE_TEMPLATES: tuple[str, ...] = ("a photo of {article} {}.",)


def article(name: str) -> str:
    """The reference's article rule: "an" before a vowel letter, else "a" (so "an umbrella", "a unicorn" too)."""
    return "an" if name and name[0] in "aeiou" else "a"


def normalize_name(name: str) -> str:
    """Class-name clean-up before formatting, as in the reference (LVIS ``_``, Objects365 ``/``)."""
    return name.replace("_", " ").replace("/", " or ").lower().strip().rstrip(".").strip()


def _check_template(template: str, where: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"{where}: template {template!r} is not a valid format string ({err})") from None
    if fields.count("") != 1 or any(f not in ("", "article") for f in fields):
        raise ValueError(
            f"{where}: template {template!r} must contain exactly one '{{}}' (the class name) and may contain "
            f"'{{article}}'; found fields {fields}"
        )


@dataclass(frozen=True)
class TemplateSet:
    """A named list of prompt templates plus the "This is " prefix flag (see the module docstring)."""

    name: str
    templates: tuple[str, ...]
    this_is_prefix: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("template set name must be non-empty")
        templates = tuple(self.templates)
        if not templates:
            raise ValueError(f"template set {self.name!r} has no templates")
        for i, t in enumerate(templates):
            if not isinstance(t, str):
                raise ValueError(f"template set {self.name!r}: template {i} is {t!r}, expected a string")
            _check_template(t, f"template set {self.name!r}, template {i}")
        object.__setattr__(self, "templates", templates)

    def __len__(self) -> int:
        return len(self.templates)

    def format(self, name: str) -> list[str]:
        """All sentences for one class name, in template order."""
        clean = normalize_name(name)
        if not clean:
            raise ValueError(f"class name {name!r} is empty after normalisation")
        texts = [t.format(clean, article=article(clean)) for t in self.templates]
        if self.this_is_prefix:
            # Exactly the reference's test: on the formatted text, case-sensitive, "a" also catching "an".
            texts = ["This is " + t if t.startswith("a") or t.startswith("the") else t for t in texts]
        return texts

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the templates, the prefix flag and the prompt-rule version; the name is left out."""
        blob = json.dumps(
            {"templates": list(self.templates), "this_is_prefix": self.this_is_prefix, "rules": PROMPT_RULES_VERSION},
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "templates": list(self.templates), "this_is_prefix": self.this_is_prefix}


BUILTIN_TEMPLATE_SETS: dict[str, TemplateSet] = {
    "vild": TemplateSet("vild", VILD_TEMPLATES, this_is_prefix=True),
    "short": TemplateSet("short", SHORT_TEMPLATES, this_is_prefix=True),
    "single": TemplateSet("single", SINGLE_TEMPLATES, this_is_prefix=False),
}
# The reference names its embedding files "..._clip_hand_craft_...": same 63 prompts.
_TEMPLATE_ALIASES = {"hand_craft": "vild", "vild_63": "vild", "short_7": "short"}


def list_template_sets() -> list[str]:
    return list(BUILTIN_TEMPLATE_SETS)


def get_templates(name_or_path: str | os.PathLike, *, this_is_prefix: bool | None = None) -> TemplateSet:
    """A built-in template set (``vild``/``hand_craft``, ``short``, ``single``) or a JSON file.

    The file is ``{"name": ..., "templates": [...], "this_is_prefix": bool}`` (name defaults to the file stem,
    the flag to false) or a bare list of templates. ``this_is_prefix`` overrides the set's own flag.
    """
    text = os.fspath(name_or_path)
    key = _TEMPLATE_ALIASES.get(text, text)
    if key in BUILTIN_TEMPLATE_SETS:
        tset = BUILTIN_TEMPLATE_SETS[key]
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(
                f"unknown template set {text!r}: not a built-in and no such file. "
                f"Built-ins: {', '.join(list_template_sets())} (alias hand_craft = vild)"
            )
        tset = _template_file(path)
    if this_is_prefix is not None and this_is_prefix != tset.this_is_prefix:
        tset = replace(tset, this_is_prefix=this_is_prefix)
    return tset


def _template_file(path: Path) -> TemplateSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, list):
        data = {"templates": data}
    if not isinstance(data, dict) or not isinstance(data.get("templates"), list):
        raise ValueError(f"{path}: expected a list of templates or an object with key 'templates' (a list)")
    prefix = data.get("this_is_prefix", False)
    if not isinstance(prefix, bool):
        raise ValueError(f"{path}: key 'this_is_prefix' must be true or false, got {prefix!r}")
    name = data.get("name") or path.stem
    try:
        return TemplateSet(str(name), tuple(data["templates"]), this_is_prefix=prefix)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
