"""The toy world's vocabulary: thing and stuff categories, their synonyms, contexts, palettes and split.

Everything here is plain data plus the few functions that turn it into the ``world.json`` category table.
Names are plain English nouns of real concepts so that a text encoder pre-trained on the captions (and the
vocabulary module, which reads the synonyms) sees ordinary language.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from densevlm.config.toyworld import STUFF_NAMES, THING_NAMES, ToyWorldConfig, check_novel_names

RGB = tuple[int, int, int]

# Named colours used for the main part of things (and named in captions). Instances jitter around them.
COLOURS: dict[str, RGB] = {
    "red": (205, 38, 38),
    "orange": (240, 130, 25),
    "yellow": (245, 210, 40),
    "green": (60, 160, 60),
    "blue": (45, 90, 200),
    "purple": (130, 60, 170),
    "pink": (240, 130, 180),
    "brown": (125, 80, 45),
    "white": (240, 240, 235),
    "grey": (135, 135, 140),
    "black": (35, 35, 40),
}


@dataclass(frozen=True)
class ThingDef:
    """A countable object drawn as an icon (see ``icons.py``)."""

    name: str
    synonyms: tuple[str, ...]
    supercategory: str
    preferred_stuff: str  # the background it stands on with probability ``context_prob``
    palette: tuple[str, ...]  # names in COLOURS its main part may take
    color: RGB  # panoptic / visualisation colour of the category (unique)
    rotation: float = 1.0  # multiplier of ``max_rotation``: a house tilts less than a kite
    # How captions name the main colour when it is not the colour of the whole thing: (singular, plural)
    # suffixes such as ("in {colour}", "in {colour}"); empty: an adjective ("a red car").
    colour_suffix: tuple[str, str] = ()
    preposition: str = ""  # overrides the stuff's preposition in captions ("fish in the water")


@dataclass(frozen=True)
class StuffDef:
    """An amorphous background region drawn as a texture (see ``textures.py``)."""

    name: str
    synonyms: tuple[str, ...]
    supercategory: str
    color: RGB
    rank: int  # vertical order of bands: lower ranks lie higher in the image (sky above ground)
    preposition: str  # how a thing is placed on it in captions: "on the road", "in the sky"
    adjectives: tuple[str, ...] = field(default_factory=tuple)  # optional caption adjectives
    mass_noun: bool = True  # "grass" reads well without an article, "road" does not


THINGS: tuple[ThingDef, ...] = (
    ThingDef("boat", ("sailboat", "ship", "vessel"), "vehicle", "water",
             ("red", "blue", "white", "brown", "yellow", "green"), (220, 20, 60), rotation=0.4),
    ThingDef("car", ("automobile", "auto", "motorcar"), "vehicle", "road",
             ("red", "blue", "yellow", "green", "white", "black", "grey", "orange"), (0, 0, 142), rotation=0.25),
    ThingDef("bicycle", ("bike", "cycle"), "vehicle", "road",
             ("red", "blue", "green", "black", "yellow", "orange", "purple"), (119, 11, 32), rotation=0.3),
    ThingDef("airplane", ("aeroplane", "plane", "aircraft", "jet"), "vehicle", "sky",
             ("white", "grey", "red", "blue", "yellow"), (106, 0, 228), rotation=1.5),
    ThingDef("person", ("man", "woman", "human", "pedestrian"), "person", "sand",
             ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"), (0, 60, 100), rotation=0.2,
             colour_suffix=("in {colour}", "in {colour}")),  # the palette colours the clothes
    ThingDef("bird", ("sparrow", "songbird"), "animal", "sky",
             ("red", "blue", "yellow", "brown", "black", "green", "orange"), (0, 80, 100), rotation=1.0),
    ThingDef("fish", ("goldfish", "guppy"), "animal", "water",
             ("orange", "yellow", "blue", "red", "green", "grey", "purple"), (0, 0, 230), rotation=1.0,
             preposition="in the"),
    ThingDef("cow", ("calf", "heifer"), "animal", "grass",
             ("white", "brown", "black"), (250, 170, 30), rotation=0.2),
    ThingDef("cat", ("kitten", "kitty"), "animal", "wooden floor",
             ("orange", "grey", "black", "white", "brown"), (100, 170, 30), rotation=0.25),
    ThingDef("tree", ("sapling", "shade tree"), "plant", "grass",
             ("green", "green", "green", "orange", "yellow", "red"), (220, 220, 0), rotation=0.15),
    ThingDef("flower", ("blossom", "bloom", "daisy"), "plant", "grass",
             ("red", "pink", "yellow", "purple", "white", "orange", "blue"), (175, 116, 175), rotation=0.4),
    ThingDef("mushroom", ("toadstool", "fungus"), "plant", "grass",
             ("red", "brown", "orange", "yellow", "purple"), (250, 0, 30), rotation=0.3),
    ThingDef("house", ("home", "cottage", "hut"), "building", "grass",
             ("white", "yellow", "blue", "pink", "orange", "grey", "brown"), (165, 42, 42), rotation=0.1),
    ThingDef("snowman", ("snow man", "snowperson"), "outdoor", "snow",
             ("red", "blue", "green", "purple", "orange", "yellow"), (255, 77, 255), rotation=0.15,
             colour_suffix=("with a {colour} scarf", "with {colour} scarves")),  # the snowman itself is white
    ThingDef("umbrella", ("parasol", "sunshade"), "accessory", "sand",
             ("red", "blue", "yellow", "green", "purple", "pink", "orange"), (0, 226, 252), rotation=0.4),
    ThingDef("kite", ("paper kite", "stunt kite"), "sports", "sky",
             ("red", "blue", "yellow", "green", "purple", "orange", "pink"), (182, 182, 255), rotation=1.0),
    ThingDef("balloon", ("party balloon", "toy balloon"), "toy", "sky",
             ("red", "blue", "yellow", "green", "pink", "purple", "orange"), (0, 82, 0), rotation=0.3),
    ThingDef("sun", ("sunshine", "sunburst"), "celestial", "sky",
             ("yellow", "orange"), (120, 166, 157), rotation=0.5),
    ThingDef("clock", ("wall clock", "timepiece"), "indoor", "brick wall",
             ("black", "brown", "red", "blue", "grey", "green", "white"), (110, 76, 0), rotation=0.2),
    ThingDef("chair", ("seat", "dining chair"), "furniture", "wooden floor",
             ("brown", "red", "blue", "green", "black", "white", "yellow"), (174, 57, 255), rotation=0.1),
)

STUFF: tuple[StuffDef, ...] = (
    StuffDef("sky", ("clear sky", "open sky"), "sky", (70, 130, 180), rank=0, preposition="in the",
             adjectives=("blue", "cloudy"), mass_noun=False),
    StuffDef("water", ("sea", "lake", "ocean", "river"), "water", (30, 60, 150), rank=2, preposition="on the",
             adjectives=("blue", "calm")),
    StuffDef("grass", ("lawn", "meadow", "field"), "plant", (107, 142, 35), rank=2, preposition="on the",
             adjectives=("green",)),
    StuffDef("road", ("street", "asphalt", "pavement"), "ground", (128, 64, 128), rank=2, preposition="on the",
             adjectives=("grey",), mass_noun=False),
    StuffDef("snow", ("snowfield", "snowbank"), "ground", (230, 230, 250), rank=2, preposition="in the",
             adjectives=("white", "fresh")),
    StuffDef("sand", ("beach", "sand dune"), "ground", (210, 180, 140), rank=2, preposition="on the",
             adjectives=("yellow", "warm")),
    StuffDef("brick wall", ("brickwork", "brick facade", "wall of bricks"), "wall", (150, 75, 60), rank=1,
             preposition="in front of the", adjectives=("red", "old"), mass_noun=False),
    StuffDef("wooden floor", ("floor", "parquet", "wood floor", "plank floor"), "floor", (160, 110, 60), rank=3,
             preposition="on the", adjectives=("brown", "polished"), mass_noun=False),
)

if tuple(t.name for t in THINGS) != THING_NAMES or tuple(s.name for s in STUFF) != STUFF_NAMES:
    raise ImportError("densevlm/toyworld/categories.py: THINGS and STUFF must define exactly the names of "
                      "THING_NAMES and STUFF_NAMES in densevlm/config/toyworld.py, in the same order")

# Plurals that the simple spelling rules get wrong; captions count things ("two people", "three fish").
_IRREGULAR_PLURALS = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "fish": "fish",
    "goldfish": "goldfish",
    "calf": "calves",
    "aircraft": "aircraft",
    "fungus": "fungi",
    "snowman": "snowmen",
    "snowperson": "snowpeople",
}


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun; the last word is inflected."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x", "z")):
        word = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def terms(name: str) -> list[str]:
    """Every surface form under which a category can appear in a caption: name and synonyms, singular and plural."""
    base = [name, *_definition(name).synonyms]
    out: list[str] = []
    for term in base:
        for form in (term, plural(term)):
            if form not in out:
                out.append(form)
    return out


_BY_NAME: dict[str, ThingDef | StuffDef] = {d.name: d for d in (*THINGS, *STUFF)}


def _definition(name: str) -> ThingDef | StuffDef:
    if name in _BY_NAME:
        return _BY_NAME[name]
    raise KeyError(f"unknown toy-world category '{name}'; known: {', '.join(THING_NAMES + STUFF_NAMES)}")


def thing_def(name: str) -> ThingDef:
    d = _definition(name)
    if not isinstance(d, ThingDef):
        raise KeyError(f"'{name}' is a stuff category, not a thing")
    return d


def stuff_def(name: str) -> StuffDef:
    d = _definition(name)
    if not isinstance(d, StuffDef):
        raise KeyError(f"'{name}' is a thing category, not stuff")
    return d


def _ranked(names: Sequence[str], seed: int) -> list[str]:
    # A hash, not a numpy RNG, so the split is the same under any numpy version.
    return sorted(names, key=lambda n: hashlib.sha256(f"toyworld-novel:{seed}:{n}".encode()).hexdigest())


def novel_names(cfg: ToyWorldConfig) -> list[str]:
    """The novel categories: ``cfg.novel_categories`` if given, else ``round(novel_fraction * n)`` things and
    ``round(novel_fraction * n)`` stuff chosen deterministically from ``cfg.seed``."""
    if cfg.novel_categories is not None:
        check_novel_names(cfg.novel_categories)
        return list(cfg.novel_categories)
    chosen: list[str] = []
    for names in (THING_NAMES, STUFF_NAMES):
        k = int(round(cfg.novel_fraction * len(names)))
        k = min(k, len(names) - 1)  # keep at least one seen category of each kind
        chosen += _ranked(names, cfg.seed)[:k]
    return chosen


def categories(cfg: ToyWorldConfig) -> list[dict]:
    """The category table of ``world.json``: things then stuff, ids 1..N in that order.

    Each entry: ``id, name, isthing (0|1), novel, synonyms, preferred_stuff (things; null for stuff), color``.
    """
    novel = set(novel_names(cfg))
    table: list[dict] = []
    for t in THINGS:
        table.append({
            "id": len(table) + 1, "name": t.name, "isthing": 1, "novel": t.name in novel,
            "synonyms": list(t.synonyms), "preferred_stuff": t.preferred_stuff, "color": list(t.color),
        })
    for s in STUFF:
        table.append({
            "id": len(table) + 1, "name": s.name, "isthing": 0, "novel": s.name in novel,
            "synonyms": list(s.synonyms), "preferred_stuff": None, "color": list(s.color),
        })
    return table


def supercategory(name: str) -> str:
    return _definition(name).supercategory
