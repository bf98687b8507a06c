"""Region-classification evaluation: the panoptic region dataset, the macc evaluator, the driver, diagnostics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densevlm.config.core import ConfigError, from_dict
from densevlm.config.evaluation import PanopticDataConfig, RegionEvalConfig
from densevlm.data.panoptic import (
    PanopticAnnotationError,
    PanopticRegionDataset,
    collate_regions,
    region_loader,
    token_grid_weights,
)
from densevlm.evaluation.diagnostics import (
    dense_probabilities,
    foreground_bias,
    format_foreground_bias,
    plot_foreground_bias,
    plot_probability_maps,
    write_per_class_table,
)
from densevlm.evaluation.regions import RegionClassificationEvaluator, evaluate_regions, format_table
from densevlm.models.pooling import masks_to_token_grid, pool_boxes, pool_masks
from densevlm.vocab import get_vocabulary, text_embeddings_from_config
from densevlm.vocab.cache import save_text_embeddings
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary

torch.set_num_threads(1)

CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 2, "name": "dog", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]
# One colour per category (and black for void): the oracle model reads classes back from these.
PALETTE = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 4: (200, 200, 30)}
BASE_KEYS = {
    "rois.thing.macc1", "rois.thing.macc5", "maskpool.thing.macc1", "maskpool.thing.macc5",
    "maskpool.stuff.macc1", "maskpool.stuff.macc5",
}


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def write_panoptic(root: Path, images: Sequence[dict[str, Any]], categories=CATEGORIES, split: str = "val") -> Path:
    """A COCO-panoptic split under ``root``: each image dict has ``name``, ``ids`` (H, W) segment-id map and
    ``segments`` {segment id: category id}; boxes and areas are computed from the map unless given."""
    png_dir = root / "annotations" / f"panoptic_{split}"
    img_dir = root / "images" / split
    png_dir.mkdir(parents=True)
    img_dir.mkdir(parents=True)
    data: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    for n, spec in enumerate(images):
        ids = spec["ids"]
        stem = spec["name"]
        Image.fromarray(id_to_rgb(ids)).save(png_dir / f"{stem}.png")
        rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
        segments = []
        for sid, cid in spec["segments"].items():
            mask = ids == sid
            rgb[mask] = PALETTE[cid]
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] \
                if len(xs) else [0, 0, 0, 0]
            seg = {"id": int(sid), "category_id": int(cid), "area": int(mask.sum()), "bbox": bbox, "iscrowd": 0}
            seg.update(spec.get("overrides", {}).get(sid, {}))
            segments.append(seg)
        segments += spec.get("extra_segments", [])
        Image.fromarray(rgb).save(img_dir / f"{stem}.png")
        data["images"].append({"id": n, "file_name": f"{stem}.png", "width": ids.shape[1], "height": ids.shape[0]})
        data["annotations"].append({"image_id": n, "file_name": f"{stem}.png", "segments_info": segments})
    path = root / "annotations" / f"panoptic_{split}.json"
    path.write_text(json.dumps(data))
    return path


def wide_image() -> dict[str, Any]:
    """128×64: sky above grass, a 32×16 cat on the grass, a 4×4 dog (below the 8² box filter)."""
    ids = np.zeros((64, 128), dtype=np.int64)
    ids[:32] = 10
    ids[32:] = 20
    ids[40:56, 16:48] = 30
    ids[50:54, 100:104] = 40
    return {"name": "wide", "ids": ids, "segments": {10: 3, 20: 4, 30: 1, 40: 2}}


def tall_image() -> dict[str, Any]:
    """64×96 (not an integer resize to 64 px): grass with a dog."""
    ids = np.full((96, 64), 20, dtype=np.int64)
    ids[30:70, 10:50] = 30
    return {"name": "tall", "ids": ids, "segments": {20: 4, 30: 2}}


def data_cfg(json_path: Path, **kw) -> PanopticDataConfig:
    root = json_path.parent.parent
    return PanopticDataConfig(panoptic_json=str(json_path), image_root=str(root / "images" / "val"), **kw)


# ---------------------------------------------------------------------- dataset


def test_dataset_boxes_masks_labels_on_padded_canvas(tmp_path):
    json_path = write_panoptic(tmp_path, [wide_image(), tall_image()])
    ds = PanopticRegionDataset(data_cfg(json_path, image_size=64), patch_size=16)
    assert len(ds) == 2 and ds.grid == 4
    item = ds[0]
    assert item["image"].shape == (3, 64, 64)
    assert item["resized_size"] == (32, 64) and item["orig_size"] == (64, 128)
    # The 4×4 dog (w·h = 16 < 64) is dropped; sky, grass, cat remain in json order.
    assert item["segment_ids"].tolist() == [10, 20, 30]
    assert item["labels"].tolist() == [2, 3, 0]  # sky, grass, cat in the json's category order
    assert item["isthing"].tolist() == [False, False, True]
    # Scale 0.5 onto a 64-px canvas: x / 128, y / 128. Stuff boxes are mask extents, the cat's its json bbox.
    expected_boxes = [[0, 0, 1, 0.25], [0, 0.25, 1, 0.5], [0.125, 0.3125, 0.375, 0.4375]]
    assert torch.allclose(item["boxes"], torch.tensor(expected_boxes))
    masks = item["masks"]
    assert masks.shape == (3, 4, 4)
    sky = torch.zeros(4, 4)
    sky[0] = 1
    # Cat covers canvas x 8..23, y 20..27: 8×8 pixels in each of tokens (1,0) and (1,1) -> 64/256.
    cat = torch.zeros(4, 4)
    cat[1, 0] = cat[1, 1] = 0.25
    # Grass fills token row 1 except the cat and the dropped dog (2×2 canvas pixels in token (1,3)).
    grass = torch.zeros(4, 4)
    grass[1] = torch.tensor([0.75, 0.75, 1.0, 1 - 4 / 256])
    assert torch.allclose(masks[0], sky) and torch.allclose(masks[1], grass) and torch.allclose(masks[2], cat)
    assert float(masks[:, 2:].abs().sum()) == 0.0  # token rows 2-3 are padding

    # Portrait 64×96 -> 43×64 content (scale 2/3): area is conserved exactly on the token grid.
    tall = ds[1]
    assert tall["resized_size"] == (64, 43)
    sx, sy = 43 / 64, 64 / 96
    for k, seg_area in enumerate([96 * 64 - 40 * 40, 40 * 40]):
        assert float(tall["masks"][k].sum()) * 256 == pytest.approx(seg_area * sx * sy, rel=1e-5)
    assert float(tall["masks"][:, :, 3].sum()) == 0.0  # canvas columns 48.. are padding (content ends at 43)
    assert torch.allclose(tall["boxes"][1], torch.tensor([10 * sx, 30 * sy, 50 * sx, 70 * sy]) / 64)


def test_token_grid_weights_match_masks_to_token_grid_on_integer_upsampling():
    rng = np.random.default_rng(0)
    inverse = rng.integers(0, 3, size=(8, 12))
    # 12×8 -> 48×32 (×4), token grid 6×6 of 8-px cells on a 48-px canvas.
    weights = token_grid_weights(inverse, [0, 1, 2], (32, 48), grid=6, patch=8)
    canvas = np.zeros((48, 48), dtype=np.int64) - 1
    canvas[:32, :48] = np.kron(inverse, np.ones((4, 4), dtype=np.int64))
    reference = masks_to_token_grid(torch.from_numpy(np.stack([canvas == k for k in range(3)])), 8)
    assert torch.allclose(torch.from_numpy(weights), reference, atol=1e-6)


def test_token_grid_weights_match_supersampled_area_on_fractional_resize():
    rng = np.random.default_rng(1)
    inverse = rng.integers(0, 4, size=(7, 11))
    resized, grid, patch, r = (23, 37), 5, 8, 16  # 11×7 -> 37×23 (×3.36, ×3.29) on a 40-px canvas
    weights = token_grid_weights(inverse, [0, 2, 3], resized, grid=grid, patch=patch)
    # Reference: r×r samples per canvas pixel, each taking the source pixel under it (padding beyond content).
    u = (np.arange(grid * patch * r) + 0.5) / r
    src_y = np.where(u < resized[0], np.floor(u * 7 / resized[0]).astype(int), -1)
    src_x = np.where(u < resized[1], np.floor(u * 11 / resized[1]).astype(int), -1)
    fine = np.where((src_y[:, None] >= 0) & (src_x[None, :] >= 0),
                    inverse[np.clip(src_y, 0, 6)][:, np.clip(src_x, 0, 10)], -1)
    for slot, k in enumerate([0, 2, 3]):
        reference = (fine == k).reshape(grid, patch * r, grid, patch * r).mean(axis=(1, 3))
        assert np.abs(weights[slot] - reference).max() < 0.01  # the sampled reference is itself off by ~1/(patch·r)


def test_binary_masks_and_box_filter_bounds(tmp_path):
    json_path = write_panoptic(tmp_path, [wide_image()])
    ds = PanopticRegionDataset(data_cfg(json_path, image_size=64, mask_weights="binary", max_box_size=40), 16)
    item = ds[0]
    # Boxes above 40² px are dropped (sky and grass: 128×32); the 32×16 cat remains, its mask binarised.
    assert item["segment_ids"].tolist() == [30]
    assert item["masks"][0].tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    only_two = PanopticRegionDataset(data_cfg(json_path, image_size=64, max_segments=2), 16)[0]
    assert only_two["segment_ids"].tolist() == [10, 20]


def test_collate_and_loader_keep_per_image_lists(tmp_path):
    json_path = write_panoptic(tmp_path, [wide_image(), tall_image()])
    ds = PanopticRegionDataset(data_cfg(json_path, image_size=64, max_images=2), 16)
    batch = collate_regions([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 64, 64)
    assert [len(b) for b in batch["boxes"]] == [3, 2] and [m.shape[0] for m in batch["masks"]] == [3, 2]
    (loaded,) = list(region_loader(ds, batch_size=2, num_workers=1))
    assert torch.equal(loaded["images"], batch["images"])
    assert all(torch.equal(a, b) for a, b in zip(loaded["masks"], batch["masks"]))
    assert loaded["file_name"] == ["wide.png", "tall.png"]


def test_annotation_png_disagreements_name_image_and_segment(tmp_path, caplog):
    missing = wide_image()
    missing["extra_segments"] = [{"id": 77, "category_id": 1, "area": 5, "bbox": [0, 0, 9, 9]}]
    ds = PanopticRegionDataset(data_cfg(write_panoptic(tmp_path / "a", [missing]), image_size=64), 16)
    with pytest.raises(PanopticAnnotationError, match=r"wide\.png.*segment 77 .*absent from the PNG"):
        ds[0]

    unlisted = wide_image()
    del unlisted["segments"][40]  # the dog's pixels stay in the PNG
    ds = PanopticRegionDataset(data_cfg(write_panoptic(tmp_path / "b", [unlisted]), image_size=64), 16)
    with pytest.raises(PanopticAnnotationError, match=r"wide\.png.*\[40\].*not in the json"):
        ds[0]

    no_dog = Vocabulary("no-dog", tuple(ClassEntry(c["name"], isthing=bool(c["isthing"]), id=c["id"])
                                        for c in CATEGORIES if c["id"] != 2))
    with pytest.raises(PanopticAnnotationError, match=r"image wide\.png .*segment 40.*'dog'.*not in vocabulary"):
        PanopticRegionDataset(data_cfg(write_panoptic(tmp_path / "c", [wide_image()]), image_size=64), 16, no_dog)

    wrong_area = wide_image()
    wrong_area["overrides"] = {30: {"area": 500}}
    ds = PanopticRegionDataset(data_cfg(write_panoptic(tmp_path / "d", [wrong_area]), image_size=64), 16)
    with caplog.at_level(logging.WARNING, logger="densevlm.data.panoptic"):
        ds[0]
    assert any("wide.png" in r.getMessage() and "segment 30" in r.getMessage() and "512" in r.getMessage()
               for r in caplog.records)


def test_foreign_vocabulary_maps_by_id_and_rejects_other_id_schemes(tmp_path):
    json_path = write_panoptic(tmp_path, [wide_image()])
    reordered = Vocabulary("reordered", (
        ClassEntry("grass", isthing=False, id=4), ClassEntry("kitten", ("cat",), isthing=True, id=1),
        ClassEntry("sky", isthing=False, id=3), ClassEntry("dog", isthing=True, id=2),
        ClassEntry("tree", isthing=False, id=9),
    ))
    ds = PanopticRegionDataset(data_cfg(json_path, image_size=64), 16, reordered)
    assert ds[0]["labels"].tolist() == [2, 0, 1]
    shifted = Vocabulary("shifted", tuple(ClassEntry(c["name"], isthing=bool(c["isthing"]), id=c["id"] + 1)
                                          for c in CATEGORIES))
    with pytest.raises(PanopticAnnotationError, match="names disagree"):
        PanopticRegionDataset(data_cfg(json_path, image_size=64), 16, shifted)


def test_config_validation_and_empty_vocabulary():
    cfg = from_dict(RegionEvalConfig, {"text": {"cache_dir": "/tmp/x"}, "data": {"panoptic_json": "a.json"}})
    assert cfg.text.vocabulary == ""  # the dataset's own categories, not the 316-class default
    assert cfg.data.resolved_panoptic_root() == Path("a")
    with pytest.raises(ConfigError, match="max_segments"):
        from_dict(RegionEvalConfig, {"data": {"max_segments": 0}})
    with pytest.raises(ConfigError, match="device"):
        from_dict(RegionEvalConfig, {"device": "tpu"})
    with pytest.raises(ConfigError, match="data.image_root"):
        PanopticRegionDataset(PanopticDataConfig(panoptic_json="a.json"), 16)


# ---------------------------------------------------------------------- evaluator


def toy_vocabulary(novel: Sequence[str] = ()) -> Vocabulary:
    names = ["t0", "t1", "t2", "t3", "s0", "s1", "s2", "s3"]
    return Vocabulary("toy8", tuple(ClassEntry(n, isthing=n[0] == "t", novel=n in novel) for n in names))


def feature(label: int, rank: int, dim: int = 8) -> torch.Tensor:
    """A feature whose true class is exactly the ``rank``-th best (0 = top-1) against one-hot text embeddings."""
    f = torch.zeros(dim)
    f[label] = 1.0
    others = [j for j in range(dim) if j != label][:rank]
    for n, j in enumerate(others):
        f[j] = 1.5 + 0.1 * n  # distinct, all above the true class
    return f


# (label, rank under maskpool): t0 ok ok, t1 ok + rank 2, t2 rank 6; s0 ok, s1 rank 1 + rank 5, s2 rank 4.
REGIONS = [(0, 0), (0, 0), (1, 0), (1, 2), (2, 6), (4, 0), (5, 1), (5, 5), (6, 4)]


def run_evaluator(vocabulary: Vocabulary) -> dict[str, Any]:
    ev = RegionClassificationEvaluator(vocabulary, torch.eye(8) * 3.0)  # not unit norm: the evaluator normalises
    # Two images per batch, two batches: the evaluator must concatenate in image order.
    halves = [REGIONS[:4], REGIONS[4:]]
    for half in halves:
        per_image = [half[: len(half) // 2], half[len(half) // 2:]]
        labels = [torch.tensor([lab for lab, _ in im]) for im in per_image]
        isthing = [lab < 4 for lab in labels]
        masks = torch.stack([feature(lab, r) for im in per_image for lab, r in im])
        things = torch.stack([feature(lab, 0) * 2 for im in per_image for lab, _ in im if lab < 4]) \
            if any(bool(t.any()) for t in isthing) else torch.zeros(0, 8)
        ev.process({"labels": labels, "isthing": isthing}, {"maskpool": masks, "rois": things})
    return ev.evaluate()


def test_macc_equals_hand_computation():
    result = run_evaluator(toy_vocabulary())
    m = result["metrics"]
    assert set(m) == BASE_KEYS
    assert m["maskpool.thing.macc1"] == pytest.approx((1 + 0.5 + 0) / 3 * 100)
    assert m["maskpool.thing.macc5"] == pytest.approx((1 + 1 + 0) / 3 * 100)
    assert m["maskpool.stuff.macc1"] == pytest.approx((1 + 0 + 0) / 3 * 100)
    assert m["maskpool.stuff.macc5"] == pytest.approx((1 + 0.5 + 1) / 3 * 100)
    assert m["rois.thing.macc1"] == 100.0 and m["rois.thing.macc5"] == 100.0
    c = result["counts"]
    assert c["maskpool.thing.regions"] == 5 and c["maskpool.stuff.regions"] == 4 and c["rois.thing.regions"] == 5
    assert c["maskpool.thing.classes"] == 3 and c["maskpool.stuff.classes"] == 3 and c["images"] == 4
    rows = {r["name"]: r for r in result["per_class"]}
    assert rows["t1"]["maskpool.acc1"] == 50.0 and rows["t3"]["maskpool.acc1"] is None
    assert "rois.regions" not in rows["s0"]  # boxes are scored on things only


def test_novel_keys_only_with_novel_classes():
    result = run_evaluator(toy_vocabulary(novel=("t2", "s1")))
    m = result["metrics"]
    assert set(m) == BASE_KEYS | {
        f"{p}.{kind}.{split}.macc{k}"
        for p, kinds in (("rois", ("thing",)), ("maskpool", ("thing", "stuff")))
        for kind in kinds for split in ("seen", "novel") for k in (1, 5)
    }
    assert m["maskpool.thing.seen.macc1"] == pytest.approx(75.0) and m["maskpool.thing.novel.macc1"] == 0.0
    assert m["maskpool.stuff.seen.macc1"] == pytest.approx(50.0) and m["maskpool.stuff.seen.macc5"] == 100.0
    assert m["maskpool.stuff.novel.macc1"] == 0.0 and m["maskpool.stuff.novel.macc5"] == pytest.approx(50.0)
    assert m["maskpool.thing.macc1"] == pytest.approx(50.0)  # the overall numbers do not change
    assert result["counts"]["maskpool.stuff.novel.regions"] == 2
    table = format_table({"a": result, "b": result["metrics"]})
    assert "maskpool.stuff.novel" in table and table.count("50.0") >= 4


def test_evaluator_rejects_mismatched_region_counts():
    ev = RegionClassificationEvaluator(toy_vocabulary(), torch.eye(8))
    with pytest.raises(ValueError, match="rois: got 2 region features for 1 regions"):
        ev.process({"labels": [torch.tensor([0, 4])], "isthing": [torch.tensor([True, False])]},
                   {"rois": torch.zeros(2, 8)})


def test_degenerate_features_are_misses():
    ev = RegionClassificationEvaluator(toy_vocabulary(), torch.eye(8))
    features = torch.stack([torch.zeros(8), torch.full((8,), float("nan")), feature(4, 0)])
    ev.process({"labels": [torch.tensor([0, 1, 4])], "isthing": [torch.tensor([True, True, False])]},
               {"maskpool": features})
    m = ev.evaluate()["metrics"]
    assert m["maskpool.thing.macc5"] == 0.0 and m["maskpool.stuff.macc1"] == 100.0
    assert m["rois.thing.macc1"] is None  # no box features were given


# ---------------------------------------------------------------------- driver


class OracleModel(torch.nn.Module):
    """Dense features equal to the text embedding of the class painted at each pixel, averaged per token."""

    patch_size = 16
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)
    name = "oracle"
    weights_id = "oracle"

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("palette", torch.tensor([PALETTE[c["id"]] for c in CATEGORIES]).float() / 255)
        self.register_buffer("text", text)

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        dist = (images[:, None] - self.palette[None, :, :, None, None]).pow(2).sum(2)  # (B, C, H, W)
        onehot = (dist < 1e-4).float()
        emb = torch.einsum("bchw,cd->bdhw", onehot, self.text)
        return F.normalize(F.avg_pool2d(emb, self.patch_size), dim=1)

    def pool_boxes(self, dense, boxes):
        return pool_boxes(dense, boxes)

    def pool_masks(self, dense, masks):
        return pool_masks(dense, masks)


def aligned_images() -> list[dict[str, Any]]:
    """128×128 and 128×96 scenes whose segments fill whole 16-px cells (so token features are pure)."""
    a = np.full((128, 128), 10, dtype=np.int64)
    a[64:] = 20
    a[16:64, 32:96] = 30
    a[80:128, 0:48] = 40
    b = np.full((96, 128), 20, dtype=np.int64)
    b[:32] = 10
    b[32:80, 64:112] = 40
    return [{"name": "a", "ids": a, "segments": {10: 3, 20: 4, 30: 1, 40: 2}},
            {"name": "b", "ids": b, "segments": {10: 3, 20: 4, 40: 2}}]


def test_perfectly_aligned_model_scores_100(tmp_path, capsys):
    json_path = write_panoptic(tmp_path / "data", aligned_images())
    emb_path = tmp_path / "text.npy"
    save_text_embeddings(emb_path, torch.eye(4, 6), {})
    cfg = RegionEvalConfig(output_dir=str(tmp_path / "out"), data=data_cfg(json_path, image_size=128),
                           batch_size=2, num_workers=0, device="cpu")
    cfg.text.embeddings_path = str(emb_path)
    result = evaluate_regions(OracleModel(torch.eye(4, 6)), cfg, progress=False)
    assert result["metrics"] == {k: 100.0 for k in BASE_KEYS}
    assert result["counts"]["rois.thing.regions"] == 3 and result["counts"]["maskpool.stuff.regions"] == 4
    saved = json.loads((tmp_path / "out" / "regions.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["data"]["token_grid"] == 8
    assert (tmp_path / "out" / "regions_per_class.csv").read_text().splitlines()[0].startswith("index,class,kind")
    assert (tmp_path / "out" / "foreground_bias.png").stat().st_size > 0
    assert "maskpool.stuff" in capsys.readouterr().out


def test_tiny_denseclip_end_to_end_and_diagnostics(tmp_path):
    from densevlm.models import ModelSpec, create_backbone

    spec = ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides={
        "vision_cfg": {"layers": 1, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32}})
    model = create_backbone(spec)
    json_path = write_panoptic(tmp_path / "data", [wide_image(), tall_image()] + aligned_images())
    cfg = RegionEvalConfig(output_dir=str(tmp_path / "out"), data=data_cfg(json_path, image_size=64),
                           batch_size=3, num_workers=0, device="cpu")
    cfg.text.templates = "single"
    result = evaluate_regions(model, cfg, progress=False)
    assert set(result["metrics"]) == BASE_KEYS
    assert all(0.0 <= v <= 100.0 for v in result["metrics"].values())
    assert result["counts"]["images"] == 4 and result["counts"]["rois.thing.regions"] == 1 + 1 + 2 + 1
    assert result["model"]["weights_id"] == model.weights_id

    bias = foreground_bias(result)
    assert {b["class"] for b in bias} == {"sky", "grass"} and all(0 < b["p_correct"] < 1 for b in bias)
    assert all(b["thing"] in ("cat", "dog") for b in bias)
    fig = plot_foreground_bias({"base": result, "again": result}, tmp_path / "fb.png", classes=["sky"])
    assert fig.stat().st_size > 0
    sky = next(b for b in bias if b["class"] == "sky")
    table = format_foreground_bias({"base": result, "again": result}, classes=["sky"])
    assert table.splitlines()[2].count(f"{sky['p_correct']:.2f} / {sky['p_thing']:.2f} {sky['thing']}") == 2
    assert (tmp_path / "out" / "foreground_bias.md").is_file()
    paths = write_per_class_table(result, tmp_path / "tables")
    assert "| sky | stuff | seen |" in paths["markdown"].read_text()

    image = Image.open(Path(cfg.data.image_root) / "wide.png")
    vocab, text = text_embeddings_from_config(model, cfg.text, get_vocabulary(json_path))
    probs, crop = dense_probabilities(model, image, text, image_size=64)
    assert probs.shape == (4, 2, 4) and crop.shape == (32, 64, 3)  # padding rows cut off
    assert torch.allclose(probs.sum(0), torch.ones(2, 4), atol=1e-5)
    out = plot_probability_maps(crop, {"before": probs, "after": probs}, vocab, "sky", tmp_path / "maps.png")
    assert out.stat().st_size > 0
