"""The model zoo: shipped weights match their manifest, corrupted files are refused, zoo names work everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from densevlm import zoo
from densevlm.cli import main
from densevlm.config import from_dict
from densevlm.config.model import ModelSpec
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.models import create_backbone
from densevlm.utils.hashing import sha256_file, sha256_state_dict
from densevlm.tasks.zoo_build import RECIPES
from densevlm.zoo.publish import publish
from densevlm.zoo.registry import WEIGHTS_DIR, ZooError

REPO = Path(__file__).resolve().parents[1]
TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32,
                                                                               "heads": 1}}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from densevlm.toyworld import generate_world

    root = tmp_path_factory.mktemp("zoo") / "world"
    generate_world(ToyWorldConfig(num_train=48, num_val=12, image_size=96, workers=0), root, progress=False)
    return root


def _run_dir(path: Path, seed: int, base: dict | None = None, visual_only: bool = False) -> Path:
    """A run directory with random fp32 weights of ToyCLIP-ViT-S-16 (optionally: only the vision tower differs)."""
    torch.manual_seed(seed)
    state = create_backbone(ModelSpec(name="ToyCLIP-ViT-S-16")).state_dict_for_export()
    if base is not None and visual_only:
        state = {k: (v if k.startswith("visual.") else base[k].float()) for k, v in state.items()}
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "weights.safetensors"))
    return path


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch) -> Path:
    """A zoo folder with a full entry and a vision-tower delta on top of it, selected through $DENSEVLM_ZOO."""
    zdir = tmp_path / "zoo"
    monkeypatch.setenv("DENSEVLM_ZOO", str(zdir))
    monkeypatch.setenv("DENSEVLM_CACHE", str(tmp_path / "cache"))
    publish(_run_dir(tmp_path / "a", 0), "mini", architecture="ToyCLIP-ViT-S-16", info={"steps": 3}, role="test")
    base = load_file(str(zdir / "mini.safetensors"))
    publish(_run_dir(tmp_path / "b", 1, base, visual_only=True), "mini-tuned", architecture="ToyCLIP-ViT-S-16",
            info={}, base="mini", only_prefix="visual.")
    return zdir


# ------------------------------------------------------------------------------------------- the shipped zoo
def test_shipped_manifest_files_match_their_sha256_and_size_budget():
    entries = zoo.list_models()
    assert {e.name for e in entries} == {r.name for r in RECIPES}
    total = 0
    for e in entries:
        path = WEIGHTS_DIR / e.file
        assert sha256_file(path) == e.sha256, e.name
        total += path.stat().st_size
        for key in ("recipe", "world", "steps", "wall_seconds", "metrics", "command", "hardware"):
            assert key in e.info, (e.name, key)
        assert (REPO / e.info["recipe"]).is_file() and (REPO / e.info["world"]).is_file()
        assert all(v.dtype == torch.float16 for v in load_file(str(path)).values() if v.is_floating_point())
    assert total <= 60e6
    # teacher-size is bigger than student-size, in the vision tower as L/14 is to B/16
    teacher = create_backbone("toy-teacher")
    student = create_backbone("toy-student")
    n_vis = lambda m: sum(p.numel() for p in m.clip.visual.parameters())  # noqa: E731
    assert n_vis(teacher) > 2 * n_vis(student)
    assert len(teacher.visual_blocks()) > len(student.visual_blocks())


def test_shipped_clipself_teacher_assembles_onto_the_base_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEVLM_CACHE", str(tmp_path))
    tuned = create_backbone("toy-teacher-clipself").state_dict_for_export()
    base = create_backbone("toy-teacher").state_dict_for_export()
    text_keys = [k for k in base if not k.startswith("visual.")]
    assert text_keys and all(torch.equal(tuned[k], base[k]) for k in text_keys)
    assert any(not torch.equal(tuned[k], base[k]) for k in base if k.startswith("visual."))


# ------------------------------------------------------------------------------------------- manifest checks
def test_zoo_entries_load_and_the_delta_equals_base_plus_vision_tower(tiny_zoo):
    assert [e.name for e in zoo.list_models()] == ["mini", "mini-tuned"]
    full = load_file(str(zoo.weights_path("mini-tuned")))
    base = load_file(str(tiny_zoo / "mini.safetensors"))
    delta = load_file(str(tiny_zoo / "mini-tuned.safetensors"))
    assert set(delta) == {k for k in base if k.startswith("visual.")}
    assert sha256_state_dict(full) == zoo.get_entry("mini-tuned").full_sha256
    model = create_backbone("mini-tuned")
    assert model.name == "ToyCLIP-ViT-S-16"
    sd = model.state_dict_for_export()
    assert torch.equal(sd["visual.conv1.weight"].half(), delta["visual.conv1.weight"])
    assert torch.equal(sd["token_embedding.weight"].half(), base["token_embedding.weight"])
    # a zoo name as `pretrained` works too, and must agree with `name`
    assert create_backbone(ModelSpec(pretrained="mini")).name == "ToyCLIP-ViT-S-16"
    with pytest.raises(Exception, match="zoo ToyCLIP-ViT-S-16"):
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained="mini"))


def test_corrupted_or_missing_weights_are_refused_naming_file_and_hashes(tiny_zoo):
    entry = zoo.get_entry("mini")
    path = tiny_zoo / entry.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ZooError) as err:
        create_backbone("mini")
    msg = str(err.value)
    assert str(path) in msg and entry.sha256 in msg and sha256_file(path) in msg and "corrupted" in msg
    path.unlink()
    with pytest.raises(ZooError, match=f"{path}.*missing.*{entry.sha256}"):
        zoo.weights_path("mini-tuned")  # the delta needs its base


def test_unknown_zoo_name_lists_the_available_ones(tiny_zoo, capsys):
    with pytest.raises(ZooError, match="unknown zoo model 'mni'; available: mini, mini-tuned"):
        zoo.get_entry("mni")
    assert main(["embed-text", "--model", "mini-tund", "--vocabulary", "voc_21", "--out", "/nonexistent/x"]) == 2
    assert "Did you mean ['mini-tuned'" in capsys.readouterr().err


def test_delta_that_changes_the_text_tower_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEVLM_ZOO", str(tmp_path / "zoo"))
    publish(_run_dir(tmp_path / "a", 0), "mini", architecture="ToyCLIP-ViT-S-16", info={})
    with pytest.raises(ZooError, match="changed .* tensors outside 'visual.'"):
        publish(_run_dir(tmp_path / "b", 1), "bad", architecture="ToyCLIP-ViT-S-16", info={}, base="mini",
                only_prefix="visual.")
    with pytest.raises(ZooError, match="already exists"):
        publish(_run_dir(tmp_path / "c", 2), "mini", architecture="ToyCLIP-ViT-S-16", info={})
    assert [e.name for e in zoo.list_models()] == ["mini"]


def test_malformed_manifest_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEVLM_ZOO", str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "models": {"x": {"file": "x.safetensors"}}}))
    with pytest.raises(ZooError, match=r"manifest.json: model 'x' lacks \['architecture', 'sha256'\]"):
        zoo.list_models()


# ------------------------------------------------------------------------------------------- zoo names in commands
def test_zoo_names_work_in_every_command_that_takes_a_model(tiny_zoo, world, tmp_path, capsys):
    out = tmp_path / "text.safetensors"
    assert main(["embed-text", "--model", "mini", "--vocabulary", str(world), "--templates", "single",
                 "--out", str(out)]) == 0
    assert load_file(str(out))["embeddings"].shape[0] == 28
    ev = ["eval", "regions", "--set", f"output_dir={tmp_path / 'ev'}", "model.name=mini-tuned",
          f"data.panoptic_json={world / 'annotations' / 'panoptic_val.json'}",
          f"data.image_root={world / 'images' / 'val'}", "data.image_size=96", "num_workers=0", "device=cpu"]
    assert main(ev) == 0
    regions = json.loads((tmp_path / "ev" / "regions.json").read_text())
    assert regions["model"]["name"] == "ToyCLIP-ViT-S-16"
    # train (student and teacher by zoo name) and pretrain (continue from a zoo model) build their models the
    # same way; the quick demo trains from zoo names end to end (tests/test_demo.py).
    from densevlm.config.align import AlignConfig
    from densevlm.tasks.align import METHODS

    cfg = from_dict(AlignConfig, {"student": {"name": "mini"}, "teacher": {"name": "mini-tuned"},
                                  "student_text": {"vocabulary": str(world), "templates": "single"},
                                  "teacher_text": {"vocabulary": str(world), "templates": "single"},
                                  "data": {"source": {"kind": "toyworld", "path": str(world)}}})
    student = create_backbone(cfg.student)
    parts = METHODS["densevlm"](cfg, student)  # a method's builder also makes its dataset: it needs the source
    teacher, info = parts.teacher_targets.teacher, parts.info
    assert teacher.weights_id != student.weights_id and teacher.source != student.source and info["classes"] == 28
    capsys.readouterr()
    assert main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "mini-tuned" in listing and "ToyCLIP-ViT-S-16" in listing


# ------------------------------------------------------------------------------------------- recipes
def test_zoo_pretraining_recipe_runs_a_few_steps_and_its_loss_falls(world, tmp_path):
    """configs/pretrain/zoo_student.yaml as shipped, on a tiny world with a small batch for a few epochs."""
    from densevlm.config import load_config
    from densevlm.config.pretrain import PretrainConfig
    from densevlm.tasks.pretrain import run_pretrain

    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "zoo_student.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.captions_json={world / 'annotations' / 'captions_train.json'}",
        f"data.image_root={world / 'images' / 'train'}", "eval.panoptic_json=", "loop.epochs=6",
        "loop.batch_size=16", "loop.num_workers=0", "loop.cpu=true", "optim.warmup_steps=2", "optim.lr=2e-3",
    ])
    assert cfg.model.name == "ToyCLIP-ViT-S-16" and cfg.data.image_size == 128 and cfg.optim.grad_clip == 1.0
    result = run_pretrain(cfg)
    losses = [h["train"]["loss"] for h in result.metrics["history"]]
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:2]), losses


def test_every_zoo_recipe_loads_and_names_its_architecture():
    from densevlm.config.recipes import recipe_class
    from densevlm.config import load_config

    for r in RECIPES:
        cfg = load_config(recipe_class(REPO / r.recipe), REPO / r.recipe)
        name = cfg.model.name if r.command == "pretrain" else cfg.student.name
        assert name == r.architecture, r.recipe
    world = load_config(recipe_class(REPO / "configs/toyworld/zoo.yaml"), REPO / "configs/toyworld/zoo.yaml")
    default = ToyWorldConfig()
    # the demo's world is a prefix of the zoo world: same statistics and seed, more images
    assert {**vars(world), "num_train": 0} == {**vars(default), "num_train": 0} and world.num_train > default.num_train


def test_zoo_build_and_publish_never_touch_the_shipped_zoo(tmp_path):
    """A tiny end-to-end `zoo build` (the recipes with test overrides) publishing into a folder of its own."""
    from densevlm.tasks.zoo_build import build_zoo

    shipped = {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()}
    tiny = ["loop.epochs=1", "loop.batch_size=16", "eval.max_images=8", f"model.model_overrides={json.dumps(TINY)}"]
    result = build_zoo(tmp_path / "build", workers=0, publish_dir=tmp_path / "zoo",
                       world_overrides=("num_train=32", "num_val=8", "image_size=64"),
                       stage_overrides={"toy-student": tiny, "toy-teacher": tiny,
                                        "toy-teacher-clipself": ["loop.max_steps=1", "loop.batch_size=4",
                                                                 "eval.data.max_images=4",
                                                                 f"student.model_overrides={json.dumps(TINY)}",
                                                                 "data.image_size=64"],
                                        "eval": ["data.max_images=4", "data.image_size=64",
                                                 f"model.model_overrides={json.dumps(TINY)}"]})
    assert {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()} == shipped
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert set(manifest["models"]) == set(result) == {r.name for r in RECIPES}
    for name, row in manifest["models"].items():
        assert "densevlm " in row["command"] and row["steps"] >= 1
        assert "regions.maskpool.stuff.macc1" in row["metrics"]
        assert {"rois.thing.macc1", "maskpool.stuff.macc1", "images"} <= set(row["quality_subset"])
    assert "zeroshot.thing.top1" in manifest["models"]["toy-student"]["metrics"]
    assert manifest["models"]["toy-teacher-clipself"]["base"] == "toy-teacher"


def test_learning_curves_tool_draws_the_shipped_curves(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "zoo_curves.py"), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    assert set(report["curves"]) == {"toy-student", "toy-teacher"}
    last = report["curves"]["toy-teacher"][-1]
    assert last["zeroshot.thing.top1"] == zoo.get_entry("toy-teacher").info["metrics"]["zeroshot.thing.top1"]
    assert out.stat().st_size > 10_000


@pytest.fixture(scope="module")
def subset_world(tmp_path_factory) -> Path:
    from densevlm.tasks.zoo_quality import subset_world

    return subset_world(tmp_path_factory.mktemp("zoo_subset") / "world", REPO / "configs/toyworld/zoo.yaml",
                        workers=2)


@pytest.mark.parametrize("name", ["toy-student", "toy-teacher-clipself"])
def test_shipped_quality_on_the_first_toy_val_images_matches_the_manifest(subset_world, tmp_path, name):
    """The shipped student and DenseVLM teacher, re-measured (reference region protocol, 192 px, first 100 toy-val
    images), stay within 2 points of what the manifest recorded for that subset: weights, loader, dense path and
    evaluator together still give the published model."""
    from densevlm.tasks.zoo_quality import SUBSET_IMAGES, SUBSET_KEYS, subset_quality

    recorded = zoo.get_entry(name).info["quality_subset"]
    assert recorded["images"] == SUBSET_IMAGES and recorded["image_size"] == 192
    got = subset_quality(name, subset_world, tmp_path / "eval", device="cpu")
    for key in SUBSET_KEYS:
        assert abs(got[key] - recorded[key]) <= 2.0, (name, key, got[key], recorded[key])
    assert len(json.loads((subset_world / "annotations/panoptic_val.json").read_text())["images"]) == SUBSET_IMAGES


def test_zoo_build_finds_its_recipes_outside_a_checkout_or_names_the_missing_one(tmp_path):
    """``zoo build`` runs library calls, not the CLI from the repository: recipes come from ``recipes_dir``
    when the package is installed without configs/, and a missing one is named."""
    from densevlm.config import ConfigError
    from densevlm.tasks.zoo_build import recipe_path

    assert recipe_path("configs/pretrain/zoo_student.yaml") == REPO / "configs/pretrain/zoo_student.yaml"
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "zoo_student.yaml").write_text("{}\n")
    assert recipe_path("configs/pretrain/zoo_student.yaml", tmp_path) == tmp_path / "pretrain" / "zoo_student.yaml"
    with pytest.raises(ConfigError, match=r"recipe configs/train/clipself_zoo_teacher\.yaml not found"):
        recipe_path("configs/train/clipself_zoo_teacher.yaml", tmp_path)
