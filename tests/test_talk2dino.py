"""Talk2DINO: ψ and its released layout, attention extraction, best-head InfoNCE, the feature cache, training, the
segmenter and its place in ``eval semseg``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densevlm.config import from_dict
from densevlm.config.semseg import SemSegEvalConfig, toyworld_data
from densevlm.config.talk2dino import Talk2DINOTrainConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.data import feature_cache as fc
from densevlm.methods.talk2dino import (
    Talk2DINOObjective,
    Talk2DINOProjection,
    read_projection,
    select_best_heads,
    symmetric_infonce,
)
from densevlm.models.patch_attention import (
    DenseCLIPPatchBackbone,
    PatchFeatures,
    attention_pool,
    create_dinov2,
    load_dinov2_weights,
)
from densevlm.segmenters import add_background
from densevlm.segmenters.talk2dino import Talk2DINOSegmenter, background_clean

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # see fixtures/README.md
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4}  # a DINOv2-with-registers ViT small enough for a CPU test
TINY_TEXT = {"name": "ToyCLIP-ViT-T-16", "pretrained": None,
             "model_overrides": {"vision_cfg": {"layers": 1, "width": 32, "head_width": 16},
                                 "text_cfg": {"layers": 1, "width": 32, "heads": 1}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from densevlm.toyworld import generate_world

    root = tmp_path_factory.mktemp("t2d") / "world"
    generate_world(ToyWorldConfig(num_train=24, num_val=6, image_size=64, workers=0), root, progress=False)
    return root


def _train_cfg(world: Path, out: Path, **over) -> Talk2DINOTrainConfig:
    cfg = {
        "output_dir": str(out / "run"),
        "vision": {"family": "dinov2", "name": "dinov2_vitb14_reg", "timm_kwargs": SMALL},
        "text": TINY_TEXT,
        "data": {"captions_json": str(world / "annotations" / "captions_train.json"),
                 "image_root": str(world / "images" / "train"), "image_size": 56},
        "cache": {"dir": str(out / "cache"), "batch_size": 8, "shard_size": 10, "num_workers": 0,
                  "device": "cpu", "dtype": "float32"},
        "loop": {"epochs": 8, "batch_size": 24, "cpu": True, "log_every": 5, "checkpoint_every": 8},
        "optim": {"lr": 3e-3},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return from_dict(Talk2DINOTrainConfig, cfg)


# ------------------------------------------------------------------------------------------------ ψ


def test_psi_parameter_counts_of_the_released_sizes():
    assert sum(p.numel() for p in Talk2DINOProjection(512, 768).parameters()) == 984_576
    assert sum(p.numel() for p in Talk2DINOProjection(512, 1024).parameters()) == 1_574_912


@pytest.mark.parametrize("legacy", [False, True])
def test_released_psi_state_dict_loads(tmp_path, legacy):
    g = torch.Generator().manual_seed(0)
    w1, b1, w2, b2 = (torch.randn(48, 16, generator=g), torch.randn(48, generator=g),
                      torch.randn(48, 48, generator=g), torch.randn(48, generator=g))
    second = "linear_layer2" if legacy else "hidden_layers.0"
    path = tmp_path / "vitb_mlp_infonce.pth"
    torch.save({"linear_layer.weight": w1, "linear_layer.bias": b1, f"{second}.weight": w2, f"{second}.bias": b2},
               path)
    psi = read_projection(path)
    assert (psi.in_dim, psi.out_dim) == (16, 48)
    x = torch.randn(5, 16, generator=g)
    expected = torch.tanh(x @ w1.T + b1) @ w2.T + b2  # Linear -> tanh -> Linear, no output activation
    torch.testing.assert_close(psi(x), expected)
    assert set(psi.state_dict()) == {"linear_layer.weight", "linear_layer.bias", "hidden_layers.0.weight",
                                     "hidden_layers.0.bias"}


def test_reference_psi_checkpoint_reproduces_the_reference_outputs():
    """ψ saved by Talk2DINO's own code (tools/fixtures/make_talk2dino_psi_fixture.py) gives its outputs."""
    from safetensors.torch import load_file

    golden = load_file(str(FIXTURES / "talk2dino_psi_tiny_golden.safetensors"))
    psi = read_projection(FIXTURES / "talk2dino_psi_tiny.pth")
    assert (psi.in_dim, psi.out_dim) == (24, 40)
    with torch.no_grad():
        projected = psi(golden["text"])
    for ours, key in ((projected, "projected"), (F.normalize(projected, dim=-1), "projected_unit")):
        diff = (ours - golden[key]).abs().max().item()
        assert diff <= 1e-5, f"{key}: max abs diff {diff:.2e} from the reference ProjectionLayer"


def test_psi_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "not_psi.pth"
    torch.save({"proj.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match=r"not_psi\.pth.*linear_layer\.weight"):
        read_projection(path)


# ------------------------------------------------------------------------------------------------ attention


def _manual_last_block(model, x: torch.Tensor):
    """Tokens entering the last block, and its softmax(q·kᵀ/√d) computed by hand (CLS and register rows kept)."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:-1]:
        t = block(t)
    last = model.blocks[-1]
    q, k, _ = (last.norm1(t) @ last.attn.qkv.weight.T + last.attn.qkv.bias).chunk(3, dim=-1)
    b, n, d = q.shape
    heads = last.attn.num_heads
    q = q.view(b, n, heads, d // heads).transpose(1, 2)
    k = k.view(b, n, heads, d // heads).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)


def test_dinov2_attention_equals_manual_softmax_and_tokens_are_final_norm():
    torch.manual_seed(0)
    bb = create_dinov2("dinov2_vitb14_reg", None, timm_kwargs=SMALL)
    bb.model.blocks[-1].attn.fused_attn = True  # SDPA never forms the matrix; the logits come from qkv
    x = torch.randn(2, 3, 56, 42)
    feats = bb(x)
    assert feats.grid == (4, 3) and feats.tokens.shape == (2, 12, 64) and feats.attn.shape == (2, 4, 12)
    probs = _manual_last_block(bb.model, x)  # (B, H, 17, 17): CLS, 4 registers, 12 patches
    # The CLS row restricted to the patches, renormalised, is the softmax of our logits.
    row = probs[:, :, 0, 5:]
    torch.testing.assert_close(feats.attn.softmax(-1), row / row.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feats.tokens, bb.model.forward_features(x)[:, 5:])


def test_clip_tower_attention_equals_multihead_attention_weights():
    from densevlm.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(from_dict_spec(TINY_TEXT))
    bb = DenseCLIPPatchBackbone(model, last_block="standard")
    x = torch.randn(2, 3, 48, 64)
    feats = bb(x)
    # The tower's own nn.MultiheadAttention weights on the last block's input.
    t, grid, ctx = model._embed(model._prepare(x))
    for block in model.visual_blocks()[:-1]:
        t = model._block(block, t, ctx)
    last = model.visual_blocks()[-1]
    h = last.ln_1(t)
    _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=False)
    row = weights[:, :, 0, 1:]
    torch.testing.assert_close(feats.attn.softmax(-1), row / row.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert feats.grid == grid and feats.tokens.shape == (2, 12, model.width)
    value = DenseCLIPPatchBackbone(model, last_block="value")(x)
    torch.testing.assert_close(value.attn, feats.attn)  # same attention; other tokens
    assert not torch.allclose(value.tokens, feats.tokens)


def test_eva_tower_attention_equals_its_own_attention_probabilities():
    """EVA02 (RoPE on the patch tokens): the logits match the probabilities timm's own non-fused path computes."""
    from densevlm.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("EVA02-Ti-16-golden")
    feats = DenseCLIPPatchBackbone(model)(x := torch.randn(1, 3, 48, 32))
    last = model.visual_blocks()[-1].attn
    last.fused_attn = False
    seen = []
    handle = last.attn_drop.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    model.encode_dense(x, last_block="standard")
    handle.remove()
    row = seen[0][:, :, 0, 1:]
    torch.testing.assert_close(feats.attn.softmax(-1), row / row.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def from_dict_spec(d):
    from densevlm.config.model import ModelSpec

    return from_dict(ModelSpec, d)


def test_attention_pool_weights_tokens_per_head():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    attn = torch.tensor([[[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # head 0 looks at patch 0, head 1 everywhere
    heads, avg = attention_pool(PatchFeatures(tokens, attn, (1, 3)))
    torch.testing.assert_close(heads[0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(heads[0, 1], tokens[0].mean(0))
    torch.testing.assert_close(avg[0], (attn.mean(1).softmax(-1) @ tokens[0])[0])


# ------------------------------------------------------------------------------------------------ DINOv2 files


# The original layout, written by facebookresearch/dinov2's own code (tools/fixtures/make_dinov2_fixture.py): a
# tiny vit_base with 4 registers, and Meta's outputs at its native size and at two others (the position embedding
# resized by dinov2's own interpolation).
DINOV2_FILE = FIXTURES / "dinov2_vitb14_reg4_tiny.pth"
DINOV2_FILE_ARCH = {"embed_dim": 128, "depth": 2, "num_heads": 2}  # its 7x7 grid (98 px) is read off the file


@pytest.fixture(scope="module")
def meta_dinov2():
    from safetensors.torch import load_file

    backbone = create_dinov2("dinov2_vitb14_reg", str(DINOV2_FILE), timm_kwargs=DINOV2_FILE_ARCH)
    return backbone, load_file(str(FIXTURES / "dinov2_vitb14_reg4_tiny_golden.safetensors"))


@pytest.mark.parametrize("size", ["98x98", "112x70", "56x56"])
def test_original_dinov2_file_reproduces_metas_outputs(meta_dinov2, size):
    """Final-norm patch tokens, CLS, registers and the last block's CLS attention equal Meta's, at <= 1e-5."""
    backbone, golden = meta_dinov2
    image = golden[f"image_{size}"]
    with torch.no_grad():
        feats = backbone(image)
        sequence = backbone.model.forward_features(image)  # [CLS, 4 registers, patches] after the final norm
    h, w = (int(v) for v in size.split("x"))
    assert feats.grid == (h // 14, w // 14)
    for key, ours in (("patch_tokens", feats.tokens), ("attn_logits", feats.attn), ("cls", sequence[:, 0]),
                      ("registers", sequence[:, 1:5])):
        ref = golden[f"{key}_{size}"]
        assert ours.shape == ref.shape, f"{key}: {tuple(ours.shape)} vs Meta's {tuple(ref.shape)}"
        diff = (ours.float() - ref).abs().max().item()
        assert diff <= 1e-5, f"{key} at {size}: max abs diff {diff:.2e} from Meta's output"
    # Meta's full last-block attention: its CLS row over the patches, renormalised, is the softmax of our logits.
    row = golden[f"attn_probs_{size}"][:, :, 0, 5:]
    torch.testing.assert_close(feats.attn.softmax(-1), row / row.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert backbone.source == str(DINOV2_FILE) and len(backbone.weights_id) == 16


def test_dinov2_checkpoint_of_the_wrong_size_names_file_and_shapes():
    import timm

    narrow = timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, dynamic_img_size=True,
                               **{**DINOV2_FILE_ARCH, "embed_dim": 64})
    with pytest.raises(ValueError, match=r"dinov2_vitb14_reg4_tiny\.pth.*\[1, 1, 128\].*\[1, 1, 64\]"):
        load_dinov2_weights(narrow, DINOV2_FILE, "vit_base_patch14_reg4_dinov2")
    shallow = timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, dynamic_img_size=True,
                                **{**DINOV2_FILE_ARCH, "depth": 1})
    with pytest.raises(ValueError, match=r"depth 1.*2 blocks.*unexpected key"):
        load_dinov2_weights(shallow, DINOV2_FILE, "vit_base_patch14_reg4_dinov2")


# ------------------------------------------------------------------------------------------------ objective


def test_best_head_selection_and_loss_on_hand_made_tensors():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    heads = torch.tensor([[[0.0, 1.0], [0.6, 0.8]],    # image 0: head 1 is closer to caption 0
                          [[0.0, 1.0], [1.0, 0.0]]])   # image 1: head 0 is caption 1 exactly
    chosen, index = select_best_heads(text, heads)
    assert index.tolist() == [1, 0]
    torch.testing.assert_close(chosen, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    tau = 0.07
    loss, logits = symmetric_infonce(text, chosen, tau)
    s = torch.tensor([[0.6, 0.0], [0.8, 1.0]])  # S = T Vᵀ
    torch.testing.assert_close(logits, s / tau)
    t2i = -(torch.log_softmax(s / tau, dim=1).diagonal()).mean()
    i2t = -(torch.log_softmax(s.T / tau, dim=1).diagonal()).mean()
    torch.testing.assert_close(loss, (t2i + i2t) / 2)


def test_only_the_chosen_heads_attention_maps_get_gradient_and_change_the_loss():
    """Each caption's head is picked by hand (arg-max cosine with ψ(caption) among its own image's heads); the loss's
    gradient reaches the attention maps of exactly those heads and is exactly zero on every other head, and moving
    the other heads' maps (while they stay unchosen) leaves the loss unchanged."""
    from densevlm.engine.step_module import StepModule

    torch.manual_seed(0)
    psi = Talk2DINOProjection(8, 6)
    g = torch.Generator().manual_seed(1)
    tokens, text = torch.randn(4, 5, 6, generator=g), torch.randn(4, 8, generator=g)
    attn = torch.randn(4, 3, 5, generator=g).requires_grad_(True)  # raw CLS->patch logits, 3 heads, 5 patches

    def loss_of(attn_maps):
        heads, _ = attention_pool(PatchFeatures(tokens, attn_maps, (1, 5)))
        return Talk2DINOObjective(0.07)(StepModule(psi), {"text": text, "heads": heads}).loss, heads

    loss, heads = loss_of(attn)
    loss.backward()
    with torch.no_grad():
        cos = torch.einsum("bd,bhd->bh", F.normalize(psi(text), dim=-1), F.normalize(heads, dim=-1))
    chosen = cos.argmax(dim=1)
    assert len(set(chosen.tolist())) > 1  # the captions do not all pick the same head index
    picked = torch.zeros(4, 3, dtype=torch.bool)
    picked[torch.arange(4), chosen] = True
    assert (attn.grad[picked].abs().sum(-1) > 0).all()
    assert (attn.grad[~picked] == 0).all()
    with torch.no_grad():
        moved = attn + 0.05 * torch.randn(4, 3, 5, generator=g) * (~picked)[..., None]
        loss_moved, heads_moved = loss_of(moved)
        cos_moved = torch.einsum("bd,bhd->bh", F.normalize(psi(text), dim=-1), F.normalize(heads_moved, dim=-1))
    assert torch.equal(cos_moved.argmax(dim=1), chosen) and not torch.equal(heads_moved, heads)
    torch.testing.assert_close(loss_moved, loss.detach(), atol=1e-7, rtol=0)


def test_objective_trains_every_psi_parameter_and_reports_its_metrics():
    """Every ψ parameter gets a gradient; t2i accuracy and the entropy of head usage equal what the chosen heads give
    by hand."""
    from densevlm.engine.step_module import StepModule

    torch.manual_seed(0)
    psi = Talk2DINOProjection(8, 6)
    text, heads = torch.randn(4, 8), torch.randn(4, 3, 6)
    out = Talk2DINOObjective(0.07)(StepModule(psi), {"text": text, "heads": heads})
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in psi.parameters())
    with torch.no_grad():
        t, h = F.normalize(psi(text), dim=-1), F.normalize(heads, dim=-1)
        index = torch.einsum("bd,bhd->bh", t, h).argmax(1)
        chosen = h[torch.arange(4), index]
    acc = float(((t @ chosen.t()).argmax(1) == torch.arange(4)).float().mean())
    usage = [index.tolist().count(k) / 4 for k in range(3)]
    entropy = -sum(u * math.log(u) for u in usage if u)
    assert out.metrics["t2i_acc"] == pytest.approx(acc) and out.metrics["head_entropy"] == pytest.approx(entropy)


# ------------------------------------------------------------------------------------------------ cache + training


def test_cache_reuse_and_refusal(world, tmp_path, monkeypatch):
    from densevlm.tasks import talk2dino as eng

    cfg = _train_cfg(world, tmp_path)
    torch.manual_seed(0)
    backbone, text_model = eng.build_encoders(cfg)
    cache_dir = eng.build_feature_cache(cfg, backbone, text_model, progress=False)
    manifest = json.loads((cache_dir / fc.MANIFEST).read_text())
    assert manifest["num_images"] == 24 and manifest["num_captions"] == 24 * 5 and len(manifest["shards"]) == 3
    cache = fc.load_feature_cache(cache_dir, eng.cache_identity(cfg, backbone, text_model))
    assert cache.heads.shape == (24, 4, 64) and cache.text.shape == (120, text_model.embed_dim)
    # The cached per-head embeddings are the backbone's own.
    first = fc.CenterCropImages(fc.read_caption_pairs(cfg.data.captions_json, cfg.data.image_root).images[:2], 56,
                        backbone.image_mean, backbone.image_std)
    heads, _ = attention_pool(backbone(torch.stack([first[0], first[1]])))
    torch.testing.assert_close(cache.heads[:2], heads)

    def no_forward(self, images):
        raise AssertionError("the cache should have been reused, not recomputed")

    monkeypatch.setattr(type(backbone), "forward", no_forward)
    assert eng.build_feature_cache(cfg, backbone, text_model, progress=False) == cache_dir
    monkeypatch.undo()

    other = _train_cfg(world, tmp_path, data={"image_size": 70})
    with pytest.raises(fc.FeatureCacheError, match=r"cache.*data\.image_size: cache 56 vs run 70"):
        eng.build_feature_cache(other, backbone, text_model, progress=False)
    torch.manual_seed(1)
    other_backbone = create_dinov2("dinov2_vitb14_reg", None, timm_kwargs=SMALL)
    with pytest.raises(fc.FeatureCacheError, match=r"vision\.weights_id"):
        eng.build_feature_cache(cfg, other_backbone, text_model, progress=False)
    other_text = _train_cfg(world, tmp_path, text={"name": "ToyCLIP-ViT-S-16"})
    text_s = eng.build_encoders(other_text)[1]
    with pytest.raises(fc.FeatureCacheError, match=r"text\.name: cache 'ToyCLIP-ViT-T-16' vs run 'ToyCLIP-ViT-S-16'"):
        eng.build_feature_cache(other_text, backbone, text_s, progress=False)
    # A damaged shard is refused when the cache is read.
    (cache_dir / "images-00001.safetensors").write_bytes(b"broken")
    with pytest.raises(fc.FeatureCacheError, match="images-00001"):
        fc.load_feature_cache(cache_dir)


def test_interrupted_cache_build_keeps_finished_shards(world, tmp_path):
    from densevlm.tasks import talk2dino as eng

    cfg = _train_cfg(world, tmp_path)
    backbone, text_model = eng.build_encoders(cfg)
    cache_dir = eng.build_feature_cache(cfg, backbone, text_model, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("images-*")}
    (cache_dir / fc.MANIFEST).unlink()  # as if the build had stopped before the manifest
    (cache_dir / "images-00002.safetensors").unlink()
    eng.build_feature_cache(cfg, backbone, text_model, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("images-*")}
    assert after["images-00000.safetensors"] == before["images-00000.safetensors"]
    assert after["images-00002.safetensors"] != before["images-00002.safetensors"]


def test_captions_json_without_captions_is_refused(world, tmp_path):
    from densevlm.tasks.talk2dino import run_talk2dino_cache

    bad = tmp_path / "instances_train.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}],
                               "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    cfg = _train_cfg(world, tmp_path, data={"captions_json": str(bad)})
    with pytest.raises(ValueError, match=r"instances_train\.json: no captions"):
        run_talk2dino_cache(cfg, progress=False)


def test_training_lowers_the_loss_and_writes_psi_in_the_released_layout(world, tmp_path):
    from densevlm.tasks.talk2dino import run_talk2dino_train

    torch.manual_seed(0)
    cfg = _train_cfg(world, tmp_path)
    result = run_talk2dino_train(cfg, progress=False)
    losses = [h["train"]["loss"] for h in result.metrics["history"]]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    psi = read_projection(result.run_dir)
    assert (psi.in_dim, psi.out_dim) == (128, 64)  # toy text embed_dim -> the backbone width
    assert (result.run_dir / "config.yaml").is_file()


# ------------------------------------------------------------------------------------------------ segmenter


class _FixedBackbone(torch.nn.Module):
    """A backbone whose patch tokens and attention are given (the segmenter's arithmetic on known numbers)."""

    name, embed_dim, num_heads, patch_size = "fixed", 2, 2, 4
    image_mean, image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> PatchFeatures:
        b, _, h, w = images.shape
        gh, gw = h // 4, w // 4
        tokens = torch.zeros(b, gh * gw, 2)
        tokens[:, :, 0] = 1.0
        tokens[:, : gw, :] = torch.tensor([0.0, 1.0])  # the top patch row is "class 1", the rest "class 0"
        attn = torch.randn(b, 2, gh * gw)
        return PatchFeatures(tokens, attn, (gh, gw))


def _identity_psi() -> Talk2DINOProjection:
    psi = Talk2DINOProjection(2, 2)
    with torch.no_grad():  # ψ(x) ≈ x: tanh is linear near 0, so scale in and out
        psi.linear_layer.weight.copy_(torch.eye(2) * 1e-3)
        psi.linear_layer.bias.zero_()
        psi.hidden_layers[0].weight.copy_(torch.eye(2) * 1e3)
        psi.hidden_layers[0].bias.zero_()
    return psi


def test_segmenter_shapes_sigmoid_scores_and_background_rule():
    seg = Talk2DINOSegmenter(_FixedBackbone(), _identity_psi(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                             ["a", "b"])
    out = seg(torch.zeros(2, 3, 18, 13))  # not multiples of the 4-px patch: padded, then cut
    assert out.shape == (2, 2, 18, 13)
    s = 1 / (1 + math.exp(-1.0))
    assert abs(float(out[0, 0, -1, 0]) - s) < 1e-4  # cos 1 -> sigmoid(1)
    assert abs(float(out[0, 1, -1, 0]) - 0.5) < 1e-4  # cos 0 -> sigmoid 0.5
    # Background rule: constant 0.55 channel wins where every class scores below it.
    with_bg = add_background(out, 0, 0.55).argmax(1)
    assert with_bg[0, -1, 0] == 1 and with_bg[0, 0, 0] == 2  # class a below, class b on the top row
    scores = torch.full((1, 2, 1, 1), 0.5)
    assert add_background(scores, 0, 0.55).argmax(1).item() == 0


def test_background_cleaning_on_a_hand_computed_example():
    """METHOD_TALK2DINO.md §1.10, step by step in scalar arithmetic on one image: 3 patches, 2 heads, 2 classes.

    ê_m = normalize(Σ_p A_m[p] F[p]) with the RAW attention logits; w_n = softmax_m <t_n, ê_m>;
    Â_n = softmax_p(Σ_m w_nm A_m); min-max over all of Â, rescaled to [min mask, max mask];
    mask' = (mask + λ Â) / (1 + λ)."""
    tokens = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    attn = [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # head 0 looks at patch 0, head 1 at patch 2
    text = [[1.0, 0.0], [0.0, 1.0]]
    mask = [[0.6, 0.5, 0.4], [0.3, 0.7, 0.55]]
    lam = 0.2
    s = 1 / math.sqrt(2)
    e_hat = [[1.0, 0.0], [s, s]]  # normalize(2 * F[0]) and normalize(1 * F[2])

    def softmax(v):
        z = [math.exp(x) for x in v]
        return [x / sum(z) for x in z]

    maps = []
    for t in text:
        w = softmax([t[0] * e[0] + t[1] * e[1] for e in e_hat])
        maps.append(softmax([w[0] * attn[0][p] + w[1] * attn[1][p] for p in range(3)]))
    lo, hi = min(min(m) for m in maps), max(max(m) for m in maps)
    m_lo, m_hi = min(min(m) for m in mask), max(max(m) for m in mask)
    expected = [[(mask[n][p] + lam * ((maps[n][p] - lo) / (hi - lo) * (m_hi - m_lo) + m_lo)) / (1 + lam)
                 for p in range(3)] for n in range(2)]
    feats = PatchFeatures(torch.tensor([tokens]), torch.tensor([attn]), (1, 3))
    out = background_clean(torch.tensor([mask]), feats, torch.tensor(text), lam)
    torch.testing.assert_close(out, torch.tensor([expected]), atol=1e-6, rtol=1e-6)


def test_background_cleaning_mixes_within_the_mask_range():
    torch.manual_seed(0)
    feats = PatchFeatures(torch.randn(1, 6, 4), torch.randn(1, 3, 6), (2, 3))
    text = F.normalize(torch.randn(2, 4), dim=-1)
    mask = torch.rand(1, 2, 6) * 0.4 + 0.3
    out = background_clean(mask, feats, text, 0.2)
    assert out.shape == mask.shape and not torch.allclose(out, mask)
    assert out.min() >= mask.min() - 1e-6 and out.max() <= mask.max() + 1e-6
    torch.testing.assert_close(background_clean(mask, feats, text, 0.0), mask)


def test_pamr_pulls_a_mask_back_inside_the_image_edge():
    from densevlm.segmenters.talk2dino import pamr

    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # a vertical edge between columns 7 and 8
    mask = torch.zeros(1, 2, 16, 16)
    mask[:, 0, :, :10] = 1.0  # class 0 leaks two columns over the edge
    mask[:, 1] = torch.linspace(0, 1, 16)  # a ramp ignoring the edge
    out = pamr(image, mask, iterations=10, dilations=(1, 2))
    assert out.shape == mask.shape
    # Within a region the masks diffuse, across the edge they do not: the leak is spread over the white half
    # (2 of 8 columns -> about 0.25), the black half keeps 1, the ramp becomes two plateaus split at the edge.
    assert float(out[0, 0, :, 8:10].max()) < 0.3 and float(out[0, 0, :, :8].min()) > 0.99
    assert float(out[0, 1, :, :8].max()) < 0.3 and float(out[0, 1, :, 8:].min()) > 0.7
    torch.testing.assert_close(pamr(image, torch.ones(1, 1, 16, 16)), torch.ones(1, 1, 16, 16))


def test_eval_semseg_with_the_talk2dino_segmenter_from_a_run_directory(world, tmp_path):
    from densevlm.tasks.talk2dino import run_talk2dino_train
    from densevlm.evaluation.semseg import evaluate_semseg

    torch.manual_seed(0)
    run = run_talk2dino_train(_train_cfg(world, tmp_path, loop={"epochs": 1}), progress=False).run_dir
    cfg = SemSegEvalConfig(output_dir=str(tmp_path / "eval"), segmenter="talk2dino",
                           data=toyworld_data(world, "val"), num_workers=0, device="cpu", figures=0,
                           metrics_backend="densevlm")
    cfg.text.vocabulary, cfg.text.templates = str(world), "single"
    cfg.talk2dino.psi = str(run)
    cfg.talk2dino.bg_clean = cfg.talk2dino.pamr = True
    cfg.inference.short_side, cfg.inference.mode = 56, "whole"
    result = evaluate_semseg(None, cfg, progress=False)
    assert result["model"]["segmenter"] == "Talk2DINOSegmenter" and result["counts"]["images"] == 6
    assert 0.0 <= result["metrics"]["mIoU"] <= 100.0
    assert (tmp_path / "eval" / "semseg.json").is_file()


def test_demo_talk2dino_stage_on_the_quick_profile_and_rerun_reuses_it(tmp_path, capsys):
    from densevlm.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--talk2dino", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo" /
                                                   "quick.yaml"),
            "--set", f"output_dir={out}", "talk2dino.max_images=32", "talk2dino.loop.epochs=2",
            "talk2dino.loop.batch_size=32", "semseg.max_images=8", "semseg.figures=0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    summary = json.loads((out / "talk2dino" / "summary.json").read_text())
    assert set(summary["semseg"]) == {"dense CLIP (toy-student)", "Talk2DINO (toy-student)"}
    for metrics in summary["semseg"].values():
        assert 0.0 <= metrics["mIoU"] <= 100.0 and metrics["mIoU.novel"] is not None
    assert summary["psi"]["steps"] == 2 * (32 * 5 // 32) and summary["psi"]["cache_seconds"] > 0
    assert "Talk2DINO vs dense CLIP" in first and "Talk2DINO demo finished" in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "Talk2DINO ψ (cache + training): reusing" in second
    assert json.loads((out / "talk2dino" / "summary.json").read_text())["semseg"] == summary["semseg"]
