"""``densevlm demo labels``: the toy end-to-end story of a person in the loop, in one command.

1. a "domain": the toy world with a few classes renamed to domain words (``labels.renames``), its training images
   unlabelled (their regions come from a class-agnostic mask file: the world's segments without their classes,
   standing in for a mask generator such as SAM);
2. the teacher's labels proposed for every region of ``labels.images`` images (``densevlm labels propose``);
3. a **simulated** reviewer corrects the wrong labels of the first ``labels.reviewed_images`` images from the
   ground truth (a person would do this in a labelling tool) and exports them as COCO; ``densevlm labels apply``
   turns the export into a corrections file;
4. CLIPSelf, DenseVLM, and DenseVLM with the corrections (``teacher_targets.corrections``) tune the zoo student
   on the same images;
5. ``densevlm report`` compares base, CLIPSelf, DenseVLM and DenseVLM + corrections on the domain's val images.

Finished stages are reused on a re-run with the same config (``--fresh`` redoes them).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from densevlm.config import to_dict
from densevlm.config.align import AlignConfig, RegionDataConfig
from densevlm.config.demo import DemoConfig
from densevlm.config.demo_labels import DemoLabelsConfig
from densevlm.config.labels import LabelsProposeConfig
from densevlm.config.model import ModelSpec
from densevlm.config.regions import RegionSourceConfig
from densevlm.config.report import CorrectionsReportConfig, LabelledSetConfig, ReportConfig
from densevlm.config.sources import ImageSourceConfig
from densevlm.config.vocab import TextEmbeddingConfig
from densevlm.tasks.align import run_align
from densevlm.tasks.corrections import run_apply
from densevlm.tasks.demo import train_stage
from densevlm.tasks.labels import DISTRIBUTIONS, PROPOSALS, run_propose
from densevlm.tasks.report import run_report
from densevlm.toyworld import generate_world
from densevlm.utils.io import atomic_write_json, read_json
from densevlm.vocab.registry import get_vocabulary
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary


@dataclass
class Domain:
    """The story's domain: the world, its renamed vocabulary and ground truth, and the class-agnostic masks."""

    world: Path
    vocabulary_file: Path
    panoptic_train: Path  # the ground truth the simulated reviewer reads (renamed classes)
    panoptic_val: Path  # the report set
    masks_train: Path  # the training regions: segments without classes


def domain_vocabulary(world: Vocabulary, renames: Mapping[str, str]) -> Vocabulary:
    """The world's classes with ``renames`` applied (a renamed class loses its synonyms and is flagged novel: the
    domain's own words); every other class as it is, not novel."""
    unknown = sorted(set(renames) - set(world.names))
    if unknown:
        raise ValueError(f"labels.renames: {unknown} are not toy-world classes ({', '.join(world.names)})")
    return Vocabulary("toy_domain", tuple(
        ClassEntry(renames[c.name], (), c.isthing, True, c.id) if c.name in renames
        else ClassEntry(c.name, c.synonyms, c.isthing, False, c.id) for c in world.classes))


def _renamed(panoptic: dict[str, Any], vocabulary: Vocabulary) -> dict[str, Any]:
    by_id = {c.id: c for c in vocabulary.classes}
    cats = [{**c, "name": by_id[c["id"]].name, "synonyms": list(by_id[c["id"]].synonyms),
             "novel": by_id[c["id"]].novel} for c in panoptic["categories"]]
    return {**panoptic, "categories": cats}


def domain_stage(cfg: DemoLabelsConfig, out: Path) -> Domain:
    """The world (made unless it exists with this config) and the domain's files."""
    world = out / "toyworld"
    if not ((world / "world.json").is_file() and read_json(world / "world.json")["config"] == to_dict(cfg.world)):
        generate_world(cfg.world, world, overwrite=True, progress=False)
    vocabulary = domain_vocabulary(get_vocabulary(str(world)), cfg.renames)
    d = out / "domain"
    vocabulary.to_json(d / "vocabulary.json")
    ann = world / "annotations"
    train = read_json(ann / "panoptic_train.json")
    atomic_write_json(d / "panoptic_train.json", _renamed(train, vocabulary), indent=None)
    atomic_write_json(d / "panoptic_val.json", _renamed(read_json(ann / "panoptic_val.json"), vocabulary), indent=None)
    # The regions a mask generator would give: every segment, no class.
    masks = {"images": train["images"], "categories": [],
             "annotations": [{"image_id": a["image_id"], "file_name": a["file_name"],
                              "segments_info": [{k: v for k, v in s.items() if k != "category_id"}
                                                for s in a["segments_info"]]} for a in train["annotations"]]}
    atomic_write_json(d / "masks_train.json", masks, indent=None)
    return Domain(world, d / "vocabulary.json", d / "panoptic_train.json", d / "panoptic_val.json",
                  d / "masks_train.json")


def region_data(cfg: DemoLabelsConfig, domain: Domain) -> RegionDataConfig:
    """The training images and their regions, the same for the proposals and the tuning (the corrections file is
    keyed to them)."""
    return RegionDataConfig(
        source=ImageSourceConfig(kind="toyworld", path=str(domain.world), split="train", max_images=cfg.images),
        regions=RegionSourceConfig(kind="masks", path=str(domain.masks_train),
                                   panoptic_root=str(domain.world / "annotations" / "panoptic_train")),
        image_size=cfg.image_size, max_boxes=cfg.max_boxes)


def simulate_review(proposals_dir: Path, ground_truth: Path, reviewed_images: int, out: Path) -> dict[str, int]:
    """A simulated reviewer (a stand-in for a person, from the ground truth): in the proposals' COCO export, the
    first ``reviewed_images`` images are reviewed and every region whose proposed class differs from its segment's
    true class is relabelled to the true class; the export holds the reviewed images only (an image missing from it
    was not reviewed), as a labelling tool exports a reviewed task. Returns the counts."""
    coco = read_json(proposals_dir / PROPOSALS)
    records = {(r["image_id"], r["slot"]): r for r in read_json(proposals_dir / DISTRIBUTIONS)["regions"]}
    truth = read_json(ground_truth)
    names = {c["id"]: c["name"] for c in truth["categories"]}
    true_class: dict[tuple[str, int], str] = {}
    file_of = {img["id"]: img["file_name"] for img in truth["images"]}
    for a in truth["annotations"]:
        for s in a["segments_info"]:
            true_class[(file_of[a["image_id"]], int(s["id"]))] = names[s["category_id"]]
    category_id = {c["name"]: c["id"] for c in coco["categories"]}
    images = coco["images"][:reviewed_images]
    keep = {img["id"] for img in images}
    annotations, counts = [], {"reviewed_images": len(images), "regions": 0, "relabelled": 0}
    for ann in coco["annotations"]:
        if ann["image_id"] not in keep:
            continue
        rec = records[(ann["image_id"], ann["attributes"]["densevlm_region"])]
        truth_name = true_class[(Path(rec["image"]).name, int(rec["region_id"]))]
        counts["regions"] += 1
        if truth_name != rec["label"]:
            ann = {**ann, "category_id": category_id[truth_name]}
            counts["relabelled"] += 1
        annotations.append(ann)
    atomic_write_json(out, {"images": images, "annotations": annotations, "categories": coco["categories"]},
                      indent=None)
    return counts


def tuning_configs(cfg: DemoConfig, domain: Domain, corrections: Path, out: Path) -> dict[str, AlignConfig]:
    """CLIPSelf, DenseVLM and DenseVLM + corrections on the story's images, from the demo's recipes."""
    story = cfg.labels
    data = region_data(story, domain)
    clip = copy.deepcopy(cfg.clipself)
    clip.data = RegionDataConfig(source=copy.deepcopy(data.source), image_size=story.image_size,
                                 max_boxes=story.max_boxes)  # CLIPSelf's own grid cells
    dense = copy.deepcopy(cfg.densevlm)
    dense.data = copy.deepcopy(data)
    dense.teacher = ModelSpec(name=cfg.teacher)
    dense.student_text = TextEmbeddingConfig(vocabulary=str(domain.vocabulary_file), templates="short")
    dense.teacher_text = copy.deepcopy(dense.student_text)
    dense.exclude_novel = False  # the domain's words are what the reviewer corrects
    runs = {"clipself": clip, "densevlm": dense, "densevlm+corrections": copy.deepcopy(dense)}
    runs["densevlm+corrections"].teacher_targets.corrections = str(corrections)
    for name, run in runs.items():
        run.student = ModelSpec(name=cfg.student)
        run.loop, run.optim = copy.deepcopy(story.loop), copy.deepcopy(story.optim)
        run.output_dir = str(out / name)
    return runs


def run_labels_demo(cfg: DemoConfig, *, fresh: bool = False) -> dict[str, Any]:
    """The story (see the module docstring); writes ``<output_dir>/labels_story/`` and returns its summary."""
    t0 = time.time()
    story = cfg.labels
    out = Path(cfg.output_dir) / "labels_story"
    seconds: dict[str, float] = {}

    t = time.time()
    domain = domain_stage(story, out)
    seconds["domain"] = round(time.time() - t, 1)
    print(f"[1] domain: the toy world with {story.renames} renamed; {story.images} unlabelled training images, their "
          f"regions from a class-agnostic mask file -> {out / 'domain'}")

    t = time.time()
    propose_cfg = LabelsProposeConfig(
        output_dir=str(out / "proposals"), teacher=ModelSpec(name=cfg.teacher),
        teacher_text=TextEmbeddingConfig(vocabulary=str(domain.vocabulary_file), templates="short"),
        exclude_novel=False, data=region_data(story, domain), device="cpu")
    proposed = read_json(out / "proposals" / "summary.json") if (
        not fresh and (out / "proposals" / "summary.json").is_file()
        and read_json(out / "proposals" / "summary.json").get("config") == to_dict(propose_cfg)) else None
    if proposed is None:
        proposed = {**run_propose(propose_cfg, progress=False), "config": to_dict(propose_cfg)}
        atomic_write_json(out / "proposals" / "summary.json", proposed)
    seconds["propose"] = round(time.time() - t, 1)
    print(f"[2] teacher labels proposed: {proposed['regions']} regions of {proposed['images']} images, "
          f"{proposed['passing_fraction']:.0%} pass the threshold -> {out / 'proposals'}/contact_sheet.html")

    t = time.time()
    review = simulate_review(out / "proposals", domain.panoptic_train, story.reviewed_images,
                             out / "review" / "corrected.coco.json")
    applied = run_apply(out / "proposals", out / "review" / "corrected.coco.json", out / "review" / "corrections.json")
    seconds["review"] = round(time.time() - t, 1)
    print(f"[3] SIMULATED reviewer (from the ground truth, not a person): {review['reviewed_images']} images, "
          f"{review['regions']} regions, {review['relabelled']} wrong labels corrected; labels apply: "
          f"{applied['relabelled']} relabelled, {applied['deleted']} deleted, {applied['added']} added")

    runs = tuning_configs(cfg, domain, out / "review" / "corrections.json", out)
    for n, (name, run_cfg) in enumerate(runs.items()):
        t = time.time()
        train_stage(f"[4{'abc'[n]}] {name}", run_cfg, run_align, fresh)
        seconds[name] = round(time.time() - t, 1)

    t = time.time()
    report_cfg = ReportConfig(
        output_dir=str(out / "report"),
        data=LabelledSetConfig(panoptic_json=str(domain.panoptic_val), image_root=str(domain.world / "images" / "val"),
                               panoptic_root=str(domain.world / "annotations" / "panoptic_val"),
                               classes=str(domain.vocabulary_file), max_images=story.report_images),
        models=[f"base={cfg.student}"] + [f"{name}={r.output_dir}" for name, r in runs.items()],
        corrections=CorrectionsReportConfig(file=str(out / "review" / "corrections.json"),
                                            model="densevlm+corrections", baseline="densevlm"),
        image_size=story.image_size, inference=copy.deepcopy(story.inference), batch_size=16, device="cpu")
    report = run_report(report_cfg)
    seconds["report"] = round(time.time() - t, 1)
    seconds["total"] = round(time.time() - t0, 1)
    summary = {"review": review, "applied": applied, "proposed": {k: v for k, v in proposed.items() if k != "config"},
               "summary": report["summary"], "corrections": {k: v for k, v in report["corrections"].items()
                                                             if k != "html"},
               "seconds": seconds, "report": str(out / "report" / "index.html")}
    atomic_write_json(out / "summary.json", summary)
    print("\n[5] report on the domain's val images (%; mIoU.novel = the renamed domain classes):")
    keys = ("mIoU", "mIoU.seen", "mIoU.novel", "maskpool.thing.macc1", "maskpool.stuff.macc1")
    print(f"{'model':<22}" + "".join(f"{k:>22}" for k in keys))
    for name, row in report["summary"].items():
        print(f"{name:<22}" + "".join(f"{row[k]:>22.1f}" if row[k] is not None else f"{'-':>22}" for k in keys))
    print(f"\nreport: {summary['report']}; stage seconds {seconds}")
    return summary
