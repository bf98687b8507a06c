"""Things: one recognisable cartoon icon per category, built from polygons, ellipses and strokes.

An icon lives in the unit square [-1, 1]^2 (y down, facing right where it has a front) and is a list of
primitives drawn in order; the renderer scales, rotates, flips and places it. Colours come from the
category's palette (the *main* colour, named in captions) plus fixed parts (wheels are dark, windows glassy,
trunks brown), so the colour of an instance never gives its class away but its shape does.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import numpy as np

RGB = tuple[int, int, int]
Point = tuple[float, float]


class Poly(NamedTuple):
    points: list[Point]
    color: RGB


class Ellipse(NamedTuple):
    cx: float
    cy: float
    rx: float
    ry: float
    color: RGB
    angle: float = 0.0  # radians, in the icon frame


class Stroke(NamedTuple):
    points: list[Point]
    width: float  # in icon units (the icon is 2 units wide)
    color: RGB
    closed: bool = False


Prim = Union[Poly, Ellipse, Stroke]


class Paint(NamedTuple):
    """The colours an instance is drawn with: its main colour (and name) and a second palette colour."""

    main: RGB
    main_name: str
    second: RGB
    second_name: str


DARK: RGB = (38, 36, 40)
GLASS: RGB = (170, 210, 235)
SKIN: tuple[RGB, ...] = ((255, 219, 185), (238, 190, 150), (198, 145, 105), (150, 100, 70), (105, 72, 50))
BROWNS: tuple[RGB, ...] = ((110, 72, 40), (92, 60, 35), (132, 90, 55))
WHITE: RGB = (246, 246, 244)


def shade(c: RGB, f: float) -> RGB:
    """Scale a colour's brightness (f < 1 darker, f > 1 lighter), clipped to [0, 255]."""
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)  # type: ignore[return-value]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def pick(rng: np.random.Generator, options: tuple[RGB, ...]) -> RGB:
    return options[int(rng.integers(len(options)))]


def circle(cx: float, cy: float, r: float, color: RGB) -> Ellipse:
    return Ellipse(cx, cy, r, r, color)


def rect(x0: float, y0: float, x1: float, y1: float, color: RGB) -> Poly:
    return Poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color)


def arc_points(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 16) -> list[Point]:
    """Points on an ellipse from angle a0 to a1 (radians; 0 = +x, pi/2 = down)."""
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(a0, a1, n)]


def mirror_x(points: list[Point]) -> list[Point]:
    return [(-x, y) for x, y in points]


def boat(rng: np.random.Generator, p: Paint) -> list[Prim]:
    sail = pick(rng, (WHITE, (250, 240, 215), p.second))
    hull = [(-1.0, 0.3), (1.0, 0.3), (0.72, 0.72), (-0.72, 0.72)]
    prims: list[Prim] = [
        Stroke([(0.0, 0.32), (0.0, -0.92)], 0.06, pick(rng, BROWNS)),
        Poly([(0.07, -0.88), (0.07, 0.22), (0.8, 0.22)], sail),
        Poly([(-0.07, -0.68), (-0.07, 0.22), (-0.62, 0.22)], shade(sail, 0.93)),
        Poly([(0.0, -0.92), (0.24, -0.86), (0.0, -0.79)], (215, 40, 40)),
        Poly(hull, p.main),
        Poly([(-0.97, 0.3), (0.97, 0.3), (0.93, 0.4), (-0.93, 0.4)], shade(p.main, 0.7)),
    ]
    for x in (-0.4, 0.0, 0.4):  # portholes
        prims.append(circle(x, 0.54, 0.06, shade(p.main, 0.55)))
    return prims


def car(rng: np.random.Generator, p: Paint) -> list[Prim]:
    body = p.main
    return [
        Poly([(-0.6, -0.06), (-0.38, -0.5), (0.3, -0.5), (0.6, -0.06)], body),
        Poly([(-0.5, -0.1), (-0.33, -0.43), (-0.05, -0.43), (-0.05, -0.1)], GLASS),
        Poly([(0.03, -0.1), (0.03, -0.43), (0.26, -0.43), (0.47, -0.1)], GLASS),
        Poly([(-1.0, 0.0), (-0.94, -0.1), (0.9, -0.1), (1.0, 0.06), (1.0, 0.32), (-1.0, 0.32)], body),
        Stroke([(-0.1, 0.02), (0.06, 0.02)], 0.04, shade(body, 0.55)),  # door handle
        rect(-0.98, 0.2, 0.98, 0.3, shade(body, 0.7)),
        Ellipse(0.95, 0.03, 0.05, 0.05, (250, 225, 90)),
        Ellipse(-0.96, 0.03, 0.04, 0.05, (200, 30, 30)),
        circle(-0.56, 0.32, 0.23, DARK),
        circle(0.56, 0.32, 0.23, DARK),
        circle(-0.56, 0.32, 0.1, (185, 185, 190)),
        circle(0.56, 0.32, 0.1, (185, 185, 190)),
    ]


def bicycle(rng: np.random.Generator, p: Paint) -> list[Prim]:
    rear, front = (-0.58, 0.32), (0.58, 0.32)
    crank, seat, head = (-0.05, 0.32), (-0.22, -0.26), (0.38, -0.26)
    w = 0.075
    return [
        Stroke([(rear[0] + 0.4 * math.cos(a), rear[1] + 0.4 * math.sin(a)) for a in np.linspace(0, 2 * np.pi, 25)],
               0.08, DARK, closed=True),
        Stroke([(front[0] + 0.4 * math.cos(a), front[1] + 0.4 * math.sin(a)) for a in np.linspace(0, 2 * np.pi, 25)],
               0.08, DARK, closed=True),
        circle(*rear, 0.06, (170, 170, 175)),
        circle(*front, 0.06, (170, 170, 175)),
        Stroke([rear, crank, seat, rear], w, p.main),
        Stroke([seat, head, crank], w, p.main),
        Stroke([head, front], w, shade(p.main, 0.85)),
        Stroke([seat, (-0.25, -0.38)], 0.05, (150, 150, 150)),
        Poly([(-0.42, -0.46), (-0.08, -0.46), (-0.14, -0.36), (-0.38, -0.36)], DARK),
        Stroke([head, (0.33, -0.5), (0.52, -0.52)], 0.055, DARK),
        Stroke([(crank[0] - 0.1, crank[1] - 0.08), (crank[0] + 0.1, crank[1] + 0.08)], 0.05, DARK),
        circle(*crank, 0.08, (150, 150, 155)),
    ]


def airplane(rng: np.random.Generator, p: Paint) -> list[Prim]:
    wing = shade(p.main, 0.85) if rng.random() < 0.6 else p.second
    upper = [(0.24, -0.05), (-0.1, -0.84), (-0.3, -0.84), (-0.14, -0.05)]
    tail = [(-0.7, -0.04), (-0.9, -0.36), (-1.0, -0.36), (-0.9, -0.04)]
    return [
        Poly(upper, wing),
        Poly([(x, -y) for x, y in upper], wing),
        Ellipse(-0.02, -0.4, 0.13, 0.05, (150, 150, 155)),
        Ellipse(-0.02, 0.4, 0.13, 0.05, (150, 150, 155)),
        Poly(tail, wing),
        Poly([(x, -y) for x, y in tail], wing),
        Ellipse(0.0, 0.0, 1.0, 0.14, p.main),
        Stroke([(-0.85, 0.0), (0.7, 0.0)], 0.04, shade(p.main, 0.75)),
        Ellipse(0.78, 0.0, 0.12, 0.07, (55, 85, 125)),
    ]


def person(rng: np.random.Generator, p: Paint) -> list[Prim]:
    skin = pick(rng, SKIN)
    trousers = pick(rng, ((50, 70, 140), (40, 40, 45), (110, 80, 50), (120, 120, 125), (50, 90, 60)))
    hair = pick(rng, ((30, 25, 20), (90, 60, 30), (210, 170, 90), (125, 45, 25), (200, 200, 200)))
    prims: list[Prim] = [
        Stroke([(-0.1, 0.12), (-0.17, 0.93)], 0.15, trousers),
        Stroke([(0.1, 0.12), (0.17, 0.93)], 0.15, trousers),
        Ellipse(-0.21, 0.95, 0.11, 0.05, DARK),
        Ellipse(0.21, 0.95, 0.11, 0.05, DARK),
        Stroke([(-0.22, -0.46), (-0.38, -0.1), (-0.42, 0.14)], 0.11, shade(p.main, 0.9)),
        Stroke([(0.22, -0.46), (0.38, -0.1), (0.42, 0.14)], 0.11, shade(p.main, 0.9)),
        circle(-0.42, 0.18, 0.065, skin),
        circle(0.42, 0.18, 0.065, skin),
    ]
    if rng.random() < 0.3:  # a dress instead of a shirt
        prims.append(Poly([(-0.2, -0.52), (0.2, -0.52), (0.34, 0.4), (-0.34, 0.4)], p.main))
    else:
        prims.append(Poly([(-0.24, -0.52), (0.24, -0.52), (0.2, 0.18), (-0.2, 0.18)], p.main))
    prims += [
        rect(-0.06, -0.6, 0.06, -0.5, skin),
        circle(0.0, -0.74, 0.18, skin),
        Poly(arc_points(0.0, -0.76, 0.19, 0.17, math.pi, 2 * math.pi, 12), hair),
        circle(-0.06, -0.74, 0.025, DARK),
        circle(0.06, -0.74, 0.025, DARK),
    ]
    return prims


def bird(rng: np.random.Generator, p: Paint) -> list[Prim]:
    belly = mix(p.main, WHITE, 0.45)
    return [
        Poly([(-0.5, 0.0), (-0.98, -0.22), (-0.92, 0.05), (-0.98, 0.26), (-0.5, 0.16)], shade(p.main, 0.8)),
        Ellipse(-0.05, 0.05, 0.56, 0.32, p.main),
        Ellipse(0.05, 0.18, 0.36, 0.14, belly),
        circle(0.48, -0.2, 0.24, p.main),
        Poly([(0.67, -0.28), (0.98, -0.18), (0.67, -0.1)], (240, 170, 30)),
        circle(0.55, -0.26, 0.05, DARK),
        Poly([(-0.28, -0.02), (0.22, -0.02), (-0.22, -0.86), (-0.34, -0.5)], shade(p.main, 0.72)),
    ]


def fish(rng: np.random.Generator, p: Paint) -> list[Prim]:
    fin = shade(p.main, 0.78)
    prims: list[Prim] = [
        Poly([(-0.55, 0.0), (-1.0, -0.46), (-0.88, 0.0), (-1.0, 0.46)], fin),
        Poly([(-0.28, -0.3), (0.2, -0.34), (-0.12, -0.7)], fin),
        Poly([(-0.06, 0.3), (0.2, 0.32), (-0.02, 0.58)], fin),
        Ellipse(0.05, 0.0, 0.68, 0.4, p.main),
    ]
    if rng.random() < 0.5:  # stripes
        stripe = WHITE if p.main_name != "white" else p.second
        prims += [Ellipse(-0.25, 0.0, 0.06, 0.3, stripe), Ellipse(0.05, 0.0, 0.07, 0.37, stripe)]
    prims += [
        Stroke([(0.3, -0.24), (0.23, 0.0), (0.3, 0.24)], 0.045, shade(p.main, 0.6)),
        circle(0.47, -0.1, 0.1, WHITE),
        circle(0.5, -0.1, 0.05, DARK),
        Stroke([(0.62, 0.12), (0.72, 0.1)], 0.03, shade(p.main, 0.5)),
    ]
    return prims


def cow(rng: np.random.Generator, p: Paint) -> list[Prim]:
    body = p.main
    leg = shade(body, 0.9)
    spots = {"white": DARK, "brown": WHITE, "black": WHITE}.get(p.main_name, DARK)
    prims: list[Prim] = [
        Stroke([(-0.62, -0.1), (-0.76, 0.2), (-0.73, 0.42)], 0.05, leg),
        Ellipse(-0.73, 0.46, 0.05, 0.07, DARK),
    ]
    for x in (-0.46, -0.26, 0.26, 0.44):
        prims.append(Stroke([(x, 0.1), (x - 0.01, 0.72)], 0.12, leg))
        prims.append(rect(x - 0.07, 0.7, x + 0.06, 0.8, DARK))
    prims += [
        Poly([(0.42, -0.22), (0.62, -0.38), (0.72, -0.08), (0.5, 0.12)], body),
        Ellipse(0.0, 0.0, 0.64, 0.33, body),
        Ellipse(0.04, 0.3, 0.11, 0.07, (240, 170, 170)),
    ]
    if p.main_name == "white" or rng.random() < 0.5:
        for _ in range(int(rng.integers(2, 5))):
            prims.append(Ellipse(float(rng.uniform(-0.4, 0.35)), float(rng.uniform(-0.14, 0.12)),
                                 float(rng.uniform(0.1, 0.17)), float(rng.uniform(0.07, 0.12)), spots,
                                 float(rng.uniform(-0.6, 0.6))))
    prims += [
        Poly([(0.6, -0.36), (0.55, -0.56), (0.66, -0.38)], (232, 222, 190)),
        Poly([(0.78, -0.38), (0.8, -0.58), (0.86, -0.36)], (232, 222, 190)),
        Ellipse(0.55, -0.3, 0.1, 0.05, shade(body, 0.85), -0.4),
        Ellipse(0.73, -0.22, 0.2, 0.17, body),
        Ellipse(0.87, -0.12, 0.13, 0.1, (238, 165, 165)),
        circle(0.9, -0.1, 0.025, DARK),
        circle(0.7, -0.28, 0.035, DARK),
    ]
    return prims


def cat(rng: np.random.Generator, p: Paint) -> list[Prim]:
    fur = p.main
    light = mix(fur, WHITE, 0.5)
    eye = pick(rng, ((120, 200, 60), (230, 200, 40), (90, 160, 220)))
    prims: list[Prim] = [
        Stroke([(0.28, 0.78), (0.66, 0.72), (0.84, 0.44), (0.78, 0.16)], 0.12, shade(fur, 0.9)),
        Ellipse(0.0, 0.38, 0.42, 0.5, fur),
        Ellipse(0.0, 0.36, 0.2, 0.3, light),
        Ellipse(-0.16, 0.86, 0.13, 0.07, light),
        Ellipse(0.16, 0.86, 0.13, 0.07, light),
        Poly([(-0.31, -0.56), (-0.08, -0.72), (-0.3, -0.98)], fur),
        Poly([(0.31, -0.56), (0.08, -0.72), (0.3, -0.98)], fur),
        circle(0.0, -0.42, 0.34, fur),
        Poly([(-0.26, -0.63), (-0.14, -0.7), (-0.26, -0.86)], (240, 160, 170)),
        Poly([(0.26, -0.63), (0.14, -0.7), (0.26, -0.86)], (240, 160, 170)),
        Ellipse(-0.13, -0.47, 0.07, 0.08, eye),
        Ellipse(0.13, -0.47, 0.07, 0.08, eye),
        Ellipse(-0.13, -0.47, 0.025, 0.07, DARK),
        Ellipse(0.13, -0.47, 0.025, 0.07, DARK),
        Poly([(-0.06, -0.33), (0.06, -0.33), (0.0, -0.26)], (235, 130, 150)),
    ]
    whisker = DARK if p.main_name in ("white", "grey", "orange") else (220, 220, 220)
    for s in (-1, 1):
        prims.append(Stroke([(s * 0.1, -0.27), (s * 0.48, -0.33)], 0.02, whisker))
        prims.append(Stroke([(s * 0.1, -0.24), (s * 0.47, -0.2)], 0.02, whisker))
    return prims


def tree(rng: np.random.Generator, p: Paint) -> list[Prim]:
    trunk = pick(rng, BROWNS)
    prims: list[Prim] = [Poly([(-0.11, 0.05), (0.11, 0.05), (0.17, 1.0), (-0.17, 1.0)], trunk)]
    if p.main_name == "green" and rng.random() < 0.4:  # a conifer
        crown = shade(p.main, 0.75)
        for y0, hw, top in ((0.3, 0.72, -0.25), (0.0, 0.6, -0.6), (-0.32, 0.46, -0.98)):
            prims.append(Poly([(-hw, y0), (hw, y0), (0.0, top)], crown))
            crown = shade(crown, 1.08)
        return prims
    prims.append(Stroke([(0.0, 0.35), (0.3, 0.05)], 0.07, trunk))
    crown = p.main
    prims += [
        circle(-0.44, -0.05, 0.38, shade(crown, 0.85)),
        circle(0.44, -0.05, 0.38, shade(crown, 0.85)),
        Ellipse(0.0, -0.36, 0.64, 0.55, crown),
        circle(-0.1, -0.72, 0.3, shade(crown, 1.12)),
    ]
    if p.main_name == "green" and rng.random() < 0.3:  # fruit
        for _ in range(5):
            prims.append(circle(float(rng.uniform(-0.55, 0.55)), float(rng.uniform(-0.7, 0.0)), 0.06, (210, 35, 35)))
    return prims


def flower(rng: np.random.Generator, p: Paint) -> list[Prim]:
    stem = (60, 140, 50)
    prims: list[Prim] = [
        Stroke([(0.0, -0.35), (0.05, 0.35), (0.0, 1.0)], 0.07, stem),
        Ellipse(0.26, 0.5, 0.24, 0.09, (70, 155, 55), -0.5),
        Ellipse(-0.24, 0.7, 0.22, 0.08, (70, 155, 55), 0.5),
    ]
    n = int(rng.integers(5, 9))
    a0 = float(rng.uniform(0, 2 * np.pi))
    for k in range(n):
        a = a0 + 2 * np.pi * k / n
        prims.append(Ellipse(0.33 * math.cos(a), -0.45 + 0.33 * math.sin(a), 0.26, 0.15, p.main, a))
    centre = (110, 70, 30) if p.main_name == "yellow" else (245, 200, 40)
    prims.append(circle(0.0, -0.45, 0.17, centre))
    return prims


def mushroom(rng: np.random.Generator, p: Paint) -> list[Prim]:
    cap = arc_points(0.0, 0.02, 0.92, 0.82, math.pi, 2 * math.pi, 24)
    prims: list[Prim] = [
        Poly([(-0.22, -0.05), (0.22, -0.05), (0.3, 0.92), (-0.3, 0.92)], (236, 226, 200)),
        Poly(cap, p.main),
        Poly([(-0.9, 0.0), (0.9, 0.0), (0.8, 0.1), (-0.8, 0.1)], (215, 195, 165)),
    ]
    if p.main_name in ("red", "orange", "purple", "brown") and rng.random() < 0.8:
        for _ in range(int(rng.integers(3, 7))):
            a = float(rng.uniform(math.pi * 1.1, math.pi * 1.9))
            r = float(rng.uniform(0.3, 0.7))
            prims.append(circle(0.92 * r * math.cos(a), 0.02 + 0.82 * r * math.sin(a),
                                float(rng.uniform(0.06, 0.12)), WHITE))
    return prims


def house(rng: np.random.Generator, p: Paint) -> list[Prim]:
    roof = pick(rng, ((170, 50, 40), (110, 70, 45), (70, 70, 80), (50, 80, 140), (150, 90, 50)))
    door = pick(rng, ((120, 70, 40), (60, 90, 150), (160, 40, 40), (60, 110, 60)))
    prims: list[Prim] = [
        rect(0.38, -0.72, 0.58, -0.3, (150, 60, 50)),
        rect(-0.75, -0.12, 0.75, 0.92, p.main),
        Poly([(-0.95, -0.08), (0.0, -0.9), (0.95, -0.08)], roof),
        rect(-0.16, 0.42, 0.16, 0.92, door),
        circle(0.1, 0.68, 0.03, (230, 200, 60)),
    ]
    for x0 in (-0.56, 0.28):
        prims.append(rect(x0, 0.06, x0 + 0.28, 0.34, GLASS))
        prims.append(Stroke([(x0 + 0.14, 0.06), (x0 + 0.14, 0.34)], 0.03, WHITE))
        prims.append(Stroke([(x0, 0.2), (x0 + 0.28, 0.2)], 0.03, WHITE))
    return prims


def snowman(rng: np.random.Generator, p: Paint) -> list[Prim]:
    snow = (247, 248, 252)
    arm = pick(rng, BROWNS)
    return [
        Stroke([(-0.25, -0.05), (-0.66, -0.32), (-0.8, -0.5)], 0.05, arm),
        Stroke([(0.25, -0.05), (0.66, -0.32), (0.82, -0.44)], 0.05, arm),
        circle(0.0, 0.55, 0.42, shade(snow, 0.94)),
        circle(0.0, 0.0, 0.32, shade(snow, 0.97)),
        circle(0.0, -0.5, 0.24, snow),
        rect(-0.24, -0.3, 0.24, -0.21, p.main),
        Poly([(0.08, -0.25), (0.2, -0.25), (0.26, 0.06), (0.13, 0.06)], p.main),
        rect(-0.3, -0.69, 0.3, -0.62, DARK),
        rect(-0.19, -0.98, 0.19, -0.68, DARK),
        circle(-0.08, -0.56, 0.035, DARK),
        circle(0.08, -0.56, 0.035, DARK),
        Poly([(0.0, -0.5), (0.24, -0.46), (0.0, -0.43)], (240, 130, 30)),
        circle(0.0, -0.1, 0.04, DARK),
        circle(0.0, 0.04, 0.04, DARK),
        circle(0.0, 0.18, 0.04, DARK),
    ]


def umbrella(rng: np.random.Generator, p: Paint) -> list[Prim]:
    top = arc_points(0.0, -0.12, 1.0, 0.72, math.pi, 2 * math.pi, 24)
    k = 4  # scalloped lower edge between k ribs
    edge: list[Point] = []
    for i in range(k):
        xa, xb = 1.0 - 2.0 * i / k, 1.0 - 2.0 * (i + 1) / k
        edge += [(xa + (xb - xa) * t, -0.12 - 0.12 * math.sin(math.pi * t)) for t in np.linspace(0, 1, 6)]
    pole = pick(rng, ((90, 80, 70), (225, 225, 225), DARK))
    prims: list[Prim] = [
        Stroke([(0.0, -0.2), (0.0, 0.84), (0.02, 0.95), (-0.08, 0.99), (-0.15, 0.9)], 0.055, pole),
        Poly(top + edge, p.main),
    ]
    if rng.random() < 0.6:  # alternate panels in a second colour
        alt = WHITE if p.second == p.main else pick(rng, (WHITE, p.second))
        apex = (0.0, -0.84)
        for i in range(1, k, 2):
            prims.append(Poly([apex] + edge[6 * i: 6 * i + 6], alt))
    prims.append(Stroke([(0.0, -0.84), (0.0, -0.98)], 0.05, DARK))
    return prims


def kite(rng: np.random.Generator, p: Paint) -> list[Prim]:
    t, r, b, l, c = (0.0, -0.95), (0.55, -0.25), (0.0, 0.5), (-0.55, -0.25), (0.0, -0.25)
    other = p.second if p.second != p.main else WHITE
    prims: list[Prim] = [
        Poly([t, r, c], p.main), Poly([r, b, c], other), Poly([b, l, c], p.main), Poly([l, t, c], other),
        Stroke([t, b], 0.03, DARK), Stroke([l, r], 0.03, DARK),
        Stroke([b, (0.16, 0.64), (-0.05, 0.8), (0.12, 0.98)], 0.025, DARK),
    ]
    for (x, y), col in (((0.1, 0.62), p.main), ((-0.02, 0.79), other), ((0.08, 0.93), p.main)):
        prims.append(Poly([(x, y), (x - 0.1, y - 0.06), (x - 0.1, y + 0.06)], col))
        prims.append(Poly([(x, y), (x + 0.1, y - 0.06), (x + 0.1, y + 0.06)], col))
    return prims


def balloon(rng: np.random.Generator, p: Paint) -> list[Prim]:
    return [
        Stroke([(0.0, 0.36), (0.07, 0.55), (-0.04, 0.76), (0.05, 0.98)], 0.025, (80, 80, 80)),
        Ellipse(0.0, -0.32, 0.5, 0.63, p.main),
        Ellipse(-0.2, -0.58, 0.08, 0.14, mix(p.main, WHITE, 0.6), 0.4),
        Poly([(-0.08, 0.38), (0.08, 0.38), (0.0, 0.29)], shade(p.main, 0.8)),
    ]


def sun(rng: np.random.Generator, p: Paint) -> list[Prim]:
    n = int(rng.integers(8, 14))
    a0 = float(rng.uniform(0, 2 * np.pi))
    ray = mix(p.main, (255, 240, 120), 0.3)
    prims: list[Prim] = []
    for k in range(n):
        a = a0 + 2 * np.pi * k / n
        da = np.pi / n * 0.55
        prims.append(Poly([(0.58 * math.cos(a - da), 0.58 * math.sin(a - da)), (0.97 * math.cos(a), 0.97 * math.sin(a)),
                           (0.58 * math.cos(a + da), 0.58 * math.sin(a + da))], ray))
    prims.append(circle(0.0, 0.0, 0.54, p.main))
    if rng.random() < 0.3:  # a smiling face
        prims += [circle(-0.18, -0.12, 0.05, DARK), circle(0.18, -0.12, 0.05, DARK),
                  Stroke(arc_points(0.0, 0.05, 0.25, 0.18, 0.3, math.pi - 0.3, 8), 0.04, DARK)]
    return prims


def clock(rng: np.random.Generator, p: Paint) -> list[Prim]:
    face = pick(rng, ((248, 245, 235), (250, 250, 250), (245, 235, 200)))
    prims: list[Prim] = [circle(0.0, 0.0, 0.96, p.main), circle(0.0, 0.0, 0.8, face)]
    for k in range(12):
        a = 2 * np.pi * k / 12
        r0 = 0.6 if k % 3 == 0 else 0.67
        prims.append(Stroke([(r0 * math.cos(a), r0 * math.sin(a)), (0.75 * math.cos(a), 0.75 * math.sin(a))],
                            0.05 if k % 3 == 0 else 0.03, DARK))
    ah, am = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))
    prims += [
        Stroke([(0.0, 0.0), (0.38 * math.cos(ah), 0.38 * math.sin(ah))], 0.08, DARK),
        Stroke([(0.0, 0.0), (0.6 * math.cos(am), 0.6 * math.sin(am))], 0.05, DARK),
        circle(0.0, 0.0, 0.07, (200, 40, 40)),
    ]
    return prims


def chair(rng: np.random.Generator, p: Paint) -> list[Prim]:
    wood = p.main
    return [
        Stroke([(-0.44, -0.95), (-0.44, 0.86)], 0.1, shade(wood, 0.8)),
        Stroke([(0.44, -0.95), (0.44, 0.86)], 0.1, shade(wood, 0.8)),
        rect(-0.44, -0.96, 0.44, -0.7, wood),
        rect(-0.44, -0.52, 0.44, -0.4, wood),
        Poly([(-0.5, 0.04), (0.5, 0.04), (0.66, 0.3), (-0.66, 0.3)], shade(wood, 1.12)),
        rect(-0.66, 0.3, 0.66, 0.4, shade(wood, 0.72)),
        Stroke([(-0.6, 0.38), (-0.6, 1.0)], 0.11, wood),
        Stroke([(0.6, 0.38), (0.6, 1.0)], 0.11, wood),
    ]


ICONS: dict[str, Callable[[np.random.Generator, Paint], list[Prim]]] = {
    "boat": boat,
    "car": car,
    "bicycle": bicycle,
    "airplane": airplane,
    "person": person,
    "bird": bird,
    "fish": fish,
    "cow": cow,
    "cat": cat,
    "tree": tree,
    "flower": flower,
    "mushroom": mushroom,
    "house": house,
    "snowman": snowman,
    "umbrella": umbrella,
    "kite": kite,
    "balloon": balloon,
    "sun": sun,
    "clock": clock,
    "chair": chair,
}
