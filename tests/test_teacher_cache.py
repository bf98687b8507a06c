"""The teacher-target cache: exact cell naming, round trip, equality with the online teacher, refusals, resume,
atomic shards, and bf16 training on the CPU."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densevlm.config import from_dict
from densevlm.config.align import AlignConfig
from densevlm.config.model import ModelSpec
from densevlm.data.grid_boxes import all_grid_cells, cell_offsets, grid_boxes, grid_boxes_with_cells, grid_choices
from densevlm.data.teacher_cache import TeacherCacheError
from densevlm.vocab import ClassEntry, Vocabulary

TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1}}


def test_every_drawn_box_is_named_by_its_cell_exactly():
    choices = grid_choices(6, "densevlm")
    assert cell_offsets(choices)[-1] == 309  # the 17 DenseVLM choices have 309 cells in all
    for seed in range(20):
        w, h = random.Random(seed).randint(40, 700), random.Random(seed + 99).randint(40, 700)
        scale, size = 512 / max(w, h), 512
        boxes, valid, pixel, cells = grid_boxes_with_cells(w, h, scale, size, random.Random(seed), choices, 36)
        everything = all_grid_cells(w, h, scale, size, choices)
        assert torch.equal(everything[cells[valid]], boxes[valid])  # bit-identical: the cache is exact
        assert (cells[~valid] == -1).all()
        # the reference draw (shuffle the cells themselves) is unchanged by naming them
        rng = random.Random(seed)
        rows, cols = choices[rng.randrange(len(choices))]
        ref = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
               for r in range(rows) for c in range(cols)]
        rng.shuffle(ref)
        ref_boxes = (torch.tensor(ref[:36]) * (scale / size)).clamp(0, 1)
        assert torch.equal(ref_boxes, boxes[valid])
        old = grid_boxes(w, h, scale, size, random.Random(seed), choices, 36)
        assert torch.equal(old[0], boxes) and torch.equal(old[1], valid)


def _world(tmp: Path, n_images: int = 8) -> dict:
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir(parents=True)
    for i in range(n_images):
        arr = rng.integers(0, 255, (40 + 8 * (i % 3), 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp / "images" / f"{i:03d}.png")
    Vocabulary("tiny", (ClassEntry("boat"), ClassEntry("car"), ClassEntry("sky", isthing=False))).to_json(
        tmp / "vocab.json")
    from densevlm.models import create_backbone

    torch.manual_seed(1)
    create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY)).save_weights(tmp / "teacher.safetensors")
    torch.manual_seed(2)
    create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY)).save_weights(tmp / "other.safetensors")
    return {
        "output_dir": str(tmp / "run"), "method": "densevlm",
        "student": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY},
        "teacher": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY, "pretrained": str(tmp / "teacher.safetensors")},
        "student_text": {"vocabulary": str(tmp / "vocab.json"), "templates": "single"},
        "teacher_text": {"vocabulary": str(tmp / "vocab.json"), "templates": "single"},
        "densevlm": {"threshold": 0.0}, "ensemble_alpha": None,
        "data": {"source": {"kind": "folder", "path": str(tmp / "images")}, "image_size": 64, "max_boxes": 8},
        "loop": {"epochs": 1, "batch_size": 4, "num_workers": 0, "cpu": True, "log_every": 1, "eval_every": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
    }


def _cfg(base: dict, **top) -> AlignConfig:
    d = {**base, **top}
    return from_dict(AlignConfig, d)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny folder world, a teacher weights file and its cache (built once for the module)."""
    from densevlm.tasks.teacher_cache import run_cache_teacher

    tmp = tmp_path_factory.mktemp("cache_world")
    base = _world(tmp)
    summary = run_cache_teacher(_cfg(base, teacher_cache=str(tmp / "cache")), progress=False)
    return {"tmp": tmp, "base": base, "cache": tmp / "cache", "summary": summary}


def _batch(cfg: AlignConfig, cache=None):
    from densevlm.data.regions import GridRegionDataset
    from densevlm.data.sources import ImageSource
    from densevlm.models import create_backbone

    student = create_backbone(cfg.student)
    ds = GridRegionDataset(ImageSource(cfg.data.source), 64, max_boxes=8, mean=student.image_mean,
                           std=student.image_std, teacher_cache=cache)
    return torch.utils.data.default_collate([ds[i] for i in range(len(ds))]), student


def test_cached_features_equal_the_online_teacher(world):
    from densevlm.tasks.teacher_cache import open_teacher_cache
    from densevlm.data.sources import ImageSource
    from densevlm.methods.densevlm import DenseVLMObjective
    from densevlm.methods.regions import per_image_boxes
    from densevlm.models import create_backbone

    s = world["summary"]
    assert s["images"] == 8 and s["cells_per_image"] == 309 and s["dtype"] == "fp16"
    cfg = _cfg(world["base"], teacher_cache=str(world["cache"]))
    cache = open_teacher_cache(cfg, ImageSource(cfg.data.source), create_backbone(cfg.student))
    batch, _ = _batch(cfg, cache)
    assert batch["cached"].all() and batch["teacher_features"].dtype == torch.float16
    teacher = create_backbone(cfg.teacher)
    boxes = per_image_boxes(batch["boxes"], batch["valid"])
    online = F.normalize(teacher.pool_boxes(teacher.encode_dense(batch["image"]), boxes), dim=-1)
    cached = batch["teacher_features"][batch["valid"]].float()
    assert cached.shape == online.shape and (cached - online).abs().max() <= 1e-3  # fp16 rounding of unit vectors
    # the loss of the same batch agrees; from the cache the objective needs no teacher at all
    g = torch.Generator().manual_seed(0)
    text, student_text = (F.normalize(torch.randn(3, teacher.embed_dim, generator=g), dim=-1) for _ in range(2))
    thing = torch.tensor([True, True, False])
    with_teacher = DenseVLMObjective(teacher, text, student_text, thing, threshold=0.0)
    without = DenseVLMObjective(None, text, student_text, thing, threshold=0.0)
    s_logits = torch.randn(len(online), 3, generator=torch.Generator().manual_seed(1))
    online_batch = {k: v for k, v in batch.items() if k not in ("teacher_features", "cached")}
    t_online = with_teacher.batch_teacher_targets(online_batch, boxes)
    t_cached = without.batch_teacher_targets(batch, boxes)
    assert t_cached.online_images == 0 and t_online.online_images == len(batch["image"])
    l_online, _ = with_teacher.loss_from_logits(t_online.logits(text, with_teacher.temperature), s_logits)
    l_cached, _ = without.loss_from_logits(t_cached.logits(text, without.temperature), s_logits)
    assert torch.allclose(l_online, l_cached, rtol=2e-2, atol=1e-3)


def test_training_from_the_cache_gives_the_online_weights_without_building_the_teacher(world, monkeypatch):
    from safetensors.torch import load_file

    import densevlm.tasks.densevlm as align  # where the teacher is built
    import densevlm.tasks.teacher_cache as engine_cache
    from densevlm.tasks.align import run_align

    tmp, base = world["tmp"], world["base"]
    # Adam's eps=1e-8 turns even a gradient of 1e-9 into a full lr step, so a rounding-level difference could flip
    # it; a large eps keeps the update a smooth function of the gradient, which is what is compared here.
    base = {**base, "optim": {**base["optim"], "eps": 1e-2}}
    run_align(_cfg(base, output_dir=str(tmp / "online")), overwrite=True)
    built = []
    real = align.create_backbone

    def spy(spec, **kw):
        built.append(spec.pretrained)
        return real(spec, **kw)

    monkeypatch.setattr(align, "create_backbone", spy)
    monkeypatch.setattr(engine_cache, "create_backbone", spy)
    result = run_align(_cfg(base, output_dir=str(tmp / "cached"), teacher_cache=str(world["cache"])), overwrite=True)
    assert base["teacher"]["pretrained"] not in built  # the teacher is never even loaded
    assert result.metrics["history"][0]["train"]["teacher_online_images"] == 0.0
    from densevlm.models import create_backbone

    torch.manual_seed(0)  # run_align's loop.seed, before it builds the student
    init = create_backbone(_cfg(base).student).state_dict_for_export()
    a, b = load_file(str(tmp / "online" / "weights.safetensors")), load_file(str(tmp / "cached" / "weights.safetensors"))
    moved = torch.cat([(a[k].float() - init[k].float()).flatten() for k in a]).norm()
    apart = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a]).norm()
    assert moved > 0 and apart / moved < 1e-2, (float(apart), float(moved))


def test_cache_built_for_other_settings_is_refused(world):
    from densevlm.tasks.align import run_align

    base, cache = world["base"], str(world["cache"])
    other_teacher = {**base["teacher"], "pretrained": str(world["tmp"] / "other.safetensors")}
    cases = [({"teacher": other_teacher}, "teacher_weights"),
             ({"data": {**base["data"], "image_size": 96}}, "image_size"),
             ({"data": {**base["data"], "max_split": 5}}, "grid_choices")]
    for change, key in cases:
        with pytest.raises(TeacherCacheError, match=key) as err:
            run_align(_cfg(base, output_dir=str(world["tmp"] / "refused"), teacher_cache=cache, **change),
                      overwrite=True)
        assert "cache-teacher" in str(err.value)


def test_missing_images_are_an_error_or_counted_online(world):
    from densevlm.tasks.align import run_align

    tmp = world["tmp"]
    extra = tmp / "images2"
    extra.mkdir()
    for p in sorted((tmp / "images").glob("*.png")):
        (extra / p.name).write_bytes(p.read_bytes())
    Image.fromarray(np.full((50, 64, 3), 7, np.uint8)).save(extra / "zz_new.png")
    data = {**world["base"]["data"], "source": {"kind": "folder", "path": str(extra)}}
    cfg = _cfg(world["base"], output_dir=str(tmp / "missing"), teacher_cache=str(world["cache"]), data=data)
    with pytest.raises(TeacherCacheError, match=r"1 of 9 image\(s\).*zz_new\.png.*teacher_cache_missing=online"):
        run_align(cfg, overwrite=True)
    cfg.teacher_cache_missing = "online"
    cfg.loop.batch_size = 9
    result = run_align(cfg, overwrite=True)
    assert result.metrics["history"][0]["train"]["teacher_online_images"] == 1.0


def test_build_resumes_shard_by_shard_and_a_failed_write_leaves_no_shard(tmp_path, monkeypatch):
    import safetensors.torch

    from densevlm.data.sources import ImageSource
    from densevlm.data.teacher_cache import build_teacher_cache, cache_metadata
    from densevlm.models import create_backbone

    base = _world(tmp_path)
    cfg = _cfg(base)
    teacher = create_backbone(cfg.teacher)
    meta = cache_metadata(teacher_name=teacher.name, teacher_weights=teacher.weights_id, dense_last_block="value",
                          image_size=64, grid_style="densevlm", max_split=6, mean=teacher.image_mean,
                          std=teacher.image_std)
    source, out = ImageSource(cfg.data.source), tmp_path / "c"
    first = build_teacher_cache(teacher, source, out, meta, shard_size=3, progress=False)
    assert first["shards"] == 3 and first["shards_written_here"] == 3
    assert first["bytes_per_image"] >= 309 * teacher.embed_dim * 2  # fp16 features of every cell
    (out / "shard-00001.safetensors").unlink()
    again = build_teacher_cache(teacher, source, out, meta, shard_size=3, progress=False)
    assert again["shards_written_here"] == 1 and again["shards_kept_here"] == 2

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # half a shard, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(OSError, match="shard-00002.safetensors"):
        build_teacher_cache(teacher, source, out, meta, shard_size=3, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cache.json", "shard-00000.safetensors", "shard-00001.safetensors"]  # no partial shard
    with pytest.raises(TeacherCacheError, match="shard_size 3"):
        build_teacher_cache(teacher, source, out, meta, shard_size=4, progress=False)


def test_bf16_training_runs_on_the_cpu_under_autocast(world, monkeypatch):
    import densevlm.methods.densevlm as method
    from densevlm.tasks.align import run_align

    seen = []
    real = method.student_region_features

    def spy(model, images, boxes):
        out = real(model, images, boxes)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(method, "student_region_features", spy)
    cfg = _cfg(world["base"], output_dir=str(world["tmp"] / "bf16"), teacher_cache=str(world["cache"]))
    cfg.loop.precision = "bf16"
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process: start this run's state fresh and leave none behind
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = run_align(cfg, overwrite=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and all(d == torch.bfloat16 for d in seen)
    loss = result.metrics["history"][0]["train"]["loss"]
    assert np.isfinite(loss) and loss > 0


def test_lazy_fill_mode_fills_the_cache_in_the_first_epoch_and_reads_it_after(world, monkeypatch):
    """teacher_cache_missing=fill from an empty folder: epoch 1 runs the teacher and writes every cell of every
    image; epoch 2 and a later run read the cache; the filled features equal those `cache-teacher` builds."""
    import densevlm.tasks.densevlm as align  # where the teacher is built
    from densevlm.data.sources import ImageSource
    from densevlm.tasks.align import run_align
    from densevlm.tasks.teacher_cache import open_teacher_cache
    from densevlm.models import create_backbone

    tmp, base = world["tmp"], world["base"]
    lazy = tmp / "lazy_cache"
    cfg = _cfg(base, output_dir=str(tmp / "lazy"), teacher_cache=str(lazy), teacher_cache_missing="fill")
    cfg.loop.epochs = 2
    result = run_align(cfg, overwrite=True)
    online = [h["train"]["teacher_online_images"] for h in result.metrics["history"]]
    assert online[0] > 0 and online[1] == 0.0, online  # batches of 4: epoch 1 all online, epoch 2 none
    assert sorted(p.name.split("-")[0] for p in lazy.glob("*.safetensors")) == ["fill"] * len(list(lazy.glob("*.safetensors")))

    student = create_backbone(cfg.student)
    source = ImageSource(cfg.data.source)
    cfg_built = _cfg(base, teacher_cache=str(world["cache"]))
    filled = open_teacher_cache(cfg, source, student)
    built = open_teacher_cache(cfg_built, source, student)
    assert filled.missing == 0
    every_cell = torch.arange(309)
    for i in range(len(source)):
        a, _ = filled.lookup(i, every_cell)
        b, _ = built.lookup(i, every_cell)
        assert (a.float() - b.float()).abs().max() <= 1e-3

    # A later run on the filled cache needs no teacher, even with the default teacher_cache_missing=error.
    built_specs = []
    real = align.create_backbone
    monkeypatch.setattr(align, "create_backbone", lambda spec, **kw: (built_specs.append(spec.pretrained),
                                                                      real(spec, **kw))[1])
    again = run_align(_cfg(base, output_dir=str(tmp / "lazy2"), teacher_cache=str(lazy)), overwrite=True)
    assert base["teacher"]["pretrained"] not in built_specs
    assert again.metrics["history"][0]["train"]["teacher_online_images"] == 0.0
