"""Render one toy-world image and its exact panoptic segmentation.

Each thing is drawn with PIL ImageDraw into its own canvas whose pixel values index the colours of its parts,
so its mask is exact; pasting the things back to front gives the occlusion, and a thing left with fewer than
``min_segment_area`` visible pixels is removed from the scene (image and annotations alike). Every pixel then
belongs to exactly one segment: a visible thing instance, or the (one) segment of the stuff category whose
band it lies in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld.captions import ThingInfo, captions
from densevlm.toyworld.icons import ICONS, Ellipse, Poly, Stroke
from densevlm.toyworld.scene import PlacedThing, Scene, sample_scene
from densevlm.toyworld.textures import render_stuff

SPLIT_CODES = {"train": 0, "val": 1}


@dataclass
class DrawnThing:
    """A rendered thing: its pixels in an (h, w) box at (y0, x0) of the image."""

    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool
    slots: np.ndarray  # (h, w) uint8: which part (row of ``colours``) covers each pixel
    colours: np.ndarray  # (parts + 1, 3) float32
    shade: np.ndarray  # (h, w) float32 brightness factor (light from above, dark outline)

    @property
    def box(self) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


@dataclass
class Segment:
    """One panoptic segment: a visible thing instance or all visible pixels of one stuff category."""

    category: str
    isthing: bool
    mask: np.ndarray  # (S, S) bool
    area: int
    bbox: list[int]  # x, y, w, h
    thing: PlacedThing | None = None


@dataclass
class RenderedImage:
    """An image, its segments (things in drawing order, then stuff top to bottom) and its captions.

    ``segment_map`` indexes ``segments``; the value ``len(segments)`` marks void pixels (no category: only a
    close-up's plain background has them)."""

    image: np.ndarray  # (S, S, 3) uint8
    segment_map: np.ndarray  # (S, S) int16: index into ``segments``
    segments: list[Segment]
    captions: list[str]
    scene: Scene
    rng: np.random.Generator  # a generator of this image not used by rendering (for segment ids)
    closeup: Any = None  # an object-centric close-up's :class:`densevlm.toyworld.closeup.CloseUp`; None: a scene

    @property
    def kind(self) -> str:
        """'scene', or 'object' for a close-up (:mod:`densevlm.toyworld.closeup`)."""
        return "scene" if self.closeup is None else "object"


_CIRCLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _ellipse_points(e: Ellipse, radius_px: float) -> np.ndarray:
    n = min(max(int(radius_px * 1.2), 10), 48)  # enough vertices that the outline looks round
    if n not in _CIRCLES:
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        _CIRCLES[n] = (np.cos(t), np.sin(t))
    cos_t, sin_t = _CIRCLES[n]
    ca, sa = math.cos(e.angle), math.sin(e.angle)
    pts = np.empty((n, 2))
    pts[:, 0] = e.cx + (ca * e.rx) * cos_t - (sa * e.ry) * sin_t
    pts[:, 1] = e.cy + (sa * e.rx) * cos_t + (ca * e.ry) * sin_t
    return pts


def draw_thing(thing: PlacedThing, rng: np.random.Generator, image_size: int) -> DrawnThing | None:
    """Draw one thing into its own canvas; ``None`` if it falls entirely outside the image."""
    prims = ICONS[thing.name](rng, thing.paint)
    half = thing.size / 2
    a = math.radians(thing.angle)
    flip = -1.0 if thing.flip else 1.0
    # Icon units -> pixels: mirror x, scale, rotate counter-clockwise on screen (y points down), translate.
    # The canvas is the part of the image the rotated icon square can reach (icon corners lie within
    # sqrt(2) half-sides of the centre), so every array below is as small as the thing.
    reach = half * 1.42 + 2
    cx0, cy0 = max(0, int(thing.cx - reach)), max(0, int(thing.cy - reach))
    cx1, cy1 = min(image_size, int(thing.cx + reach) + 1), min(image_size, int(thing.cy + reach) + 1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    m = half * np.array([[math.cos(a) * flip, math.sin(a)], [-math.sin(a) * flip, math.cos(a)]])
    offset = np.array([thing.cx - cx0, thing.cy - cy0])
    # Transform the points of all primitives at once (one matrix product instead of one per part).
    parts: list[np.ndarray] = []
    for prim in prims:
        if isinstance(prim, Stroke):
            parts.append(np.asarray(prim.points + (prim.points[:1] if prim.closed else []), np.float64))
        elif isinstance(prim, Ellipse):
            parts.append(_ellipse_points(prim, max(prim.rx, prim.ry) * half))
        elif isinstance(prim, Poly):
            parts.append(np.asarray(prim.points, np.float64))
        else:
            raise TypeError(f"{thing.name}: unknown icon primitive {prim!r}")
    flat = (np.concatenate(parts) @ m.T + offset).ravel().tolist()
    canvas = Image.new("L", (cx1 - cx0, cy1 - cy0), 0)
    draw = ImageDraw.Draw(canvas)
    colours = [(0, 0, 0)]
    start = 0
    for prim, pts in zip(prims, parts):
        slot = len(colours)
        colours.append(prim.color)
        xy = flat[start:start + 2 * len(pts)]
        start += 2 * len(pts)
        if isinstance(prim, Stroke):
            draw.line(xy, fill=slot, width=max(1, int(round(prim.width * half))), joint="curve")
        else:
            draw.polygon(xy, fill=slot)
    slots = np.asarray(canvas)
    rows, cols = np.flatnonzero(slots.any(axis=1)), np.flatnonzero(slots.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    sub = slots[y0:y1, x0:x1]
    mask = sub > 0
    # Light from above, and a dark silhouette outline: cartoon-like, and it separates the thing from its stuff.
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    shade = np.where(inner, np.float32(1.0), np.float32(0.5))
    shade *= np.linspace(1.1, 0.86, y1 - y0, dtype=np.float32)[:, None]
    return DrawnThing(cy0 + y0, cx0 + x0, mask, sub, np.asarray(colours, np.float32), shade)


def _provisional_segments(label: np.ndarray, n_bands: int, drawn: list[DrawnThing]) -> tuple[np.ndarray, np.ndarray]:
    """Segment index per pixel, things 0..T-1 pasted back to front over stuff band i at T + i; and the areas."""
    t = len(drawn)
    seg = np.take(np.arange(t, t + n_bands, dtype=np.int16), label)
    for k, d in enumerate(drawn):
        seg[d.box][d.mask] = k
    return seg, np.bincount(seg.ravel(), minlength=t + n_bands)


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def image_rngs(cfg: ToyWorldConfig, split: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators (scene, captions, segment ids) seeded from (seed, split, index) only, so the
    result does not depend on which process renders the image or in what order."""
    seq = np.random.SeedSequence([cfg.seed, SPLIT_CODES[split], index])
    return tuple(np.random.default_rng(s) for s in seq.spawn(3))


def render_image(cfg: ToyWorldConfig, split: str, index: int) -> RenderedImage:
    """Sample, draw and segment image ``index`` of ``split``; deterministic in (cfg, split, index)."""
    scene_rng, caption_rng, spare_rng = image_rngs(cfg, split, index)
    size = cfg.image_size
    scene = sample_scene(cfg, scene_rng)
    image = render_stuff(scene_rng, scene.stuff, scene.label, scene.bounds)
    things, drawn = [], []
    for t in scene.things:
        d = draw_thing(t, scene_rng, size)
        if d is not None:
            things.append(t)
            drawn.append(d)
    n_bands = len(scene.stuff)
    seg, areas = _provisional_segments(scene.label, n_bands, drawn)
    if (areas[:len(drawn)] < cfg.min_segment_area).any():
        # Removing a thing only uncovers the others, so one pass leaves every kept thing large enough.
        keep = [k for k in range(len(drawn)) if areas[k] >= cfg.min_segment_area]
        things, drawn = [things[k] for k in keep], [drawn[k] for k in keep]
        seg, areas = _provisional_segments(scene.label, n_bands, drawn)

    segments: list[Segment] = []
    for k, (t, d) in enumerate(zip(things, drawn)):
        ys, xs = d.box
        vis = seg[ys, xs] == k
        pixels = np.take(d.colours, d.slots[vis], axis=0) * d.shade[vis][:, None]
        image[ys, xs][vis] = np.clip(pixels, 0, 255).astype(np.uint8)
        mask = np.zeros((size, size), bool)
        mask[ys, xs] = vis
        rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
        bbox = [d.x0 + int(cols[0]), d.y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        segments.append(Segment(t.name, True, mask, int(areas[k]), bbox, t))
    remap = np.arange(len(drawn) + n_bands, dtype=np.int16)
    for i, name in enumerate(scene.stuff):
        j = len(drawn) + i
        if areas[j] == 0:  # entirely hidden behind things: not present in this image
            continue
        remap[j] = len(segments)
        mask = seg == j
        segments.append(Segment(name, False, mask, int(areas[j]), _bbox(mask)))
    segment_map = np.take(remap, seg) if len(segments) < len(remap) else seg

    span = max(cfg.max_thing_size - cfg.min_thing_size, 1e-9)
    infos = [
        ThingInfo(s.category, s.thing.paint.main_name, (s.thing.size / size - cfg.min_thing_size) / span,
                  s.thing.on_stuff, s.area)
        for s in segments if s.thing is not None
    ]
    stuff_areas = {s.category: s.area for s in segments if not s.isthing}
    texts = captions(caption_rng, infos, stuff_areas, cfg.captions_per_image, cfg.mention_largest_prob)
    scene.things = things
    return RenderedImage(image, segment_map, segments, texts, scene, spare_rng)
