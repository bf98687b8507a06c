"""Checkpoint layouts: every layout round-trips for every family it takes, holds every tensor, and its consumer
loads it (open_clip strictly, OpenAI CLIP's ``build_model``, the reference EVA layout bit for bit)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from densevlm.cli import main as cli_main
from densevlm.config import ConfigError
from densevlm.models import ExportError, ModelSpec, create_backbone, export_model, writable_layouts
from densevlm.models.checkpoints import read_checkpoint
from densevlm.models.export_check import verify_export
from densevlm.models.layouts import LAYOUTS, reload_spec
from densevlm.models.layouts import open_clip as open_clip_layout
from densevlm.models.layouts.eva_reference import infer_reference_config
from densevlm.models.layouts.openai import EXTRA_KEYS

torch.set_num_threads(1)

GOLDEN_DIR = Path(__file__).resolve().parent / "fixtures"  # the reference-format checkpoint (fixtures/README.md)
GOLDEN_CKPT = GOLDEN_DIR / "densevlm_fork_tiny_eva.pt"
GOLDEN_CONFIG = GOLDEN_DIR / "EVA02-CLIP-tiny-16.json"

# an OpenAI-architecture ViT (QuickGELU, 64-wide heads), small enough for a CPU test
QUICKGELU_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 1, "layers": 2},
}


def _randomise(model):
    """Non-trivial values in every tensor (open_clip initialises some biases and norms to constants)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.clip.parameters():
            p.copy_(p + 0.02 * torch.randn(p.shape, generator=gen))
    model.refresh_weights_id()
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "toy_vit": _randomise(create_backbone("ToyCLIP-ViT-T-16")),
        "openai_vit": _randomise(create_backbone(ModelSpec(name="ViT-B-16-quickgelu", model_overrides=QUICKGELU_VIT))),
        "eva02": _randomise(create_backbone("EVA02-Ti-16-golden")),
    }


def _out(tmp_path: Path, layout: str) -> Path:
    return tmp_path / ("export" if layout == "local-dir" else "export.pt")


CASES = [(family, layout) for family in ("toy_vit", "openai_vit", "eva02") for layout in LAYOUTS]
TAKES = {"toy_vit": {"open_clip", "local-dir"}, "openai_vit": {"open_clip", "local-dir", "openai"},
         "eva02": {"open_clip", "local-dir", "eva_reference"}}
WRITABLE = [(family, layout) for family, layout in CASES if layout in TAKES[family]]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{l}" for f, l in CASES])
def test_round_trip_or_clear_refusal(models, family, layout, tmp_path, record_property):
    model = models[family]
    takes = TAKES[family]
    assert set(writable_layouts(model)) == takes
    out = _out(tmp_path, layout)
    if layout not in takes:
        with pytest.raises(ExportError, match=rf"cannot be exported as '{layout}'.*Layouts this model can take: "):
            export_model(model, layout, out)
        assert not any(tmp_path.iterdir()), "a refused export must not leave files"
        return
    export_model(model, layout, out)
    diffs = verify_export(model, layout, out)
    record_property("max_abs_diff", max(diffs.values()))
    print(f"{family} {layout}: {diffs}")
    assert max(diffs.values()) <= 1e-6, diffs


def _written_state_dict(layout: str, out: Path) -> dict[str, torch.Tensor]:
    if layout == "local-dir":
        return load_file(str(out / "open_clip_model.safetensors"))
    obj = torch.load(out, map_location="cpu", weights_only=True)
    return obj["state_dict"] if layout == "eva_reference" else obj


@pytest.mark.parametrize("family,layout", WRITABLE, ids=[f"{f}-{l}" for f, l in WRITABLE])
def test_every_tensor_of_the_model_is_written(models, family, layout, tmp_path):
    model = models[family]
    out = _out(tmp_path, layout)
    export_model(model, layout, out)
    written = _written_state_dict(layout, out)
    expected = set(model.clip.state_dict())
    if layout == "openai":
        assert set(written) == expected | set(EXTRA_KEYS)
        assert all(written[k].ndim == 0 and written[k].dtype == torch.int64 for k in EXTRA_KEYS)
        assert int(written["input_resolution"]) == model.native_image_size
    elif layout == "eva_reference":
        # Key by key against the file the reference code wrote for this architecture (the golden fixture): its keys
        # in its order, dtypes and shapes; each value the model tensor timm's own EVA converter loads that key into;
        # the RoPE tables the reference computed.
        reference = {k.removeprefix("module."): v
                     for k, v in torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)["state_dict"].items()}
        assert list(written) == list(reference)
        into = _reference_key_targets(reference, model)
        assert sorted(into.values()) == sorted(expected)  # every model tensor is somewhere in the file
        ours = model.clip.state_dict()
        for key, ref in reference.items():
            assert written[key].dtype == ref.dtype and written[key].shape == ref.shape, key
            if key in into:
                assert torch.equal(written[key], ours[into[key]]), f"{key} is not the model's {into[key]}"
            else:
                assert "rope.freqs_" in key and torch.equal(written[key], ref), key
        assert create_backbone(reload_spec(model, layout, out)).load_info["layout"] == "eva_reference"
    else:
        assert set(written) == expected
    for key, value in model.clip.state_dict().items():
        if layout in ("open_clip", "local-dir", "openai"):
            assert torch.equal(written[key], value), key


def _reference_key_targets(reference: dict[str, torch.Tensor], model) -> dict[str, str]:
    """Each reference key -> the model key it loads into: for ``visual.*``, where timm's EVA converter puts it (each
    tensor tagged with its index, so the map owes nothing to our writer); ``text.*`` and ``logit_scale`` keep their
    names (open_clip's CustomTextCLIP uses the reference's). RoPE tables load into nothing."""
    from timm.models.eva import checkpoint_filter_fn

    names = list(reference)
    tagged = {k: torch.full(reference[k].shape, float(i)) for i, k in enumerate(names) if k.startswith("visual.")}
    out = {k: k for k in names if not k.startswith("visual.")}
    for key, value in checkpoint_filter_fn(tagged, model.clip.visual.trunk).items():
        out[names[int(value.flatten()[0])]] = "visual.trunk." + key
    return out


def test_open_clip_export_loads_strictly_in_plain_open_clip(models, tmp_path):
    """SAN's route: register the config beside the weights, then create_model(name, pretrained=file)."""
    model = models["openai_vit"]
    out = tmp_path / "san_clip.pt"
    paths = export_model(model, "open_clip", out)
    assert paths == [out, tmp_path / "san_clip.json"]
    config = json.loads((tmp_path / "san_clip.json").read_text())
    assert config["quick_gelu"] is True  # open_clip 2.16 has no -quickgelu ViT configs: the file must say it
    for tower in ("vision_cfg", "text_cfg"):
        assert set(config[tower]) <= open_clip_layout.OPEN_CLIP_216_KEYS[tower]
    assert set(config) <= open_clip_layout.OPEN_CLIP_216_KEYS["top"]
    assert all(isinstance(v, torch.Tensor) for v in torch.load(out, weights_only=True).values())
    open_clip.add_model_config(tmp_path / "san_clip.json")
    plain = open_clip.create_model("san_clip", pretrained=str(out)).eval()  # strict=True inside open_clip
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tokens = model.tokenizer(["a cat", "a wall"])
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), model.clip.encode_image(images))
        assert torch.equal(plain.encode_text(tokens), model.clip.encode_text(tokens))


def test_local_dir_loads_in_open_clip_with_its_preprocessing(models, tmp_path):
    model = models["toy_vit"]
    export_model(model, "local-dir", tmp_path / "toy")
    plain, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'toy'}")
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx(model.image_mean) and tuple(normalize.std) == pytest.approx(model.image_std)
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(plain.eval().encode_image(images), model.clip.encode_image(images))
    reread = create_backbone(str(tmp_path / "toy"))  # --model <local-dir>
    assert reread.name == model.name


def _openai_build_model():
    """OpenAI CLIP's ``build_model`` (PyPI clip-anytorch). Its package __init__ needs pkg_resources, which current
    setuptools dropped, so the model module is loaded on its own: it is the code under test, unchanged."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI CLIP not installed: pip install -r requirements-dev.txt (clip-anytorch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.build_model


def test_openai_build_model_rebuilds_identical_outputs(models, tmp_path):
    build_model = _openai_build_model()
    model = models["openai_vit"]
    # build_model converts the model to fp16 before loading (as CAT-Seg's does): use fp16-exact weights so the
    # comparison tests the layout, not that rounding
    with torch.no_grad():
        for p in model.clip.parameters():
            p.copy_(p.half().float())
    out = tmp_path / "openai.pt"
    export_model(model, "openai", out)
    openai_model = build_model(torch.load(out, weights_only=True)).float().eval()  # load_state_dict strict=True
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    tokens = model.tokenizer(["a photo of a cat.", "wall, brick"])
    with torch.no_grad():
        image_diff = (openai_model.encode_image(images) - model.clip.encode_image(images)).abs().max().item()
        text_diff = (openai_model.encode_text(tokens) - model.clip.encode_text(tokens)).abs().max().item()
    print(f"OpenAI build_model vs ours: image {image_diff:.2e}, text {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5


def test_golden_reference_written_back_bit_for_bit(tmp_path):
    model = create_backbone(ModelSpec(name=str(GOLDEN_CONFIG), pretrained=str(GOLDEN_CKPT)))
    out = tmp_path / "golden_again.pt"
    export_model(model, "eva_reference", out)
    original = torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert {k: v for k, v in written.items() if k != "state_dict"} == {"epoch": 6, "name": "golden-tiny"}
    ref = {k[len("module."):]: v for k, v in original["state_dict"].items()}
    ours = written["state_dict"]
    assert list(ours) == list(ref)  # same keys in the reference's order: F-ViT's strict load sees the same file
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_golden_loads_from_its_shapes_alone():
    from safetensors.torch import load_file as load

    golden = load(str(GOLDEN_DIR / "densevlm_fork_tiny_eva_golden.safetensors"))
    model = create_backbone(ModelSpec(pretrained=str(GOLDEN_CKPT)))  # no name: the shapes give the architecture
    assert model.load_info["layout"] == "eva_reference"
    cfg, assumptions = infer_reference_config(read_checkpoint(GOLDEN_CKPT).state_dict)
    vision = cfg["vision_cfg"]
    assert (vision["width"], vision["layers"], vision["head_width"], vision["patch_size"], vision["image_size"],
            vision["pt_hw_seq_len"], int(vision["width"] * vision["mlp_ratio"])) == (192, 3, 64, 16, 224, 16, 512)
    assert any("text heads" in note for note in assumptions)  # not in the file: said, not hidden
    with torch.no_grad():
        assert (model.encode_dense(golden["image_224"]) - golden["encode_dense_224"]).abs().max() <= 1e-5
        assert (model.encode_dense(golden["image_320"]) - golden["encode_dense_320"]).abs().max() <= 1e-4
        assert (model.encode_image(golden["image_224"]) - golden["encode_image_224"]).abs().max() <= 1e-5


def test_shapes_that_fit_no_architecture_name_the_keys(tmp_path):
    from densevlm.models import CheckpointLayoutError

    original = torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)["state_dict"]
    path = tmp_path / "bad.pt"

    def load_with(**changes):
        sd = dict(original)
        for key, value in changes.items():
            key = "module." + key.replace("__", ".")
            if value is None:
                del sd[key]
            else:
                sd[key] = value
        torch.save({"state_dict": sd}, path)
        return create_backbone(ModelSpec(pretrained=str(path)))

    with pytest.raises(ConfigError, match=r"'visual\.patch_embed\.proj\.weight' \(100, 3, 16, 16\) disagrees with "
                                          r"'visual\.pos_embed' width 192"):
        load_with(visual__patch_embed__proj__weight=original["module.visual.patch_embed.proj.weight"][:100])
    with pytest.raises(ConfigError, match=r"'visual\.blocks\.0\.mlp\.w1\.weight' is missing"):
        load_with(visual__blocks__0__mlp__w1__weight=None)
    # block 0 sets the architecture; a later block that disagrees is named by the strict load
    with pytest.raises(CheckpointLayoutError, match=r"shape mismatches.*visual\.trunk\.blocks\.1\.mlp\.fc1_g\.weight: "
                                                    r"\(256, 192\) vs model \(512, 192\)"):
        load_with(visual__blocks__1__mlp__w1__weight=original["module.visual.blocks.1.mlp.w1.weight"][:256])


def test_existing_output_is_kept_without_overwrite(models, tmp_path):
    model = models["toy_vit"]
    out = tmp_path / "toy.pt"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(model, "open_clip", out)
    assert out.read_bytes() == b"precious" and not (tmp_path / "toy.json").exists()
    export_model(model, "open_clip", out, overwrite=True)
    assert set(torch.load(out, weights_only=True)) == set(model.clip.state_dict())
    folder = tmp_path / "dir"
    export_model(model, "local-dir", folder)
    with pytest.raises(FileExistsError):
        export_model(model, "local-dir", folder)
    export_model(model, "local-dir", folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "toy.json", "toy.pt"]  # no temporaries left


def test_failed_write_leaves_nothing_under_the_final_name(models, tmp_path, monkeypatch):
    import densevlm.models.checkpoints as checkpoints

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    for layout in ("openai", "eva_reference"):
        model = models["openai_vit" if layout == "openai" else "eva02"]
        with pytest.raises(OSError, match="disk full"):
            export_model(model, layout, tmp_path / f"{layout}.pt")
    monkeypatch.setattr(checkpoints, "write_tensors", _fail_after_partial)
    import densevlm.models.layouts.local_dir as local_dir

    monkeypatch.setattr(local_dir, "write_tensors", _fail_after_partial)
    with pytest.raises(OSError, match="disk full"):
        export_model(models["toy_vit"], "local-dir", tmp_path / "folder")
    assert list(tmp_path.iterdir()) == []


def _fail_after_partial(tensors, path, **kwargs):
    Path(path).write_bytes(b"half")
    raise OSError("disk full")


def test_cli_export_verifies_and_refuses_overwrite(models, tmp_path, capsys):
    weights = models["toy_vit"].save_weights(tmp_path / "toy.safetensors")  # records its model name
    out = tmp_path / "toy_export"
    args = ["export", "--model", str(weights), "--format", "local-dir", "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "max abs difference: dense 0.00e+00" in printed
    assert cli_main(args) == 1
    assert "already exist" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite", "--no-verify"]) == 0
    assert cli_main(["export", "--model", str(weights), "--format", "openai", "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert "cannot be exported as 'openai'" in err and "QuickGELU" in err and "['open_clip', 'local-dir']" in err


def _pattern(key: str) -> str:
    """A key with its block index replaced: the per-block structure, independent of depth."""
    import re

    return re.sub(r"(blocks|resblocks)\.\d+\.", r"\1.*.", key)


def test_full_size_eva02_b16_reference_key_set():
    """F-ViT's EVA02-CLIP-B-16 holds the golden fixture's per-block keys, 12 times, with B/16's shapes."""
    from densevlm.models.layouts.eva_reference import to_reference_state_dict

    model = create_backbone("EVA02-B-16")
    ours = to_reference_state_dict(model)
    golden = {k[len("module."):] for k in torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)["state_dict"]}
    assert {_pattern(k) for k in ours} == {_pattern(k) for k in golden}
    assert sum(k.startswith("visual.blocks.") and k.endswith(".attn.q_bias") for k in ours) == 12
    assert tuple(ours["visual.pos_embed"].shape) == (1, 197, 768) and tuple(ours["visual.head.weight"].shape) == (512, 768)
    assert tuple(ours["visual.blocks.11.attn.rope.freqs_cos"].shape) == (196, 64)
    assert len(ours) == len(model.clip.state_dict()) + 2 * 13  # every tensor, plus the stored RoPE tables


def test_recipe_student_is_openai_vit_b16_for_san_and_catseg():
    """The SAN / CAT-Seg recipe's student, full size: OpenAI's build_model takes its 'openai' export strictly."""
    from densevlm.config import load_config
    from densevlm.config.align import AlignConfig
    from densevlm.models.layouts.openai import to_openai_state_dict

    build_model = _openai_build_model()
    recipe = load_config(AlignConfig, Path(__file__).resolve().parents[1] / "configs/train/densevlm_vitb16_openai_coco.yaml")
    assert (recipe.student.name, recipe.student.pretrained) == ("ViT-B-16-quickgelu", "openai")
    model = create_backbone(recipe.student.name)  # the architecture; weights are random here (offline)
    assert set(writable_layouts(model)) == {"open_clip", "local-dir", "openai"}
    sd = to_openai_state_dict(model)  # what the 'openai' export writes (not written here: 600 MB)
    assert [int(sd[k]) for k in EXTRA_KEYS] == [224, 77, 49408]
    openai_model = build_model(sd)  # strict load: exactly OpenAI ViT-B/16's tensors
    assert openai_model.visual.transformer.resblocks[0].attn.num_heads == 12


def test_cli_export_of_a_zoo_model(tmp_path, capsys):
    """--model resolves zoo names through the factory, as every command does."""
    out = tmp_path / "toy_student.pt"
    assert cli_main(["export", "--model", "toy-student", "--format", "open_clip", "--out", str(out)]) == 0
    assert "max abs difference: dense 0.00e+00" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text()) == open_clip.get_model_config("ToyCLIP-ViT-S-16")


def test_eva_reference_writer_uses_the_reference_names_for_every_block_tensor(models):
    """Written from the reference's EVA-CLIP key layout (INTEGRATION.md §2), without the golden fixture: each block
    holds exactly these names, so a tensor left under a timm name (which the reference's strict=False load would
    silently skip, e.g. ``attn.v_proj.bias`` instead of ``attn.v_bias``) fails here."""
    from densevlm.models.layouts.eva_reference import to_reference_state_dict

    model = models["eva02"]
    ours = to_reference_state_dict(model)
    per_block = {"norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.q_proj.weight",
                 "attn.k_proj.weight", "attn.v_proj.weight", "attn.inner_attn_ln.weight", "attn.inner_attn_ln.bias",
                 "attn.proj.weight", "attn.proj.bias", "attn.rope.freqs_cos", "attn.rope.freqs_sin", "norm2.weight",
                 "norm2.bias", "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight", "mlp.w2.bias", "mlp.ffn_ln.weight",
                 "mlp.ffn_ln.bias", "mlp.w3.weight", "mlp.w3.bias"}
    depth = len(model.visual_blocks())
    for i in range(depth):
        prefix = f"visual.blocks.{i}."
        assert {k[len(prefix):] for k in ours if k.startswith(prefix)} == per_block, i
    top = {k for k in ours if k.startswith("visual.") and not k.startswith("visual.blocks.")}
    assert top == {"visual.cls_token", "visual.pos_embed", "visual.patch_embed.proj.weight",
                   "visual.patch_embed.proj.bias", "visual.rope.freqs_cos", "visual.rope.freqs_sin",
                   "visual.norm.weight", "visual.norm.bias", "visual.head.weight", "visual.head.bias"}
    # the biases hold the model's own values
    attn = model.visual_blocks()[0].attn
    assert torch.equal(ours["visual.blocks.0.attn.v_bias"], attn.v_proj.bias)
    assert torch.equal(ours["visual.blocks.0.attn.q_bias"], attn.q_proj.bias)
