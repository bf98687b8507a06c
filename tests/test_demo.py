"""`densevlm demo` on the quick profile: every stage runs from the zoo, writes its outputs, and a re-run reuses them."""

from __future__ import annotations

import json
from pathlib import Path

from densevlm.cli import main

REPO = Path(__file__).resolve().parents[1]
KEYS = ["rois.thing.macc1", "rois.thing.macc5", "maskpool.thing.macc1", "maskpool.thing.macc5",
        "maskpool.stuff.macc1", "maskpool.stuff.macc5"]


def test_quick_demo_end_to_end_and_rerun_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--config", str(REPO / "configs" / "demo" / "quick.yaml"), "--set", f"output_dir={out}"]
    assert main(args) == 0
    first = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["regions"]) == {"base", "clipself", "densevlm", "teacher"}
    # the demo starts from the shipped zoo: base student and teacher are zoo models
    assert summary["models"]["base"]["spec"]["name"] == "toy-student"
    assert summary["models"]["teacher"]["spec"]["name"] == "toy-teacher-clipself"
    for metrics in summary["regions"].values():
        for key in KEYS:
            assert 0.0 <= metrics[key] <= 100.0
            assert metrics[key.replace("thing.", "thing.novel.").replace("stuff.", "stuff.novel.")] is not None
        # top-5 is never below top-1
        assert metrics["maskpool.stuff.macc5"] >= metrics["maskpool.stuff.macc1"]
    assert set(summary["semseg"]) == set(summary["regions"])
    for metrics in summary["semseg"].values():
        assert 0.0 <= metrics["mIoU.novel"] <= 100.0 and 0.0 <= metrics["mIoU.seen"] <= 100.0
        assert 0.0 < metrics["mIoU"] <= metrics["fwIoU"] + 100.0
    for name in summary["semseg"]:
        assert (out / "semseg" / name / "semseg.json").is_file()
    for fig in ("toyworld_val.png", "foreground_bias.png", "probability_maps.png"):
        assert (out / "figures" / fig).stat().st_size > 10_000, fig
    assert "region classification on toy val" in first and "densevlm" in first
    weights = (out / "densevlm" / "weights.safetensors").stat().st_mtime_ns

    assert main(args) == 0
    second = capsys.readouterr().out
    assert "student: zoo model 'toy-student'" in second
    for stage in ("toy world: reusing", "CLIPSelf (student): reusing",
                  "DenseVLM (student): reusing"):
        assert stage in second, stage
    assert (out / "densevlm" / "weights.safetensors").stat().st_mtime_ns == weights
    again = json.loads((out / "summary.json").read_text())
    assert again["regions"] == summary["regions"] and again["semseg"] == summary["semseg"]


def test_quick_demo_from_scratch_rebuilds_the_zoo_without_touching_the_shipped_one(tmp_path, capsys):
    from densevlm.zoo.registry import WEIGHTS_DIR

    shipped = {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()}
    out = tmp_path / "demo"
    args = ["demo", "--from-scratch", "--config", str(REPO / "configs" / "demo" / "quick.yaml"),
            "--set", f"output_dir={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "running the zoo recipes" in printed and "about 30 hours" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["base"]["spec"]["pretrained"] == str(out.resolve() / "zoo_from_scratch" / "toy-student")
    assert summary["models"]["teacher"]["spec"]["name"] == "ToyCLIP-ViT-B-12"
    assert {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()} == shipped
