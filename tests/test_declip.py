"""DeCLIP: the decoupled last block and the loss against the released code's golden outputs, each mode against an
einsum oracle, a 2-process step, export round trips of a DeCLIP-tuned model, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from open_clip.transformer import ResidualAttentionBlock
from safetensors.torch import load_file
from timm.models.eva import EvaBlock

from densevlm.config import ConfigError, from_dict
from densevlm.config.align import AlignConfig
from densevlm.config.model import ModelSpec
from densevlm.methods.declip import (
    check_grids,
    content_loss,
    context_loss,
    cosine_self_similarity,
    student_context_similarity,
)
from densevlm.models import create_backbone
from densevlm.models.decoupled import DECOUPLED_MODES

GOLDEN = Path(__file__).parent / "fixtures" / "declip" / "golden.safetensors"
TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1}}
TOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", model_overrides=TINY, dense_last_block="qq"))


@pytest.fixture(scope="module")
def eva():
    torch.manual_seed(0)
    return create_backbone(ModelSpec(name="EVA02-Ti-16-golden", dense_last_block="csa"))


def _block(golden, prefix: str, block: torch.nn.Module) -> torch.nn.Module:
    state = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
    block.double().load_state_dict(state, strict=True)
    return block.eval()


# ---------------------------------------------------------------------------------------- golden: the released code


def test_openclip_decoupled_block_matches_the_released_one(golden, toy):
    block = _block(golden, "oc.block.", ResidualAttentionBlock(32, 2, mlp_ratio=2.0, ls_init_value=0.5))
    x = golden["oc.x"]
    with torch.no_grad():
        for mode in ("qq", "kk", "csa"):  # the modes the released open_clip block implements
            out, q, k, _ = toy._block_decoupled(block, x, None, mode)
            assert (out - golden[f"oc.{mode}.out"]).abs().max() <= TOL, mode
        assert (q[:, :, 1:] - golden["oc.q"]).abs().max() <= TOL
        assert (k[:, :, 1:] - golden["oc.k"]).abs().max() <= TOL


def test_eva_decoupled_block_matches_the_released_one(golden, eva):
    block = _block(golden, "eva.block.", EvaBlock(32, 2, qkv_bias=True, qkv_fused=False, mlp_ratio=2.0,
                                                  swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True))
    x = golden["eva.x"]
    with torch.no_grad():
        for mode in DECOUPLED_MODES:
            out, q, k, v = eva._block_decoupled(block, x, None, mode)
            assert (out - golden[f"eva.{mode}.out"]).abs().max() <= TOL, mode
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert (t[:, :, 1:] - golden[f"eva.{name}"]).abs().max() <= TOL, name


@pytest.mark.parametrize("case", ["qq", "kk", "vv", "csa", "all"])
def test_loss_matches_the_released_one(golden, case):
    g = {k.split(".", 2)[2]: v for k, v in golden.items() if k.startswith(f"loss.{case}.")}
    mode = case.split("_")[0]
    student_grid, vfm_grid = (int(n) for n in g["grids"])
    content_w, context_w = (float(w) for w in g["weights"])
    vfm_tokens = g["vfm"].flatten(2).transpose(1, 2)  # (B, C, h, w) maps -> (B, N, C) tokens
    teacher = cosine_self_similarity(vfm_tokens)
    student = student_context_similarity(g["q"], g["k"], g["v"], mode, (student_grid,) * 2, (vfm_grid,) * 2)
    assert (teacher - g["teacher_sim"]).abs().max() <= TOL
    # the released csa / all keep (B * heads, M, M); ours (B, heads, M, M)
    assert (student.reshape(g["student_sim"].shape) - g["student_sim"]).abs().max() <= TOL
    assert abs(context_w * context_loss(student, teacher).item() - g["loss_context"].item()) <= TOL
    assert abs(content_w * content_loss(g["rois"], g["crops"]).item() - g["loss_content"].item()) <= TOL


def test_resized_context_is_a_true_resize_where_the_released_code_scrambles(golden):
    """Student grid 4x4, VFM grid 6x6 (the released recipes never resize: their proxy image gives equal grids).
    The released resize reads the (B, C, h', w') map back with ``transpose(-2, -1).view(B, h' * w', C)``, which
    mixes channels and positions; ours resizes each channel map. Both are checked against their own oracle."""
    g = {k.split(".", 2)[2]: v for k, v in golden.items() if k.startswith("loss.qq_resized.")}
    b, heads, n, d = g["q"].shape
    tokens = g["q"].permute(0, 2, 1, 3).reshape(b, n, heads * d)
    maps = F.interpolate(tokens.transpose(1, 2).reshape(b, -1, 4, 4), size=(6, 6), mode="bilinear",
                         align_corners=False)
    scrambled = maps.transpose(-2, -1).contiguous().view(b, 36, -1)
    resized = maps.flatten(2).transpose(1, 2)
    assert (cosine_self_similarity(scrambled) - g["student_sim"]).abs().max() <= TOL  # what was released
    ours = student_context_similarity(g["q"], g["k"], g["v"], "qq", (4, 4), (6, 6))
    assert (ours - cosine_self_similarity(resized)).abs().max() <= TOL
    assert (ours - g["student_sim"]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------- independent oracles


def _oracle_block(block: ResidualAttentionBlock, x: torch.Tensor, mode: str):
    """The open_clip decoupled block written out with einsum from the block's raw weights."""
    heads = block.attn.num_heads
    h = F.layer_norm(x, (x.shape[-1],), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    d = x.shape[-1]
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q, k, v = (torch.einsum("btc,oc->bto", h, w[i * d:(i + 1) * d]) + b[i * d:(i + 1) * d] for i in range(3))
    q, k, v = (t.reshape(*t.shape[:2], heads, -1) for t in (q, k, v))  # (B, T, heads, d)
    s = q.shape[-1] ** -0.5
    gram = {n: torch.einsum("bthd,bshd->bhts", t, t) * s for n, t in (("q", q), ("k", k), ("v", v))}
    attn = {"qq": gram["q"].softmax(-1), "kk": gram["k"].softmax(-1), "vv": gram["v"].softmax(-1),
            "csa": gram["q"].softmax(-1) + gram["k"].softmax(-1),
            "all": ((gram["q"] + gram["k"] + gram["v"]) / 3).softmax(-1)}[mode]
    out = torch.einsum("bhts,bshd->bthd", attn, v).flatten(2)
    out = torch.einsum("btc,oc->bto", out, block.attn.out_proj.weight) + block.attn.out_proj.bias
    return block.ls_1(out), q.transpose(1, 2)


@pytest.mark.parametrize("mode", DECOUPLED_MODES)
def test_each_mode_against_an_einsum_oracle(toy, mode):
    block = toy.visual_blocks()[-1]
    x = torch.randn(2, 1 + 12, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, q, _, _ = toy._block_decoupled(block, x, None, mode)
        want, want_q = _oracle_block(block, x, mode)
    assert (out - want).abs().max() <= TOL and (q - want_q).abs().max() <= TOL
    # the context similarity, written out: single modes concatenate the heads, csa / all average per-head maps
    gen = torch.Generator().manual_seed(2)
    qkv = {n: torch.randn(2, 2, 9, 4, generator=gen) for n in "qkv"}
    got = student_context_similarity(qkv["q"], qkv["k"], qkv["v"], mode, (3, 3), (3, 3))

    def cos(t: torch.Tensor, eq: str) -> torch.Tensor:
        u = t / t.norm(dim=-1, keepdim=True)
        return torch.einsum(eq, u, u)

    if mode in ("qq", "kk", "vv"):
        t = qkv[mode[0]].permute(0, 2, 1, 3).reshape(2, 9, 8)
        want_sim = cos(t, "bnc,bmc->bnm")
    else:
        names = "qk" if mode == "csa" else "qkv"
        want_sim = sum(cos(qkv[n], "bhnc,bhmc->bhnm") for n in names) / len(names)
    assert got.shape == want_sim.shape and (got - want_sim).abs().max() <= TOL


def test_dense_path_of_a_mode_is_the_decoupled_map(toy):
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = toy.encode_dense_decoupled(images, "qq")
        assert out.grid == (3, 4) and out.q.shape == (1, 2, 12, 32)
        assert torch.equal(toy.encode_dense(images), out.dense)  # dense_last_block "qq"
        assert (toy.encode_dense(images, last_block="value") - out.dense).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- bad inputs


def test_a_vfm_grid_that_cannot_be_matched_is_named_with_both_grids():
    with pytest.raises(ValueError, match=r"VFM 'dino' patch grid \(4, 8\) cannot be matched to the student "
                                         r"'stu' grid \(6, 6\)"):
        check_grids("stu", (6, 6), "dino", (4, 8), 14)
    with pytest.raises(ValueError, match=r"vfm_image_size 100 is not a multiple of its 14-px patch.*'stu' grid"):
        check_grids("stu", (6, 6), "dino", (7, 7), 14, 100)
    check_grids("stu", (6, 6), "dino", (9, 9), 14, 126)  # a different but matching grid is resized


def test_a_mode_a_non_vit_tower_cannot_decouple_names_the_model_and_modes():
    with pytest.raises(ValueError, match=r"model 'RN50': DeCLIP mode 'qq' .* ModifiedResNet; modes this model "
                                         r"supports: none .*'qq', 'kk', 'vv', 'csa', 'all'"):
        create_backbone(ModelSpec(name="RN50", dense_last_block="qq"))


def test_declip_recipe_must_tune_the_mode_it_evaluates():
    with pytest.raises(ConfigError, match=r"student.dense_last_block: .*declip.mode 'qq'"):
        from_dict(AlignConfig, {"method": "declip", "student": {"name": "toy-student"}})


def _tiny_declip(tmp_path: Path, **declip) -> dict:
    import numpy as np
    from PIL import Image

    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    vfm = {"family": "dinov2", "name": "vit_small_patch14_reg4_dinov2", "pretrained": "random",
           "timm_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}
    return {"output_dir": str(tmp_path / "run"), "method": "declip",
            "student": {"name": "ToyCLIP-ViT-T-16", "model_overrides": TINY, "dense_last_block": "qq"},
            "teacher": None, "ensemble_alpha": 0.7,
            "declip": {"mode": "qq", "vfm": vfm, **declip},
            "data": {"source": {"kind": "folder", "path": str(img_dir)}, "image_size": 64, "max_boxes": 4,
                     "crop_size": 32},
            "loop": {"epochs": 1, "batch_size": 2, "num_workers": 0, "cpu": True, "log_every": 1},
            "optim": {"lr": 1e-3, "warmup_steps": 1}}


def test_missing_vfm_weights_are_a_clear_error(tmp_path):
    from densevlm.tasks.align import run_align

    raw = _tiny_declip(tmp_path)
    raw["declip"]["vfm"]["pretrained"] = str(tmp_path / "dinov2_vits14_reg4.pth")
    with pytest.raises(FileNotFoundError, match=r"VFM weights not found: .*dinov2_vits14_reg4.pth"):
        run_align(from_dict(AlignConfig, raw))
    raw["declip"]["vfm"]["pretrained"] = None
    with pytest.raises(ConfigError, match=r"declip.vfm.pretrained: DeCLIP's VFM .* needs weights"):
        run_align(from_dict(AlignConfig, raw), overwrite=True)


# ---------------------------------------------------------------------------------------- training and exports


def test_declip_trains_moves_the_loss_terms_and_exports_round_trip(tmp_path):
    """A short DeCLIP run (random DINOv2 VFM at another patch size: the grids are matched through the proxy
    image); every export layout of the tuned model reloads with the same decoupled dense path."""
    from densevlm.models.export_check import verify_export
    from densevlm.models.layouts import export_model, writable_layouts
    from densevlm.tasks.align import run_align

    cfg = from_dict(AlignConfig, _tiny_declip(tmp_path))
    result = run_align(cfg)
    train = result.metrics["history"][0]["train"]
    assert result.global_step == 2 and train["loss_context"] > 0 and 0 < train["loss_content"] < 2
    tuned = create_backbone(ModelSpec(pretrained=cfg.output_dir))
    assert tuned.dense_last_block == "qq"  # a DeCLIP run directory brings its dense path
    layouts = writable_layouts(tuned)
    assert {"open_clip", "local-dir"} <= set(layouts)
    for layout in layouts:
        out = tmp_path / "exports" / (layout + ("" if layout == "local-dir" else ".pt"))
        export_model(tuned, layout, out)
        diffs = verify_export(tuned, layout, out)
        assert max(diffs.values()) <= 1e-6, (layout, diffs)


def test_declip_step_on_two_processes_keeps_ranks_in_sync(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    raw = _tiny_declip(tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(worker), str(cfg_file), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks) and ranks[1]["steps"] == 1
    assert max(ranks[1]["diffs"]) == 0.0
