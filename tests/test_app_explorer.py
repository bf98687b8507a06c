"""What the explorer's page shows, without a browser: typed classes, side-by-side panels, the teacher's grid labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densevlm.app.explorer import Explorer, parse_classes, side_by_side, split_panels
from densevlm.config.report import AppConfig
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


def test_teacher_grid_labels_tile_the_image_and_score_each_cell():
    teacher_patch = 12  # toy-teacher-clipself's patch side: 3 x 3 cells of 2 x 2 tokens on a 72-px image
    size = 3 * 2 * teacher_patch
    explorer = Explorer(AppConfig(grid=3, image_size=size, threshold=0.3))
    # A smooth image: the teacher is not sure of every cell, so the probabilities are not all 0 or 1.
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([xx * 3, yy * 3, 255 - xx - yy], axis=-1).clip(0, 255).astype(np.uint8)
    vocab = parse_classes("sky, grass, car, cat")
    rows = explorer.grid_labels(image, vocab, top_k=2)
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
