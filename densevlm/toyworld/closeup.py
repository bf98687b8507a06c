"""Object-centric close-ups: the web-like part of the pre-training mix (issue 20, design decision 1).

Web data, on which real CLIP towers are pre-trained, is full of single-object photos; that is why those towers
name crops of objects well. The toy world's scenes have none, so a world with ``object_centric_share`` > 0
adds close-ups to its train split:

* a **thing close-up**: one thing whose icon side is ``min_object_size``..``max_object_size`` of the image
  side (above 1 it overflows the frame), its centre offset by up to ``max_object_offset`` of the side, rotated
  and mirrored as in scenes; with probability ``object_partial_prob`` it is shifted further so that part of it
  leaves the frame. At least ``min_object_visible`` of its own pixels stay inside (a draw that leaves fewer is
  redrawn, up to :data:`PLACEMENT_TRIES` times, then the thing is centred at the smallest size). Its
  background is a plain colour (``object_plain_prob``; no category: panoptic void, semantic 255, no segment),
  two stuff bands (``object_two_stuff_prob``) or one stuff texture filling the frame; the first stuff is the
  thing's preferred one with probability ``context_prob``, as in scenes;
* a **stuff close-up** (``stuff_closeup_share`` of the close-ups): one stuff texture filling the whole frame;

with ``captions_per_image`` web alt-text captions (templates in :mod:`densevlm.toyworld.captions`: "a photo of
a kite", "close-up of brick wall", "kite", "a kite in the sky", ...) that always name the object.

**Where they go.** ``num_train`` keeps counting the train scenes; the ``cfg.num_closeups()`` close-ups come on
top of them, after every scene: close-up ``j`` has image id ``num_train + num_val + 1 + j``, lies in
``images/train/`` and is listed after the train scenes in the train JSON files (its caption and instance
annotation ids follow the val split's), with ``"kind": "object"`` in its image entry (scene entries carry no
``kind``: absent means a scene). Each close-up draws from its own random stream, seeded from
``(seed, OBJECT_STREAM, j)``, never from the scenes' ``(seed, split, index)``. So a world with close-ups is its
scene-only twin (share 0, same config otherwise) plus appended close-ups: every scene, every val file and every
annotation of the twin stay byte-identical, and the demo's world (the first scenes of the zoo world) and toy val
remain the same benchmark.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld.captions import CloseUpInfo, closeup_captions
from densevlm.toyworld.categories import STUFF_NAMES, THING_NAMES, stuff_def, thing_def
from densevlm.toyworld.render import RenderedImage, Segment, _bbox, draw_thing
from densevlm.toyworld.scene import PlacedThing, Scene, _paint
from densevlm.toyworld.textures import band_layout, render_stuff

OBJECT_STREAM = 2  # the random stream of close-ups, beside the splits' (render.SPLIT_CODES: train 0, val 1)
PLACEMENT_TRIES = 8
KIND = "object"  # the ``kind`` of a close-up's image entry


@dataclass
class CloseUp:
    """How a close-up was drawn (for tests and statistics): what it shows and how much of the thing is in frame."""

    thing: str | None  # None: a stuff close-up
    stuff: list[str]  # background stuff, top to bottom (empty: plain)
    background: str  # "plain", "one stuff", "two stuff" or "stuff" (a stuff close-up)
    visible: float  # of the thing's own pixels, the part inside the frame (1 for a stuff close-up)
    partial: bool  # the thing touches the frame's edge (part of it is cut off)
    tries: int  # placements drawn (PLACEMENT_TRIES + 1: the centred fallback)


def closeup_rngs(cfg: ToyWorldConfig, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators (image, captions, segment ids) of close-up ``index``, seeded from (seed, index)
    only: another stream than any scene's (:func:`densevlm.toyworld.render.image_rngs`)."""
    seq = np.random.SeedSequence([cfg.seed, OBJECT_STREAM, index])
    return tuple(np.random.default_rng(s) for s in seq.spawn(3))


def closeup_image_id(cfg: ToyWorldConfig, index: int) -> int:
    """The image id of close-up ``index``: after every scene of both splits."""
    return cfg.num_train + cfg.num_val + 1 + index


def _plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A studio-like backdrop: one low-saturation colour with a soft vertical gradient and faint grain."""
    grey = rng.uniform(70, 245)
    base = np.clip(grey + rng.uniform(-25, 25, 3), 0, 255).astype(np.float32)
    ramp = np.linspace(rng.uniform(0.92, 1.05), rng.uniform(0.92, 1.05), size, dtype=np.float32)
    img = base[None, None, :] * ramp[:, None, None] + (rng.random((size, size, 1), dtype=np.float32) - 0.5) * 4
    return np.clip(img, 0, 255).astype(np.uint8)


def _full_frame(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The layout of one stuff filling the frame (as :func:`band_layout` with one band, drawing nothing)."""
    bounds = np.empty((2, size), np.float32)
    bounds[0], bounds[1] = 0.0, float(size)
    return np.zeros((size, size), np.uint8), bounds


def _background_stuff(cfg: ToyWorldConfig, rng: np.random.Generator, thing: str, n: int) -> tuple[list[str], str]:
    """``n`` distinct stuff behind a thing, top to bottom, and the one it is seen on: its preferred stuff with
    probability ``context_prob``, another one otherwise (as a scene's thing stands on its preferred stuff)."""
    pref = thing_def(thing).preferred_stuff
    if rng.random() < cfg.context_prob:
        chosen = [pref]
    else:
        others = [s for s in STUFF_NAMES if s != pref]
        chosen = [others[int(rng.integers(len(others)))]]
    while len(chosen) < n:
        rest = [s for s in STUFF_NAMES if s not in chosen]
        chosen.append(rest[int(rng.integers(len(rest)))])
    tie = rng.random(len(chosen))
    order = sorted(range(len(chosen)), key=lambda i: (stuff_def(chosen[i]).rank, tie[i]))
    return [chosen[i] for i in order], chosen[0]


def _place_thing(cfg: ToyWorldConfig, rng: np.random.Generator, name: str, on_stuff: str):
    """Draw the close-up's thing until at least ``min_object_visible`` of it lies in the frame; returns the
    placed thing, its drawing, the visible fraction and the number of placements drawn."""
    size = cfg.image_size
    for attempt in range(PLACEMENT_TRIES + 1):
        if attempt < PLACEMENT_TRIES:
            side = float(rng.uniform(cfg.min_object_size, cfg.max_object_size)) * size
            dx, dy = rng.uniform(-cfg.max_object_offset, cfg.max_object_offset, 2) * size
            if rng.random() < cfg.object_partial_prob:  # a partial view: pushed towards an edge
                a = rng.uniform(0.0, 2.0 * math.pi)
                r = rng.uniform(0.25, 0.5) * size
                dx, dy = r * math.cos(a), r * math.sin(a)
            angle = float(rng.uniform(-1, 1)) * cfg.max_rotation * thing_def(name).rotation
        else:  # fallback: centred, smallest size, upright (the rotated icon square then fits in the frame)
            side, dx, dy, angle = cfg.min_object_size * size, 0.0, 0.0, 0.0
        thing = PlacedThing(name=name, paint=_paint(rng, name), size=side, cx=size / 2 + float(dx),
                            cy=size / 2 + float(dy), angle=angle, flip=bool(rng.random() < 0.5), on_stuff=on_stuff)
        # The same icon drawn whole (centred in a canvas it cannot leave) gives the thing's own area.
        whole_rng = copy.deepcopy(rng)
        reach = int(math.ceil(side * 0.71 + 3))
        whole = draw_thing(PlacedThing(name, thing.paint, side, reach, reach, angle, thing.flip, on_stuff),
                           whole_rng, 2 * reach + 1)
        drawn = draw_thing(thing, rng, size)
        if drawn is None or whole is None:
            continue
        area = int(drawn.mask.sum())
        visible = area / max(int(whole.mask.sum()), 1)
        if area >= cfg.min_segment_area and visible >= cfg.min_object_visible:
            return thing, drawn, min(visible, 1.0), attempt + 1
    # Unreachable for valid configs (the fallback lies inside the frame); say so rather than loop.
    raise RuntimeError(f"could not place a {name} close-up in a {size}-px frame")


def render_closeup(cfg: ToyWorldConfig, index: int) -> RenderedImage:
    """Sample, draw and segment close-up ``index``; deterministic in (cfg, index)."""
    rng, caption_rng, spare_rng = closeup_rngs(cfg, index)
    size = cfg.image_size
    if rng.random() < cfg.stuff_closeup_share:
        name = STUFF_NAMES[int(rng.integers(len(STUFF_NAMES)))]
        label, bounds = _full_frame(size)
        image = render_stuff(rng, [name], label, bounds)
        mask = np.ones((size, size), bool)
        segments = [Segment(name, False, mask, size * size, [0, 0, size, size])]
        scene = Scene(stuff=[name], label=label, bounds=bounds, things=[])
        info = CloseUp(None, [name], "stuff", 1.0, False, 0)
        segment_map = np.zeros((size, size), np.int16)
        texts = closeup_captions(caption_rng, CloseUpInfo(None, "", False, (name,)), cfg.captions_per_image,
                                 cfg.object_mention_stuff_prob)
        return RenderedImage(image, segment_map, segments, texts, scene, spare_rng, info)

    name = THING_NAMES[int(rng.integers(len(THING_NAMES)))]
    r = rng.random()
    if r < cfg.object_plain_prob:
        background, stuff, on_stuff = "plain", [], ""
    elif r < cfg.object_plain_prob + cfg.object_two_stuff_prob:
        background = "two stuff"
        stuff, on_stuff = _background_stuff(cfg, rng, name, 2)
    else:
        background = "one stuff"
        stuff, on_stuff = _background_stuff(cfg, rng, name, 1)
    if stuff:
        label, bounds = band_layout(rng, size, len(stuff)) if len(stuff) > 1 else _full_frame(size)
        image = render_stuff(rng, stuff, label, bounds)
    else:
        label, bounds = np.zeros((size, size), np.uint8), np.empty((1, size), np.float32)
        image = _plain_background(rng, size)
    thing, drawn, visible, tries = _place_thing(cfg, rng, name, on_stuff)

    # Segment index per pixel: the thing 0, stuff bands 1.. (top to bottom); void (plain) = after the last.
    n_void = len(stuff) + 1
    seg = np.take(np.arange(1, len(stuff) + 1, dtype=np.int16), label) if stuff else np.full(
        (size, size), n_void, np.int16)
    ys, xs = drawn.box
    seg[ys, xs][drawn.mask] = 0
    pixels = np.take(drawn.colours, drawn.slots[drawn.mask], axis=0) * drawn.shade[drawn.mask][:, None]
    image[ys, xs][drawn.mask] = np.clip(pixels, 0, 255).astype(np.uint8)
    areas = np.bincount(seg.ravel(), minlength=n_void + 1)
    mask = seg == 0
    rows, cols = np.flatnonzero(drawn.mask.any(axis=1)), np.flatnonzero(drawn.mask.any(axis=0))
    bbox = [drawn.x0 + int(cols[0]), drawn.y0 + int(rows[0]), int(cols[-1] - cols[0] + 1),
            int(rows[-1] - rows[0] + 1)]
    segments = [Segment(name, True, mask, int(areas[0]), bbox, thing)]
    remap = np.arange(n_void + 1, dtype=np.int16)
    for i, s in enumerate(stuff):
        j = i + 1
        if areas[j] == 0:  # entirely behind the thing
            continue
        remap[j] = len(segments)
        band = seg == j
        segments.append(Segment(s, False, band, int(areas[j]), _bbox(band)))
    remap[n_void] = len(segments)  # void: one past the last segment (writers map it to id 0 / label 255)
    segment_map = np.take(remap, seg)
    x, y, w, h = bbox
    partial = x == 0 or y == 0 or x + w == size or y + h == size
    # The stuff captions may name: the one the thing is seen on first (if visible), then by visible area.
    shown = tuple(sorted((s.category for s in segments[1:]),
                         key=lambda c: (c != on_stuff, -int(areas[1 + stuff.index(c)]))))
    texts = closeup_captions(caption_rng, CloseUpInfo(name, thing.paint.main_name, partial, shown),
                             cfg.captions_per_image, cfg.object_mention_stuff_prob)
    scene = Scene(stuff=stuff, label=label, bounds=bounds, things=[thing])
    info = CloseUp(name, stuff, background, visible, partial, tries)
    return RenderedImage(image, segment_map, segments, texts, scene, spare_rng, info)
