"""``densevlm labels propose|apply`` and DenseVLM trained on corrected labels.

- the corrected targets: a corrected region changes the loss exactly as a one-hot target would (the KL computed
  by hand), a deleted one is dropped, the class rules reshape the distributions as worked out by hand;
- propose on the toy world with the zoo teacher: the COCO file reads with pycocotools, and each region's
  distribution is the one the region evaluation computes for the same segment;
- the round trip through a labelling tool's own COCO importer and exporter (Datumaro, CVAT's dataset framework):
  relabelled, deleted and added regions come back as corrections and reach training.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densevlm import cli
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.methods.corrections import DELETED, NEG, TargetCorrections
from densevlm.methods.densevlm import DenseVLMObjective

TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1}}


# --------------------------------------------------------------------------- the objective
class _FixedTeacher:
    """Teacher targets that hand out fixed region features (the objective's TeacherTargets protocol)."""

    def __init__(self, feats: torch.Tensor) -> None:
        self.feats = feats

    def prepare(self, device):
        pass

    def targets(self, batch, boxes):
        from densevlm.methods.teacher_targets import RegionFeatures

        return RegionFeatures(self.feats, 0)

    def on_epoch_start(self, epoch):
        pass

    def close(self):
        pass


class _FixedStudent(torch.nn.Module):
    """A 'model' whose pooled region features are fixed rows, in the order the objective asks for them."""

    def __init__(self, feats: torch.Tensor) -> None:
        super().__init__()
        self.feats = torch.nn.Parameter(feats.clone())

    def encode_dense(self, images):
        return images

    def pool_boxes(self, dense, boxes):
        return self.feats[: sum(len(b) for b in boxes)]


def _step(model):
    return lambda fn, *args: fn(model, *args)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_cls, dim, n_reg = 5, 8, 6
    thing = torch.tensor([True, True, True, False, False])
    t_text, s_text = torch.randn(n_cls, dim, generator=g), torch.randn(n_cls, dim, generator=g)
    t_feats, s_feats = torch.randn(n_reg, dim, generator=g), torch.randn(n_reg, dim, generator=g)
    batch = {"image": torch.zeros(2, 3, 4, 4), "boxes": torch.zeros(2, 3, 4),
             "valid": torch.ones(2, 3, dtype=torch.bool), "cells": torch.tensor([[4, 7, 9], [0, 1, 2]]),
             "index": torch.tensor([3, 5])}
    return thing, t_text, s_text, t_feats, s_feats, batch


def _hand_loss(t_rows: list[np.ndarray], s_logits: np.ndarray, thing: np.ndarray, keep: list[bool]) -> float:
    """DenseVLM's decoupled KL written out: each kept row's KL over thing columns (thing argmax) or all columns
    (stuff argmax), averaged within each group, the two groups summed. ``t_rows`` are probability rows."""
    groups = {True: [], False: []}
    for p, s, k in zip(t_rows, s_logits, keep):
        if not k:
            continue
        is_thing = bool(thing[int(np.argmax(p))])
        cols = np.flatnonzero(thing) if is_thing else np.arange(len(p))
        q = np.exp(s[cols] - s[cols].max())
        q = q / q.sum()
        pc = p[cols] / p[cols].sum()
        groups[is_thing].append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pc, q) if a > 0))
    return sum(float(np.mean(v)) for v in groups.values() if v)


def test_a_corrected_region_changes_the_loss_exactly_as_a_one_hot_target():
    thing, t_text, s_text, t_feats, s_feats, batch = _problem()
    T = 0.5  # a soft teacher, so every region's distribution matters
    # image 3 slot 7 (row 1) is corrected to class 4 (stuff), image 5 slot 0 (row 3) to class 1 (thing), image 3
    # slot 9 (row 2) deleted; image 9 is not in the batch.
    corr = TargetCorrections({(3, 7): 4, (5, 0): 1, (3, 9): DELETED, (9, 0): 2})
    kw = dict(temperature=T, threshold=0.0)
    plain = DenseVLMObjective(_FixedTeacher(t_feats), t_text, s_text, thing, **kw)
    fixed = DenseVLMObjective(_FixedTeacher(t_feats), t_text, s_text, thing, corrections=corr, **kw)
    out = fixed(_step(_FixedStudent(s_feats)), batch)
    base = plain(_step(_FixedStudent(s_feats)), batch)

    n = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True))  # noqa: E731
    t_logits = n(t_feats.numpy()) @ n(t_text.numpy()).T / T
    s_logits = n(s_feats.numpy().astype(np.float64)) @ n(s_text.numpy().astype(np.float64)).T / T
    rows = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in t_logits.astype(np.float64)]
    thing_np = thing.numpy()
    want_plain = _hand_loss(rows, s_logits, thing_np, [True] * 6)
    rows[1], rows[3] = np.eye(5)[4], np.eye(5)[1]
    want = _hand_loss(rows, s_logits, thing_np, [True, True, False, True, True, True])
    assert float(base.loss.detach()) == pytest.approx(want_plain, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(out.loss.detach()) != pytest.approx(want_plain, rel=1e-3)
    assert out.metrics["corrected_regions"] == 2 and out.metrics["dropped_regions"] == 1
    assert out.metrics["thing_regions"] + out.metrics["stuff_regions"] == 5
    # The one-hot row of a thing class contributes exactly -log q_c over the thing columns.
    t_adj, drop, _ = corr.adjust(batch, torch.as_tensor(t_logits))
    assert t_adj[3, 1] == 0 and bool((t_adj[3, [0, 2, 3, 4]] == NEG).all()) and drop.tolist() == [
        False, False, True, False, False, False]
    # Without corrections or rules, the teacher's logits are handed through untouched.
    same, none_dropped, k = TargetCorrections().adjust(batch, torch.as_tensor(t_logits))
    assert torch.equal(same, torch.as_tensor(t_logits)) and not none_dropped.any() and k == 0


def test_class_rules_merge_and_never_reshape_the_teacher_distribution_as_by_hand():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    logits = torch.log(p.clamp_min(1e-300)).float()
    merge = torch.tensor([0, 0, 2, 3, 4])  # merge class 1 into class 0
    never = torch.tensor([False, False, False, True, True])  # never predict 3 or 4
    out, empty = TargetCorrections(merge=merge, never=never).apply_rules(logits)
    # by hand: row 0 -> [0.1 + 0.2, 0, 0.3, 0, 0] / 0.6; row 1 has nothing left: dropped
    assert torch.allclose(out[0].softmax(-1).double(), torch.tensor([0.5, 0, 0.5, 0, 0], dtype=torch.float64),
                          atol=1e-6)
    assert empty.tolist() == [False, True]


# --------------------------------------------------------------------------- propose / apply on the toy world
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A small toy world, and the zoo teacher's proposals for its panoptic segments (run once for the module)."""
    from densevlm.toyworld import generate_world

    tmp = tmp_path_factory.mktemp("labels")
    world = tmp / "world"
    generate_world(ToyWorldConfig(num_train=6, num_val=2, image_size=64, workers=0), world, progress=False)
    argv = ["labels", "propose", "--set", f"output_dir={tmp / 'props'}", f"data.source.path={world}",
            f"teacher_text.vocabulary={world}", "teacher_text.templates=single", f"teacher_text.cache_dir={tmp / 'text'}",
            "data.image_size=64", "data.regions.kind=masks",
            f"data.regions.path={world / 'annotations' / 'panoptic_train.json'}", "top_k=3"]
    assert cli.main(argv) == 0
    return {"tmp": tmp, "world": world, "props": tmp / "props"}


def test_propose_writes_coco_with_scores_distributions_and_a_contact_sheet(labelled):
    from pycocotools.coco import COCO

    props = labelled["props"]
    dist = json.loads((props / "distributions.json").read_text())
    coco = COCO(str(props / "proposals.coco.json"))  # the COCO API's own reader
    anns = coco.loadAnns(coco.getAnnIds())
    panoptic = json.loads((labelled["world"] / "annotations" / "panoptic_train.json").read_text())
    assert len(anns) == len(dist["regions"]) == sum(len(a["segments_info"]) for a in panoptic["annotations"]) > 0
    vocab = dist["vocabulary"]
    for ann, r in zip(anns, dist["regions"]):
        probs = np.asarray(r["probs"])
        assert abs(probs.sum() - 1) < 1e-4 and len(probs) == len(vocab)
        order = np.argsort(-probs)[:3]
        assert np.allclose([q for _, q in r["top"]], probs[order], atol=2e-6)  # (near-zero ties may swap names)
        assert all(probs[[v["name"] for v in vocab].index(n)] == pytest.approx(q, abs=2e-6) for n, q in r["top"])
        assert ann["score"] == pytest.approx(probs.max(), abs=1e-6) == r["score"]
        assert coco.cats[ann["category_id"]]["name"] == r["label"] == vocab[int(order[0])]["name"]
        assert r["route"] == ("thing" if vocab[int(order[0])]["isthing"] else "stuff")
        assert r["passes"] == (r["score"] > dist["threshold"])
        assert coco.annToMask(ann).sum() == ann["area"] > 0  # the RLE mask reads back
    sheet = (props / "contact_sheet.html").read_text()
    assert sheet.count("<img src='data:image/jpeg;base64,") == len(coco.imgs) and "function sortCards" in sheet
    assert dist["identity"]["regions"]["kind"] == "masks" and dist["identity"]["teacher"]["name"] == "ToyCLIP-ViT-B-12"


def test_proposed_distributions_are_the_region_evaluations_probabilities(labelled):
    """Each proposed region's distribution equals the softmax the region evaluation computes (its own dataset,
    geometry and mask pooling) for the same panoptic segment, over the seen classes."""
    from densevlm.config.evaluation import PanopticDataConfig
    from densevlm.config.vocab import TextEmbeddingConfig
    from densevlm.data.panoptic import PanopticRegionDataset
    from densevlm.models import create_backbone
    from densevlm.vocab import text_embeddings_from_config

    world = labelled["world"]
    dist = json.loads((labelled["props"] / "distributions.json").read_text())
    teacher = create_backbone("toy-teacher-clipself")
    vocab, text = text_embeddings_from_config(teacher, TextEmbeddingConfig(
        vocabulary=str(world), templates="single", cache_dir=str(labelled["tmp"] / "text")), progress=False)
    seen = ~vocab.novel_mask
    ds = PanopticRegionDataset(PanopticDataConfig(panoptic_json=str(world / "annotations" / "panoptic_train.json"),
                                                  image_root=str(world / "images" / "train"), image_size=64,
                                                  min_box_size=0, max_box_size=None, max_images=2),
                               teacher.patch_size, vocab, image_mean=teacher.image_mean, image_std=teacher.image_std)
    checked = 0
    for item in (ds[0], ds[1]):
        with torch.no_grad():
            feats = teacher.pool_masks(teacher.encode_dense(item["image"][None]), [item["masks"]])
        probs = (F.normalize(feats, dim=-1) @ F.normalize(text[seen], dim=-1).T / 0.01).softmax(-1)
        mine = {r["region_id"]: r["probs"] for r in dist["regions"] if r["image"] == item["file_name"]}
        for seg, p in zip(item["segment_ids"].tolist(), probs):
            assert np.allclose(mine[seg], p.numpy(), atol=2e-4), (item["file_name"], seg)
            checked += 1
    assert checked >= 4


def _review_with_datumaro(proposals: Path, out: Path, stage: Path) -> dict:
    """A reviewer in Datumaro: import our COCO, relabel one region, delete one, add one box, export COCO."""
    dm = pytest.importorskip("datumaro", reason="datumaro (requirements-dev.txt) runs the labelling-tool round trip")
    from datumaro.components.annotation import AnnotationType, Bbox

    (stage / "annotations").mkdir(parents=True)
    (stage / "images" / "default").mkdir(parents=True)
    shutil.copy(proposals, stage / "annotations" / "instances_default.json")
    ds = dm.Dataset.import_from(str(stage), "coco_instances")
    labels = ds.categories()[AnnotationType.label]
    item = next(it for it in ds if len({a.group for a in it.annotations}) >= 2)
    groups = sorted({a.group for a in item.annotations})
    first, second = groups[0], groups[1]
    was = labels[next(a.label for a in item.annotations if a.group == first)].name
    new_name = "car" if was != "car" else "boat"
    kept = [a.wrap(label=labels.find(new_name)[0]) if a.group == first else a
            for a in item.annotations if a.group != second]
    kept.append(Bbox(2, 3, 10, 12, label=labels.find("person")[0], group=999, id=999))
    ds.put(item.wrap(annotations=kept))
    ds.export(str(stage / "export"), "coco_instances", save_media=False)
    shutil.copy(stage / "export" / "annotations" / "instances_default.json", out)
    regions = {g: a.attributes.get("densevlm_region") for a in item.annotations for g in [a.group]}
    return {"image": item.id, "relabelled": regions[first], "deleted": regions[second], "class": new_name}


def test_labelling_tool_round_trip_reaches_training(labelled, tmp_path):
    from densevlm.config import load_config
    from densevlm.config.align import AlignConfig
    from densevlm.data.sources import ImageSource
    from densevlm.data.teacher_cache import image_keys
    from densevlm.tasks.corrections import ADDED_SLOT
    from densevlm.tasks.densevlm import run_corrections
    from densevlm.vocab import get_vocabulary

    world, props = labelled["world"], labelled["props"]
    review = _review_with_datumaro(props / "proposals.coco.json", tmp_path / "corrected.json", tmp_path / "dm")
    rules = tmp_path / "rules.yaml"
    rules.write_text("synonyms: {automobile: car}\nnever: [snowman]\n")
    assert cli.main(["labels", "apply", "--proposals", str(props), "--corrected", str(tmp_path / "corrected.json"),
                     "--rules", str(rules), "--out", str(tmp_path / "corr.json")]) == 0
    corr = json.loads((tmp_path / "corr.json").read_text())
    image = next(k for k in {r["image"] for r in corr["regions"]} if Path(k).stem == review["image"])
    acts = {(r["image"], r["slot"]): r for r in corr["regions"]}
    assert acts[(image, review["relabelled"])]["action"] == "relabel"
    assert acts[(image, review["relabelled"])]["class"] == review["class"]
    assert acts[(image, review["deleted"])]["action"] == "delete"
    assert [(a["image"], a["bbox"], a["class"]) for a in corr["added"]] == [(image, [2.0, 3.0, 10.0, 12.0], "person")]
    assert corr["summary"]["relabelled"] == 1 and corr["summary"]["deleted"] == 1 and corr["summary"]["added"] == 1
    # A tool that drops custom attributes (the region slot): the boxes match the proposals by overlap instead.
    bare = json.loads((tmp_path / "corrected.json").read_text())
    for ann in bare["annotations"]:
        ann.pop("attributes", None)
        ann["bbox"] = [round(v) for v in ann["bbox"]]  # and rounds coordinates to the pixel
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert cli.main(["labels", "apply", "--proposals", str(props), "--corrected", str(tmp_path / "bare.json"),
                     "--rules", str(rules), "--out", str(tmp_path / "bare_corr.json")]) == 0
    again = json.loads((tmp_path / "bare_corr.json").read_text())
    assert again["regions"] == corr["regions"] and again["summary"] == corr["summary"]

    # Training reads them for its own images, regions and vocabulary.
    cfg = load_config(AlignConfig, None, [
        f"teacher_targets.corrections={tmp_path / 'corr.json'}", "data.source.kind=toyworld",
        f"data.source.path={world}", "data.regions.kind=masks",
        f"data.regions.path={world / 'annotations' / 'panoptic_train.json'}"])
    source = ImageSource(cfg.data.source)
    vocab = get_vocabulary(str(world)).seen()
    targets, extra = run_corrections(cfg, source, vocab)
    i = image_keys(source).index(image)
    assert targets.labels[(i, review["relabelled"])] == vocab.names.index(review["class"])
    assert targets.labels[(i, review["deleted"])] == DELETED
    assert targets.labels[(i, ADDED_SLOT)] == vocab.names.index("person")
    assert bool(targets.never[vocab.names.index("snowman")]) and targets.merge is None
    assert [a["slot"] for a in extra["added"][i]] == [ADDED_SLOT]


def test_training_with_corrections_uses_them(labelled, tmp_path):
    """One DenseVLM step on mask regions with the corrections: the relabelled and the added region are one-hot
    targets, the deleted one is dropped (counted in the step's metrics)."""
    from densevlm.config import from_dict
    from densevlm.config.align import AlignConfig
    from densevlm.tasks.align import run_align

    world, props = labelled["world"], labelled["props"]
    review = _review_with_datumaro(props / "proposals.coco.json", tmp_path / "corrected.json", tmp_path / "dm")
    assert cli.main(["labels", "apply", "--proposals", str(props), "--corrected", str(tmp_path / "corrected.json"),
                     "--out", str(tmp_path / "corr.json")]) == 0
    cfg = from_dict(AlignConfig, {
        "output_dir": str(tmp_path / "run"), "method": "densevlm",
        "student": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY},
        "teacher": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY},
        "student_text": {"vocabulary": str(world), "templates": "single"},
        "teacher_text": {"vocabulary": str(world), "templates": "single"}, "exclude_novel": True,
        "ensemble_alpha": None, "teacher_targets": {"corrections": str(tmp_path / "corr.json")},
        "data": {"source": {"kind": "toyworld", "path": str(world)}, "image_size": 64,
                 "regions": {"kind": "masks", "path": str(world / "annotations" / "panoptic_train.json")}},
        "loop": {"epochs": 1, "batch_size": 6, "num_workers": 0, "cpu": True, "log_every": 1, "eval_every": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 1}})
    train = run_align(cfg, overwrite=True).metrics["history"][0]["train"]
    assert review["image"]  # the reviewed image is one of the 6 in the single batch
    assert train["corrected_regions"] == 2 and train["dropped_regions"] == 1
