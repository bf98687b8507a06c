"""What the explorer's page shows, without a browser: typed classes, side-by-side panels, the teacher's labels on
region sources (grid splits, the example world's masks, a region file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from PIL import Image

from densevlm.app.explorer import WORLD_MASKS, Explorer, parse_classes, side_by_side, split_panels, world_examples
from densevlm.config.align import RegionDataConfig
from densevlm.config.labels import LabelsProposeConfig
from densevlm.config.regions import RegionSourceConfig
from densevlm.config.report import AppConfig
from densevlm.config.sources import ImageSourceConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.config.vocab import TextEmbeddingConfig
from densevlm.tasks.labels import run_propose
from densevlm.toyworld import generate_world
from densevlm.vocab.registry import get_vocabulary
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary


def test_typed_classes_keep_known_flags_and_mark_stuff():
    known = Vocabulary("w", (ClassEntry("sky", ("clear sky",), isthing=False), ClassEntry("car")))
    vocab = parse_classes(" car, clear sky ,gasket, weld seam (stuff), car", known)
    assert [(c.name, c.isthing) for c in vocab.classes] == [("car", True), ("clear sky", False), ("gasket", True),
                                                            ("weld seam", False)]
    with pytest.raises(ValueError, match="at least two"):
        parse_classes("sky", known)


def test_panels_round_trip():
    rng = np.random.default_rng(0)
    panels = [rng.integers(0, 255, (5, 7, 3), dtype=np.uint8) for _ in range(3)]
    joined = side_by_side(panels)
    assert joined.shape == (5, 3 * 7 + 2 * 8, 3)
    assert all(np.array_equal(a, b) for a, b in zip(split_panels(joined, 7), panels))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A two-image toy world (val split only) at 96 px: the examples and their panoptic segments."""
    root = tmp_path_factory.mktemp("app_world") / "world"
    generate_world(ToyWorldConfig(num_train=0, num_val=2, image_size=96, workers=0), root, overwrite=True,
                   progress=False)
    return root


def test_teacher_grid_labels_tile_the_image_and_score_each_cell():
    teacher_patch = 12  # toy-teacher-clipself's patch side: 3 x 3 cells of 2 x 2 tokens on a 72-px image
    size = 3 * 2 * teacher_patch
    explorer = Explorer(AppConfig(grid=3, image_size=size, threshold=0.3))
    # A smooth image: the teacher is not sure of every cell, so the probabilities are not all 0 or 1.
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([xx * 3, yy * 3, 255 - xx - yy], axis=-1).clip(0, 255).astype(np.uint8)
    vocab = parse_classes("sky, grass, car, cat")
    regions, _ = explorer.regions(RegionSourceConfig(kind="grid"), image, split=3)
    rows = explorer.region_labels(image, vocab, regions, top_k=2)
    cell = size // 3
    assert [r["box"] for r in rows] == [[x, y, x + cell, y + cell] for y in (0, cell, 2 * cell)
                                        for x in (0, cell, 2 * cell)]  # row-major, by hand
    # Oracle per cell: the teacher's dense map averaged over the cell's 2 x 2 tokens (RoIAlign 1x1, aligned, samples
    # exactly those token centres), cosine against the text, softmax of cos / 0.01.
    teacher = explorer.model(explorer.cfg.teacher)
    assert teacher.patch_size == teacher_patch
    with torch.no_grad():
        dense = teacher.encode_dense(explorer.canvas(image, teacher)[None])[0]
        text = F.normalize(explorer.text(explorer.cfg.teacher, vocab).float(), dim=-1)
    p = teacher_patch
    for r in rows:
        x0, y0, x1, y1 = r["box"]
        feature = F.normalize(dense[:, y0 // p: y1 // p, x0 // p: x1 // p].float().mean((1, 2)), dim=0)
        probs = torch.softmax(text @ feature / 0.01, dim=0)
        top = torch.topk(probs, 2)
        best = int(top.indices[0])
        assert [n for n, _ in r["labels"]] == [vocab.names[int(i)] for i in top.indices]
        assert [q for _, q in r["labels"]] == pytest.approx(top.values.tolist(), rel=1e-3, abs=1e-7)
        assert r["route"] == ("thing" if vocab.classes[best].isthing else "stuff")
        assert r["passes"] == (r["labels"][0][1] > 0.3)


@pytest.mark.parametrize("split", [2, 5])
def test_grid_split_sets_the_cells(split):
    explorer = Explorer(AppConfig())
    image = np.zeros((60, 90, 3), dtype=np.uint8)  # not square: cells are w / split by h / split
    regions, what = explorer.regions(RegionSourceConfig(kind="grid"), image, split=split)
    assert len(regions) == split * split and what == f"grid {split} x {split}"
    w, h = 90 / split, 60 / split
    expected = [[c * w, r * h, (c + 1) * w, (r + 1) * h] for r in range(split) for c in range(split)]
    np.testing.assert_allclose(regions.boxes, expected, rtol=0, atol=1e-9)


def test_world_masks_labels_equal_labels_propose(world, tmp_path):
    """The explorer's teacher probabilities for the example world's panoptic segments are those ``densevlm labels
    propose`` writes for the same image and region file (the labelling path, end to end)."""
    size = 96
    explorer = Explorer(AppConfig(world=str(world), image_size=size))
    known = get_vocabulary(str(world))
    choices = explorer.region_choices()
    source = choices[WORLD_MASKS]
    assert source.kind == "masks"
    name = Path(world_examples(world, 2)[1]).name
    image = np.asarray(Image.open(world / "images" / "val" / name).convert("RGB"))
    regions, what = explorer.regions(source, image, split=3, image_name=name)
    assert regions.masks is not None and len(regions) >= 2 and name in what
    rows = explorer.region_labels(image, known, regions)

    cfg = LabelsProposeConfig(output_dir=str(tmp_path / "labels"), exclude_novel=False, device="cpu",
                              teacher_text=TextEmbeddingConfig(vocabulary=str(world), templates="short"),
                              data=RegionDataConfig(source=ImageSourceConfig(kind="toyworld", path=str(world),
                                                                             split="val"),
                                                    regions=RegionSourceConfig(kind="masks", path=source.path),
                                                    image_size=size))
    run_propose(cfg, progress=False)
    records = [r for r in json.loads((tmp_path / "labels" / "distributions.json").read_text())["regions"]
               if r["image"] == name]
    assert [r["region_id"] for r in records] == [r["id"] for r in rows]
    for rec, row in zip(records, rows):
        assert row["probs"].tolist() == pytest.approx(rec["probs"], abs=2e-6)
        assert [n for n, _ in row["labels"]] == [n for n, _ in rec["top"][:3]]
        assert (row["route"], row["passes"]) == (rec["route"], rec["passes"])
        assert row["mask"].shape == image.shape[:2]


def test_region_file_without_regions_for_the_image_says_so(world, tmp_path):
    names = [Path(e).name for e in world_examples(world, 2)]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": [{"id": i + 1, "file_name": n, "width": 96, "height": 96}
                                           for i, n in enumerate(names)],
                                "annotations": [{"id": 7, "image_id": 1, "bbox": [4, 4, 40, 30], "score": 0.9}]}))
    explorer = Explorer(AppConfig(world=str(world), image_size=96, regions=RegionSourceConfig("boxes", str(path))))
    source = explorer.region_choices()[f"boxes: {path.name}"]
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    regions, _ = explorer.regions(source, image, split=3, image_name=names[0])
    assert regions.boxes.tolist() == [[4, 4, 44, 34]]
    with pytest.raises(ValueError, match=rf"{path}.*names no region for image '{names[1]}'"):
        explorer.regions(source, image, split=3, image_name=names[1])
    with pytest.raises(ValueError, match=rf"{path}.*'elsewhere.jpg' is neither an example"):
        explorer.regions(source, image, split=3, image_name="elsewhere.jpg")


def test_page_handler_lays_out_region_labels_and_reports_bad_files(world, tmp_path):
    """The page's callback (no browser): the table has one row per region of the chosen source, and a region file
    without regions for the image reaches the page as a message naming the file."""
    gr = pytest.importorskip("gradio")
    from densevlm.app.ui import Handlers

    path = tmp_path / "empty.json"
    name = Path(world_examples(world, 1)[0]).name
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": name, "width": 96, "height": 96}],
                                "annotations": []}))
    explorer = Explorer(AppConfig(world=str(world), image_size=96, regions=RegionSourceConfig("masks", str(path))))
    handlers = Handlers(explorer, timeout=60)
    image = np.asarray(Image.open(world / "images" / "val" / name).convert("RGB"))
    classes = ", ".join(get_vocabulary(str(world)).names)
    overlay, table, status = handlers.propose(image, classes, "grid", 4, name)
    assert overlay.shape == image.shape and len(table) == 16 and status.startswith("grid 4 x 4: 16 regions")
    overlay, table, status = handlers.propose(image, classes, WORLD_MASKS, 4, name)
    assert len(table) == len(explorer.regions(explorer.region_choices()[WORLD_MASKS], image, split=4,
                                              image_name=name)[0])
    with pytest.raises(gr.Error, match=f"{path}.*names no region for image '{name}'"):
        handlers.propose(image, classes, f"masks: {path.name}", 4, name)
