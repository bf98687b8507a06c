"""Region-language alignment: grid boxes, the DenseVLM and CLIPSelf objectives, the train job, 2-process DDP."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from densevlm.config import ConfigError, from_dict, to_dict
from densevlm.config.align import AlignConfig
from densevlm.data.grid_boxes import grid_boxes, grid_choices
from densevlm.methods.densevlm import DenseVLMObjective
from densevlm.vocab import ClassEntry, Vocabulary

TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1}}


def test_grid_choices_match_the_reference():
    d = grid_choices(6, "densevlm")
    assert len(d) == 17 and d[0] == (2, 2) and d[-1] == (6, 6) and (3, 6) in d and (2, 5) not in d
    assert len(grid_choices(6, "clipself")) == 24 and (1, 1) in grid_choices(6, "clipself")
    cells = [r * c for r, c in d]
    assert min(cells) == 4 and max(cells) == 36 and abs(np.mean(cells) - 18.2) < 0.1


def test_grid_boxes_are_mapped_into_the_padded_canvas():
    # a 200x100 image resized-longest to a 64 canvas: scale 0.32, content occupies the top half
    boxes, valid, pixel = grid_boxes(200, 100, 0.32, 64, random.Random(0), [(2, 4)], max_boxes=36)
    assert valid.sum() == 8 and not valid[8:].any()
    b = boxes[valid]
    assert torch.allclose(b[:, 3].max(), torch.tensor(0.5)) and torch.allclose(b[:, 2].max(), torch.tensor(1.0))
    areas = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
    assert torch.allclose(areas, torch.tensor(0.5))  # the cells tile exactly the image's part of the canvas
    assert torch.allclose(pixel[valid][:, 2].max(), torch.tensor(200.0))


def _objective(n_thing=3, n_stuff=2, threshold=0.3) -> DenseVLMObjective:
    n = n_thing + n_stuff
    mask = torch.tensor([True] * n_thing + [False] * n_stuff)
    eye = torch.eye(n)  # distinct teacher and student tables (these tests hand in logits; see the own-text test)
    return DenseVLMObjective(torch.nn.Identity(), eye, eye.flip(0), mask, threshold=threshold)


def test_densevlm_loss_is_decoupled_by_the_vocabulary_flags():
    obj = _objective()
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g) * 3
    t[0, 1] += 20  # confident thing region (class 1)
    t[1, 3] += 20  # confident stuff region (class 3)
    t[2, 2] += 20  # confident thing region (class 2, the last thing: the reference's off-by-one called it stuff)
    t[3:] = 0  # uniform: max prob 0.2 < 0.3, dropped
    s = torch.randn(6, 5, generator=g)
    loss, m = obj.loss_from_logits(t, s)
    thing, stuff = [0, 2], [1]
    cols = slice(0, 3)
    kl_thing = F.kl_div(F.log_softmax(s[thing, cols], -1), F.softmax(t[thing, cols], -1), reduction="batchmean")
    kl_stuff = F.kl_div(F.log_softmax(s[stuff], -1), F.softmax(t[stuff], -1), reduction="batchmean")
    assert torch.allclose(loss, kl_thing + kl_stuff, atol=1e-6)
    assert m["thing_regions"] == 2 and m["stuff_regions"] == 1 and m["kept_fraction"] == pytest.approx(0.5)


def test_densevlm_empty_batch_gives_zero_loss_not_nan():
    obj = _objective()
    s = torch.randn(4, 5, requires_grad=True)
    loss, m = obj.loss_from_logits(torch.zeros(4, 5), s)
    assert loss.item() == 0.0 and m["empty_batch"] == 1.0
    loss.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) == 0
    loss, m = obj.loss_from_logits(torch.zeros(0, 5), torch.zeros(0, 5, requires_grad=True))
    assert loss.item() == 0.0 and not torch.isnan(loss)


def _write_world(tmp: Path, n_images: int = 8) -> dict[str, str]:
    """Random images and a 3-thing / 2-stuff vocabulary in our JSON format."""
    rng = np.random.default_rng(0)
    img_dir = tmp / "images"
    img_dir.mkdir(parents=True)
    for i in range(n_images):
        arr = rng.integers(0, 255, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i:03d}.png")
    classes = [ClassEntry("boat"), ClassEntry("car"), ClassEntry("kite", novel=True),
               ClassEntry("sky", isthing=False), ClassEntry("grass", isthing=False)]
    Vocabulary("tiny", tuple(classes)).to_json(tmp / "vocab.json")
    return {"images": str(img_dir), "vocab": str(tmp / "vocab.json")}


def _tiny_cfg(tmp: Path, paths: dict[str, str], method: str = "densevlm") -> dict:
    return {
        "output_dir": str(tmp / f"run_{method}"),
        "method": method,
        "student": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY},
        "teacher": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY} if method == "densevlm" else None,
        "student_text": {"vocabulary": paths["vocab"], "templates": "single"},
        "teacher_text": {"vocabulary": paths["vocab"], "templates": "single"},
        "exclude_novel": True,
        "densevlm": {"threshold": 0.0},  # random teachers are unconfident: keep every region
        "ensemble_alpha": 0.9,
        "data": {"source": {"kind": "folder", "path": paths["images"]}, "image_size": 64, "max_boxes": 8},
        "loop": {"epochs": 2, "batch_size": 2, "num_workers": 0, "cpu": True, "log_every": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
    }


@pytest.mark.parametrize("method", ["densevlm", "clipself"])
def test_train_job_runs_and_changes_only_unlocked_blocks(tmp_path, method):
    from safetensors.torch import load_file

    from densevlm.tasks.align import run_align
    from densevlm.models import create_backbone

    cfg = from_dict(AlignConfig, {**_tiny_cfg(tmp_path, _write_world(tmp_path), method), "unlocked_blocks": 1})
    result = run_align(cfg)
    assert result.global_step == 8
    saved = load_file(str(Path(cfg.output_dir) / "weights.safetensors"))
    torch.manual_seed(cfg.loop.seed)
    initial = create_backbone(cfg.student).state_dict_for_export()
    changed = {k for k in saved if not torch.equal(saved[k], initial[k])}
    assert changed and all(k.startswith("visual.transformer.resblocks.1.") for k in changed), sorted(changed)[:5]
    # the last block runs without q.k attention: the q and k rows of its fused projection get no gradient, so
    # they only shrink by weight decay (one scalar factor for all of them), while the v rows learn
    w_new = saved["visual.transformer.resblocks.1.attn.in_proj_weight"]
    w_old = initial["visual.transformer.resblocks.1.attn.in_proj_weight"]
    d = w_new.shape[1]
    ratio = w_new[: 2 * d] / w_old[: 2 * d]
    assert 0.99 < ratio.mean() < 1.0 and torch.allclose(ratio, ratio.mean().expand_as(ratio), atol=1e-4)
    v_ratio = w_new[2 * d:] / w_old[2 * d:]
    assert v_ratio.std() > 1e-3


def test_teacher_and_student_vocabularies_must_agree(tmp_path):
    from densevlm.tasks.align import run_align

    paths = _write_world(tmp_path)
    other = Vocabulary("other", (ClassEntry("car"), ClassEntry("boat"), ClassEntry("kite", novel=True),
                                 ClassEntry("sky", isthing=False), ClassEntry("grass", isthing=False)))
    other.to_json(tmp_path / "other.json")
    raw = _tiny_cfg(tmp_path, paths)
    raw["teacher_text"]["vocabulary"] = str(tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"teacher and student vocabularies differ at class 0"):
        run_align(from_dict(AlignConfig, raw))
    assert not (Path(raw["output_dir"]) / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path: Path, bypass_ddp: bool) -> list[dict]:
    raw = _tiny_cfg(tmp_path, _write_world(tmp_path))
    raw["loop"]["epochs"] = 1
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(worker), str(cfg_file), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "DENSEVLM_TEST_BYPASS_DDP": "1" if bypass_ddp else "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_process_training_keeps_ranks_identical(tmp_path):
    """2 CPU processes (gloo): after every step both ranks hold the same weights."""
    ranks = _run_two_processes(tmp_path, bypass_ddp=False)
    assert all(r["world"] == 2 for r in ranks)
    # 8 images, 2 per process -> 2 steps per epoch
    assert ranks[1]["steps"] == 2 and len(ranks[1]["diffs"]) == 2
    assert max(ranks[1]["diffs"]) == 0.0


def test_bypassing_ddp_as_the_reference_does_desynchronises_ranks(tmp_path):
    """The check above can fail: the reference's pattern (forward on model.module) leaves ranks apart."""
    ranks = _run_two_processes(tmp_path, bypass_ddp=True)
    assert ranks[1]["diffs"][0] > 0.0


def test_compiled_blocks_train_like_eager_ones(tmp_path):
    """loop.compile: the blocks go through torch.compile (inductor), the run ends where the eager one does, and
    the saved weights have the same keys."""
    from safetensors.torch import load_file

    from densevlm.tasks.align import run_align

    base = _tiny_cfg(tmp_path, _write_world(tmp_path, n_images=4))
    base["loop"] = {**base["loop"], "epochs": 1}
    # A large Adam eps keeps the update a smooth function of the gradient (eps=1e-8 turns a rounding-level gradient
    # into a full lr step of either sign), so fused kernels' rounding differences stay rounding-sized.
    base["optim"] = {**base["optim"], "eps": 1e-2}
    from torch._dynamo.utils import counters

    out, graphs = {}, {}
    for compiled in (False, True):
        cfg = from_dict(AlignConfig, {**base, "output_dir": str(tmp_path / f"run_{compiled}")})
        cfg.loop.compile = compiled
        before = counters["stats"]["unique_graphs"]
        result = run_align(cfg)
        graphs[compiled] = counters["stats"]["unique_graphs"] - before
        out[compiled] = (result.metrics["history"][0]["train"]["loss"],
                         load_file(str(Path(cfg.output_dir) / "weights.safetensors")))
    assert_compiled_run_matches_eager(out, graphs, base)


def assert_compiled_run_matches_eager(out: dict, graphs: dict, base: dict) -> None:
    """``out[compiled] = (first-epoch loss, saved weights)``, ``graphs[compiled]`` = new dynamo graphs: dynamo
    captured the blocks only when asked, the keys agree, the loss to 1e-3 relative, and the weights to 1e-2 of how
    far training moved them from ``base``'s initial student."""
    from densevlm.models import create_backbone

    (loss_e, eager), (loss_c, comp) = out[False], out[True]
    assert graphs[False] == 0 and graphs[True] > 0
    assert eager.keys() == comp.keys()
    assert abs(loss_e - loss_c) <= 1e-3 * max(1.0, abs(loss_e))
    torch.manual_seed(0)  # run_align's loop.seed, before it builds the student
    init = create_backbone(from_dict(AlignConfig, base).student).state_dict_for_export()
    moved = torch.cat([(eager[k].float() - init[k].float()).flatten() for k in eager]).norm()
    apart = torch.cat([(eager[k].float() - comp[k].float()).flatten() for k in eager]).norm()
    assert moved > 0 and apart / moved < 1e-2, (float(apart), float(moved))


# --------------------------------------------------------------------------- CLIPSelf: crops and loss, by hand

CELL_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _four_cell_image(tmp: Path) -> Path:
    """A 301 x 200 image whose 2 x 2 grid cells (the only DenseVLM choice with max_split 2) are solid colours.

    Cell edges by hand: x at 301 / 2 = 150.5 (PIL and the reference round it to 150), y at 100."""
    arr = np.zeros((200, 301, 3), dtype=np.uint8)
    arr[:100, :150], arr[:100, 150:], arr[100:, :150], arr[100:, 150:] = CELL_COLOURS
    (tmp / "images").mkdir()
    Image.fromarray(arr).save(tmp / "images" / "cells.png")
    return tmp / "images"


def test_clipself_crops_are_the_grid_cells_centred_as_the_reference_resizes_them(tmp_path):
    """Each crop is its own cell and nothing of a neighbour: the 150 x 100 (or 151 x 100) cell resized to 32 px wide,
    21 px high, centred on a black 32 x 32 square (open_clip's ResizeMaxSize: 5 rows above, 6 below), as CLIPSelf's
    crop transform makes it."""
    from densevlm.config.sources import ImageSourceConfig
    from densevlm.data.regions import GridRegionDataset
    from densevlm.data.sources import ImageSource

    folder = _four_cell_image(tmp_path)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # crops stay in [0, 1], colours are readable
    ds = GridRegionDataset(ImageSource(ImageSourceConfig(kind="folder", path=str(folder))), 64, max_split=2,
                           max_boxes=6, crop_size=32, mean=mean, std=std)
    item = ds[0]
    # the cells on the 64-px canvas, normalised: pixel / 301 (the canvas scale 64/301 over the canvas side 64)
    by_hand = {(0.0, 0.0, 150.5 / 301, 100 / 301): 0, (150.5 / 301, 0.0, 1.0, 100 / 301): 1,
               (0.0, 100 / 301, 150.5 / 301, 200 / 301): 2, (150.5 / 301, 100 / 301, 1.0, 200 / 301): 3}
    assert item["valid"].tolist() == [True] * 4 + [False] * 2
    assert (item["crops"][4:] == 0).all()
    seen = []
    for box, crop in zip(item["boxes"][:4], item["crops"][:4]):
        cell = [c for b, c in by_hand.items() if torch.allclose(box, torch.tensor(b), atol=1e-6)]
        assert len(cell) == 1, box
        seen.append(cell[0])
        expected = torch.zeros(3, 32, 32)
        expected[:, 5:26, :] = torch.tensor(CELL_COLOURS[cell[0]]).float().view(3, 1, 1) / 255
        assert (crop - expected).abs().max() < 1e-6, (cell[0], (crop - expected).abs().amax(dim=(0, 2)))
    assert sorted(seen) == [0, 1, 2, 3]


def test_clipself_loss_is_one_minus_cosine_to_the_teachers_crop_embeddings():
    """The objective against an independent computation: torchvision RoIAlign (1x1, aligned, boxes scaled to the
    token grid) on the student's dense map, open_clip's own ``encode_image`` of each valid box's crop on the teacher,
    mean of 1 - cos over the valid boxes only (padding boxes and their zero crops take no part)."""
    from torchvision.ops import roi_align

    from densevlm.config.model import ModelSpec
    from densevlm.engine.step_module import StepModule
    from densevlm.methods.clipself import CLIPSelfObjective
    from densevlm.models import create_backbone

    torch.manual_seed(0)
    student = create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY))
    torch.manual_seed(1)
    teacher = create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY))
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0], [0.1, 0.1, 0.2, 0.2]],
                          [[0.5, 0.0, 1.0, 0.75], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    size = teacher.native_image_size
    crops = torch.randn(2, 3, 3, size, size, generator=g)
    objective = CLIPSelfObjective(teacher)
    objective.prepare(torch.device("cpu"))
    out = objective(StepModule(student), {"image": images, "boxes": boxes, "valid": valid, "crops": crops})
    with torch.no_grad():
        dense = student.encode_dense(images)
        h, w = dense.shape[-2:]
        rois = [b[v] * torch.tensor([w, h, w, h]) for b, v in zip(boxes, valid)]
        region = roi_align(dense, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,
                           aligned=True).flatten(1)
        target = teacher.clip.encode_image(torch.stack([crops[0, 0], crops[0, 1], crops[1, 0]]))
    cos = F.cosine_similarity(region, target, dim=-1)
    assert cos.shape == (3,) and cos.std() > 1e-3
    torch.testing.assert_close(out.loss.detach(), (1 - cos).mean(), atol=1e-5, rtol=1e-5)
    assert out.metrics["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)


# --------------------------------------------------------------------------- DenseVLM: each side in its own text space


def _decoupled_kl_by_hand(t_logits, s_logits, thing_mask, labels):
    """KL(p_T || p_S) over the thing columns for regions whose teacher label is a thing, over all columns for the
    others, each averaged over its own group (METHOD_DENSEVLM.md §1.5); every region is confident here."""
    thing = thing_mask[labels]
    total = 0.0
    for rows, cols in ((thing, thing_mask), (~thing, torch.ones_like(thing_mask))):
        log_p = t_logits[rows][:, cols].log_softmax(-1)
        log_q = s_logits[rows][:, cols].log_softmax(-1)
        total = total + (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return total


def test_densevlm_scores_teacher_and_student_regions_each_against_its_own_text():
    """Distinct teacher and student text embeddings (the teacher's in another space, as an L/14 teacher's are): the
    loss is the decoupled KL between teacher features · TEACHER text and student features · STUDENT text, computed
    here by hand; the swapped assignment gives another loss, so a swap in the objective fails this test."""
    from torchvision.ops import roi_align

    from densevlm.config.model import ModelSpec
    from densevlm.engine.step_module import StepModule
    from densevlm.models import create_backbone

    torch.manual_seed(0)
    student = create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY))
    d = student.embed_dim
    g = torch.Generator().manual_seed(3)
    teacher_text = F.normalize(torch.randn(5, d, generator=g), dim=-1)
    student_text = F.normalize(torch.randn(5, d, generator=g), dim=-1)
    thing_mask = torch.tensor([True, True, True, False, False])
    labels = torch.tensor([0, 3, 2, 4])  # thing, stuff, thing (the last thing class), stuff
    # teacher region features near their class's TEACHER text: confident, with the arg-max labels above
    t_feats = teacher_text[labels] + 0.02 * torch.randn(4, d, generator=g)
    images = torch.randn(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
                          [[0.2, 0.1, 0.9, 0.6], [0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, True, False]])
    cached = torch.zeros(2, 3, d)
    cached[valid] = t_feats
    batch = {"image": images, "boxes": boxes, "valid": valid, "teacher_features": cached,
             "cached": torch.tensor([True, True])}
    objective = DenseVLMObjective(None, teacher_text, student_text, thing_mask)
    out = objective(StepModule(student), batch)

    with torch.no_grad():
        dense = student.encode_dense(images)
        h, w = dense.shape[-2:]
        rois = [b[v] * torch.tensor([w, h, w, h]) for b, v in zip(boxes, valid)]
        s_feats = roi_align(dense, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,
                            aligned=True).flatten(1)
    t_logits = F.normalize(t_feats, dim=-1) @ teacher_text.t() / 0.01
    s_logits = F.normalize(s_feats, dim=-1) @ student_text.t() / 0.01
    assert torch.equal(t_logits.argmax(-1), labels) and t_logits.softmax(-1).amax(-1).min() > 0.3
    expected = _decoupled_kl_by_hand(t_logits, s_logits, thing_mask, labels)
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-3, rtol=1e-5)
    assert out.metrics["thing_regions"] == 2 and out.metrics["stuff_regions"] == 2
    # what a swap of the two text tables would compute is far from it
    swapped = _decoupled_kl_by_hand(F.normalize(t_feats, dim=-1) @ student_text.t() / 0.01,
                                    F.normalize(s_feats, dim=-1) @ teacher_text.t() / 0.01, thing_mask, labels)
    assert abs(float(swapped) - float(expected)) > 1.0


def test_train_job_gives_the_objective_each_models_own_text_embeddings(tmp_path):
    """build_densevlm: the teacher's table comes from the teacher's text tower, the student's from the student's
    (two different random towers here), novel classes dropped from both in the same rows."""
    from densevlm.config.model import ModelSpec
    from densevlm.models import create_backbone
    from densevlm.tasks.align import METHODS
    from densevlm.vocab import text_embeddings_from_config

    paths = _write_world(tmp_path)
    torch.manual_seed(7)
    teacher = create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY))
    teacher.save_weights(tmp_path / "teacher.safetensors")
    raw = _tiny_cfg(tmp_path, paths)
    raw["teacher"]["pretrained"] = str(tmp_path / "teacher.safetensors")
    cfg = from_dict(AlignConfig, raw)
    torch.manual_seed(0)
    student = create_backbone(cfg.student)
    objective = METHODS["densevlm"](cfg, student).objective
    keep = [0, 1, 3, 4]  # 'kite' (class 2) is novel: excluded
    own_t = F.normalize(text_embeddings_from_config(teacher, cfg.teacher_text, progress=False)[1][keep], dim=-1)
    own_s = F.normalize(text_embeddings_from_config(student, cfg.student_text, progress=False)[1][keep], dim=-1)
    assert (own_t * own_s).sum(-1).max() < 0.9  # the two towers really embed differently
    torch.testing.assert_close(objective.teacher_text, own_t)
    torch.testing.assert_close(objective.student_text, own_s)
    assert objective.thing_mask.tolist() == [True, True, False, False]
