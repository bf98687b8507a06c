"""The pieces of ``densevlm demo labels``: the domain's vocabulary and files, and the simulated reviewer, exact
against the ground truth (each proposed mask matched to its true segment by its pixels, not by the ids the code
under test uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from densevlm.config import from_dict
from densevlm.config.demo_labels import DemoLabelsConfig
from densevlm.data.panoptic import load_panoptic_png
from densevlm.tasks.demo_labels import domain_stage, domain_vocabulary, region_data, simulate_review
from densevlm.utils.io import read_json
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary

RENAMES = {"kite": "sprocket", "sky": "clean room"}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A tiny domain (6 training images at 96 px) and the teacher's proposals for its regions."""
    from densevlm.config.labels import LabelsProposeConfig
    from densevlm.config.model import ModelSpec
    from densevlm.config.vocab import TextEmbeddingConfig
    from densevlm.tasks.labels import run_propose

    out = tmp_path_factory.mktemp("story")
    cfg = from_dict(DemoLabelsConfig, {"world": {"num_train": 6, "num_val": 1, "image_size": 96, "workers": 0},
                                       "images": 6, "reviewed_images": 3, "image_size": 96, "renames": RENAMES})
    domain = domain_stage(cfg, out)
    run_propose(LabelsProposeConfig(
        output_dir=str(out / "proposals"), teacher=ModelSpec(name="toy-teacher-clipself"),
        teacher_text=TextEmbeddingConfig(vocabulary=str(domain.vocabulary_file), templates="short"),
        exclude_novel=False, data=region_data(cfg, domain), device="cpu"), progress=False)
    return cfg, domain, out


def test_domain_vocabulary_renames_and_flags():
    world = Vocabulary("w", (ClassEntry("kite", ("paper kite",), True, True, 16), ClassEntry("car", ("auto",), True,
                                                                                               True, 2)))
    dom = domain_vocabulary(world, {"kite": "sprocket"})
    assert [(c.name, c.synonyms, c.isthing, c.novel, c.id) for c in dom.classes] == [
        ("sprocket", (), True, True, 16), ("car", ("auto",), True, False, 2)]
    with pytest.raises(ValueError, match="'boat'"):
        domain_vocabulary(world, {"boat": "x"})


def test_domain_files_hide_the_classes_of_the_training_regions(story):
    cfg, domain, _ = story
    masks = read_json(domain.masks_train)
    assert masks["categories"] == []
    assert all("category_id" not in s for a in masks["annotations"] for s in a["segments_info"])
    names = {c["name"] for c in read_json(domain.panoptic_train)["categories"]}
    assert {"sprocket", "clean room"} <= names and not {"kite", "sky"} & names


def test_simulated_reviewer_corrects_exactly_the_wrong_labels_of_the_reviewed_images(story, tmp_path):
    cfg, domain, out = story
    export = tmp_path / "corrected.json"
    counts = simulate_review(out / "proposals", domain.panoptic_train, cfg.reviewed_images, export)
    proposals = read_json(out / "proposals" / "proposals.coco.json")
    corrected = read_json(export)
    truth = read_json(domain.panoptic_train)
    cat_name = {c["id"]: c["name"] for c in proposals["categories"]}
    truth_name = {c["id"]: c["name"] for c in truth["categories"]}
    reviewed = [img["id"] for img in proposals["images"][: cfg.reviewed_images]]
    assert [img["id"] for img in corrected["images"]] == reviewed

    # Oracle: each proposed region's true class is the segment whose pixels its mask covers exactly.
    file_of = {img["id"]: img["file_name"] for img in proposals["images"]}
    ann_of = {Path(a["file_name"]).stem: a for a in truth["annotations"]}
    truth_of = {}
    for ann in proposals["annotations"]:
        if ann["image_id"] not in reviewed:
            continue
        gt = ann_of[Path(file_of[ann["image_id"]]).stem]
        ids = load_panoptic_png(domain.world / "annotations" / "panoptic_train" / gt["file_name"])
        mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                                  "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
        hits = [s for s in gt["segments_info"] if np.array_equal(ids == s["id"], mask)]
        assert len(hits) == 1
        truth_of[ann["id"]] = truth_name[hits[0]["category_id"]]
    by_id = {a["id"]: a for a in corrected["annotations"]}
    assert set(by_id) == set(truth_of), "the export holds every region of the reviewed images and no other"
    wrong = 0
    for ann in proposals["annotations"]:
        if ann["id"] in truth_of:
            assert cat_name[by_id[ann["id"]]["category_id"]] == truth_of[ann["id"]]
            wrong += cat_name[ann["category_id"]] != truth_of[ann["id"]]
    assert counts == {"reviewed_images": cfg.reviewed_images, "regions": len(truth_of), "relabelled": wrong}
    assert wrong > 0, "the teacher is expected to get some regions of 3 toy images wrong (renamed classes)"

    from densevlm.tasks.corrections import run_apply

    applied = run_apply(out / "proposals", export, tmp_path / "corrections.json")
    assert (applied["relabelled"], applied["deleted"], applied["added"]) == (wrong, 0, 0)
