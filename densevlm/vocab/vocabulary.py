"""Vocabularies: ordered class lists with thing/stuff and novel flags and synonyms.

A :class:`Vocabulary` is the single source of truth for "which column of the text-embedding matrix is which
class, and is it a thing". The reference code derived the thing/stuff boundary from a file name (and got it off
by one); here every class carries its own flags, and a fingerprint over names, synonyms and flags lets two
components (teacher and student, a cache file and its user) check that they mean the same columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch

from densevlm.utils.io import atomic_write_text

FORMAT = "densevlm.vocabulary"
FORMAT_VERSION = 1


def split_synonyms(text: str) -> tuple[str, tuple[str, ...]]:
    """Split a comma list such as ``'wardrobe, closet, press'`` into ``('wardrobe', ('closet', 'press'))``.

    Surrounding whitespace is dropped (ADE-150 ships ``'window '``) and a repeated word is kept once.
    """
    parts = [p.strip() for p in text.split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"class name {text!r} is empty")
    head, rest = parts[0], []
    for p in parts[1:]:
        if p != head and p not in rest:
            rest.append(p)
    return head, tuple(rest)


@dataclass(frozen=True)
class ClassEntry:
    """One class: its primary name, extra names, and flags.

    ``isthing`` separates countable objects (thing) from amorphous regions (stuff); ``novel`` marks classes held
    out from training in an open-vocabulary split; ``id`` is the dataset's category id when there is one.
    ``synonyms`` may be given as a list; it is stored as a tuple so the entry stays immutable and hashable.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    isthing: bool = True
    novel: bool = False
    id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"class name must be a non-empty string, got {self.name!r}")
        if "," in self.name:
            raise ValueError(
                f"class name {self.name!r} contains a comma; pass extra names as synonyms "
                f"(split_synonyms({self.name!r}) does that)"
            )
        if isinstance(self.synonyms, str):
            raise ValueError(f"class {self.name!r}: synonyms must be a list of strings, got the string {self.synonyms!r}")
        synonyms = tuple(self.synonyms)
        for s in synonyms:
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"class {self.name!r}: synonyms must be non-empty strings, got {s!r}")
        if not isinstance(self.isthing, bool) or not isinstance(self.novel, bool):
            raise ValueError(
                f"class {self.name!r}: isthing/novel must be booleans, got {self.isthing!r}/{self.novel!r}"
            )
        if self.id is not None and (isinstance(self.id, bool) or not isinstance(self.id, int)):
            raise ValueError(f"class {self.name!r}: id must be an int or None, got {self.id!r}")
        # Lists are accepted for convenience; a tuple keeps the entry hashable and immutable.
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "synonyms", tuple(s.strip() for s in synonyms))

    @property
    def all_names(self) -> tuple[str, ...]:
        """The primary name followed by its synonyms: every name the text embedding averages over."""
        return (self.name, *self.synonyms)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "synonyms": list(self.synonyms),
            "isthing": self.isthing,
            "novel": self.novel,
        }
        if self.id is not None:
            out["id"] = self.id
        return out


# Union rather than `|`: a module-level alias is evaluated at import time.
Selector = Union[Sequence[int], Sequence[bool], torch.Tensor, Callable[[ClassEntry], bool]]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, immutable list of classes; index ``i`` is column ``i`` of a text-embedding matrix.

    Equality compares the name and every class; :attr:`fingerprint` ignores the name, so two vocabularies with
    the same classes under different names embed identically and :meth:`check_compatible` accepts them.
    """

    name: str
    classes: tuple[ClassEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"vocabulary name must be a non-empty string, got {self.name!r}")
        classes = tuple(self.classes)
        for i, c in enumerate(classes):
            if not isinstance(c, ClassEntry):
                raise ValueError(f"vocabulary {self.name!r}: class {i} is a {type(c).__name__}, expected ClassEntry")
        if not classes:
            raise ValueError(f"vocabulary {self.name!r} has no classes")
        # A name twice with the same thing/stuff flag gives two identical text columns: an ambiguous argmax and a
        # class that can never win. Once as a thing and once as stuff is kept: the reference's 316-name list has
        # three such names (cupboard, fruit, cradle), one in each half.
        seen: dict[tuple[str, bool], int] = {}
        for i, c in enumerate(classes):
            key = (c.name.strip().lower(), c.isthing)
            if key in seen:
                kind = "thing" if c.isthing else "stuff"
                raise ValueError(f"vocabulary {self.name!r}: duplicate {kind} class name {c.name!r} (classes "
                                 f"{seen[key]} and {i}); merge them, e.g. as synonyms of one class")
            seen[key] = i
        object.__setattr__(self, "classes", classes)

    # -- sequence protocol ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[ClassEntry]:
        return iter(self.classes)

    def __getitem__(self, index: int) -> ClassEntry:
        return self.classes[index]

    def __repr__(self) -> str:
        return (
            f"Vocabulary(name={self.name!r}, classes={len(self)}, things={sum(self.thing_list)}, "
            f"novel={sum(c.novel for c in self.classes)}, fingerprint={self.fingerprint[:12]})"
        )

    # -- views ----------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Primary names in order. Not unique in general: the merged 316 list has 'cupboard' as thing and stuff."""
        return [c.name for c in self.classes]

    @property
    def ids(self) -> list[int | None]:
        return [c.id for c in self.classes]

    @property
    def thing_list(self) -> list[bool]:
        return [c.isthing for c in self.classes]

    @property
    def thing_mask(self) -> torch.Tensor:
        """Bool tensor (N,), True for thing classes."""
        return torch.tensor(self.thing_list, dtype=torch.bool)

    @property
    def stuff_mask(self) -> torch.Tensor:
        """Bool tensor (N,), True for stuff classes."""
        return ~self.thing_mask

    @property
    def novel_mask(self) -> torch.Tensor:
        """Bool tensor (N,), True for classes held out from training."""
        return torch.tensor([c.novel for c in self.classes], dtype=torch.bool)

    @property
    def thing_indices(self) -> torch.Tensor:
        """Long tensor of the column indices of thing classes, ascending."""
        return torch.nonzero(self.thing_mask, as_tuple=False).flatten()

    @property
    def stuff_indices(self) -> torch.Tensor:
        """Long tensor of the column indices of stuff classes, ascending."""
        return torch.nonzero(self.stuff_mask, as_tuple=False).flatten()

    def id_to_index(self) -> dict[int, int]:
        """Map dataset category id to column index (for evaluators reading dataset labels)."""
        out: dict[int, int] = {}
        for i, c in enumerate(self.classes):
            if c.id is None:
                raise ValueError(f"vocabulary {self.name!r}: class {i} ({c.name!r}) has no id")
            if c.id in out:
                raise ValueError(
                    f"vocabulary {self.name!r}: id {c.id} is used by classes {out[c.id]} and {i} ({c.name!r})"
                )
            out[c.id] = i
        return out

    # -- derived vocabularies -------------------------------------------------------------------------------
    def subset(self, keep: Selector, name: str | None = None) -> "Vocabulary":
        """A vocabulary of the selected classes, in their original order.

        ``keep`` is a sequence of indices, a boolean mask of length N (list or tensor), or a predicate on
        :class:`ClassEntry`. Note the columns renumber: index ``j`` of the subset is ``keep``'s ``j``-th class.
        """
        n = len(self)
        if callable(keep) and not isinstance(keep, torch.Tensor):
            idx = [i for i, c in enumerate(self.classes) if keep(c)]
        else:
            values = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
            if values and all(isinstance(v, bool) for v in values):
                if len(values) != n:
                    raise ValueError(
                        f"vocabulary {self.name!r}: boolean mask has length {len(values)}, expected {n}"
                    )
                idx = [i for i, v in enumerate(values) if v]
            else:
                idx = []
                for v in values:
                    if isinstance(v, bool) or not isinstance(v, int) or not -n <= v < n:
                        raise ValueError(
                            f"vocabulary {self.name!r}: subset index {v!r} is not an int in [0, {n})"
                        )
                    idx.append(v % n)
                if len(set(idx)) != len(idx):
                    raise ValueError(f"vocabulary {self.name!r}: subset indices repeat: {values}")
                idx.sort()
        if not idx:
            raise ValueError(f"vocabulary {self.name!r}: subset selects no class")
        return Vocabulary(name or f"{self.name}.subset", tuple(self.classes[i] for i in idx))

    def seen(self) -> "Vocabulary":
        """The classes not marked novel (the training vocabulary of an open-vocabulary split)."""
        return self.subset(lambda c: not c.novel, name=f"{self.name}.seen")

    def renamed(self, name: str) -> "Vocabulary":
        return dataclasses.replace(self, name=name)

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) over names, synonyms and flags in order; stable across runs, Python versions and names.

        Ids are left out on purpose: a COCO json and our built-in with the same classes embed identically.
        """
        canon = [[c.name, list(c.synonyms), c.isthing, c.novel] for c in self.classes]
        blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def check_compatible(self, other: "Vocabulary", what: str = "vocabularies") -> None:
        """Raise ValueError naming the first difference if ``other`` does not have the same classes and flags."""
        if self.fingerprint == other.fingerprint:
            return
        if len(self) != len(other):
            raise ValueError(
                f"{what} differ: {self.name!r} has {len(self)} classes, {other.name!r} has {len(other)}"
            )
        for i, (a, b) in enumerate(zip(self.classes, other.classes)):
            ka = (a.name, a.synonyms, a.isthing, a.novel)
            kb = (b.name, b.synonyms, b.isthing, b.novel)
            if ka != kb:
                raise ValueError(
                    f"{what} differ at class {i}: {self.name!r} has {_describe(a)}, {other.name!r} has {_describe(b)}"
                )
        # Not reached: the fingerprint hashes exactly the fields compared above.
        raise ValueError(f"{what} differ: fingerprints {self.fingerprint[:12]} vs {other.fingerprint[:12]}")

    # -- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "classes": [c.to_dict() for c in self.classes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Vocabulary":
        """Parse our JSON format (``{"name", "classes": [{"name", "synonyms", "isthing", "novel", "id"}]}``).

        ``source`` (usually the file path) is named in every error.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object with 'name' and 'classes', got {type(data).__name__}")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"{source}: key 'format' is {fmt!r}, expected {FORMAT!r}")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: vocabulary format version {version!r} is not supported (expected 1)")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: key 'name' must be a non-empty string, got {name!r}")
        raw = data.get("classes")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{source}: key 'classes' must be a non-empty list, got {raw!r:.80}")
        classes = [
            entry_from_mapping(c, f"{source}: classes[{i}]", require_isthing=True) for i, c in enumerate(raw)
        ]
        try:
            return cls(name, tuple(classes))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically), one class per line for readable diffs."""
        d = self.to_dict()
        classes = d.pop("classes")
        head = json.dumps(d, indent=2, ensure_ascii=False)[:-2]
        body = ",\n".join("    " + json.dumps(c, ensure_ascii=False) for c in classes)
        atomic_write_text(path, f'{head},\n  "classes": [\n{body}\n  ]\n}}\n')

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read a vocabulary file in our format (see :func:`densevlm.vocab.get_vocabulary` for other formats)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file not found: {p}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(p))


def _describe(c: ClassEntry) -> str:
    kind = "thing" if c.isthing else "stuff"
    syn = f" (synonyms {list(c.synonyms)})" if c.synonyms else ""
    return f"{c.name!r}{syn} [{kind}{', novel' if c.novel else ''}]"


def entry_from_mapping(
    item: Any, where: str, *, require_isthing: bool, default_isthing: bool | None = None
) -> ClassEntry:
    """Build a :class:`ClassEntry` from a category mapping (our format, COCO panoptic or toy-world).

    A comma list in ``name`` becomes name plus synonyms, followed by any explicit ``synonyms``. ``isthing``
    may be a bool or 0/1 (COCO writes ints). When it is missing: an error if ``require_isthing``, else
    ``default_isthing`` (an error too if that is None).
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected an object with at least 'name', got {item!r:.80}")
    raw_name = item.get("name")
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise ValueError(f"{where}: key 'name' must be a non-empty string, got {raw_name!r}")
    name, synonyms = split_synonyms(raw_name)
    extra = item.get("synonyms", [])
    if extra is None:
        extra = []
    if isinstance(extra, str) or not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
        raise ValueError(f"{where} ({name!r}): key 'synonyms' must be a list of strings, got {extra!r}")
    merged = list(synonyms)
    for s in extra:
        s = s.strip()
        if s and s != name and s not in merged:
            merged.append(s)

    def flag(key: str, default: bool | None) -> bool:
        value = item.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{where} ({name!r}): key '{key}' is missing; expected true/false (or 1/0)")
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where} ({name!r}): key '{key}' must be true/false or 1/0, got {value!r}")

    isthing = flag("isthing", None if require_isthing else default_isthing)
    novel = flag("novel", False)
    cid = item.get("id")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)):
        raise ValueError(f"{where} ({name!r}): key 'id' must be an integer, got {cid!r}")
    return ClassEntry(name, tuple(merged), isthing=isthing, novel=novel, id=cid)
