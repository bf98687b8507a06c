"""Open-vocabulary detection in detectron2: the OV-COCO split and its files, the novel-class rule at load time,
AP50 novel/base from per-class AP, F-ViT's score fusion, and a tiny detector that trains on CPU (losses fall),
is evaluated by COCOEvaluator, and gives the same numbers when its checkpoint is evaluated twice."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densevlm.integrations.detectron2 import INSTALL_HINT

try:
    import detectron2  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip(INSTALL_HINT, allow_module_level=True)

from densevlm.config import ConfigError, load_config
from densevlm.config.detection import DetectionConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.integrations.detectron2.datasets import (
    OVCOCO_BASE, OVCOCO_NOVEL, make_ovcoco_annotations, register_ov_split)
from densevlm.integrations.detectron2.evaluation import per_class_ap, split_metrics

torch.set_num_threads(1)  # small ops: one thread is faster than two on a busy 2-core machine
MODEL = "ToyCLIP-ViT-T-16"  # random weights: width 192, 4 blocks, 128-d text space


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from densevlm.toyworld import generate_world

    root = tmp_path_factory.mktemp("det") / "world"
    generate_world(ToyWorldConfig(image_size=96, num_train=24, num_val=8, workers=0, seed=5, novel_fraction=0.25),
                   root, progress=False)
    return root


def _cfg(world: Path, out: Path, **solver) -> DetectionConfig:
    overrides = [
        f"output_dir={out}", f"data.root={world}", "backbone.model=" + MODEL, "backbone.out_indices=[0,1,2,3]",
        "input.train_size=96", "input.test_size=96", "head.fpn_channels=32", "head.num_conv=0", "head.fc_dim=64",
        "head.anchor_sizes=[16,32,64,128,256]", "head.rpn_post_nms_topk_train=64", "head.rpn_post_nms_topk_test=64",
        "head.roi_batch_size_per_image=32", "head.templates=single", "head.score_thresh_test=0.0",
        "solver.ims_per_batch=4", "solver.warmup_iters=2", "solver.lr=1e-3", "solver.weight_decay=0.0",
        "num_workers=0", "device=cpu",
    ] + [f"solver.{k}={v}" for k, v in solver.items()]
    return load_config(DetectionConfig, "configs/det/toy.yaml", overrides)


# --------------------------------------------------------------------------- split, files, catalogs
def test_ovcoco_split_is_the_standard_one():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    coco = {c["name"] for c in COCO_CATEGORIES if c["isthing"]}
    assert len(OVCOCO_BASE) == 48 and len(OVCOCO_NOVEL) == 17 and not set(OVCOCO_BASE) & set(OVCOCO_NOVEL)
    assert set(OVCOCO_BASE) | set(OVCOCO_NOVEL) <= coco


def test_make_ovcoco_annotations(tmp_path):
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    cats = [{"id": c["id"], "name": c["name"], "supercategory": "x"} for c in COCO_CATEGORIES if c["isthing"]]
    ids = {c["name"]: c["id"] for c in cats}
    anns = [{"id": i + 1, "image_id": 1, "category_id": ids[n], "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}
            for i, n in enumerate(["person", "cat", "traffic light", "tv", "cake"])]
    src = tmp_path / "instances.json"
    src.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}],
                               "annotations": anns, "categories": cats}))
    counts = make_ovcoco_annotations(src, tmp_path / "base.json", base_only=True)
    base = json.loads((tmp_path / "base.json").read_text())
    assert [ids[n] for n in ("person", "tv")] == [a["category_id"] for a in base["annotations"]]
    assert counts == {"images": 1, "annotations": 2, "removed": 3}
    assert len(base["categories"]) == 65 and [c["id"] for c in base["categories"]] == sorted(
        c["id"] for c in base["categories"])
    make_ovcoco_annotations(src, tmp_path / "all.json", base_only=False)
    assert len(json.loads((tmp_path / "all.json").read_text())["annotations"]) == 4  # traffic light is not OV-COCO
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match="expected the 65 OV-COCO categories"):
        register_ov_split("ovcoco", tmp_path, "instances.json", "img", "train", train=True)
    name = register_ov_split("ovcoco", tmp_path, "base.json", "img", "train", train=True)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert MetadataCatalog.get(name).novel_classes == [n for n in MetadataCatalog.get(name).thing_classes
                                                       if n in OVCOCO_NOVEL]
    assert len(DatasetCatalog.get(name)[0]["annotations"]) == 2
    # the all-classes file as a training split: the novel 'cat' and 'cake' stop it, naming the class
    bad = register_ov_split("ovcoco", tmp_path, "all.json", "img", "train", train=True)
    with pytest.raises(ValueError, match="novel class 'cat'.*base classes only"):
        DatasetCatalog.get(bad)


def test_toy_training_split_never_holds_a_novel_class(world):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    strict = register_ov_split("toyworld", world, "annotations/instances_train.json", "images/train", "train",
                               train=True, novel_in_train="error")
    meta = MetadataCatalog.get(strict)
    assert meta.novel_classes and set(meta.novel_classes) < set(meta.thing_classes)
    with pytest.raises(ValueError, match="has an annotation of the novel class"):
        DatasetCatalog.get(strict)
    dropped = register_ov_split("toyworld", world, "annotations/instances_train.json", "images/train", "train",
                                train=True, novel_in_train="drop", limit=20)
    novel_ids = {meta.thing_classes.index(n) for n in meta.novel_classes}
    records = DatasetCatalog.get(dropped)
    assert len(records) == 20 and sum(len(r["annotations"]) for r in records) > 0
    assert not any(a["category_id"] in novel_ids for r in records for a in r["annotations"])
    val = register_ov_split("toyworld", world, "annotations/instances_val.json", "images/val", "val", train=False)
    assert any(a["category_id"] in novel_ids for r in DatasetCatalog.get(val) for a in r["annotations"])


# --------------------------------------------------------------------------- metrics and fusion
def test_ap50_novel_base_from_per_class_precision():
    # precision [iou (10), recall (101), class (3), area (4), maxdet (3)]; class 2 has no ground truth (-1)
    precision = np.full((10, 101, 3, 4, 3), -1.0)
    precision[:, :, 0, 0, -1] = 0.8
    precision[0, :, 0, 0, -1] = 1.0  # AP50 of class 0 is 100, its AP (mean over IoUs) 82
    precision[:, :50, 1, 0, -1] = 0.5
    precision[:, 50:, 1, 0, -1] = 0.0  # class 1: mean over recall points 50 * 0.5 / 101
    ap, ap50 = per_class_ap(precision)
    assert ap50[0] == pytest.approx(100.0) and ap[0] == pytest.approx(82.0)
    assert ap50[1] == pytest.approx(100 * 25 / 101) and math.isnan(ap50[2])
    m = split_metrics(ap, ap50, novel=[False, True, True])
    assert m["AP50-base"] == pytest.approx(100.0) and m["AP50-novel"] == pytest.approx(100 * 25 / 101)
    assert m["AP-novel"] == pytest.approx(ap[1])  # the class without ground truth is left out, not counted as 0
    assert math.isnan(split_metrics(ap, ap50, novel=[False, False, True])["AP50-novel"])


def test_fvit_fusion_and_base_only_training_scores():
    from detectron2.layers import ShapeSpec

    from densevlm.integrations.detectron2.ov_heads import OpenVocabOutputLayers, fuse_scores
    from detectron2.modeling.box_regression import Box2BoxTransform

    p = torch.tensor([[0.5, 0.2, 0.3]])
    v = torch.tensor([[0.1, 0.6, 0.3]])
    fused = fuse_scores(p, v, torch.tensor([False, True, False]), alpha=0.1, beta=0.8)
    expected = [0.5 ** 0.9 * 0.1 ** 0.1, 0.2 ** 0.2 * 0.6 ** 0.8, 0.3 ** 0.9 * 0.3 ** 0.1]
    assert torch.allclose(fused, torch.tensor([expected]))
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    head = OpenVocabOutputLayers(ShapeSpec(channels=16), class_embeddings=emb, background_embedding=torch.randn(8),
                                 novel=[False, True, False], box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
                                 cls_agnostic_bbox_reg=True)
    x = torch.randn(5, 16)
    head.train()
    scores, deltas = head(x)
    assert scores.shape == (5, 4) and deltas.shape == (5, 4)
    assert torch.isinf(scores[:, 1]).all() and torch.isfinite(scores[:, [0, 2, 3]]).all()
    head.eval()
    scores, _ = head(x)
    assert torch.isfinite(scores).all()  # at test time every class is scored
    # the logits are temperature x cosine with the class and background embeddings
    cos = torch.nn.functional.normalize(head.cls_proj(x), dim=-1) @ head.classifier().t()
    assert torch.allclose(scores, 50.0 * cos, atol=1e-5)


# --------------------------------------------------------------------------- train, evaluate, reload
@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    from densevlm.integrations.detectron2.detector import run_detection

    cfg = _cfg(world, tmp_path_factory.mktemp("det") / "run", max_iter=40)
    return cfg, run_detection(cfg, "train")


def test_tiny_detector_trains_and_its_losses_fall(trained):
    cfg, result = trained
    out = Path(cfg.output_dir)
    events = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [e["total_loss"] for e in events if "total_loss" in e]
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0], losses
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(out.glob(".*.tmp"))
    assert result["max_iter"] == 40 and (out / "ap50_per_class.png").is_file()
    saved = json.loads((out / "det_metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"], nan_ok=True)


def test_evaluator_reads_our_detections(trained):
    cfg, result = trained
    m = result["metrics"]
    for key in ("AP", "AP50", "AP75", "AP50-novel", "AP50-base", "AP-novel", "AP-base"):
        assert key in m and math.isfinite(m[key]) and 0 <= m[key] <= 100, key
    classes, novel = result["classes"], set(result["novel_classes"])
    per_class = {c: m[f"AP50-{c}"] for c in classes}
    for split, pick in (("novel", True), ("base", False)):
        values = [v for c, v in per_class.items() if (c in novel) == pick and not math.isnan(v)]
        assert m[f"AP50-{split}"] == pytest.approx(float(np.mean(values)))


def test_checkpoint_evaluated_twice_gives_the_same_numbers(trained):
    from densevlm.integrations.detectron2.detector import run_detection

    cfg, result = copy.deepcopy(trained)
    cfg.weights = str(Path(cfg.output_dir) / "model_final.pth")
    cfg.output_dir = str(Path(cfg.output_dir).parent / "eval")
    first = run_detection(cfg, "eval")["metrics"]
    second = run_detection(cfg, "eval")["metrics"]
    assert first == pytest.approx(second, nan_ok=True)
    assert first == pytest.approx(result["metrics"], nan_ok=True)  # the same as the end-of-training evaluation


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named(world, tmp_path, trained, monkeypatch, capsys):
    from densevlm.integrations.detectron2.detector import run_detection

    emb = tmp_path / "emb64.npy"
    meta_classes = trained[1]["classes"]
    np.save(emb, np.random.default_rng(0).standard_normal((len(meta_classes), 64)).astype(np.float32))
    cfg = _cfg(world, tmp_path / "run", max_iter=1)
    cfg.head.class_embeddings = str(emb)
    with pytest.raises(ValueError, match=r"64-d embeddings, but the backbone .* 128-d text space"):
        run_detection(cfg, "train")
    # a checkpoint of another detector (here: another backbone width) is refused, naming the tensors
    cfg = _cfg(world, tmp_path / "eval", max_iter=1)
    cfg.weights = str(Path(trained[0].output_dir) / "model_final.pth")
    cfg.head.fpn_channels = 16
    with pytest.raises(ValueError, match="does not fit this detector"):
        run_detection(cfg, "eval")
    with pytest.raises(ConfigError, match="head.beta"):
        load_config(DetectionConfig, "configs/det/toy.yaml", ["head.beta=1.5"])
    # detectron2 missing: the command names the install command
    import sys

    from densevlm.cli import main

    monkeypatch.setitem(sys.modules, "detectron2.modeling", None)
    assert main(["det", "eval", "-c", "configs/det/toy.yaml"]) == 1
    assert "make detectron2" in capsys.readouterr().err


def test_toy_recipe_file_is_the_demo_recipe():
    from densevlm.config import to_dict
    from densevlm.config.detection import toy_detection_config

    assert to_dict(load_config(DetectionConfig, "configs/det/toy.yaml")) == to_dict(toy_detection_config())
    ovcoco = load_config(DetectionConfig, "configs/det/fvit_ovcoco_eva02_b16.yaml")
    assert (ovcoco.input.train_size, ovcoco.solver.epochs, ovcoco.solver.optimizer, ovcoco.solver.lr) == (
        640, 3.0, "adamw", 1e-4)
    assert (ovcoco.head.alpha, ovcoco.head.beta, ovcoco.data.novel_in_train) == (0.1, 0.8, "error")


def test_quick_demo_detection_stage_and_rerun_reuses_it(tmp_path, capsys):
    from densevlm.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--detection", "--config", "configs/demo/quick.yaml", "--set", f"output_dir={out}"]
    assert main(args) == 0
    first = capsys.readouterr().out
    summary = json.loads((out / "detection" / "summary.json").read_text())
    assert set(summary["metrics"]) == {"base", "clipself", "densevlm"}
    for metrics in summary["metrics"].values():
        for key in ("AP", "AP50", "AP50-novel", "AP50-base"):
            assert key in metrics
    # same recipe, only the backbone differs
    configs = {n: json.loads((out / "detection" / n / "det_metrics.json").read_text())["config"]
               for n in summary["metrics"]}
    models = {n: c["backbone"].pop("model") for n, c in configs.items()}
    assert models["base"] == "toy-student" and models["densevlm"] == str(out / "densevlm")
    for c in configs.values():
        c.pop("output_dir")
    assert configs["base"] == configs["clipself"] == configs["densevlm"]
    assert (out / "figures" / "detection_ap50.png").is_file() and "AP50-novel" in first
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") >= 5  # world, both students, three detectors


def test_vlm_branch_inference_fuses_each_proposals_scores_as_fvit_does():
    """The whole test-time path of the box predictor against numbers computed here: detector softmax over K+1
    columns, VLM softmax of 75 x cosine between each proposal's RoI CLIP feature and the (normalised) class and
    background embeddings given at construction, p^(1-a) * p_vlm^a with a = ALPHA on base classes (background
    included) and BETA on novel ones, each proposal with its OWN VLM row across a batch of two images."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.structures import Boxes, Instances

    from densevlm.integrations.detectron2.ov_heads import OpenVocabOutputLayers

    g = torch.Generator().manual_seed(0)
    emb, background = torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    novel = [False, True, False]
    head = OpenVocabOutputLayers(ShapeSpec(channels=16), class_embeddings=emb, background_embedding=background,
                                 novel=novel, box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
                                 cls_agnostic_bbox_reg=True, test_score_thresh=0.0, test_nms_thresh=1.0,
                                 test_topk_per_image=100, vlm_temperature=75.0, alpha=0.3, beta=0.7).eval()
    counts = [2, 3]
    proposals = []
    for n in counts:
        p = Instances((64, 64))
        xy = torch.rand(n, 2, generator=g) * 30
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], dim=1))
        proposals.append(p)
    scores = torch.randn(5, 4, generator=g) * 3
    predictions = (scores, torch.zeros(5, 4))
    vlm_features = torch.randn(5, 8, generator=g)
    instances, kept = head.inference(predictions, proposals, vlm_features=vlm_features)

    rows = torch.cat([F.normalize(emb, dim=-1), F.normalize(background, dim=0)[None]])
    p_det = scores.softmax(-1)
    p_vlm = (75.0 * F.normalize(vlm_features, dim=-1) @ rows.t()).softmax(-1)
    exponent = torch.tensor([0.3, 0.7, 0.3, 0.3])  # base, novel, base, background
    fused = p_det ** (1 - exponent) * p_vlm ** exponent
    start = 0
    for image, (inst, index) in enumerate(zip(instances, kept)):
        # every (proposal, class) pair survives (threshold 0, no suppression): 3 classes per proposal
        assert len(inst) == 3 * counts[image]
        expected = fused[start + index, inst.pred_classes]
        torch.testing.assert_close(inst.scores, expected, rtol=1e-5, atol=1e-7)
        start += counts[image]
    # without the VLM branch the scores are the detector's own probabilities
    plain, kept = head.inference(predictions, proposals)
    torch.testing.assert_close(plain[1].scores, p_det[2 + kept[1], plain[1].pred_classes])


def test_region_clip_features_are_roialign_of_pixel_boxes_on_the_stride_16_map():
    """F-ViT's vlm_roi_extractor: boxes in the padded batch's pixels, RoIAlign 1x1 (aligned) on the dense CLIP map at
    1/16 of the pixels."""
    from types import SimpleNamespace

    from detectron2.structures import Boxes, Instances
    from torchvision.ops import roi_align

    from densevlm.integrations.detectron2.ov_heads import OpenVocabROIHeads

    g = torch.Generator().manual_seed(0)
    clip_map = torch.randn(2, 8, 4, 6, generator=g)  # a 64 x 96 padded batch at stride 16
    proposals = []
    for boxes in ([[0.0, 0.0, 32.0, 32.0], [40.0, 8.0, 96.0, 60.0]], [[10.0, 20.0, 50.0, 64.0]]):
        p = Instances((64, 96))
        p.proposal_boxes = Boxes(torch.tensor(boxes))
        proposals.append(p)
    ours = OpenVocabROIHeads.region_clip_features(SimpleNamespace(clip_stride=16), clip_map, proposals)
    expected = roi_align(clip_map, [p.proposal_boxes.tensor for p in proposals], output_size=(1, 1),
                         spatial_scale=1 / 16, sampling_ratio=-1, aligned=True).flatten(1)
    torch.testing.assert_close(ours, expected)
