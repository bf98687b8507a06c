"""What is in one image: which stuff bands, which things, where, and on which stuff each thing stands.

The context correlation lives here: every thing stands on its category's preferred stuff with probability
``context_prob`` and on another stuff otherwise, exactly, for every thing (the stuff set of an image is built
around its things, and once an image has its full number of stuff regions the next things are drawn so that
the probability still holds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld.categories import COLOURS, STUFF_NAMES, THINGS, stuff_def, thing_def
from densevlm.toyworld.icons import Paint
from densevlm.toyworld.textures import band_layout


@dataclass
class PlacedThing:
    """One thing instance before rendering. Coordinates are pixels; ``size`` is the icon side in pixels."""

    name: str
    paint: Paint
    size: float
    cx: float
    cy: float
    angle: float  # degrees, counter-clockwise on screen
    flip: bool  # mirrored left-right
    on_stuff: str


@dataclass
class Scene:
    """The layout of one image: stuff bands top to bottom and the things standing on them."""

    stuff: list[str]  # top to bottom; ``label`` indexes it
    label: np.ndarray  # (S, S) uint8 band index
    bounds: np.ndarray  # (len(stuff) + 1, S) band boundaries, for textures that follow them (lane marks)
    things: list[PlacedThing]  # in drawing order (back to front)


def _choose_categories(cfg: ToyWorldConfig, rng: np.random.Generator) -> tuple[list[str], list[tuple[str, str]]]:
    """Pick the stuff set and (thing, stuff it stands on) pairs of one image."""
    n_regions = min(int(rng.integers(cfg.min_stuff_regions, cfg.max_stuff_regions + 1)), len(STUFF_NAMES))
    n_things = int(rng.integers(cfg.min_things, cfg.max_things + 1))
    things = [t.name for t in THINGS]
    pref = {t.name: t.preferred_stuff for t in THINGS}
    stuff: list[str] = []
    plan: list[tuple[str, str]] = []
    for _ in range(n_things):
        in_context = rng.random() < cfg.context_prob
        if len(stuff) < n_regions:
            name = things[int(rng.integers(len(things)))]
            if in_context:
                target = pref[name]
            else:
                others = [s for s in STUFF_NAMES if s != pref[name]]
                target = others[int(rng.integers(len(others)))]
            if target not in stuff:
                stuff.append(target)
        elif in_context:  # the stuff set is full: a thing whose preferred stuff is in it
            fitting = [t for t in things if pref[t] in stuff]
            name = fitting[int(rng.integers(len(fitting)))]
            target = pref[name]
        else:  # the stuff set is full: a thing on a stuff of the set that it does not prefer
            fitting = [t for t in things if any(s != pref[t] for s in stuff)]
            name = fitting[int(rng.integers(len(fitting)))]
            others = [s for s in stuff if s != pref[name]]
            target = others[int(rng.integers(len(others)))]
        plan.append((name, target))
    while len(stuff) < n_regions:
        rest = [s for s in STUFF_NAMES if s not in stuff]
        stuff.append(rest[int(rng.integers(len(rest)))])
    # Bands from top to bottom by rank (sky above walls above ground above floors), ties at random.
    tie = rng.random(len(stuff))
    order = sorted(range(len(stuff)), key=lambda i: (stuff_def(stuff[i]).rank, tie[i]))
    return [stuff[i] for i in order], plan


def _paint(rng: np.random.Generator, name: str) -> Paint:
    palette = thing_def(name).palette
    main_name = palette[int(rng.integers(len(palette)))]
    others = [c for c in palette if c != main_name] or [main_name]
    second_name = others[int(rng.integers(len(others)))]

    def jitter(c: str) -> tuple[int, int, int]:
        r, g, b = (min(max(v + int(d), 0), 255) for v, d in zip(COLOURS[c], rng.integers(-14, 15, 3)))
        return (r, g, b)

    return Paint(jitter(main_name), main_name, jitter(second_name), second_name)


def _place(
    rng: np.random.Generator, pixels: np.ndarray, top: np.ndarray, bottom: np.ndarray, size: int, side: float,
    boxes: list[tuple[float, float, float, float]], candidates: int = 10,
) -> tuple[float, float]:
    """A centre inside a band (one of its ``pixels``) whose box lies mostly in the band and overlaps the boxes of
    earlier things little. The band holds rows ``top[x] <= y < bottom[x]`` of column x."""
    half = 0.45 * side  # icons fill most of their square; rotation adds little on average
    flat = pixels[rng.integers(pixels.size, size=candidates)]
    cx = (flat % size) + rng.random(candidates)
    cy = (flat // size) + rng.random(candidates)
    x0, x1 = (np.clip(np.round(cx + d), 0, size)[:, None] for d in (-half, half))
    y0, y1 = (np.clip(np.round(cy + d), 0, size)[:, None] for d in (-half, half))
    cols = np.arange(size)[None, :]
    rows_in = np.clip(np.minimum(bottom[None, :], y1) - np.maximum(top[None, :], y0), 0, None)
    inside = (rows_in * ((cols >= x0) & (cols < x1))).sum(axis=1)
    score = inside / (2 * half) ** 2  # the part of the box off the image counts as outside
    for bx0, by0, bx1, by1 in boxes:
        iw = np.minimum(bx1, cx + half) - np.maximum(bx0, cx - half)
        ih = np.minimum(by1, cy + half) - np.maximum(by0, cy - half)
        smaller = min((bx1 - bx0) * (by1 - by0), (2 * half) ** 2)
        overlap = np.where((iw > 0) & (ih > 0), iw * ih, 0.0) / smaller
        score -= 2.0 * np.maximum(overlap - 0.6, 0.0)  # some overlap (occlusion) is welcome, hiding is not
    best = int(np.argmax(score))
    return float(cx[best]), float(cy[best])


def sample_scene(cfg: ToyWorldConfig, rng: np.random.Generator) -> Scene:
    """Draw the content and layout of one image from ``rng``."""
    size = cfg.image_size
    stuff, plan = _choose_categories(cfg, rng)
    label, bounds = band_layout(rng, size, len(stuff))
    # Row r of column x lies in band i iff starts[i, x] <= r < starts[i + 1, x] (as ``label`` is computed).
    starts = np.clip(np.ceil(bounds - 0.5), 0, size)
    band_of = {name: i for i, name in enumerate(stuff)}
    region_pixels = {name: np.flatnonzero(label == i) for i, name in enumerate(stuff)}
    things: list[PlacedThing] = []
    boxes: list[tuple[float, float, float, float]] = []
    for name, target in plan:
        if region_pixels[target].size == 0:  # cannot happen with bands >= 6 % of the side; be safe anyway
            continue
        side = float(rng.uniform(cfg.min_thing_size, cfg.max_thing_size)) * size
        i = band_of[target]
        cx, cy = _place(rng, region_pixels[target], starts[i], starts[i + 1], size, side, boxes)
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        things.append(PlacedThing(
            name=name, paint=_paint(rng, name), size=side, cx=cx, cy=cy,
            angle=float(rng.uniform(-1, 1)) * cfg.max_rotation * thing_def(name).rotation,
            flip=bool(rng.random() < 0.5), on_stuff=target,
        ))
    # Lower things are nearer the viewer: drawn later, so they occlude the ones behind.
    things.sort(key=lambda t: t.cy + t.size / 2)
    return Scene(stuff=stuff, label=label, bounds=bounds, things=things)
