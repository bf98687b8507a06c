"""The toy world: category table, scene statistics, rendering, the written COCO files, determinism, safety."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densevlm.config.core import ConfigError, from_dict, load_config
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld import categories, generate_world, load_world, split_paths
from densevlm.toyworld.categories import STUFF_NAMES, THING_NAMES, THINGS, plural, terms
from densevlm.toyworld.icons import ICONS, Paint
from densevlm.toyworld.render import draw_thing, render_image
from densevlm.toyworld.scene import PlacedThing, sample_scene
from densevlm.toyworld.textures import TEXTURES, band_layout, render_stuff

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=96, num_train=12, num_val=4, workers=0, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "world"
    generate_world(ToyWorldConfig(**TINY), root, progress=False)
    return root


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
    ],
)
def test_config_validation_names_the_bad_value(changes, key):
    with pytest.raises(ValueError, match=key):
        ToyWorldConfig(**changes).validate()


def test_config_files_and_typos(tmp_path):
    assert load_config(ToyWorldConfig, REPO / "configs/toyworld/default.yaml") == ToyWorldConfig()
    quick = load_config(ToyWorldConfig, REPO / "configs/toyworld/quick.yaml")
    assert (quick.num_train, quick.num_val, quick.image_size) == (256, 64, 192)
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
def test_instances_decode_to_the_panoptic_segments(world):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

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


def test_panoptic_and_semantic_pngs_match_the_json(world):
    table = load_world(world)["categories"]
    index = {c["id"]: i for i, c in enumerate(table)}
    isthing = {c["id"]: c["isthing"] for c in table}
    for split in ("train", "val"):
        paths = split_paths(world, split)
        pan = json.loads(paths["panoptic_json"].read_text())
        assert [c["id"] for c in pan["categories"]] == [c["id"] for c in table]
        for ann in pan["annotations"]:
            ids = _panoptic_ids(paths["panoptic"] / ann["file_name"])
            segs = {s["id"]: s for s in ann["segments_info"]}
            assert set(np.unique(ids)) == set(segs) and 0 not in segs  # no void pixel, no empty segment
            stuff_cats = [s["category_id"] for s in segs.values() if not isthing[s["category_id"]]]
            assert len(stuff_cats) == len(set(stuff_cats))  # one segment per stuff category
            semantic = np.asarray(Image.open(paths["semantic"] / ann["file_name"]))
            assert semantic.dtype == np.uint8 and (semantic != 255).all()
            for sid, s in segs.items():
                m = ids == sid
                rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
                assert s["area"] == int(m.sum())
                assert s["bbox"] == [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                                     int(rows[-1] - rows[0] + 1)]
                assert s["iscrowd"] == 0
                assert (semantic[m] == index[s["category_id"]]).all()


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
