"""Tests of densevlm.vocab: vocabularies, templates, text embeddings and their cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from densevlm.config.core import ConfigError, from_dict
from densevlm.config.vocab import TextEmbeddingConfig
from densevlm.vocab import (
    ClassEntry,
    TemplateSet,
    TextEmbeddingCache,
    Vocabulary,
    build_text_embeddings,
    embed_text_main,
    get_templates,
    get_text_embeddings,
    get_vocabulary,
    list_vocabularies,
    load_text_embeddings,
    save_text_embeddings,
    split_synonyms,
    text_embeddings_from_config,
)
from densevlm.vocab.templates import SHORT_TEMPLATES, VILD_TEMPLATES

TINY_MODEL = "DenseVLMTest-TinyText"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class TinyTextModel(torch.nn.Module):
    """The text-encoder interface over a real open_clip CLIP, counting encode_text calls."""

    def __init__(self, clip: torch.nn.Module, tokenizer, weights_id: str = "seed0") -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.name = TINY_MODEL
        self.weights_id = weights_id
        self.calls = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.clip.encode_text(tokens)


@pytest.fixture(scope="module")
def clip_and_tokenizer(tmp_path_factory):
    torch.set_num_threads(1)
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg_dir / f"{TINY_MODEL}.json")
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    return clip, open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture
def model(clip_and_tokenizer) -> TinyTextModel:
    clip, tok = clip_and_tokenizer
    return TinyTextModel(clip, tok)


def small_vocab(name: str = "small", wardrobe_synonyms=("closet", "press")) -> Vocabulary:
    return Vocabulary(
        name,
        (
            ClassEntry("cat", (), isthing=True, id=1),
            ClassEntry("wardrobe", tuple(wardrobe_synonyms), isthing=True, id=2),
            ClassEntry("sky", (), isthing=False, id=3),
        ),
    )


def manual_name_embedding(model: TinyTextModel, texts: list[str]) -> torch.Tensor:
    """Reference computation for one name: normalise each sentence, mean, normalise."""
    with torch.no_grad():
        e = model.clip.encode_text(model.tokenizer(texts)).float()
    return F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1)


# -- vocabularies ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,size,things",
    [
        ("coco_panoptic", 133, 80),
        ("ade20k_150", 150, 100),
        ("coco_stuff_171", 171, 80),
        ("pascal_context_59", 59, 0),
        ("voc_21", 21, 21),
        ("cityscapes_19", 19, 8),
        ("coco_ade_316", 316, 204),
    ],
)
def test_builtin_sizes_and_thing_counts(name, size, things):
    v = get_vocabulary(name)
    assert len(v) == size
    assert int(v.thing_mask.sum()) == things
    assert int(v.stuff_mask.sum()) == size - things
    assert v.thing_mask.dtype == torch.bool and v.thing_mask.shape == (size,)
    assert torch.equal(v.thing_mask | v.stuff_mask, torch.ones(size, dtype=torch.bool))


def test_merged_316_boundary_house_is_thing():
    v = get_vocabulary("coco_ade_316")
    assert v[203].name == "house" and v[203].isthing
    assert v[204].name == "banner" and not v[204].isthing
    assert torch.equal(v.thing_indices, torch.arange(204))
    assert torch.equal(v.stuff_indices, torch.arange(204, 316))
    # The reference constant name resolves to the same list.
    assert get_vocabulary("COCO_STUFF_ADE20k_Thing204_STUFF112") == v
    # 'cupboard' is both a thing (123) and a stuff class (215) in the reference list; indices are kept.
    assert [i for i, n in enumerate(v.names) if n == "cupboard"] == [123, 215]


def test_coco_panoptic_80_things_then_53_stuff_with_ids():
    v = get_vocabulary("coco_panoptic")
    assert v.thing_list == [True] * 80 + [False] * 53
    assert v.ids[:3] == [1, 2, 3] and v.ids[-1] == 200
    assert v.id_to_index()[200] == 132


def test_comma_lists_become_synonyms():
    assert split_synonyms("wardrobe, closet, press") == ("wardrobe", ("closet", "press"))
    assert split_synonyms(" window ") == ("window", ())
    assert split_synonyms("cup, cups, cup,") == ("cup", ("cups",))
    ade = get_vocabulary("ade20k_150")
    wardrobe = next(c for c in ade if c.name == "wardrobe")
    assert wardrobe.synonyms == ("closet", "press") and wardrobe.id == 35
    assert "window" in ade.names  # the reference's 'window ' is stripped
    merged = get_vocabulary("coco_ade_316")
    assert sum(1 for c in merged if c.synonyms) == 101
    assert merged[200].all_names == ("andiron", "firedog", "dog", "dog-iron")
    with pytest.raises(ValueError, match="contains a comma"):
        ClassEntry("a, b")


def test_unknown_vocabulary_error_lists_builtins(tmp_path):
    with pytest.raises(ValueError) as err:
        get_vocabulary("coco_ade_999")
    msg = str(err.value)
    assert "'coco_ade_999'" in msg
    for name in list_vocabularies():
        assert name in msg
    with pytest.raises(FileNotFoundError, match="missing.json"):
        get_vocabulary(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="world.json"):
        get_vocabulary(tmp_path)  # a directory that is not a toy-world root


def test_masks_subset_and_seen():
    v = Vocabulary(
        "w",
        (
            ClassEntry("a", isthing=True, novel=False),
            ClassEntry("b", isthing=False, novel=True),
            ClassEntry("c", isthing=True, novel=True),
            ClassEntry("d", isthing=False, novel=False),
        ),
    )
    assert v.novel_mask.tolist() == [False, True, True, False]
    assert v.thing_indices.tolist() == [0, 2]
    assert v.seen().names == ["a", "d"] and v.seen().name == "w.seen"
    assert v.subset([2, 0]).names == ["a", "c"]  # original order is kept
    assert v.subset(v.stuff_mask).names == ["b", "d"]
    assert v.subset([True, False, False, True], name="x").name == "x"
    assert v.subset(lambda c: c.isthing and c.novel).names == ["c"]
    with pytest.raises(ValueError, match="length 2, expected 4"):
        v.subset([True, False])
    with pytest.raises(ValueError, match="index 7"):
        v.subset([7])
    with pytest.raises(ValueError, match="selects no class"):
        v.subset(lambda c: False)


def test_fingerprint_stable_and_sensitive():
    v = small_vocab()
    # Pinned: the hash must not change across runs or refactors, or every cache would silently go stale.
    assert v.fingerprint == "39c3888196f4def7512cbb8c7ce03dfde82dfe9ec63a608ee36359575483273f"
    assert v.renamed("other").fingerprint == v.fingerprint  # names of vocabularies do not matter
    assert v.renamed("other") != v  # but equality is strict
    variants = [
        small_vocab(wardrobe_synonyms=("closet",)),
        Vocabulary("small", (v[1], v[0], v[2])),
        Vocabulary("small", (v[0], v[1], ClassEntry("sky", (), isthing=True, id=3))),
        Vocabulary("small", (v[0], v[1], ClassEntry("sky", (), isthing=False, novel=True, id=3))),
    ]
    assert len({v.fingerprint, *(x.fingerprint for x in variants)}) == 5
    # ids are not part of the fingerprint
    assert Vocabulary("n", tuple(ClassEntry(c.name, c.synonyms, c.isthing) for c in v)).fingerprint == v.fingerprint
    with pytest.raises(ValueError, match=r"class 2: 'small' has 'sky' \[stuff\], 'small' has 'sky' \[thing\]"):
        v.check_compatible(variants[2])
    v.check_compatible(v.renamed("teacher"))


def test_json_roundtrip(tmp_path):
    v = small_vocab()
    path = tmp_path / "v.json"
    v.to_json(path)
    assert Vocabulary.from_json(path) == v
    assert get_vocabulary(path) == v
    builtin = get_vocabulary("ade20k_150")
    builtin.to_json(tmp_path / "ade.json")
    assert get_vocabulary(tmp_path / "ade.json").fingerprint == builtin.fingerprint


def test_coco_panoptic_json(tmp_path):
    path = tmp_path / "panoptic_val_mini.json"
    cats = [
        {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
        {"id": 7, "name": "wardrobe, closet", "isthing": 1},
        {"id": 184, "name": "tree-merged", "isthing": 0},
    ]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    v = get_vocabulary(path)
    assert v.name == "panoptic_val_mini"
    assert v.names == ["person", "wardrobe", "tree-merged"]
    assert v[1].synonyms == ("closet",)
    assert v.thing_list == [True, True, False] and v.novel_mask.tolist() == [False] * 3
    assert v.id_to_index() == {1: 0, 7: 1, 184: 2}

    no_flag = tmp_path / "instances.json"
    no_flag.write_text(json.dumps({"categories": [{"id": 1, "name": "person"}]}))
    with pytest.raises(ValueError, match=r"instances\.json: categories\[0\] \('person'\): key 'isthing' is missing"):
        get_vocabulary(no_flag)
    assert get_vocabulary(no_flag, default_isthing=True).thing_list == [True]

    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"categories": [{"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 0}]}))
    with pytest.raises(ValueError, match=r"dup\.json: .*id 1 is used by classes 0 and 1"):
        get_vocabulary(dup)


def test_toy_world_root(tmp_path):
    world = {
        "name": "toyworld-v1",
        "categories": [
            {"id": 1, "name": "circle", "isthing": True, "novel": False, "synonyms": ["disc", "round"], "color": [1, 0, 0]},
            {"id": 2, "name": "star", "isthing": True, "novel": True, "synonyms": []},
            {"id": 3, "name": "sand", "isthing": False, "novel": False, "synonyms": ["dune"]},
        ],
    }
    (tmp_path / "world.json").write_text(json.dumps(world))
    v = get_vocabulary(tmp_path)
    assert v.name == "toyworld-v1"
    assert v[0].all_names == ("circle", "disc", "round")
    assert v.thing_list == [True, True, False]
    assert v.novel_mask.tolist() == [False, True, False]
    assert v.seen().names == ["circle", "sand"]
    assert get_vocabulary(tmp_path / "world.json") == v


def test_bad_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        get_vocabulary(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"other\.json: not a vocabulary.*'classes'.*'categories'"):
        get_vocabulary(other)
    bad_flag = tmp_path / "bad_flag.json"
    bad_flag.write_text(json.dumps({"name": "x", "classes": [{"name": "a", "isthing": "yes"}]}))
    with pytest.raises(ValueError, match=r"bad_flag\.json: classes\[0\] \('a'\): key 'isthing' must be true/false"):
        get_vocabulary(bad_flag)
    no_flag = tmp_path / "no_flag.json"
    no_flag.write_text(json.dumps({"name": "x", "classes": [{"name": "a"}]}))
    with pytest.raises(ValueError, match=r"no_flag\.json: classes\[0\] \('a'\): key 'isthing' is missing"):
        get_vocabulary(no_flag)


# -- templates ------------------------------------------------------------------------------------------------
def test_template_sets_and_prefix_rule():
    vild = get_templates("vild")
    assert len(vild) == 63 and len(set(VILD_TEMPLATES)) == 63
    assert get_templates("hand_craft") == vild
    assert set(SHORT_TEMPLATES) <= set(VILD_TEMPLATES) and len(get_templates("short")) == 7
    texts = vild.format("Apple_Tree")
    assert texts[0] == "There is an apple tree in the scene."  # not prefixed: starts with "There"
    assert texts[2] == "This is a photo of an apple tree in the scene."
    assert "This is an embroidered apple tree." in texts  # "an" starts with "a"
    assert "This is the toy apple tree." in texts
    assert "itap of my apple tree." in texts
    assert sum(t.startswith("This is ") for t in texts) == 58  # all but 2 "There is" and 3 "itap of"
    plain = get_templates("vild", this_is_prefix=False)
    assert plain.format("cat")[2] == "a photo of a cat in the scene."
    assert plain.fingerprint != vild.fingerprint
    assert get_templates("single").format("umbrella") == ["a photo of an umbrella."]
    assert get_templates("single").format("cat/dog") == ["a photo of a cat or dog."]


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown template set 'vild63'.*vild, short, single"):
        get_templates("vild63")
    with pytest.raises(ValueError, match="exactly one '{}'"):
        TemplateSet("bad", ("a photo of {name}.",))
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(["a {} here.", "{article} {}."]))
    t = get_templates(path)
    assert t.name == "mine" and not t.this_is_prefix and t.format("owl") == ["a owl here.", "an owl."]


# -- embeddings -----------------------------------------------------------------------------------------------
def test_embeddings_are_unit_norm(model):
    emb = build_text_embeddings(model, small_vocab(), get_templates("short"), progress=False)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    # batching does not change the result
    assert torch.allclose(emb, build_text_embeddings(model, small_vocab(), get_templates("short"), batch_size=1, progress=False), atol=1e-6)


def test_template_averaging_matches_manual(model):
    templates = TemplateSet("two", ("a photo of {article} {}.", "There is the {} in the scene."), this_is_prefix=True)
    vocab = Vocabulary("one", (ClassEntry("owl", isthing=True),))
    emb = build_text_embeddings(model, vocab, templates, progress=False)
    expected = manual_name_embedding(model, ["This is a photo of an owl.", "There is the owl in the scene."])
    assert torch.allclose(emb[0], expected, atol=1e-6)
    # and it is not simply the first template's embedding
    assert (emb[0] - manual_name_embedding(model, ["This is a photo of an owl."])).abs().max() > 1e-3


def test_synonym_averaging(model):
    templates = get_templates("short")
    with_syn = build_text_embeddings(model, small_vocab(), templates, progress=False)
    without = build_text_embeddings(model, small_vocab(wardrobe_synonyms=()), templates, progress=False)
    assert torch.allclose(with_syn[[0, 2]], without[[0, 2]], atol=1e-6)  # other classes untouched
    assert float(with_syn[1] @ without[1]) < 1 - 1e-4
    names = [manual_name_embedding(model, templates.format(n)) for n in ("wardrobe", "closet", "press")]
    expected = F.normalize(torch.stack(names).mean(0), dim=-1)
    assert torch.allclose(with_syn[1], expected, atol=1e-6)


def test_model_mode_restored_and_interface_checked(model):
    model.train()
    build_text_embeddings(model, small_vocab(), get_templates("single"), progress=False)
    assert model.training and model.clip.training
    model.eval()

    class NoName:
        def encode_text(self, tokens):
            return tokens

    with pytest.raises(TypeError, match="tokenizer.*name: str.*weights_id: str"):
        build_text_embeddings(NoName(), small_vocab(), get_templates("single"))


# -- cache and files ------------------------------------------------------------------------------------------
def test_cache_hit_does_not_call_model(model, tmp_path, caplog):
    vocab, templates = small_vocab(), get_templates("short")
    first = get_text_embeddings(model, vocab, templates, tmp_path, progress=False)
    assert model.calls > 0
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith(f"{TINY_MODEL}--small--short--")
    model.calls = 0
    with caplog.at_level(logging.INFO, logger="densevlm.vocab"):
        second = get_text_embeddings(model, vocab, templates, tmp_path, progress=False)
    assert model.calls == 0
    assert torch.equal(first, second)
    assert "from cache" in caplog.text
    _, meta = load_text_embeddings(files[0], vocab)
    assert meta["weights_id"] == "seed0" and meta["vocabulary_fingerprint"] == vocab.fingerprint
    assert meta["templates_count"] == "7" and meta["thing_mask"] == "110"
    assert json.loads(meta["class_names"]) == ["cat", "wardrobe", "sky"]


@pytest.mark.parametrize("change", ["vocabulary", "templates", "weights_id"])
def test_cache_miss_on_change(model, tmp_path, caplog, change):
    vocab, templates = small_vocab(), get_templates("short")
    base = get_text_embeddings(model, vocab, templates, tmp_path, progress=False)
    if change == "vocabulary":  # same name, one flag flipped: must not reuse
        vocab = Vocabulary("small", (vocab[0], vocab[1], ClassEntry("sky", (), isthing=True, id=3)))
        reason = "vocabulary_fingerprint"
    elif change == "templates":
        templates = get_templates("short", this_is_prefix=False)
        reason = "templates_fingerprint"
    else:
        model.weights_id = "epoch6"
        reason = "weights_id: cached 'seed0', wanted 'epoch6'"
    model.calls = 0
    with caplog.at_level(logging.INFO, logger="densevlm.vocab"):
        rebuilt = get_text_embeddings(model, vocab, templates, tmp_path, progress=False)
    assert model.calls > 0
    assert reason in caplog.text
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    if change == "templates":
        assert not torch.allclose(base, rebuilt, atol=1e-4)
    else:  # the flag or the weights label changed, not the text: same numbers, separate file
        assert torch.allclose(base, rebuilt, atol=1e-6)


def test_no_cache_without_weights_id(model, tmp_path):
    model.weights_id = ""
    get_text_embeddings(model, small_vocab(), get_templates("single"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_file_is_rebuilt(model, tmp_path):
    vocab, templates = small_vocab(), get_templates("single")
    first = get_text_embeddings(model, vocab, templates, tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"garbage")
    model.calls = 0
    again = TextEmbeddingCache(tmp_path).get(model, vocab, templates, progress=False)
    assert model.calls > 0 and torch.allclose(first, again, atol=1e-6)
    assert load_text_embeddings(path)[0].shape == (3, 16)


def test_save_and_load_files(tmp_path):
    vocab = small_vocab()
    emb = torch.randn(3, 8)
    save_text_embeddings(tmp_path / "e.safetensors", emb, {"vocabulary_fingerprint": vocab.fingerprint, "n": 3})
    got, meta = load_text_embeddings(tmp_path / "e.safetensors", vocab)
    assert torch.equal(got, emb) and meta["n"] == "3"
    save_text_embeddings(tmp_path / "e.npy", emb, {})
    assert np.load(tmp_path / "e.npy").shape == (3, 8)
    got, meta = load_text_embeddings(tmp_path / "e.npy", vocab, renormalize=True)
    assert torch.allclose(got, F.normalize(emb, dim=-1)) and meta["format"] == "npy"
    assert list(tmp_path.glob(".*tmp")) == []  # no temporary files left behind


def test_load_errors_name_file_and_shapes(tmp_path):
    np.save(tmp_path / "ref.npy", np.zeros((316, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"ref\.npy: has 316 rows \(shape \(316, 4\)\) but vocabulary 'small' has 3"):
        load_text_embeddings(tmp_path / "ref.npy", small_vocab())
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"flat\.npy: expected text embeddings of shape \(N, D\), got \(5,\)"):
        load_text_embeddings(tmp_path / "flat.npy")
    other = small_vocab(wardrobe_synonyms=())
    save_text_embeddings(tmp_path / "o.safetensors", torch.ones(3, 2), {"vocabulary_fingerprint": other.fingerprint})
    with pytest.raises(ValueError, match=r"o\.safetensors: built for vocabulary .*other classes or flags"):
        load_text_embeddings(tmp_path / "o.safetensors", small_vocab())
    with pytest.raises(ValueError, match=r"e\.pt: unsupported text-embedding file type"):
        save_text_embeddings(tmp_path / "e.pt", torch.ones(3, 2), {})
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_text_embeddings(tmp_path / "nope.npy")


def test_embed_text_main_writes_and_caches(model, tmp_path):
    out = tmp_path / "out" / "voc.safetensors"
    emb = embed_text_main(model, "voc_21", "single", out, tmp_path / "cache", progress=False)
    assert emb.shape == (21, 16)
    got, meta = load_text_embeddings(out, get_vocabulary("voc_21"))
    assert torch.equal(got, emb) and meta["vocabulary_name"] == "voc_21" and meta["this_is_prefix"] == "false"
    model.calls = 0
    again = embed_text_main(model, "voc_21", "single", tmp_path / "voc.npy", tmp_path / "cache", progress=False)
    assert model.calls == 0 and torch.equal(again, emb)
    assert np.allclose(np.load(tmp_path / "voc.npy"), emb.numpy())


def test_config_and_from_config(model, tmp_path):
    with pytest.raises(ConfigError, match="batch_size: expected an integer >= 1"):
        from_dict(TextEmbeddingConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="embeddings_path"):
        from_dict(TextEmbeddingConfig, {"embeddings_path": "x.pt"})
    cfg = from_dict(TextEmbeddingConfig, {"vocabulary": "cityscapes_19", "templates": "single"})
    vocab, emb = text_embeddings_from_config(model, cfg)
    assert vocab.name == "cityscapes_19" and emb.shape == (19, 16)
    np.save(tmp_path / "ref.npy", (2 * emb).numpy())
    cfg = from_dict(TextEmbeddingConfig, {"vocabulary": "cityscapes_19", "embeddings_path": str(tmp_path / "ref.npy")})
    _, loaded = text_embeddings_from_config(None, cfg)
    assert torch.allclose(loaded.norm(dim=1), torch.full((19,), 2.0), atol=1e-5)  # kept as shipped
    cfg.renormalize = True
    _, loaded = text_embeddings_from_config(None, cfg)
    assert torch.allclose(loaded, emb, atol=1e-6)
