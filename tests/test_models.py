"""Backbones: factory, dense path, pooling, checkpoint layouts, freezing, param groups (fast, random weights)."""

from __future__ import annotations

import hashlib
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml

from densevlm.config import ConfigError, from_dict
from densevlm.models import (
    CheckpointLayoutError,
    EvaDense,
    ModelSpec,
    OpenCLIPViTDense,
    create_backbone,
    freeze_for_dense_tuning,
    masks_to_token_grid,
    param_groups_for_adamw,
    pool_boxes,
    pool_masks,
    resolve_model_name,
    save_weights,
    split_weight_decay,
)
from densevlm.models.positional import reference_rope_sincos, resize_abs_pos_embed

torch.set_num_threads(1)

SMALL_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
}


def _build(spec: ModelSpec | str, seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(spec)


@pytest.fixture(scope="module")
def toy():
    return _build("ToyCLIP-ViT-T-16")


@pytest.fixture(scope="module")
def vit():
    return _build(ModelSpec(name="ViT-B-16", model_overrides=SMALL_VIT))


@pytest.fixture(scope="module")
def vit_custom():
    """An open_clip ViT with custom blocks (sub-LN in attention, per-head scaling)."""
    overrides = {**SMALL_VIT, "vision_cfg": {**SMALL_VIT["vision_cfg"], "scale_attn_inner": True, "scale_heads": True}}
    return _build(ModelSpec(name="ViT-B-16", model_overrides=overrides))


@pytest.fixture(scope="module")
def eva():
    return _build("EVA02-Ti-16-golden")


@pytest.fixture(scope="module", params=["toy", "vit", "vit_custom", "eva"])
def any_model(request):
    return request.getfixturevalue(request.param)


def _images(model, h: int, w: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ factory


def test_families_and_attributes(toy, vit, eva):
    assert isinstance(toy, OpenCLIPViTDense) and isinstance(vit, OpenCLIPViTDense) and isinstance(eva, EvaDense)
    assert (toy.name, toy.embed_dim, toy.patch_size, toy.native_image_size) == ("ToyCLIP-ViT-T-16", 128, 16, 96)
    assert (vit.embed_dim, vit.native_image_size, vit.native_grid) == (32, 64, (4, 4))
    assert (eva.embed_dim, eva.native_image_size, eva.native_grid) == (96, 224, (14, 14))
    assert toy.tokenizer(["a cat"]).shape == (1, 32)  # context length from the toy config
    assert vit.tokenizer(["a cat"]).shape == (1, 16)  # ... and from overrides
    assert toy.image_mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert not toy.training and not eva.training


def test_reference_names_map_to_open_clip():
    assert resolve_model_name("EVA02-CLIP-B-16") == "EVA02-B-16"
    assert resolve_model_name("EVA02-CLIP-L-14-336") == "EVA02-L-14-336"
    assert resolve_model_name("ViT-B/16") == "ViT-B-16"
    with pytest.raises(ConfigError, match="ViT-B-61.*Did you mean"):
        resolve_model_name("ViT-B-61")


def test_bad_pretrained_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="not an open_clip tag for 'ViT-B-16'.*openai"):
        create_backbone(ModelSpec(name="ViT-B-16", pretrained="no-such-tag", model_overrides=SMALL_VIT))
    with pytest.raises(ConfigError, match="name"):
        create_backbone(ModelSpec())


def test_model_spec_from_config_dict():
    spec = from_dict(ModelSpec, {"name": "EVA02-CLIP-B-16", "dense_last_block": "standard"})
    assert spec.dense_last_block == "standard" and spec.precision == "fp32"
    with pytest.raises(ConfigError, match="dense_last_block"):
        from_dict(ModelSpec, {"name": "ViT-B-16", "dense_last_block": "qk"})
    with pytest.raises(ConfigError, match="model_overrides.vision"):
        from_dict(ModelSpec, {"name": "ViT-B-16", "model_overrides": {"vision": {}}})
    with pytest.raises(ConfigError, match="no effect on the timm tower"):
        create_backbone(ModelSpec(name="EVA02-Ti-16-golden", model_overrides={"vision_cfg": {"layers": 2}}))


def test_quick_gelu_variants():
    qg = _build(ModelSpec(name="ViT-B-16-quickgelu", model_overrides=SMALL_VIT))
    forced = _build(ModelSpec(name="ViT-B-16", model_overrides=SMALL_VIT, force_quick_gelu=True))
    plain = _build(ModelSpec(name="ViT-B-16", model_overrides=SMALL_VIT))
    for model, quick in ((qg, True), (forced, True), (plain, False)):
        act = model.visual_blocks()[0].mlp.gelu
        assert isinstance(act, open_clip.transformer.QuickGELU) is quick


def test_weights_id_random_init_is_a_state_dict_hash():
    a, b, c = _build("ToyCLIP-ViT-T-16", 0), _build("ToyCLIP-ViT-T-16", 0), _build("ToyCLIP-ViT-T-16", 1)
    assert len(a.weights_id) == 16 and a.weights_id == b.weights_id != c.weights_id


# ------------------------------------------------------------------------------------------ dense path


def _only_self_attention_in_last_block(blocks: list[torch.nn.Module], n_tokens: int):
    """A forward pre-hook on the last block giving its attention a diagonal mask: each token attends to itself only,
    so softmax(q·kᵀ) is the identity and the block computes exactly its value path (the MaskCLIP trick, §1.6)."""
    only_self = torch.full((n_tokens, n_tokens), float("-inf")).fill_diagonal_(0.0)

    def hook(_module, args, kwargs):
        return args, {**kwargs, "attn_mask": only_self}

    return blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)


def _dense_by_the_towers_own_forward(model, x: torch.Tensor) -> torch.Tensor:
    """(B, N, embed_dim) patch features BEFORE normalisation, from open_clip's / timm's own forward (not ours): the
    whole tower with the last block's attention restricted to each token itself, its final norm on every token, the
    projection into the text space. An open_clip ViT at another grid gets its position table resized here with the
    reference's plain bicubic (align_corners False, no antialias); timm's EVA runs at its native size only."""
    p = model.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    n = 1 + grid[0] * grid[1]
    if isinstance(model, EvaDense):
        trunk = model.clip.visual.trunk
        assert grid == model.native_grid, "timm's EVA resamples position tables its own way: native size only"
        handle = _only_self_attention_in_last_block(list(trunk.blocks), n)
        try:
            tokens = trunk.forward_features(x)[:, 1:]
        finally:
            handle.remove()
        b, m, c = tokens.shape
        # timm's head path (class-token pool -> fc_norm -> head), run on each patch token as if it were the class token
        return model.clip.visual.head(trunk.forward_head(tokens.reshape(b * m, 1, c))).reshape(b, m, -1)
    visual = model.clip.visual
    assert visual.transformer.batch_first and not visual.final_ln_after_pool
    original = visual.positional_embedding
    table = original.detach()
    if grid != tuple(visual.grid_size):
        gh, gw = visual.grid_size
        cells = table[1:].T.reshape(1, -1, gh, gw)
        cells = F.interpolate(cells, size=grid, mode="bicubic", align_corners=False).reshape(table.shape[1], -1).T
        table = torch.cat([table[:1], cells])
    handle = _only_self_attention_in_last_block(list(visual.transformer.resblocks), n)
    visual.positional_embedding, visual.output_tokens = torch.nn.Parameter(table), True
    try:
        _, tokens = visual(x[..., : grid[0] * p, : grid[1] * p])
    finally:
        visual.positional_embedding, visual.output_tokens = original, False
        handle.remove()
    return tokens @ visual.proj


DENSE_CASES = [(m, s) for m in ("toy", "vit", "vit_custom") for s in ((1.0, 1.0), (1.25, 0.75), (0.8, 1.5))]


@pytest.mark.parametrize("name,size", DENSE_CASES + [("eva", (1.0, 1.0))])
def test_dense_map_is_the_towers_own_forward_with_self_only_last_attention(request, name, size):
    """encode_dense equals an independent computation: open_clip's / timm's forward with the last block's attention
    masked to the diagonal (which IS the value path), final norm and projection per token, then L2 normalisation.
    The pre-normalisation norms vary from token to token, so the comparison is of directions that mean something."""
    import copy

    model = copy.deepcopy(request.getfixturevalue(name))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random init leaves attention biases at zero: give every bias a value a bug could lose
        for key, param in model.clip.visual.named_parameters():
            if "attn." in key and key.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    p = model.patch_size
    # sizes relative to the native one, rounded to odd pixel counts so the patch remainder is dropped
    h = int(model.native_image_size * size[0]) + (p // 2 if name != "eva" else 0)
    w = int(model.native_image_size * size[1]) + (p // 3 if name != "eva" else 0)
    x = _images(model, h, w)
    with torch.no_grad():
        dense = model.encode_dense(x)
        raw = _dense_by_the_towers_own_forward(model, x)
    assert dense.shape == (2, model.embed_dim, h // p, w // p)
    norms = raw.norm(dim=-1)
    assert norms.std() > 0.01 * norms.mean()  # normalising really changes the map: not a can't-fail comparison
    expected = F.normalize(raw, dim=-1).reshape(2, h // p, w // p, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense, expected, atol=2e-5, rtol=1e-4)


def test_value_path_last_block_differs_from_standard(any_model):
    x = _images(any_model, any_model.native_image_size, any_model.native_image_size)
    with torch.no_grad():
        value = any_model.encode_dense(x)
        standard = any_model.encode_dense(x, last_block="standard")
    assert (value - standard).abs().max() > 1e-3
    assert value.shape == standard.shape


def test_value_path_equals_attention_over_one_token(any_model):
    """With a single token, softmax attention returns the value path exactly: the value path is the block."""
    block = any_model.visual_blocks()[-1]
    width = next(block.parameters()).shape[-1]
    x = torch.randn(3, 1, width, generator=torch.Generator().manual_seed(0))
    ctx = None if isinstance(any_model, EvaDense) else {"batch_first": True}
    with torch.no_grad():
        ours = any_model._block_value_path(block, x, ctx)
        attended = any_model._block(block, x, ctx)
    assert torch.allclose(ours, attended, atol=1e-5)


def test_native_size_matches_open_clip(any_model):
    x = _images(any_model, any_model.native_image_size, any_model.native_image_size)
    tokens = any_model.tokenizer(["a photo of a cat", "wall"])
    with torch.no_grad():
        assert torch.allclose(any_model.encode_image(x), any_model.clip.encode_image(x), atol=1e-5)
        assert torch.equal(any_model.encode_text(tokens), any_model.clip.encode_text(tokens))


def test_dense_standard_path_matches_open_clip_tokens(vit):
    """With the standard last block, the dense map is open_clip's own output tokens, projected and normalised."""
    x = _images(vit, 64, 64)
    visual = vit.clip.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(x)
    finally:
        visual.output_tokens = False
    expected = F.normalize(tokens @ visual.proj, dim=-1).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.allclose(vit.encode_dense(x, last_block="standard"), expected, atol=1e-5)


def test_encode_image_at_other_sizes(toy):
    with torch.no_grad():
        out = toy.encode_image(_images(toy, 96, 160))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


def test_pos_embed_resize_is_reference_bicubic():
    table = torch.randn(1 + 3 * 4, 8)
    out = resize_abs_pos_embed(table, (3, 4), (5, 2))
    grid = table[1:].T.reshape(1, 8, 3, 4)
    manual = F.interpolate(grid, size=(5, 2), mode="bicubic", align_corners=False).reshape(8, 10).T
    assert torch.equal(out[0], table[0]) and torch.allclose(out[1:], manual)
    assert resize_abs_pos_embed(table, (3, 4), (3, 4)) is table
    batched = resize_abs_pos_embed(table[None], (3, 4), (5, 2))
    assert batched.shape == (1, 11, 8) and torch.equal(batched[0], out)
    with pytest.raises(ValueError, match="13 rows"):
        resize_abs_pos_embed(table, (4, 4), (5, 5))


def test_rope_table_matches_timm_formula(eva):
    """At the native grid the table is timm's buffer; on other grids it is the same EVA formula per axis."""
    from timm.layers.pos_embed_sincos import build_rotary_pos_embed

    rope = eva.clip.visual.trunk.rope
    sin, cos = reference_rope_sincos((14, 14), 64, (16, 16))
    assert torch.equal(torch.cat([sin, cos], -1), rope.get_embed())
    sin, cos = reference_rope_sincos((9, 13), 64, (16, 16))
    timm_sin, timm_cos = build_rotary_pos_embed([9, 13], bands=rope.bands, in_pixels=False, ref_feat_shape=[16, 16])
    assert torch.allclose(sin, timm_sin, atol=1e-6) and torch.allclose(cos, timm_cos, atol=1e-6)


def test_grid_cache_keeps_gradients_and_invalidates(toy):
    pos = toy.clip.visual.positional_embedding
    x = _images(toy, 160, 96, b=1)
    toy._pos_cache.clear()
    pos.requires_grad_(True)
    toy.zero_grad()
    toy.encode_dense(x).sum().backward()
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    assert len(toy._pos_cache) == 0  # trainable + grad mode: resized every call, never cached
    with torch.no_grad():
        first = toy.encode_dense(x)
        assert len(toy._pos_cache) == 1
        assert torch.equal(toy.encode_dense(x), first)
        original = pos.detach().clone()
        pos.mul_(1.5)  # an in-place update (like an optimizer step) must invalidate the cached resize
        changed = toy.encode_dense(x)
        pos.copy_(original)
    assert (changed - first).abs().max() > 1e-4
    toy.zero_grad()


def test_tables_cached_in_inference_mode_do_not_leak_into_training(eva):
    x = _images(eva, 176, 240, b=1)
    with torch.inference_mode():
        eva.encode_dense(x)
    eva.zero_grad()
    eva.encode_dense(x).sum().backward()  # would fail if the inference-mode RoPE table were reused here
    assert eva.visual_blocks()[0].attn.q_proj.weight.grad.abs().sum() > 0
    eva.zero_grad()


# ------------------------------------------------------------------------------------------ pooling


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, fmap.shape[1] - 1), min(x0 + 1, fmap.shape[2] - 1)
    ly, lx = y - y0, x - x0
    return (
        fmap[:, y0, x0] * (1 - ly) * (1 - lx) + fmap[:, y0, x1] * (1 - ly) * lx
        + fmap[:, y1, x0] * ly * (1 - lx) + fmap[:, y1, x1] * ly * lx
    )


def test_pool_boxes_equals_manual_bilinear():
    dense = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[0.1, 0.2, 0.6, 0.9]])  # normalised x0, y0, x1, y1
    # grid coordinates, shifted by half a token (aligned=True); sampling_ratio -1 -> ceil(size) samples per axis
    x0, x1 = 0.1 * 5 - 0.5, 0.6 * 5 - 0.5
    y0, y1 = 0.2 * 4 - 0.5, 0.9 * 4 - 0.5
    nx, ny = math.ceil(x1 - x0), math.ceil(y1 - y0)
    samples = [
        _bilinear(dense[0], y0 + (j + 0.5) * (y1 - y0) / ny, x0 + (i + 0.5) * (x1 - x0) / nx)
        for j in range(ny) for i in range(nx)
    ]
    manual = torch.stack(samples).mean(0)
    assert torch.allclose(pool_boxes(dense, [box])[0], manual, atol=1e-6)


def test_full_image_box_is_the_token_mean_and_forms_agree():
    dense = F.normalize(torch.randn(2, 6, 3, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    boxes = [torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.4, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    pooled = pool_boxes(dense, boxes)
    assert pooled.shape == (3, 6)
    # a full box samples exactly the token centres: the plain mean of the map, not re-normalised (norm < 1)
    assert torch.allclose(pooled[0], dense[0].mean((1, 2)), atol=1e-6)
    assert torch.allclose(pooled[2], dense[1].mean((1, 2)), atol=1e-6)
    assert pooled[0].norm() < 1.0
    rows = torch.cat([torch.tensor([[0.0], [0.0], [1.0]]), torch.cat(boxes)], dim=1)
    assert torch.allclose(pool_boxes(dense, rows), pooled)
    with pytest.raises(ValueError, match="batch of 2"):
        pool_boxes(dense, boxes[:1])
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        pool_boxes(dense, torch.zeros(2, 4))


def test_pool_masks_is_a_masked_mean():
    dense = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 2, 3, 3)
    masks[0, 0, :2, :2] = 1
    masks[0, 1, 2, :] = 1
    masks[1, 0, 1, 1] = 1
    out = pool_masks(dense, masks)
    assert out.shape == (4, 4)
    assert torch.allclose(out[0], dense[0, :, :2, :2].mean((1, 2)), atol=1e-6)
    assert torch.allclose(out[1], dense[0, :, 2, :].mean(1), atol=1e-6)
    assert torch.allclose(out[2], dense[1, :, 1, 1], atol=1e-6)
    assert torch.equal(out[3], torch.zeros(4))  # an empty mask gives zeros, not NaN
    per_image = pool_masks(dense, [masks[0], masks[1, :1].bool()])
    assert torch.allclose(per_image, out[:3])
    with pytest.raises(ValueError, match="masks_to_token_grid"):
        pool_masks(dense, [torch.ones(1, 4, 4), torch.ones(1, 4, 4)])


def test_masks_to_token_grid_area_fractions():
    masks = torch.zeros(2, 40, 36, dtype=torch.bool)
    masks[0, :16, :8] = True  # half of token (0, 0)
    masks[1, 16:32, 16:32] = True  # all of token (1, 1)
    masks[1, 32:, :] = True  # rows beyond the last full patch: dropped, as by the patch convolution
    grid = masks_to_token_grid(masks, 16)
    assert grid.shape == (2, 2, 2)
    expected = torch.tensor([[[0.5, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(grid, expected)


def test_model_pooling_on_real_dense_map(eva):
    x = _images(eva, 160, 224)
    with torch.no_grad():
        dense = eva.encode_dense(x)
    masks = masks_to_token_grid(torch.ones(2, 1, 160, 224), eva.patch_size)
    assert torch.allclose(eva.pool_masks(dense, masks), dense.mean((2, 3)), atol=1e-6)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(eva.pool_boxes(dense, [full, full]), dense.mean((2, 3)), atol=1e-6)


# ------------------------------------------------------------------------------------------ checkpoints


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = model.native_image_size
    x = _images(model, size + model.patch_size, size)
    with torch.no_grad():
        return model.encode_image(x), model.encode_dense(x), model.encode_text(model.tokenizer(["a cat", "sky"]))


def _same_outputs(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_outputs(a), _outputs(b)))


def test_toy_save_reload_identical_and_open_clip_loads_it(toy, tmp_path):
    path = toy.save_weights(tmp_path / "toy.safetensors")
    reloaded = create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(path)))
    assert reloaded.load_info["layout"] == "open_clip" and reloaded.load_info["file_format"] == "safetensors"
    assert _same_outputs(toy, reloaded)
    assert reloaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    plain = open_clip.create_model("ToyCLIP-ViT-T-16", pretrained=str(path)).eval()
    x = _images(toy, 96, 96)
    with torch.no_grad():
        assert torch.equal(plain.encode_image(x), toy.encode_image(x))


@pytest.mark.parametrize("wrap", ["raw", "module_prefix", "state_dict", "state_dict_module_prefix"])
def test_torch_files_in_every_wrapping_load(eva, tmp_path, wrap):
    sd = eva.state_dict_for_export()
    if "module" in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"epoch": 3, "name": "run", "state_dict": sd} if wrap.startswith("state_dict") else sd
    path = tmp_path / "eva.pt"
    torch.save(obj, path)
    loaded = create_backbone(ModelSpec(name="EVA02-Ti-16-golden", pretrained=str(path)))
    assert loaded.load_info["layout"] == "open_clip"
    assert loaded.load_info["stripped_prefix"] == ("module." if "module" in wrap else "")
    assert _same_outputs(eva, loaded)


def test_openai_state_dict_layout_loads(vit, tmp_path):
    sd = dict(vit.state_dict_for_export())
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai.bin"
    torch.save(sd, path)
    loaded = create_backbone(ModelSpec(name="ViT-B-16", pretrained=str(path), model_overrides=SMALL_VIT))
    assert loaded.load_info["layout"] == "openai" and _same_outputs(vit, loaded)


def test_dense_clip_state_dict_loads(toy, tmp_path):
    path = tmp_path / "module_state.pt"
    torch.save({"epoch": 2, "state_dict": toy.state_dict()}, path)  # keys under 'clip.', as a training checkpoint
    loaded = create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(path)))
    assert loaded.load_info["layout"] == "dense_clip" and _same_outputs(toy, loaded)


def test_layout_error_lists_layouts_and_sample_keys(eva, tmp_path):
    path = save_weights(eva.state_dict_for_export(), tmp_path / "eva.pt")
    with pytest.raises(CheckpointLayoutError) as info:
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(path)))
    msg = str(info.value)
    assert str(path) in msg
    for expected in ("eva_reference", "openai (", "dense_clip", "open_clip (", "missing keys", "unexpected keys",
                     "visual.trunk.blocks.0.", "text.ln_final", "visual.class_embedding"):
        assert expected in msg, f"'{expected}' not in: {msg}"


def test_partial_checkpoint_is_refused(toy, tmp_path):
    sd = {k: v for k, v in toy.state_dict_for_export().items() if not k.startswith("transformer.resblocks.0.")}
    sd["visual.extra_head.weight"] = torch.zeros(2, 2)
    path = tmp_path / "partial.safetensors"
    save_weights(sd, path)
    with pytest.raises(CheckpointLayoutError, match=r"missing keys, e\.g\. \[transformer\.resblocks\.0\..*unexpected keys, e\.g\. \[visual\.extra_head\.weight"):
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(path)))


def test_saved_model_name_is_checked(toy, tmp_path):
    path = save_weights(toy.state_dict_for_export(), tmp_path / "w.safetensors", model_name="ViT-B-16")
    with pytest.raises(CheckpointLayoutError, match="saved from model 'ViT-B-16'"):
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(path)))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_non_tensor_entries_and_torchscript_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": [1, 2, 3]}, bad)
    with pytest.raises(ValueError, match="entry 'weights'.*list, expected a tensor"):
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(bad)))
    jit = tmp_path / "jit.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(jit))
    with pytest.raises(ValueError, match="TorchScript archive"):
        create_backbone(ModelSpec(name="ToyCLIP-ViT-T-16", pretrained=str(jit)))


def test_run_directory(toy, tmp_path):
    run = tmp_path / "run"
    toy.save_weights(run / "weights.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "model": {"name": "ToyCLIP-ViT-T-16"}}))
    from_dir = create_backbone(str(run))
    assert from_dir.name == "ToyCLIP-ViT-T-16" and _same_outputs(toy, from_dir)
    with pytest.raises(ConfigError, match="trained model is 'ToyCLIP-ViT-T-16'"):
        create_backbone(ModelSpec(name="EVA02-Ti-16-golden", pretrained=str(run)))
    (run / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        create_backbone(str(run))


# ------------------------------------------------------------------------------------------ training helpers


def test_freeze_policy_eva(eva):
    try:
        trainable = freeze_for_dense_tuning(eva, 2)
        expected = {f"clip.visual.trunk.blocks.{i}.{n}" for i in (1, 2) for n, _ in eva.visual_blocks()[i].named_parameters()}
        assert set(trainable) == expected and len(expected) > 0
        frozen = {n for n, p in eva.named_parameters() if not p.requires_grad}
        for name in ("clip.visual.trunk.pos_embed", "clip.visual.trunk.cls_token", "clip.visual.trunk.patch_embed.proj.weight",
                     "clip.visual.trunk.norm.weight", "clip.visual.trunk.head.weight", "clip.logit_scale",
                     "clip.text.token_embedding.weight", "clip.visual.trunk.blocks.0.attn.v_proj.weight"):
            assert name in frozen
        assert freeze_for_dense_tuning(eva, 0) == []
        assert len(freeze_for_dense_tuning(eva, 3)) == sum(1 for b in eva.visual_blocks() for _ in b.parameters())
        with pytest.raises(ValueError, match="0..3"):
            freeze_for_dense_tuning(eva, 4)
    finally:
        eva.requires_grad_(True)


def test_freeze_policy_vit_and_gradients(toy):
    try:
        trainable = freeze_for_dense_tuning(toy, 1)
        assert trainable and all(n.startswith("clip.visual.transformer.resblocks.3.") for n in trainable)
        assert not any(p.requires_grad for n, p in toy.named_parameters() if "ln_post" in n or n == "clip.visual.proj")
        toy.zero_grad()
        toy.encode_dense(_images(toy, 128, 128, b=1)).sum().backward()
        grads = {n for n, p in toy.named_parameters() if p.grad is not None}
        # the value path never touches the q/k rows, but in_proj_weight holds them with v: it gets a gradient
        assert grads == set(trainable)
    finally:
        toy.requires_grad_(True)
        toy.zero_grad()


def test_param_groups_split(toy):
    try:
        decay, no_decay = split_weight_decay(toy)
        for name in ("clip.visual.transformer.resblocks.0.attn.in_proj_weight", "clip.visual.proj",
                     "clip.token_embedding.weight", "clip.visual.conv1.weight", "clip.text_projection"):
            assert name in decay
        for name in ("clip.visual.transformer.resblocks.0.ln_1.weight", "clip.visual.transformer.resblocks.0.attn.in_proj_bias",
                     "clip.logit_scale", "clip.visual.class_embedding", "clip.visual.positional_embedding",
                     "clip.visual.ln_post.bias", "clip.positional_embedding"):
            assert name in no_decay
        assert len(decay) + len(no_decay) == len(list(toy.parameters()))
        freeze_for_dense_tuning(toy, 2)
        groups = param_groups_for_adamw(toy, 0.1)
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        n_trainable = sum(1 for p in toy.parameters() if p.requires_grad)
        assert sum(len(g["params"]) for g in groups) == n_trainable
        assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.requires_grad for g in groups for p in g["params"])
        torch.optim.AdamW(groups, lr=1e-5)  # the groups are valid optimizer input
    finally:
        toy.requires_grad_(True)


def test_real_size_eva02_b16_builds_and_runs_dense():
    torch.manual_seed(0)
    model = create_backbone("EVA02-CLIP-B-16")
    assert isinstance(model, EvaDense)
    assert (model.name, model.embed_dim, model.native_image_size, len(model.visual_blocks())) == ("EVA02-B-16", 512, 224, 12)
    with torch.no_grad():
        dense = model.encode_dense(torch.randn(1, 3, 48, 80))
    assert dense.shape == (1, 512, 3, 5)
