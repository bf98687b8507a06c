"""Stuff: the background layout (1-4 bands with irregular boundaries) and one numpy texture per stuff category.

Textures are vectorised over the pixels of a band and sized relative to the image side, so a 16-px patch of
a 192-px image shows the same pattern (waves, blades, bricks, planks ...) at any image size. Each texture has
a pattern that a small ViT can tell apart at 8-16 px patches, not only a colour: water has horizontal wave
stripes, grass vertical blades, road grain and lane marks, snow speckles, sand fine grain and ripples, a brick
wall a mortar grid, a wooden floor vertical planks with dark seams, the sky a smooth gradient with clouds.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

TAU = 2.0 * np.pi


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Value noise in ~[0, 1]: a ``cells``-sized random grid upsampled bicubically to ``shape`` (h, w)."""
    grid = rng.random((cells[0] + 1, cells[1] + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((shape[1], shape[0]), Image.BICUBIC))


def noise_1d(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth 1-D noise in ~[-1, 1] of length ``n``."""
    grid = rng.random((1, cells + 1), dtype=np.float32) * 2 - 1
    return np.asarray(Image.fromarray(grid).resize((n, 1), Image.BICUBIC))[0]


def band_layout(rng: np.random.Generator, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a square image into ``n`` horizontal-ish bands with wavy, tilted boundaries.

    Returns ``label`` (size x size uint8, band index top to bottom) and ``bounds`` ((n + 1) x size float32: the
    y of each boundary per column, with 0 and ``size`` as the outer ones).
    """
    bounds = np.empty((n + 1, size), np.float32)
    bounds[0] = 0.0
    bounds[n] = float(size)
    if n > 1:
        min_frac = 0.18
        heights = min_frac + rng.dirichlet(np.full(n, 2.0)) * (1.0 - min_frac * n)
        x = np.arange(size, dtype=np.float32) + 0.5 - size / 2
        for j in range(1, n):
            slope = np.tan(np.deg2rad(rng.uniform(-12, 12)))
            wave = noise_1d(rng, size, int(rng.integers(2, 5))) * rng.uniform(0.02, 0.07) * size
            ripple = noise_1d(rng, size, int(rng.integers(10, 18))) * rng.uniform(0.0, 0.02) * size
            bounds[j] = heights[:j].sum() * size + slope * x + wave + ripple
        # Keep every band at least a few pixels thick in every column, and boundaries inside the image.
        gap = 0.06 * size
        for j in range(1, n):
            bounds[j] = np.clip(bounds[j], gap * j, size - gap * (n - j))
            bounds[j] = np.maximum(bounds[j], bounds[j - 1] + (gap if j > 1 else 0.0))
    y = np.arange(size, dtype=np.float32)[:, None] + 0.5
    label = np.zeros((size, size), np.uint8)
    for j in range(1, n):
        label += (y >= bounds[j][None, :]).astype(np.uint8)
    return label, bounds


class Band:
    """The pixels a texture is computed for: rows ``r0:r1`` of the image, with the band's boundaries."""

    def __init__(self, size: int, r0: int, r1: int, top: np.ndarray, bottom: np.ndarray):
        self.size = size
        self.r0, self.r1 = r0, r1
        self.shape = (r1 - r0, size)
        self.y = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5  # (h, 1), image coordinates
        self.x = np.arange(size, dtype=np.float32)[None, :] + 0.5  # (1, w)
        self.top, self.bottom = top, bottom

    def noise(self, rng: np.random.Generator, cells_y: float, cells_x: float) -> np.ndarray:
        """Value noise with ``cells_y`` x ``cells_x`` cells per full image, so features keep their size in
        any band."""
        cy = max(1, int(round(cells_y * self.shape[0] / self.size)))
        return smooth_noise(rng, self.shape, (cy, max(1, int(round(cells_x)))))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _grain(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    # Uniform rather than Gaussian: it looks the same as grain and numpy draws it several times faster.
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(std * 3.4641)


def _rgb(rng: np.random.Generator, ranges: tuple[tuple[float, float], ...]) -> np.ndarray:
    """A random colour as a (3, 1, 1) column, ready to broadcast against (h, w) fields."""
    return np.array([_u(rng, lo, hi) for lo, hi in ranges], np.float32).reshape(3, 1, 1)


def _col(*rgb: float) -> np.ndarray:
    return np.array(rgb, np.float32).reshape(3, 1)


# Textures return planar float32 images (3, h, w) (or broadcastable to it): numpy is several times faster
# on planar arrays than on (h, w, 3) ones, whose innermost axis of length 3 defeats its inner loops.


def sky(rng: np.random.Generator, b: Band) -> np.ndarray:
    zenith = _rgb(rng, ((30, 80), (95, 145), (190, 240)))
    horizon = _rgb(rng, ((150, 200), (190, 225), (232, 255)))
    t = np.clip(b.y / b.size, 0, 1) ** 0.8  # (h, 1): a gradient over the whole image, not the band
    img = zenith + (horizon - zenith) * t  # (3, h, 1)
    if rng.random() < 0.75:  # soft clouds, wider than tall, with grey-blue shading
        n = 0.65 * b.noise(rng, 4, 2) + 0.35 * b.noise(rng, 10, 5)
        alpha = np.clip((n - _u(rng, 0.5, 0.65)) * _u(rng, 4, 7), 0, 0.9)
        cloud = _u(rng, 232, 250) - b.noise(rng, 8, 4) * np.array([25, 25, 15], np.float32).reshape(3, 1, 1)
        img = img + (cloud - img) * alpha
    return img


def water(rng: np.random.Generator, b: Band) -> np.ndarray:
    base = _rgb(rng, ((15, 50), (70, 130), (140, 200)))
    lam = b.size * _u(rng, 0.035, 0.05)  # wave spacing, relative to the image side
    warp = b.noise(rng, 3, 4) * 1.5
    phase = TAU * (b.y / lam + 0.35 * np.sin(TAU * b.x / (lam * _u(rng, 3, 5)) + _u(rng, 0, TAU)) + warp)
    w = np.sin(phase)
    crest = np.clip((w - 0.75) * 4.0, 0, 1) * (b.noise(rng, 6, 12) > 0.45)
    return base * (0.8 + 0.2 * w) + crest * np.array([90, 90, 70], np.float32).reshape(3, 1, 1)


def grass(rng: np.random.Generator, b: Band) -> np.ndarray:
    base = _rgb(rng, ((40, 85), (115, 170), (25, 60)))
    h, w = b.shape
    blade_len = max(2, int(round(b.size * 0.03)))  # vertical streaks: blades a few pixels long
    streak = rng.random((max(2, h // blade_len), w), dtype=np.float32)
    blades = np.asarray(Image.fromarray(streak).resize((w, h), Image.BILINEAR))
    light = b.noise(rng, 3, 3)
    img = base * (0.55 + 0.6 * blades + 0.3 * (light - 0.5))
    tips = blades > 0.85  # bright yellowish blade tips
    img[:, tips] = img[:, tips] * 0.6 + _col(60, 80, 32)
    return img


def road(rng: np.random.Generator, b: Band) -> np.ndarray:
    g = _u(rng, 80, 115)
    base = np.array([g, g, g + _u(rng, -3, 8)], np.float32).reshape(3, 1, 1)
    img = base + (_grain(rng, b.shape, 11) + (b.noise(rng, 3, 3) - 0.5) * 22)
    # Dashed lane marks along the middle of the band.
    centre = (b.top + b.bottom) / 2
    thick = max(1.0, b.size * 0.012)
    period = b.size * _u(rng, 0.12, 0.18)
    dash = ((b.x + _u(rng, 0, period)) % period) < period * 0.55
    lane = (np.abs(b.y - centre[None, :]) < thick) & dash
    img[:, lane] = _col(235, 235, 225) if rng.random() < 0.6 else _col(235, 200, 45)
    return img


def snow(rng: np.random.Generator, b: Band) -> np.ndarray:
    base = _rgb(rng, ((232, 246), (238, 250), (246, 255)))
    shade = b.noise(rng, 3, 4) * 28
    img = base - shade * np.array([1.0, 0.75, 0.3], np.float32).reshape(3, 1, 1) + _grain(rng, b.shape, 3)
    u = rng.random(b.shape, dtype=np.float32)
    img[:, u < 0.04] = _col(160, 178, 205)  # blue-grey speckles
    img[:, u > 0.985] = 255.0  # sparkles
    return img


def sand(rng: np.random.Generator, b: Band) -> np.ndarray:
    base = _rgb(rng, ((205, 228), (172, 200), (118, 150)))
    grain = _grain(rng, b.shape, _u(rng, 10, 16))
    a = _u(rng, -0.5, 0.5)
    lam = b.size * _u(rng, 0.06, 0.09)
    warp = b.noise(rng, 3, 3)
    ripple = np.sin(TAU * ((b.y * (math.cos(a) / lam) + b.x * (math.sin(a) / lam)) + 0.8 * warp))
    img = base * (1 + 0.07 * ripple) + grain
    img += _grain(rng, (3, *b.shape), 4)  # coloured grains
    return img


def brick_wall(rng: np.random.Generator, b: Band) -> np.ndarray:
    bh = b.size * _u(rng, 0.05, 0.065)
    bw = bh * _u(rng, 2.1, 2.6)
    mortar = max(1.0, bh * 0.16)
    oy, ox = _u(rng, 0, bh), _u(rng, 0, bw)
    yy = b.y + oy
    row = np.floor(yy / bh)
    xx = b.x + ox + (row % 2) * (bw / 2)  # alternate rows are offset by half a brick
    col = np.floor(xx / bw)
    in_mortar = ((yy - row * bh) < mortar) | ((xx - col * bw) < mortar)
    base = _rgb(rng, ((145, 180), (55, 80), (38, 55)))
    jitter = _grain(rng, (int(b.size / bh) + 3, int(2 * b.size / bw) + 4), 0.12)
    ri, ci = row.astype(np.intp), col.astype(np.intp)
    shade = 1 + jitter[ri % jitter.shape[0], ci % jitter.shape[1]]
    img = base * shade + _grain(rng, b.shape, 6)
    m = _u(rng, 180, 210)
    img[:, in_mortar] = _col(m, m - 6, m - 18)
    return img


def wooden_floor(rng: np.random.Generator, b: Band) -> np.ndarray:
    pw = b.size * _u(rng, 0.07, 0.095)  # vertical planks
    xx = b.x + _u(rng, 0, pw)
    colf = np.floor(xx / pw)
    xin = xx - colf * pw
    col = colf.astype(np.intp)
    n_cols = int(b.size / pw) + 3
    tone = 1 + _grain(rng, (n_cols,), 0.1)
    base = _rgb(rng, ((130, 175), (82, 115), (42, 65)))
    length = b.size * _u(rng, 0.35, 0.7)
    offset = rng.uniform(0, length, n_cols).astype(np.float32)
    yin = (b.y + offset[col]) % length  # plank ends, staggered per plank
    grain = np.sin(TAU * (xin / (pw * 0.33) + 1.6 * b.noise(rng, 2, 10)))
    img = base * (tone[col] * (1 + 0.08 * grain))
    seam = (xin < max(1.0, pw * 0.08)) | (yin < max(1.0, b.size * 0.006))
    img[:, seam] *= 0.45
    return img


TEXTURES: dict[str, Callable[[np.random.Generator, Band], np.ndarray]] = {
    "sky": sky,
    "water": water,
    "grass": grass,
    "road": road,
    "snow": snow,
    "sand": sand,
    "brick wall": brick_wall,
    "wooden floor": wooden_floor,
}


def render_stuff(rng: np.random.Generator, names: list[str], label: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Fill the bands of ``label`` (from :func:`band_layout`) with the textures of ``names``; (S, S, 3) uint8."""
    size = label.shape[0]
    img = np.empty((3, size, size), np.float32)
    for i, name in enumerate(names):
        # Rows the band touches: between its upper boundary's highest and its lower boundary's lowest pixel.
        r0 = int(min(max(math.ceil(float(bounds[i].min()) - 0.5), 0), size))
        r1 = int(min(max(math.ceil(float(bounds[i + 1].max()) - 0.5), 0), size))
        if r1 <= r0:
            continue
        band = Band(size, r0, r1, bounds[i], bounds[i + 1])
        tex = TEXTURES[name](rng, band)
        np.copyto(img[:, r0:r1], tex, where=label[r0:r1] == i)
    np.clip(img, 0, 255, out=img)
    planes = img.astype(np.uint8)
    return np.dstack((planes[0], planes[1], planes[2]))  # several times faster than a transposed copy
