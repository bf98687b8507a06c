"""``densevlm compare`` on the quick profile, shrunk (2 seeds, 1 step per method, 4 val images): one table of the
four students (and Talk2DINO's segmentation column) whose cells are the per-seed evaluations' mean ± std."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from densevlm.cli.main import main

SHRINK = ["world.num_train=16", "world.num_val=8", "eval.max_images=4", "semseg.max_images=4",
          "clipself.loop.max_steps=1", "densevlm.loop.max_steps=1", "declip.loop.max_steps=1", "talk2dino.max_images=16", "talk2dino.loop.batch_size=16", "semseg.figures=0"]


def test_compare_quick_profile_writes_one_table_of_the_four_methods(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "-c", "configs/compare/quick.yaml", "--set", f"output_dir={out}", *SHRINK]) == 0
    summary = json.loads((out / "compare.json").read_text())
    regions = summary["tables"]["region classification (mean per-class accuracy, %)"]
    semseg = summary["tables"]["semantic segmentation (mIoU, %)"]
    assert len(regions) == 18  # the six reference keys, over all / seen / novel classes, top-1 and top-5
    assert set(semseg["mIoU"]) == {"base", "base-qq", "clipself", "densevlm", "declip", "talk2dino"}
    # every tuned cell is the mean and sample std of that seed's own evaluation file
    for m in ("clipself", "densevlm", "declip"):
        vals = [json.loads((out / "seeds" / f"seed_{k}" / "eval" / m / "regions.json").read_text())["metrics"]
                ["rois.thing.macc5"] for k in (0, 1)]
        cell = regions["rois.thing.macc5"][m]
        assert cell["values"] == vals
        assert np.isclose(cell["mean"], np.mean(vals)) and np.isclose(cell["std"], np.std(vals, ddof=1))
        assert Path(summary["config"]["output_dir"], "seeds", "seed_1", m).is_dir()
    base = json.loads((out / "semseg" / "base" / "semseg.json").read_text())["metrics"]["mIoU"]
    assert semseg["mIoU"]["base"]["mean"] == base and semseg["mIoU"]["base"]["std"] is None
    md = (out / "compare.md").read_text()
    assert "| mIoU.novel |" in md and "| key | base | base-qq | clipself | densevlm | declip | talk2dino |" in md
    assert (out / "figures" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["ordering"]["semantic segmentation (mIoU, %)"]["mIoU"][0] in semseg["mIoU"]
