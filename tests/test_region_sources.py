"""Region sources (grid, boxes, masks): geometry against hand-computed boxes and masks and against the evaluation's
own geometry (the panoptic region dataset), exact under resizing and padding; the teacher cache keyed by source."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from densevlm.config.evaluation import PanopticDataConfig
from densevlm.config.regions import RegionSourceConfig
from densevlm.config.sources import ImageSourceConfig
from densevlm.data.grid_boxes import all_grid_cells, cell_offsets, grid_choices, grid_boxes_with_cells
from densevlm.data.panoptic import PanopticRegionDataset
from densevlm.data.region_sources import (REGION_SOURCES, GridSpec, build_region_source, region_identity,
                                          regions_on_canvas)
from densevlm.data.region_sources.dataset import RegionSetDataset
from densevlm.data.sources import ImageSource


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _images(tmp: Path, sizes: list[tuple[int, int]]) -> dict:
    """Images of the given (width, height) and the COCO json listing them (ids 10, 11, ...)."""
    (tmp / "img").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / "img" / f"{k}.png")
        images.append({"id": 10 + k, "file_name": f"{k}.png", "width": w, "height": h})
    (tmp / "images.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return {"images": images}


def _source(tmp: Path) -> ImageSource:
    return ImageSource(ImageSourceConfig(kind="coco_json", path=str(tmp / "images.json"), image_root=str(tmp / "img")))


def test_every_kind_is_registered():
    assert {"grid", "boxes", "masks"} <= set(REGION_SOURCES)


def test_boxes_land_on_the_padded_canvas_where_hand_arithmetic_puts_them(tmp_path):
    """A 50x30 image on a 64 canvas: content 64x38 (38.4 rounded), so x scales by 64/50 and y by 38/30."""
    head = _images(tmp_path, [(50, 30), (30, 70)])
    anns = [{"id": 8, "image_id": 10, "bbox": [0, 0, 50, 30], "score": 0.2},
            {"id": 7, "image_id": 10, "bbox": [10, 5, 20, 10], "score": 0.9},
            {"id": 9, "image_id": 11, "bbox": [3, 14, 6, 35], "score": 0.5}]
    (tmp_path / "props.json").write_text(json.dumps({**head, "annotations": anns}))
    cfg = RegionSourceConfig(kind="boxes", path=str(tmp_path / "props.json"))
    src = build_region_source(cfg, _source(tmp_path))
    r = src.regions(0, 50, 30)
    assert r.slots == [1, 0] and r.ids == [7, 8]  # best score first; a slot is the position in the file
    got = regions_on_canvas(r, [0, 1], 50, 30, 64)["boxes"]
    fx, fy = 64 / 50 / 64, 38 / 30 / 64
    want = torch.tensor([[10 * fx, 5 * fy, 30 * fx, 15 * fy], [0, 0, 50 * fx, 30 * fy]], dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-7, rtol=0)
    assert got[1, 3] < 1.0 and abs(float(got[1, 3]) - 38 / 64) < 1e-7  # the bottom padding is not region
    # A 30x70 image: content 27x64 (27.43 rounded): x scales by 27/30.
    got = regions_on_canvas(src.regions(1, 30, 70), [0], 30, 70, 64)["boxes"]
    want = torch.tensor([[3 * 27 / 30 / 64, 14 / 70, 9 * 27 / 30 / 64, 49 / 70]])
    assert torch.allclose(got, want, atol=1e-7, rtol=0)
    # top_k and min_score select by score; slots keep naming the same regions.
    top = build_region_source(RegionSourceConfig(kind="boxes", path=cfg.path, top_k=1), _source(tmp_path))
    assert top.regions(0, 50, 30).ids == [7]
    cut = build_region_source(RegionSourceConfig(kind="boxes", path=cfg.path, min_score=0.5), _source(tmp_path))
    assert cut.regions(0, 50, 30).slots == [1]


def test_masks_are_area_averaged_onto_the_token_grid_as_by_hand(tmp_path):
    """A 40x20 image on a 32 canvas (x0.8, content 32x16), 8-px patches: a mask of columns [0, 15) and rows [0, 10)
    covers canvas x < 12, y < 8: token (0, 0) fully, token (0, 1) half; nothing below row 0 or in the padding."""
    head = _images(tmp_path, [(40, 20)])
    mask = np.zeros((20, 40), dtype=bool)
    mask[:10, :15] = True
    (tmp_path / "masks.json").write_text(json.dumps(
        {**head, "annotations": [{"id": 3, "image_id": 10, "segmentation": _rle(mask), "score": 1.0}]}))
    src = build_region_source(RegionSourceConfig(kind="masks", path=str(tmp_path / "masks.json")), _source(tmp_path))
    r = src.regions(0, 40, 20)
    placed = regions_on_canvas(r, [0], 40, 20, 32, (8, 16))
    want = torch.zeros(4, 4)
    want[0, 0], want[0, 1] = 1.0, 0.5
    assert torch.allclose(placed["masks"]["p8"][0], want, atol=1e-6)
    assert torch.allclose(placed["masks"]["p16"][0], torch.tensor([[0.375, 0.0], [0.0, 0.0]]), atol=1e-6)
    # The box is the mask's extent (pixel edges): [0, 0, 15, 10] -> canvas [0, 0, 12, 8] / 32.
    assert torch.allclose(placed["boxes"][0], torch.tensor([0.0, 0.0, 12 / 32, 8 / 32]), atol=1e-7)
    # The training items carry the same, padded to max_boxes.
    item = RegionSetDataset(_source(tmp_path), src, 32, max_boxes=3, mask_patches=(8,))[0]
    assert item["valid"].tolist() == [True, False, False] and item["cells"].tolist() == [0, -1, -1]
    assert torch.equal(item["masks"]["p8"][0], placed["masks"]["p8"][0]) and item["masks"]["p8"][1:].abs().sum() == 0


def _panoptic_split(tmp: Path) -> Path:
    """A non-square (40x24) panoptic split: a thing segment (a 13x9 block) on a stuff background."""
    (tmp / "img").mkdir()
    (tmp / "pan").mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp / "img" / "a.png")
    ids = np.full((24, 40), 2, dtype=np.int64)
    ids[5:14, 21:34] = 1
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp / "pan" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 24}],
            "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
                {"id": 1, "category_id": 1, "bbox": [21, 5, 13, 9], "area": 117, "iscrowd": 0},
                {"id": 2, "category_id": 2, "bbox": [0, 0, 40, 24], "area": 960 - 117, "iscrowd": 0}]}],
            "categories": [{"id": 1, "name": "boat", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]}
    (tmp / "pan.json").write_text(json.dumps(data))
    return tmp / "pan.json"


@pytest.mark.parametrize("size,patch", [(48, 8), (64, 16)])
def test_panoptic_masks_match_the_evaluation_geometry(tmp_path, size, patch):
    """The masks source over a panoptic json gives the boxes and token-grid masks the region evaluation uses."""
    pan = _panoptic_split(tmp_path)
    images = ImageSource(ImageSourceConfig(kind="coco_json", path=str(pan), image_root=str(tmp_path / "img")))
    src = build_region_source(RegionSourceConfig(kind="masks", path=str(pan), panoptic_root=str(tmp_path / "pan")),
                              images)
    ev = PanopticRegionDataset(PanopticDataConfig(panoptic_json=str(pan), panoptic_root=str(tmp_path / "pan"),
                                                  image_root=str(tmp_path / "img"), image_size=size, min_box_size=0),
                               patch)[0]
    r = src.regions(0, 40, 24)
    placed = regions_on_canvas(r, range(len(r)), 40, 24, size, (patch,))
    assert r.ids == ev["segment_ids"].tolist()
    assert torch.allclose(placed["boxes"], ev["boxes"], atol=1e-7, rtol=0)
    assert torch.allclose(placed["masks"][f"p{patch}"], ev["masks"], atol=1e-6, rtol=0)
    assert float(ev["masks"][:, size * 24 // 40 // patch + 1:].sum()) == 0.0  # padding rows carry no mask


def test_grid_labelling_cells_are_the_cells_training_draws(tmp_path):
    """The grid source's cells (the 6x6 choice, named by global cell index) are bit for bit the boxes the
    training grid draws for those cells and the teacher cache stores."""
    _images(tmp_path, [(50, 30)])
    src = build_region_source(RegionSourceConfig(), _source(tmp_path), GridSpec("densevlm", 6))
    r = src.regions(0, 50, 30)
    choices = grid_choices(6, "densevlm")
    first = cell_offsets(choices)[choices.index((6, 6))]
    assert r.slots == list(range(first, first + 36))
    got = regions_on_canvas(r, range(36), 50, 30, 64)["boxes"]
    assert torch.equal(got, all_grid_cells(50, 30, 64 / 50, 64, choices)[first:first + 36])
    for seed in range(40):  # a draw of the 6x6 choice names its cells with the same ids and boxes
        boxes, valid, _, cells = grid_boxes_with_cells(50, 30, 64 / 50, 64, random.Random(seed), choices, 36)
        if int(cells[0]) >= first and int(cells[0]) < first + 36:
            assert torch.equal(boxes[valid], got[cells[valid] - first])
            break
    else:
        pytest.fail("no draw of the 6x6 choice in 40 seeds")


def test_a_teacher_cache_for_one_source_is_refused_for_another_naming_both(tmp_path):
    from densevlm.data.teacher_cache import TeacherCache, TeacherCacheError, cache_metadata, write_manifest

    head = _images(tmp_path, [(50, 30)])
    (tmp_path / "props.json").write_text(json.dumps({**head, "annotations": [{"id": 1, "image_id": 10,
                                                                              "bbox": [1, 1, 5, 5]}]}))
    common = dict(teacher_name="t", teacher_weights="w", dense_last_block="value", image_size=64,
                  grid_style="densevlm", max_split=6, mean=(0.5,) * 3, std=(0.5,) * 3)
    write_manifest(tmp_path / "cache", cache_metadata(**common), 8, 4, 1)  # built for the grid
    boxes = region_identity(RegionSourceConfig(kind="boxes", path=str(tmp_path / "props.json")))
    with pytest.raises(TeacherCacheError) as err:
        TeacherCache(tmp_path / "cache", cache_metadata(**common, regions=boxes), ["0.png"])
    message = str(err.value)
    assert "regions: cache has" in message and '"kind": "grid"' in message and '"kind": "boxes"' in message
    # The same grid opens (no shard yet: the image is reported missing, not refused for its source).
    with pytest.raises(TeacherCacheError, match="not cached"):
        TeacherCache(tmp_path / "cache", cache_metadata(**common), ["0.png"])


def test_clipself_trains_on_proposal_boxes_with_crops_of_those_boxes(tmp_path):
    """CLIPSelf's proposal mode: the crops are the proposal boxes of the original image, and a step runs."""
    from densevlm.config import from_dict
    from densevlm.config.align import AlignConfig
    from densevlm.data.transforms import resize_longest_pad, to_tensor
    from densevlm.tasks.align import run_align

    head = _images(tmp_path, [(50, 30), (30, 70)])
    anns = [{"id": 1, "image_id": 10, "bbox": [10, 5, 20, 10], "score": 0.9},
            {"id": 2, "image_id": 11, "bbox": [3, 14, 6, 35], "score": 0.8}]
    (tmp_path / "props.json").write_text(json.dumps({**head, "annotations": anns}))
    cfg = RegionSourceConfig(kind="boxes", path=str(tmp_path / "props.json"))
    src = build_region_source(cfg, _source(tmp_path))
    item = RegionSetDataset(_source(tmp_path), src, 64, max_boxes=2, crop_size=32)[1]
    img = Image.open(tmp_path / "img" / "1.png").convert("RGB")
    want = to_tensor(resize_longest_pad(img.crop((3, 14, 9, 49)), 32)[0])
    assert torch.equal(item["crops"][0], want) and item["crops"][1].abs().sum() == 0
    tiny = {"vision_cfg": {"layers": 1, "width": 32, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32,
                                                                                    "heads": 1}}
    run = from_dict(AlignConfig, {
        "output_dir": str(tmp_path / "run"), "method": "clipself", "teacher": None, "ensemble_alpha": None,
        "student": {"name": "ToyCLIP-ViT-T-16", "model_overrides": tiny},
        "data": {"source": {"kind": "coco_json", "path": str(tmp_path / "images.json"),
                            "image_root": str(tmp_path / "img")},
                 "regions": {"kind": "boxes", "path": str(tmp_path / "props.json")}, "image_size": 64},
        "loop": {"epochs": 1, "batch_size": 2, "num_workers": 0, "cpu": True, "eval_every": 0}})
    cosine = run_align(run, overwrite=True).metrics["history"][0]["train"]["cosine"]
    assert -1.0 <= cosine <= 1.0


def test_mask_regions_are_pooled_by_mask_on_each_models_own_token_grid(tmp_path):
    """Training batches of a mask source pool each model's dense map by the mask on that model's grid."""
    from densevlm.methods.regions import batch_masks, per_image_boxes, pool_regions

    head = _images(tmp_path, [(40, 20)])
    mask = np.zeros((20, 40), dtype=bool)
    mask[2:12, 5:30] = True
    (tmp_path / "m.json").write_text(json.dumps({**head, "annotations": [{"id": 1, "image_id": 10,
                                                                         "segmentation": _rle(mask)}]}))
    src = build_region_source(RegionSourceConfig(kind="masks", path=str(tmp_path / "m.json")), _source(tmp_path))
    batch = torch.utils.data.default_collate([RegionSetDataset(_source(tmp_path), src, 32, max_boxes=2,
                                                               mask_patches=(8, 16))[0]])

    class Model:
        def __init__(self, patch):
            self.patch_size = patch

        def pool_boxes(self, dense, boxes):
            raise AssertionError("a mask region was pooled by its box")

        def pool_masks(self, dense, masks):
            return torch.stack([(m[:, :, :, None] * dense[0].permute(1, 2, 0)).sum((1, 2)) for m in masks])[0]

    for patch in (8, 16):
        g = 32 // patch
        dense = torch.arange(3 * g * g, dtype=torch.float32).view(1, 3, g, g)
        got = pool_regions(Model(patch), dense, per_image_boxes(batch["boxes"], batch["valid"]), batch_masks(batch))
        weights = batch["masks"][f"p{patch}"][0, 0]
        assert got.shape == (1, 3) and torch.allclose(got[0], (weights[None] * dense[0]).sum((1, 2)))
