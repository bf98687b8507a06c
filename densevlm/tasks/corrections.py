"""``densevlm labels apply`` and the training side of reviewed labels (``teacher_targets.corrections``).

``labels apply`` matches a labelling tool's corrected COCO export against the proposals of ``labels propose``:
per image of the export (an image missing from it was not reviewed), an annotation matches the proposed region
named by its ``densevlm_region`` attribute when the tool kept it, else the unmatched proposal whose box overlaps it
most (IoU >= :data:`MATCH_IOU`). A matched region whose class changed is *relabelled*; a proposal nothing matches
is *deleted*; an annotation that matches no proposal is *added*. Class names go through the rules first
(``synonyms``, then ``merge``); a name outside the vocabulary is an error naming the file and the annotation. The
corrections file keeps the proposals' identity (image source, region source, vocabulary, teacher): training refuses
it for another source, naming both.

:func:`load_corrections` turns the file into the objective's
:class:`~densevlm.methods.corrections.TargetCorrections` for the run's dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from densevlm.data.region_sources import describe_identity
from densevlm.methods.corrections import DELETED, TargetCorrections
from densevlm.tasks.labels import DISTRIBUTIONS, FORMAT as PROPOSALS_FORMAT
from densevlm.utils.hashing import sha256_file
from densevlm.utils.io import atomic_write_json, read_json
from densevlm.vocab.vocabulary import Vocabulary

log = logging.getLogger(__name__)

FORMAT = "densevlm.corrections"
MATCH_IOU = 0.7
RULE_KEYS = ("merge", "never", "synonyms")
#: Slots of added regions start here (a file source's own slots are positions in the file, far below).
ADDED_SLOT = 1_000_000


class CorrectionsError(ValueError):
    """A corrected export, rules file or corrections file that does not fit; the message names the file and the
    image, annotation or class at fault."""


# --------------------------------------------------------------------------------------------- rules
def read_rules(path: Optional[str | Path]) -> dict[str, Any]:
    """The class rules YAML (``merge: {X: Y}``, ``never: [Z]``, ``synonyms: {name: class}``), checked for shape."""
    if path is None:
        return {"merge": {}, "never": [], "synonyms": {}}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class rules file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise CorrectionsError(f"{p}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or set(data) - set(RULE_KEYS):
        raise CorrectionsError(f"{p}: expected a mapping with keys {list(RULE_KEYS)}, got "
                               f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    merge, never, synonyms = data.get("merge") or {}, data.get("never") or [], data.get("synonyms") or {}
    if not isinstance(merge, dict) or not isinstance(synonyms, dict) or not isinstance(never, list):
        raise CorrectionsError(f"{p}: merge and synonyms must be mappings (name: class), never a list of classes")
    return {"merge": {str(k): str(v) for k, v in merge.items()}, "never": [str(v) for v in never],
            "synonyms": {str(k): str(v) for k, v in synonyms.items()}}


def check_rules(rules: Mapping[str, Any], names: Sequence[str], where: str) -> None:
    """Every class a rule names must be in the vocabulary (synonym keys are the foreign names, so they need not)."""
    known = set(names)
    used = [("merge", k) for k in rules["merge"]] + [("merge", v) for v in rules["merge"].values()]
    used += [("never", v) for v in rules["never"]] + [("synonyms", v) for v in rules["synonyms"].values()]
    for key, name in used:
        if name not in known:
            raise CorrectionsError(f"{where}: {key} names class {name!r}, which is not in the vocabulary "
                                   f"({len(names)} classes: {', '.join(list(names)[:8])}, ...)")


def resolve_name(name: str, rules: Mapping[str, Any]) -> str:
    """A class name after the rules: a synonym becomes its class, then a merged class its target."""
    name = rules["synonyms"].get(name, name)
    return rules["merge"].get(name, name)


# --------------------------------------------------------------------------------------------- apply
def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _region_attr(ann: Mapping[str, Any]) -> Optional[int]:
    attrs = ann.get("attributes") if isinstance(ann.get("attributes"), dict) else {}
    value = attrs.get("densevlm_region", ann.get("densevlm_region"))
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def run_apply(proposals: str | Path, corrected: str | Path, out: str | Path, *,
              rules: Optional[str | Path] = None) -> dict[str, Any]:
    """Write the corrections file ``out`` (see the module docstring); returns a summary."""
    prop_path = Path(proposals)
    prop_path = prop_path / DISTRIBUTIONS if prop_path.is_dir() else prop_path
    props = read_json(prop_path, "labels propose distributions")
    if not isinstance(props, dict) or props.get("format") != PROPOSALS_FORMAT:
        raise CorrectionsError(f"{prop_path}: not a `densevlm labels propose` distributions file "
                               f"(format {props.get('format') if isinstance(props, dict) else None!r})")
    names = [c["name"] for c in props["vocabulary"]]
    rule_set = read_rules(rules)
    check_rules(rule_set, names, str(rules))
    data = read_json(corrected, "corrected COCO json")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise CorrectionsError(f"{corrected}: expected a COCO json with images, annotations and categories")
    category = {c["id"]: str(c["name"]) for c in data["categories"]}

    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in props["regions"]:
        by_image.setdefault(r["image"], []).append(r)
    basename = {Path(k).name: k for k in by_image}
    image_key: dict[Any, str] = {}
    for img in data["images"]:
        name = str(img.get("file_name", ""))
        key = name if name in by_image else basename.get(Path(name).name)
        if key is None:
            raise CorrectionsError(f"{corrected}: image {img.get('id')!r} ({name}) is not among the proposals' "
                                   f"images ({prop_path})")
        image_key[img["id"]] = key
    anns_of: dict[str, list[dict[str, Any]]] = {k: [] for k in image_key.values()}
    for ann in data["annotations"]:
        if ann.get("image_id") not in image_key:
            raise CorrectionsError(f"{corrected}: annotation {ann.get('id')!r} refers to image_id "
                                   f"{ann.get('image_id')!r}, which its 'images' lacks")
        anns_of[image_key[ann["image_id"]]].append(ann)

    regions, added = [], []
    counts = {"reviewed_images": len(anns_of), "relabelled": 0, "deleted": 0, "added": 0, "confirmed": 0,
              "never_deleted": 0}
    known = set(names)
    for key, anns in anns_of.items():
        proposed = {r["slot"]: r for r in by_image[key]}
        unmatched = dict(proposed)
        for ann in anns:
            where = f"{corrected}: annotation {ann.get('id')!r} (image {key})"
            if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
                raise CorrectionsError(f"{where}: needs 'bbox' [x, y, w, h], got {ann.get('bbox')!r}")
            raw = category.get(ann.get("category_id"))
            if raw is None:
                raise CorrectionsError(f"{where}: category_id {ann.get('category_id')!r} is not in its categories")
            name = resolve_name(raw, rule_set)
            if name not in known:
                raise CorrectionsError(f"{where}: class {raw!r} is not in the vocabulary {props['identity']['vocabulary']['name']!r}"
                                       f" ({len(names)} classes: {', '.join(names[:8])}, ...); add a synonym or merge "
                                       "rule, or relabel it")
            slot = _region_attr(ann)
            if slot is None or slot not in unmatched:
                best = max(unmatched.values(), key=lambda r: _iou(r["bbox"], ann["bbox"]), default=None)
                slot = best["slot"] if best is not None and _iou(best["bbox"], ann["bbox"]) >= MATCH_IOU else None
            if slot is None:
                entry = {"image": key, "bbox": [float(v) for v in ann["bbox"]], "class": name, "source_id": ann.get("id")}
                if ann.get("segmentation"):
                    entry["segmentation"] = ann["segmentation"]
                added.append(entry)
                counts["added"] += 1
                continue
            was = unmatched.pop(slot)["label"]
            if name in rule_set["never"]:
                regions.append({"image": key, "slot": slot, "action": "delete", "was": was, "class": name,
                                "why": "never rule"})
                counts["never_deleted"] += 1
            elif name != was:
                regions.append({"image": key, "slot": slot, "action": "relabel", "was": was, "class": name})
                counts["relabelled"] += 1
            else:
                counts["confirmed"] += 1
        for slot, r in sorted(unmatched.items()):
            regions.append({"image": key, "slot": slot, "action": "delete", "was": r["label"]})
            counts["deleted"] += 1
    result = {"format": FORMAT, "version": 1, "identity": props["identity"], "vocabulary": names,
              "proposals": str(prop_path.resolve()), "corrected": str(Path(corrected).resolve()),
              "corrected_sha256": sha256_file(corrected), "rules": rule_set, "summary": counts,
              "regions": regions, "added": added}
    atomic_write_json(out, result)
    return {**counts, "out": str(out), "region_source": describe_identity(props["identity"]["regions"])}


# --------------------------------------------------------------------------------------------- training
def _identity_mismatch(stored: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    out = []
    for key in ("images", "regions"):
        if stored.get(key) != run.get(key):
            show = describe_identity if key == "regions" else (lambda d: f"{d.get('kind')}:{d.get('path')}")
            out.append(f"{key}: the file's {show(stored.get(key) or {})}, the run's {show(run.get(key) or {})}")
    return out


def read_corrections(path: str | Path, identity: Mapping[str, Any]) -> dict[str, Any]:
    """The corrections file ``path``, checked to be for a run whose images and regions have ``identity``
    (``images``, ``regions``: as ``labels propose`` records them); another source is an error naming both."""
    p = Path(path)
    data = read_json(p, "corrections file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorrectionsError(f"{p}: not a corrections file of `densevlm labels apply` (format "
                               f"{data.get('format') if isinstance(data, dict) else None!r})")
    diffs = _identity_mismatch(data.get("identity", {}), identity)
    if diffs:
        raise CorrectionsError(f"corrections file {p} was made for another source than this run's: "
                               + "; ".join(diffs) + ". Propose and review labels for this run's data (densevlm "
                               "labels propose with the same data.source and data.regions)")
    return data


def load_corrections(path: str | Path, identity: Mapping[str, Any], vocabulary: Vocabulary,
                     image_keys: Sequence[str]) -> tuple[TargetCorrections, dict[str, Any]]:
    """The corrections of ``path`` (:func:`read_corrections`) for a run with training ``vocabulary`` and dataset
    ``image_keys``.

    Returns the objective's :class:`TargetCorrections` and ``{"added": {index: [entries]}, "summary": ...}``: the
    added regions per dataset image index (their slots are ``ADDED_SLOT + position``)."""
    p = Path(path)
    data = read_corrections(p, identity)
    index = {k: i for i, k in enumerate(image_keys)}
    names = vocabulary.names
    column = {n: i for i, n in enumerate(names)}

    def class_of(name: str, where: str) -> int:
        if name not in column:
            raise CorrectionsError(f"{p}: {where}: class {name!r} is not in the training vocabulary "
                                   f"{vocabulary.name!r} ({len(names)} classes)")
        return column[name]

    def image_of(key: str, where: str) -> int:
        if key not in index:
            raise CorrectionsError(f"{p}: {where}: image {key!r} is not in the run's image source "
                                   f"({len(image_keys)} images)")
        return index[key]

    rules = data.get("rules") or {"merge": {}, "never": [], "synonyms": {}}
    check_rules(rules, names, f"{p} rules")
    labels: dict[tuple[int, int], int] = {}
    for r in data.get("regions", []):
        where = f"region {r.get('slot')!r} of image {r.get('image')!r}"
        i = image_of(r["image"], where)
        labels[(i, int(r["slot"]))] = DELETED if r["action"] == "delete" else class_of(r["class"], where)
    added: dict[int, list[dict[str, Any]]] = {}
    for a in data.get("added", []):
        i = image_of(a["image"], f"added region {a.get('source_id')!r}")
        slot = ADDED_SLOT + len(added.setdefault(i, []))
        labels[(i, slot)] = class_of(a["class"], f"added region {a.get('source_id')!r} of image {a['image']!r}")
        added[i].append({**a, "slot": slot})
    merge = never = None
    if rules["merge"]:
        merge = torch.arange(len(names))
        for src, dst in rules["merge"].items():
            merge[column[src]] = column[dst]
    if rules["never"]:
        never = torch.zeros(len(names), dtype=torch.bool)
        never[[column[n] for n in rules["never"]]] = True
    summary = {"corrections": str(p), "relabelled": sum(v >= 0 for k, v in labels.items() if k[1] < ADDED_SLOT),
               "deleted": sum(v == DELETED for v in labels.values()), "added": sum(map(len, added.values())),
               "rules": {k: len(v) for k, v in rules.items()}}
    return TargetCorrections(labels, merge, never), {"added": added, "summary": summary}
