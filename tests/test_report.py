"""``densevlm report`` on a quick toy set: its numbers against the evaluations' own drivers on the toy world's own
files, both input forms (COCO panoptic, semantic PNGs), the warning for unlabelled classes, and the page."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densevlm.config import from_dict
from densevlm.config.report import ReportConfig
from densevlm.evaluation.poc_report import best_and_worst, image_scores, most_confused

MODELS = ["base=toy-student", "clipself=toy-teacher-clipself"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld import generate_world

    root = tmp_path_factory.mktemp("report") / "world"
    generate_world(from_dict(ToyWorldConfig, {"num_train": 1, "num_val": 8, "image_size": 96, "workers": 0}), root,
                   progress=False)
    return root


def _cfg(world: Path, out: Path, **data) -> ReportConfig:
    data = data or {"panoptic_json": str(world / "annotations" / "panoptic_val.json")}
    return from_dict(ReportConfig, {
        "output_dir": str(out), "models": MODELS, "image_size": 96, "batch_size": 8, "device": "cpu",
        "templates": "single",  # one prompt per name: the text towers' cost, not the report's, dominates otherwise
        "data": {"image_root": str(world / "images" / "val"), "classes": str(world), **data},
        "inference": {"short_side": 96, "max_long_side": None, "mode": "whole"}, "best_worst": 2,
    })


@pytest.fixture(scope="module")
def report(world, tmp_path_factory):
    from densevlm.tasks.report import run_report

    return run_report(_cfg(world, tmp_path_factory.mktemp("out")))


def test_report_numbers_are_the_evaluations_numbers_on_the_worlds_own_files(world, report, tmp_path):
    """Per-class IoU equals `densevlm eval semseg` on the toy world's semantic PNGs (written by the world, not by
    the report's panoptic conversion) and region accuracy equals `densevlm eval regions` on its panoptic json."""
    from densevlm.config.evaluation import PanopticDataConfig, RegionEvalConfig, RegionTextConfig
    from densevlm.config.semseg import SemSegEvalConfig, toyworld_data
    from densevlm.config.model import ModelSpec
    from densevlm.evaluation.regions import evaluate_regions
    from densevlm.evaluation.semseg import evaluate_semseg

    for label, name in (("clipself", "toy-teacher-clipself"),):  # one model: the path is the same for each
        sem = evaluate_semseg(None, from_dict(SemSegEvalConfig, {
            "output_dir": str(tmp_path / label), "model": {"name": name}, "device": "cpu", "num_workers": 0,
            "metrics_backend": "densevlm", "figures": 0,
            "data": vars(toyworld_data(world, "val")), "text": {"vocabulary": str(world), "templates": "single"},
            "inference": {"short_side": 96, "max_long_side": None, "mode": "whole"}}), progress=False, write=False)
        reg = evaluate_regions(None, RegionEvalConfig(
            output_dir=str(tmp_path / label), model=ModelSpec(name=name), device="cpu", diagnostics=False, num_workers=0,
            data=PanopticDataConfig(panoptic_json=str(world / "annotations" / "panoptic_val.json"),
                                    image_root=str(world / "images" / "val"), image_size=96),
            text=RegionTextConfig(vocabulary=str(world), templates="single")), progress=False)
        for row, s_row, r_row in zip(report["per_class"], sem["per_class"], reg["per_class"]):
            assert row["class"] == s_row["name"] == r_row["name"]
            assert row[f"{label}.IoU"] == pytest.approx(s_row["IoU"], abs=1e-9) or (
                row[f"{label}.IoU"] is None and s_row["IoU"] is None), row["class"]
            assert row[f"{label}.region_acc1"] == r_row.get("maskpool.acc1"), row["class"]
        assert report["summary"][label]["mIoU"] == pytest.approx(sem["metrics"]["mIoU"], abs=1e-9)
        assert report["summary"][label]["maskpool.stuff.macc1"] == pytest.approx(
            reg["metrics"]["maskpool.stuff.macc1"], abs=1e-9)


def test_report_warns_of_classes_without_labels_and_writes_the_page(world, report):
    pixels = np.zeros(28, dtype=np.int64)
    for png in (world / "annotations" / "semantic_val").glob("*.png"):
        label = np.asarray(Image.open(png)).ravel()
        pixels += np.bincount(label[label != 255], minlength=28)
    from densevlm.vocab import get_vocabulary

    names = get_vocabulary(str(world)).names
    unlabelled = [n for n, p in zip(names, pixels) if p == 0]
    assert unlabelled, "the 8-image toy set is expected to miss some of the 28 classes"
    assert report["set"]["unlabelled_classes"] == unlabelled
    assert any(", ".join(unlabelled) in w for w in report["warnings"])
    out = Path(report["config"]["output_dir"])
    page = (out / "index.html").read_text()
    assert ", ".join(unlabelled) in page
    for src in re.findall(r"<img src='([^']+)'", page):
        assert (out / src).is_file(), src
    assert {"summary", "class_iou", "region_accuracy", "foreground_bias", "best_worst"} <= set(report["figures"])
    best, worst = report["best_images"], report["worst_images"]
    assert len(best) == len(worst) == 2 and not set(best) & set(worst)


def test_semantic_pngs_give_the_same_pixels_as_the_panoptic_json(world, report, tmp_path):
    from densevlm.tasks.report import run_report

    cfg = _cfg(world, tmp_path / "sem", label_root=str(world / "annotations" / "semantic_val"))
    cfg.models = MODELS[:1]
    sem = run_report(cfg)
    for a, b in zip(sem["per_class"], report["per_class"]):
        assert a["base.IoU"] == b["base.IoU"], a["class"]
        if not a["isthing"]:  # one stuff segment per class and image in the toy world: the same regions
            assert a["base.region_acc1"] == b["base.region_acc1"], a["class"]


def test_image_scores_confusions_and_ranking_by_hand():
    conf = np.array([[8, 2, 0], [0, 0, 0], [1, 0, 9]])  # class 1 never true, predicted twice
    scores = image_scores(conf)
    assert scores["pACC"] == pytest.approx(100 * 17 / 20)
    assert scores["mIoU"] == pytest.approx(100 * (8 / 11 + 0 / 2 + 9 / 10) / 3)
    pairs = most_confused(conf, ["a", "b", "c"], 5)
    assert [(p["truth"], p["predicted"]) for p in pairs] == [("a", "b"), ("c", "a")]
    assert pairs[0]["share"] == pytest.approx(20.0) and pairs[1]["share"] == pytest.approx(10.0)
    per_image = {0: {"mIoU": 50.0}, 1: {"mIoU": 90.0}, 2: {"mIoU": 10.0}, 3: {"mIoU": float("nan")}, 4: {"mIoU": 50.0}}
    assert best_and_worst(per_image, 2) == ([1, 0], [2, 4])


def test_report_config_refuses_bad_input(world):
    from densevlm.config import ConfigError

    with pytest.raises(ConfigError, match="either data.panoptic_json"):
        from_dict(ReportConfig, {"models": MODELS, "data": {"image_root": "x"}})
    with pytest.raises(ConfigError, match="corrections.model"):
        from_dict(ReportConfig, {"models": MODELS, "data": {"panoptic_json": "p.json"},
                                 "corrections": {"file": "c.json", "model": "nope"}})
    with pytest.raises(ConfigError, match="used twice"):
        from_dict(ReportConfig, {"models": ["a=toy-student", "a=toy-student"], "data": {"panoptic_json": "p.json"}})
