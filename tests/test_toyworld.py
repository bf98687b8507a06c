"""The toy world: category table, scene statistics, rendering, the written COCO files, determinism, safety;
the object-centric close-ups of the pre-training mix (issue 20) and the scene-only world they leave unchanged."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densevlm.config.core import ConfigError, from_dict, load_config
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld import categories, generate_world, load_world, split_paths
from densevlm.toyworld.captions import (PARTIAL_VIEW, PLAIN_BACKGROUND, STUFF_CLOSEUP, THING_CLOSEUP, THING_ON_STUFF,
                                        CloseUpInfo, closeup_captions)
from densevlm.toyworld.categories import STUFF_NAMES, THING_NAMES, THINGS, plural, terms
from densevlm.toyworld.closeup import render_closeup
from densevlm.toyworld.icons import ICONS, Paint
from densevlm.toyworld.render import draw_thing, render_image
from densevlm.toyworld.scene import PlacedThing, sample_scene
from densevlm.toyworld.textures import TEXTURES, band_layout, render_stuff

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=96, num_train=12, num_val=4, workers=0, seed=3)
MIX = {**TINY, "object_centric_share": 0.6}  # TINY's 12 scenes and 18 close-ups (ids 17..34)
# The ToyWorldConfig keys added with the close-ups (absent from worlds written before them).
CLOSEUP_KEYS = ("object_centric_share", "stuff_closeup_share", "min_object_size", "max_object_size",
                "max_object_offset", "object_partial_prob", "min_object_visible", "object_plain_prob",
                "object_two_stuff_prob", "object_mention_stuff_prob")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "world"
    generate_world(ToyWorldConfig(**TINY), root, progress=False)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """TINY with close-ups, rendered by two worker processes."""
    root = tmp_path_factory.mktemp("toymix") / "world"
    generate_world(ToyWorldConfig(**{**MIX, "workers": 2}), root, progress=False)
    return root


@pytest.fixture(params=["scenes", "mixed"])
def any_world(request) -> Path:
    return request.getfixturevalue("world" if request.param == "scenes" else "mixed")


def _term_pattern(table) -> tuple[re.Pattern, dict[str, str]]:
    """Every surface form of every category -> the category; longest forms first ("snow man" is a snowman)."""
    forms = {t: c["name"] for c in table for t in terms(c["name"])}
    return re.compile(r"\b(" + "|".join(re.escape(t) for t in sorted(forms, key=len, reverse=True)) + r")\b"), forms


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes, key",
    [
        ({"novel_fraction": 1.0}, "novel_fraction"),
        ({"image_size": 32}, "image_size"),
        ({"context_prob": 1.5}, "context_prob"),
        ({"min_things": 3, "max_things": 2}, "min_things"),
        ({"min_thing_size": 0.5, "max_thing_size": 0.4}, "min_thing_size"),
        ({"workers": -1}, "workers"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"num_train": 0, "num_val": 0}, "num_train"),
        ({"max_stuff_regions": 9}, "max_stuff_regions"),
        ({"novel_categories": ["kite", "unicorn"]}, "unicorn"),
        ({"novel_categories": list(STUFF_NAMES)}, "stuff"),
        ({"stuff_closeup_share": 1.2}, "stuff_closeup_share"),
        ({"object_plain_prob": 0.7, "object_two_stuff_prob": 0.5}, "object_plain_prob"),
        ({"min_object_size": 1.2, "max_object_size": 1.1}, "min_object_size"),
        ({"min_object_visible": 0.0}, "min_object_visible"),
        ({"max_object_offset": 0.6}, "max_object_offset"),
    ],
)
def test_config_validation_names_the_bad_value(changes, key):
    with pytest.raises(ValueError, match=key):
        ToyWorldConfig(**changes).validate()


@pytest.mark.parametrize("share", [-0.1, 1.5, 2, float("nan"), 1.0])
def test_object_centric_share_outside_the_unit_interval_is_refused_naming_key_and_value(share, tmp_path):
    """Issue 20's bad input: the share is a fraction of the train images. 1 itself is refused too: num_train
    counts the scenes and the close-ups come on top, so a share of 1 would need infinitely many."""
    with pytest.raises(ValueError, match=rf"object_centric_share\b.*got {re.escape(repr(share))}$"):
        ToyWorldConfig(object_centric_share=share).validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"object_centric_share: {share}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*object_centric_share"):
        load_config(ToyWorldConfig, bad)


def test_closeup_count_makes_the_share():
    assert ToyWorldConfig().num_closeups() == 0  # the default world: scenes only
    assert ToyWorldConfig(**MIX).num_closeups() == 18  # 18 / (12 + 18) = 0.6
    for n, share in ((35000, 0.3), (4000, 0.25), (7, 0.5), (0, 0.5), (10, 0.999)):
        k = ToyWorldConfig(num_train=n, object_centric_share=share).num_closeups()
        assert k == 0 if n == 0 else abs(k / (n + k) - share) <= 0.5 / (n + k), (n, share, k)
    assert ToyWorldConfig(num_train=35000, object_centric_share=0.3).num_closeups() == 15000


def test_config_files_and_typos(tmp_path):
    assert load_config(ToyWorldConfig, REPO / "configs/toyworld/default.yaml") == ToyWorldConfig()
    quick = load_config(ToyWorldConfig, REPO / "configs/toyworld/quick.yaml")
    assert (quick.num_train, quick.num_val, quick.image_size) == (256, 64, 192)
    # zoo v2: the zoo world's scene statistics, seed and val, with close-ups making 50 000 train images in all.
    zoo, v2 = (load_config(ToyWorldConfig, REPO / f"configs/toyworld/{n}.yaml") for n in ("zoo", "zoo_v2"))
    assert zoo.object_centric_share == 0.0 and 0.0 < v2.object_centric_share < 1.0
    scene_keys = [k for k in vars(zoo) if k not in CLOSEUP_KEYS and k != "num_train"]
    assert {k: getattr(v2, k) for k in scene_keys} == {k: getattr(zoo, k) for k in scene_keys}
    assert v2.num_train + v2.num_closeups() == zoo.num_train == 50000
    with pytest.raises(ConfigError, match="image_size"):
        from_dict(ToyWorldConfig, {"image_sze": 128})
    bad = tmp_path / "bad.yaml"
    bad.write_text("novel_fraction: 1.5\n")
    with pytest.raises(ConfigError, match="bad.yaml.*novel_fraction"):
        load_config(ToyWorldConfig, bad)


# ------------------------------------------------------------------------------------------- categories
def test_category_table():
    table = categories(ToyWorldConfig())
    things = [c for c in table if c["isthing"]]
    stuff = [c for c in table if not c["isthing"]]
    assert len(things) >= 16 and len(stuff) >= 8
    assert [c["id"] for c in table] == list(range(1, len(table) + 1))
    assert table[: len(things)] == things  # things first, then stuff
    assert len({c["name"] for c in table}) == len(table)
    assert len({tuple(c["color"]) for c in table}) == len(table) and all(any(c["color"]) for c in table)
    assert all(c["synonyms"] for c in table)
    assert all(c["preferred_stuff"] in STUFF_NAMES for c in things)
    assert all(c["preferred_stuff"] is None for c in stuff)
    assert {c["preferred_stuff"] for c in things} == set(STUFF_NAMES)  # every stuff has its things
    assert set(ICONS) == set(THING_NAMES) and set(TEXTURES) == set(STUFF_NAMES)
    # No surface form (name, synonym, plural) belongs to two categories.
    owner: dict[str, str] = {}
    for c in table:
        for t in terms(c["name"]):
            assert owner.setdefault(t, c["name"]) == c["name"], f"'{t}' names {owner[t]} and {c['name']}"


def test_novel_split_is_deterministic_and_overridable():
    table = categories(ToyWorldConfig(seed=0))
    novel = [c["name"] for c in table if c["novel"]]
    assert sum(c["isthing"] for c in table if c["novel"]) == round(0.25 * len(THING_NAMES))
    assert sum(not c["isthing"] for c in table if c["novel"]) == round(0.25 * len(STUFF_NAMES))
    assert novel == [c["name"] for c in categories(ToyWorldConfig(seed=0)) if c["novel"]]
    assert any(
        novel != [c["name"] for c in categories(ToyWorldConfig(seed=s)) if c["novel"]] for s in range(1, 4)
    )
    explicit = categories(ToyWorldConfig(novel_categories=["kite", "sand"]))
    assert [c["name"] for c in explicit if c["novel"]] == ["kite", "sand"]
    assert not any(c["novel"] for c in categories(ToyWorldConfig(novel_fraction=0.0)))


def test_plurals():
    assert [plural(w) for w in ("boat", "person", "fish", "bus", "daisy", "paper kite", "calf")] == [
        "boats", "people", "fish", "buses", "daisies", "paper kites", "calves"]


# ------------------------------------------------------------------------------------- scene and render
def test_context_correlation():
    cfg = ToyWorldConfig(image_size=96)
    pref = {t.name: t.preferred_stuff for t in THINGS}
    on_pref, total = 0, 0
    for i in range(150):
        scene = sample_scene(cfg, np.random.default_rng([7, i]))
        assert 1 <= len(scene.stuff) <= 3 and len(set(scene.stuff)) == len(scene.stuff)
        for t in scene.things:
            total += 1
            on_pref += t.on_stuff == pref[t.name]
            # The thing's centre lies in the band of the stuff it stands on.
            assert scene.stuff[scene.label[int(t.cy), int(t.cx)]] == t.on_stuff
    assert total > 300
    assert abs(on_pref / total - 0.7) < 0.06, on_pref / total
    for p in (0.0, 1.0):
        cfg = ToyWorldConfig(image_size=96, context_prob=p)
        things = [t for i in range(30) for t in sample_scene(cfg, np.random.default_rng([8, i])).things]
        assert all((t.on_stuff == pref[t.name]) == (p == 1.0) for t in things)


def test_every_icon_draws_a_compact_mask():
    rng = np.random.default_rng(0)
    for name in THING_NAMES:
        paint = Paint((200, 30, 30), "red", (30, 30, 200), "blue")
        t = PlacedThing(name, paint, size=64.0, cx=64.0, cy=64.0, angle=0.0, flip=False, on_stuff="grass")
        d = draw_thing(t, rng, 128)
        area = int(d.mask.sum())
        h, w = d.mask.shape
        assert 0.15 * 64 * 64 < area < 64 * 64, (name, area)  # fills a good part of its square
        assert max(h, w) <= 66 and min(h, w) >= 16, (name, h, w)  # and stays inside it
        assert len(np.unique(d.slots[d.mask])) >= 2, name  # several parts


def test_textures_are_told_apart_from_small_patches():
    """A 5-nearest-neighbour classifier on 8 simple statistics of 8-px patches (96-px images, i.e. 16-px
    patches at the default size) separates the stuff textures."""

    def features(p: np.ndarray) -> np.ndarray:
        p = p.astype(np.float32)
        g = p.mean(axis=2)
        return np.concatenate([p.mean((0, 1)), p.std((0, 1)),
                               [np.abs(np.diff(g, axis=1)).mean(), np.abs(np.diff(g, axis=0)).mean()]])

    rng = np.random.default_rng(0)
    feats, labels = [], []
    for c, name in enumerate(TEXTURES):
        for _ in range(10):
            label, bounds = band_layout(rng, 96, 1)
            img = render_stuff(rng, [name], label, bounds)
            for y, x in rng.integers(0, 96 - 8, (6, 2)):
                feats.append(features(img[y:y + 8, x:x + 8]))
                labels.append(c)
    x, y = np.array(feats), np.array(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    train = np.arange(len(y)) % 2 == 0
    d = ((x[~train][:, None] - x[train][None]) ** 2).sum(-1)
    votes = y[train][np.argsort(d, axis=1)[:, :5]]
    pred = np.array([np.bincount(v, minlength=len(TEXTURES)).argmax() for v in votes])
    assert (pred == y[~train]).mean() > 0.95


def test_render_is_a_partition_and_deterministic():
    cfg = ToyWorldConfig(image_size=96)
    a, b = render_image(cfg, "train", 5), render_image(cfg, "train", 5)
    assert np.array_equal(a.image, b.image) and a.captions == b.captions
    assert not np.array_equal(a.image, render_image(cfg, "val", 5).image)
    covered = np.zeros((96, 96), int)
    for i, s in enumerate(a.segments):
        covered += s.mask
        assert np.array_equal(s.mask, a.segment_map == i) and s.area == int(s.mask.sum())
        assert s.isthing == (s.thing is not None)
        assert not s.isthing or s.area >= cfg.min_segment_area
    assert (covered == 1).all()


# ------------------------------------------------------------------------------------- the written world
def test_layout_and_world_json(world):
    w = load_world(world)
    assert w["version"] == 1 and w["splits"] == {"train": 12, "val": 4}
    assert w["object_images"] == {"train": 0, "val": 0}
    assert w["config"] == {**ToyWorldConfig(**TINY).__dict__}
    assert w["categories"] == categories(ToyWorldConfig(**TINY))
    ids = {}
    for split in ("train", "val"):
        paths = split_paths(world, split)
        caps = json.loads(paths["captions"].read_text())
        assert set(caps) >= {"images", "annotations", "info", "licenses"}
        for img in caps["images"]:
            assert set(img) == {"id", "file_name", "width", "height"} and img["width"] == img["height"] == 96
            assert (paths["images"] / img["file_name"]).is_file()
            stem = Path(img["file_name"]).stem
            assert (paths["panoptic"] / f"{stem}.png").is_file() and (paths["semantic"] / f"{stem}.png").is_file()
            ids[img["id"]] = split
        assert len(caps["images"]) == w["splits"][split]
    assert sorted(ids) == list(range(1, 17))  # unique across splits


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy-2 warning
def test_instances_decode_to_the_panoptic_segments(any_world):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    world = any_world
    for split in ("train", "val"):
        paths = split_paths(world, split)
        coco = COCO(str(paths["instances"]))
        pan = json.loads(paths["panoptic_json"].read_text())
        thing_ids = {c["id"] for c in pan["categories"] if c["isthing"]}
        assert {c["id"] for c in coco.loadCats(coco.getCatIds())} == thing_ids
        assert all(c["supercategory"] for c in coco.loadCats(coco.getCatIds()))
        n_instances = 0
        for ann in pan["annotations"]:
            ids = _panoptic_ids(paths["panoptic"] / ann["file_name"])
            things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
            inst = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]]))
            assert len(inst) == len(things)
            for a in inst:
                assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
                m = coco.annToMask(a).astype(bool)
                match = [s for s in things if np.array_equal(ids == s["id"], m)]
                assert len(match) == 1 and match[0]["category_id"] == a["category_id"]
                assert a["area"] == int(m.sum()) == match[0]["area"] >= 16
                assert a["bbox"] == match[0]["bbox"] == [int(v) for v in mask_utils.toBbox(a["segmentation"])]
            n_instances += len(inst)
        assert n_instances >= len(pan["annotations"])  # at least one thing per image on average


def test_panoptic_and_semantic_pngs_match_the_json(any_world):
    world = any_world
    table = load_world(world)["categories"]
    index = {c["id"]: i for i, c in enumerate(table)}
    isthing = {c["id"]: c["isthing"] for c in table}
    voids = 0
    for split in ("train", "val"):
        paths = split_paths(world, split)
        pan = json.loads(paths["panoptic_json"].read_text())
        kinds = {img["id"]: img.get("kind", "scene") for img in pan["images"]}
        assert [c["id"] for c in pan["categories"]] == [c["id"] for c in table]
        for ann in pan["annotations"]:
            ids = _panoptic_ids(paths["panoptic"] / ann["file_name"])
            segs = {s["id"]: s for s in ann["segments_info"]}
            stuff_cats = [s["category_id"] for s in segs.values() if not isthing[s["category_id"]]]
            assert len(stuff_cats) == len(set(stuff_cats))  # one segment per stuff category
            semantic = np.asarray(Image.open(paths["semantic"] / ann["file_name"]))
            assert semantic.dtype == np.uint8
            # No empty segment; void (0 / 255, the same pixels) only on a close-up's plain background.
            assert 0 not in segs and set(np.unique(ids)) - {0} == set(segs)
            assert np.array_equal(ids == 0, semantic == 255)
            if (ids == 0).any():
                voids += 1
                assert kinds[ann["image_id"]] == "object" and not stuff_cats and len(segs) == 1
            for sid, s in segs.items():
                m = ids == sid
                rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
                assert s["area"] == int(m.sum())
                assert s["bbox"] == [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                                     int(rows[-1] - rows[0] + 1)]
                assert s["iscrowd"] == 0
                assert (semantic[m] == index[s["category_id"]]).all()
    assert (voids > 0) == (load_world(world)["object_images"]["train"] > 0)  # the mixed world has plain ones


def test_captions_name_only_present_categories(world):
    table = load_world(world)["categories"]
    by_id = {c["id"]: c["name"] for c in table}
    thing_ids = {c["id"] for c in table if c["isthing"]}
    forms = {t: c["name"] for c in table for t in terms(c["name"])}
    # Longest forms first, so that "snow man" counts as a snowman and not as snow.
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in sorted(forms, key=len, reverse=True)) + r")\b")
    mentions = largest_named = synonyms_used = 0
    for split in ("train", "val"):
        paths = split_paths(world, split)
        caps = json.loads(paths["captions"].read_text())
        pan = {a["image_id"]: a for a in json.loads(paths["panoptic_json"].read_text())["annotations"]}
        per_image: dict[int, list[str]] = {}
        for a in caps["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a["caption"])
        assert len({a["id"] for a in caps["annotations"]}) == len(caps["annotations"])
        for image_id, texts in per_image.items():
            assert len(texts) == 5
            segs = pan[image_id]["segments_info"]
            present = {by_id[s["category_id"]] for s in segs}
            things = [s for s in segs if s["category_id"] in thing_ids]
            largest = by_id[max(things, key=lambda s: s["area"])["category_id"]] if things else None
            for text in texts:
                found = [m.group(1) for m in pattern.finditer(text.lower())]
                assert found, text
                assert {forms[f] for f in found} <= present, (text, present)
                if largest is not None:
                    mentions += 1
                    largest_named += largest in {forms[f] for f in found}
                synonyms_used += any(f not in (forms[f], plural(forms[f])) for f in found)
    assert 0.6 < largest_named / mentions < 1.0  # often, not always
    assert synonyms_used > 0


def test_generation_is_byte_identical_across_runs_and_workers(world, tmp_path):
    again = tmp_path / "again"
    generate_world(ToyWorldConfig(**{**TINY, "workers": 2}), again, progress=False)
    a, b = _files(world), _files(again)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if k != "world.json" and a[k] != b[k]]
    assert not differing
    # world.json records the config it was made with, which differs only in 'workers'.
    wa, wb = json.loads(a["world.json"]), json.loads(b["world.json"])
    assert wa["config"].pop("workers") == 0 and wb["config"].pop("workers") == 2 and wa == wb


def test_refuses_to_overwrite_and_never_leaves_a_half_world(world, tmp_path, monkeypatch):
    cfg = ToyWorldConfig(**{**TINY, "num_train": 2, "num_val": 1})
    with pytest.raises(FileExistsError, match=re.escape(str(world))):
        generate_world(cfg, world, progress=False)
    assert load_world(world)["splits"] == {"train": 12, "val": 4}

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a toy world"):
        generate_world(cfg, other, overwrite=True, progress=False)
    assert (other / "keep.txt").read_text() == "mine"

    replaced = tmp_path / "replaced"
    generate_world(cfg, replaced, progress=False)
    generate_world(ToyWorldConfig(**{**TINY, "num_train": 1, "num_val": 1}), replaced, overwrite=True,
                   progress=False)
    assert load_world(replaced)["splits"] == {"train": 1, "val": 1}
    assert len(list((replaced / "images" / "train").iterdir())) == 1

    import densevlm.toyworld.generate as gen

    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("renderer crashed")
        return render_image(*args, **kwargs)

    monkeypatch.setattr(gen, "render_image", crash)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        generate_world(cfg, crashed, progress=False)
    assert not crashed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "replaced"]  # no staging left behind


def test_load_world_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_world(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="world.json"):
        load_world(tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_world(tmp_path)
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(ValueError, match="world.json"):
        load_world(tmp_path)


# ------------------------------------------------------------------- object-centric close-ups (issue 20)
# The TINY world as the code before close-ups wrote it (HEAD 603bb45; numpy 2.4.6, Pillow 13.0.0): the sha256
# of "<path> <sha256 of the file>\n" over its files but world.json (sorted), and of its world.json. A numpy or
# Pillow upgrade that changes how images are drawn or encoded fails this too: then every toy world, the zoo
# world included, has changed, which is worth knowing.
TINY_FILES_SHA256 = "5d8d6dddbfef811ed300d67a8196b2b7ed48980807293aa6295857ea91580433"
TINY_WORLD_JSON_SHA256 = "9fb29bbd6667ce6b67cd32be43f628a75ff9e42d87dfac6c1088acd90f76a971"


def test_share_zero_world_is_byte_identical_to_the_world_before_closeups(world):
    from densevlm.toyworld.writers import dump_json

    files = _files(world)
    meta = json.loads(files.pop("world.json"))
    listing = "".join(f"{k} {hashlib.sha256(v).hexdigest()}\n" for k, v in sorted(files.items()))
    assert len(files) == 54 and hashlib.sha256(listing.encode()).hexdigest() == TINY_FILES_SHA256
    # world.json records the config, which has the close-up keys now (the demo compares it with its own
    # config to reuse a world); without them and the close-up count it is the old file byte for byte.
    assert {k: meta["config"].pop(k) for k in CLOSEUP_KEYS}["object_centric_share"] == 0.0
    assert meta.pop("object_images") == {"train": 0, "val": 0}
    dump_json(meta, world / "old_world.json", indent=2)
    try:
        assert hashlib.sha256((world / "old_world.json").read_bytes()).hexdigest() == TINY_WORLD_JSON_SHA256
    finally:
        (world / "old_world.json").unlink()


def test_closeups_leave_every_scene_and_val_file_byte_identical(world, mixed):
    """A mixed world is its share-0 twin plus close-ups appended: the scenes (the demo's world is the zoo
    world's first scenes) and the whole val split (toy val stays the same benchmark) do not move."""
    a, b = _files(world), _files(mixed)
    train_json = {f"annotations/{k}_train.json" for k in ("captions", "instances", "panoptic")}
    for name, data in a.items():
        if name != "world.json" and name not in train_json:
            assert b[name] == data, name
    new = sorted(set(b) - set(a))
    stems = [f"{i:012d}" for i in range(17, 35)]  # ids after every scene of both splits
    assert new == sorted([f"images/train/{s}.jpg" for s in stems]
                         + [f"annotations/{kind}_train/{s}.png" for kind in ("panoptic", "semantic") for s in stems])
    for name in train_json:  # the twin's images and annotations first, unchanged; the close-ups after
        old, mix = json.loads(a[name]), json.loads(b[name])
        for key in ("images", "annotations"):
            assert mix[key][: len(old[key])] == old[key], (name, key)
            assert all(e.get("kind") == "object" for e in mix[key][len(old[key]):] if key == "images")
            mix[key] = mix[key][: len(old[key])]
        assert mix == old, name
    wa, wb = json.loads(a["world.json"]), json.loads(b["world.json"])
    assert wb["splits"] == {"train": 30, "val": 4} and wb["object_images"] == {"train": 18, "val": 0}
    assert wb["config"].pop("object_centric_share") == 0.6 and wb["config"].pop("workers") == 2
    assert wa["config"].pop("object_centric_share") == 0.0 and wa["config"].pop("workers") == 0
    assert wa["config"] == wb["config"] and wa["categories"] == wb["categories"]
    # Close-up annotation ids follow the val split's, so no scene annotation id depends on them.
    val_caps = json.loads(b["annotations/captions_val.json"])["annotations"]
    train_caps = json.loads(b["annotations/captions_train.json"])["annotations"]
    assert min(c["id"] for c in train_caps if c["image_id"] > 16) > max(c["id"] for c in val_caps)


def test_closeups_are_deterministic_per_seed_and_independent_of_workers(mixed, tmp_path):
    again = tmp_path / "again"
    generate_world(ToyWorldConfig(**MIX), again, progress=False)  # in-process; the fixture used 2 workers
    a, b = _files(mixed), _files(again)
    assert sorted(a) == sorted(b) and not [k for k in a if k != "world.json" and a[k] != b[k]]
    other = render_closeup(ToyWorldConfig(**{**MIX, "seed": 4}), 0).image
    assert not np.array_equal(render_closeup(ToyWorldConfig(**MIX), 0).image, other)
    # Close-up j draws from its own stream: neither scene j's of a split nor close-up j + 1's.
    cfg = ToyWorldConfig(**MIX)
    assert not np.array_equal(render_closeup(cfg, 0).image, render_closeup(cfg, 1).image)
    from densevlm.toyworld.closeup import closeup_rngs
    from densevlm.toyworld.render import image_rngs

    draws = {tuple(g.integers(0, 2**62, 4)) for g in (*closeup_rngs(cfg, 0), *image_rngs(cfg, "train", 0),
                                                       *image_rngs(cfg, "val", 0))}
    assert len(draws) == 9
    assert render_closeup(cfg, 3).captions == render_closeup(cfg, 3).captions


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy-2 warning
def test_closeup_annotations_cover_the_object_and_captions_name_it(mixed):
    from pycocotools.coco import COCO

    table = load_world(mixed)["categories"]
    by_id = {c["id"]: c for c in table}
    pattern, forms = _term_pattern(table)
    paths = split_paths(mixed, "train")
    coco = COCO(str(paths["instances"]))
    pan = {a["image_id"]: a for a in json.loads(paths["panoptic_json"].read_text())["annotations"]}
    caps = json.loads(paths["captions"].read_text())
    texts: dict[int, list[str]] = {}
    for c in caps["annotations"]:
        texts.setdefault(c["image_id"], []).append(c["caption"])
    size, seen = 96, {"thing": 0, "stuff": 0}
    for img in caps["images"]:
        if img.get("kind") != "object":
            continue
        segs = pan[img["id"]]["segments_info"]
        inst = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        present = {by_id[s["category_id"]]["name"] for s in segs}
        ids = _panoptic_ids(paths["panoptic"] / pan[img["id"]]["file_name"])
        if inst:  # a thing close-up: one instance that covers its thing
            seen["thing"] += 1
            (a,) = inst
            named = by_id[a["category_id"]]["name"]
            assert by_id[a["category_id"]]["isthing"] and [s for s in segs if by_id[s["category_id"]]["isthing"]]
            m = coco.annToMask(a).astype(bool)
            (seg,) = [s for s in segs if s["category_id"] == a["category_id"]]
            assert np.array_equal(m, ids == seg["id"]) and a["area"] == int(m.sum())
            assert a["area"] >= 0.04 * size * size, (img["id"], a["area"])  # a close-up, not a scene's thing
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size and max(w, h) >= 0.3 * size, a["bbox"]
        else:  # a stuff close-up: one stuff segment fills the frame
            seen["stuff"] += 1
            (seg,) = segs
            named = by_id[seg["category_id"]]["name"]
            assert not by_id[seg["category_id"]]["isthing"] and seg["area"] == size * size
        assert len(texts[img["id"]]) == 5
        for text in texts[img["id"]]:
            found = {forms[f] for f in (m.group(1) for m in pattern.finditer(text.lower()))}
            assert named in found and found <= present, (text, named, present)
    assert seen["thing"] >= 5 and seen["stuff"] >= 2, seen


def test_closeup_rendering_varies_scale_position_background_and_view():
    cfg = ToyWorldConfig(image_size=64, object_centric_share=0.5)
    shots = [render_closeup(cfg, j) for j in range(200)]
    things = [r for r in shots if r.closeup.thing is not None]
    stuff = [r for r in shots if r.closeup.thing is None]
    assert abs(len(stuff) / len(shots) - cfg.stuff_closeup_share) < 0.08
    assert {r.closeup.thing for r in things} == set(THING_NAMES)
    assert {r.closeup.stuff[0] for r in stuff} == set(STUFF_NAMES)
    backgrounds = [r.closeup.background for r in things]
    assert abs(backgrounds.count("plain") / len(things) - cfg.object_plain_prob) < 0.1
    assert abs(backgrounds.count("two stuff") / len(things) - cfg.object_two_stuff_prob) < 0.1
    sizes = [t.scene.things[0].size / 64 for t in things]
    assert min(sizes) < 0.6 and max(sizes) > 1.0 and all(0.5 <= s <= 1.1 for s in sizes)  # some overflow
    assert all(r.closeup.visible >= cfg.min_object_visible for r in things)
    cut = [r for r in things if r.closeup.visible < 0.9]
    assert 0.05 < len(cut) / len(things) < 0.5  # occasional partial views
    assert all(r.closeup.partial for r in cut)
    assert all(r.segments[0].category == r.closeup.thing and r.segments[0].isthing for r in things)
    # The context correlation holds for close-ups too (one-stuff backgrounds: the thing's preferred stuff).
    pref = {t.name: t.preferred_stuff for t in THINGS}
    one = [r for r in things if r.closeup.background == "one stuff"]
    assert abs(sum(r.closeup.stuff[0] == pref[r.closeup.thing] for r in one) / len(one) - cfg.context_prob) < 0.15
    # A draw that keeps too little of the thing in frame is redrawn, the last resort centred at the smallest size.
    strict = ToyWorldConfig(image_size=64, stuff_closeup_share=0.0, object_partial_prob=1.0, min_object_visible=0.99,
                            max_object_size=1.6)
    redrawn = [render_closeup(strict, j).closeup for j in range(20)]
    assert all(c.visible >= 0.99 for c in redrawn) and max(c.tries for c in redrawn) > 1


def test_closeup_captions_always_name_the_object():
    pattern, forms = _term_pattern(categories(ToyWorldConfig()))
    rng = np.random.default_rng(0)
    used: set[str] = set()
    cases = [CloseUpInfo(t, "red", partial, bg) for t in THING_NAMES for partial in (False, True)
             for bg in ((), ("sky",), ("grass", "road"))] + [CloseUpInfo(None, "", False, (s,)) for s in STUFF_NAMES]
    for info in cases:
        named = info.thing or info.stuff[0]
        for text in closeup_captions(rng, info, 20, 0.5):
            found = {forms[f] for f in (m.group(1) for m in pattern.finditer(text.lower()))}
            assert named in found and found <= {named, *info.stuff[:1]}, (text, info)
            used.add(text)
    assert len(used) > 1000  # varied phrasing
    # Every template has a field for its object; those of THING_ON_STUFF one for the stuff as well.
    for group in (THING_CLOSEUP, THING_ON_STUFF, PLAIN_BACKGROUND, PARTIAL_VIEW):
        assert all("thing}" in t for t in group)
    assert all("stuff}" in t or "{relation}" in t for t in THING_ON_STUFF)
    assert all("stuff}" in t for t in STUFF_CLOSEUP)


def test_project_readers_read_a_world_with_closeups(mixed):
    """Pre-training captions, the region evaluator's panoptic reader (void pixels included) and the image source
    of the alignment stages all read the close-ups of the train split as they read scenes."""
    from densevlm.config.evaluation import PanopticDataConfig
    from densevlm.data.captions import CaptionDataset
    from densevlm.data.panoptic import PanopticRegionDataset
    from densevlm.data.sources import ImageSource, ImageSourceConfig

    paths = split_paths(mixed, "train")
    captions = CaptionDataset(paths["captions"], paths["images"], 64)
    assert len(captions) == 30 and captions[29][0].shape == (3, 64, 64)
    regions = PanopticRegionDataset(PanopticDataConfig(panoptic_json=str(paths["panoptic_json"]),
                                                       image_root=str(paths["images"]), image_size=64), 16)
    items = [regions[i] for i in range(len(regions))]
    assert len(items) == 30 and all(len(it["labels"]) >= 1 for it in items)
    assert len(ImageSource(ImageSourceConfig(kind="toyworld", path=str(mixed), split="train"))) == 30
