"""COCO-style captions: each names a random subset of what is visible, with varied phrasing.

A caption names the largest thing and the largest stuff with probability ``mention_largest_prob`` each and
every other present category with probability 1/2; it may use a synonym instead of the name, a colour, a
size word and the exact count ("two red boats on the water under a blue sky", "a photo of a small kite and
a tree.", "grass, a cow and a person"). It never names a category that is not visible in the image.

Object-centric close-ups (:mod:`densevlm.toyworld.closeup`) get web alt-text captions instead, from the template
lists at the end of this module ("a photo of a kite", "close-up of brick wall", "kite", "a kite in the sky"):
they always name the object, and a thing close-up's background stuff only sometimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from densevlm.toyworld.categories import plural, stuff_def, thing_def

NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
PREFIXES = ("", "", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "a cartoon of ",
            "a scene with ", "a view of ")
OTHER_PROB = 0.5  # chance that a category other than the largest thing / stuff is named
SYNONYM_PROB = 0.25


@dataclass(frozen=True)
class ThingInfo:
    """A visible thing as captions see it."""

    name: str
    colour: str  # the named main colour
    size: float  # 0 (smallest allowed) .. 1 (largest allowed)
    on_stuff: str
    area: int  # visible pixels


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _noun(rng: np.random.Generator, name: str, synonyms: Sequence[str]) -> str:
    return _choice(rng, synonyms) if synonyms and rng.random() < SYNONYM_PROB else name


def thing_phrase(rng: np.random.Generator, name: str, insts: Sequence[ThingInfo]) -> str:
    """'a small red boat', 'two kites', 'the automobile', 'three fish'."""
    d = thing_def(name)
    noun = _noun(rng, name, d.synonyms)
    adjs: list[str] = []
    if len(insts) == 1 and rng.random() < 0.3:
        s = insts[0].size
        if s < 0.33:
            adjs.append(_choice(rng, ("small", "little")))
        elif s > 0.67:
            adjs.append(_choice(rng, ("large", "big")))
    colours = {i.colour for i in insts}
    suffix = ""
    if len(colours) == 1 and rng.random() < 0.5:
        colour = next(iter(colours))
        if d.colour_suffix:
            suffix = " " + d.colour_suffix[0 if len(insts) == 1 else 1].format(colour=colour)
        else:
            adjs.append(colour)
    if len(insts) == 1:
        words = " ".join([*adjs, noun])
        r = rng.random()
        if r < 0.15:
            return "one " + words + suffix
        if r < 0.3:
            return "the " + words + suffix
        return _with_article(words) + suffix
    many = " ".join([*adjs, plural(noun)])
    if rng.random() < 0.1 or len(insts) not in NUMBERS:
        return ("some " if len(insts) == 2 else _choice(rng, ("some ", "several "))) + many + suffix
    return NUMBERS[len(insts)] + " " + many + suffix


def _stuff_noun(rng: np.random.Generator, name: str) -> tuple[str, bool]:
    """A name or synonym of a stuff category, maybe with an adjective; and whether it is the category name."""
    d = stuff_def(name)
    noun = _noun(rng, name, d.synonyms)
    if noun == name and d.adjectives and rng.random() < 0.3:  # adjectives suit the name, not every synonym
        return _choice(rng, d.adjectives) + " " + noun, True
    return noun, noun == name


def stuff_phrase(rng: np.random.Generator, name: str) -> str:
    """'the sky', 'a blue sky', 'grass', 'the wooden floor'."""
    noun, is_name = _stuff_noun(rng, name)
    if rng.random() < 0.5 or not is_name:  # synonyms ("the sea", "the brickwork") read best with "the"
        return "the " + noun
    # "grass", "calm water"; "a road", "a blue sky"
    return noun if stuff_def(name).mass_noun else _with_article(noun)


def _relation(rng: np.random.Generator, thing: str, stuff: str) -> str:
    """'on the water', 'in the sky', 'in front of the brick wall' (with a name or synonym of the stuff)."""
    d = stuff_def(stuff)
    prep = thing_def(thing).preposition or d.preposition
    return f"{prep} {_stuff_noun(rng, stuff)[0]}"


def caption(
    rng: np.random.Generator, things: Sequence[ThingInfo], stuff_areas: dict[str, int], p_largest: float
) -> str:
    """One caption of an image with the given visible things and stuff (name -> visible area)."""
    groups: dict[str, list[ThingInfo]] = {}
    for t in things:
        groups.setdefault(t.name, []).append(t)
    largest_thing = max(things, key=lambda t: t.area).name if things else None
    largest_stuff = max(stuff_areas, key=lambda s: stuff_areas[s]) if stuff_areas else None
    names = [g for g in groups if rng.random() < (p_largest if g == largest_thing else OTHER_PROB)]
    stuff = [s for s in stuff_areas if rng.random() < (p_largest if s == largest_stuff else OTHER_PROB)]
    if not names and not stuff:  # say something: any one visible category
        pool = list(groups) + list(stuff_areas)
        pick = pool[int(rng.integers(len(pool)))]
        (names if pick in groups else stuff).append(pick)
    names = [names[i] for i in rng.permutation(len(names))]
    stuff = [stuff[i] for i in rng.permutation(len(stuff))]

    related = [g for g in names if groups[g][0].on_stuff in stuff]
    forms = ["list", "comma"]
    if names and stuff:
        forms += ["background", "stuff first"]
        if related:
            forms += ["relation"] * 3
    form = _choice(rng, forms)
    tp = {g: thing_phrase(rng, g, groups[g]) for g in names}
    if form == "relation":
        head = related[0]
        where = groups[head][0].on_stuff
        text = f"{tp[head]} {_relation(rng, head, where)}"
        rest_things = [tp[g] for g in names if g != head]
        rest_stuff = [s for s in stuff if s != where]
        if "sky" in rest_stuff and rng.random() < 0.7:
            text += " under " + stuff_phrase(rng, "sky")
            rest_stuff.remove("sky")
        if rest_things:
            text += _choice(rng, (", with ", " and ", " next to ", ", near ")) + join(rest_things)
        if rest_stuff:
            sp = join([stuff_phrase(rng, s) for s in rest_stuff])
            text += _choice(rng, (f" and {sp}", f", with {sp} in the background"))
        text = _choice(rng, PREFIXES) + text
    elif form == "background":
        text = (_choice(rng, PREFIXES) + join([tp[g] for g in names]) + " with "
                + join([stuff_phrase(rng, s) for s in stuff]) + " in the background")
    elif form == "stuff first":
        text = join([stuff_phrase(rng, s) for s in stuff]) + " with " + join([tp[g] for g in names])
    elif form == "comma":
        parts = [stuff_phrase(rng, s) for s in stuff] + [tp[g] for g in names]
        text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else ""
    else:
        parts = [tp[g] for g in names] + [stuff_phrase(rng, s) for s in stuff]
        text = _choice(rng, PREFIXES) + join(parts)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.6:
        text += "."
    return text


def captions(
    rng: np.random.Generator, things: Sequence[ThingInfo], stuff_areas: dict[str, int], n: int, p_largest: float
) -> list[str]:
    """``n`` captions of one image, distinct where the draws allow it (a few retries, then duplicates stay)."""
    out: list[str] = []
    for _ in range(n):
        text = caption(rng, things, stuff_areas, p_largest)
        for _retry in range(3):
            if text not in out:
                break
            text = caption(rng, things, stuff_areas, p_largest)
        out.append(text)
    return out


# ------------------------------------------------------------------------------- object-centric close-ups
# Captions of the close-ups of the pre-training mix, in the style of web alt-text: short, often a bare noun
# phrase, always naming the object. Fields: {a_thing} "a red kite", {the_thing} "the kite", {thing} "red kite"
# (no article), {relation} "in the sky" (the thing's preposition and the background stuff), {stuff} "the sky",
# "grass", {bare_stuff} "blue sky", "lawn" (no article). A thing close-up's caption names its background stuff
# with probability ``object_mention_stuff_prob`` (when there is one), using a template of THING_ON_STUFF;
# otherwise it uses THING_CLOSEUP, or PLAIN_BACKGROUND on a plain background, or PARTIAL_VIEW when part of the
# thing leaves the frame (each with probability ``SPECIAL_TEMPLATE_PROB``).
THING_CLOSEUP: tuple[str, ...] = (
    "{a_thing}", "{thing}", "a photo of {a_thing}", "a close-up of {a_thing}", "close-up of {a_thing}",
    "a close-up photo of {a_thing}", "a picture of {a_thing}", "an image of {a_thing}", "a cropped photo of {a_thing}",
    "a zoomed-in photo of {a_thing}", "{a_thing}, close up", "{thing} photo", "a good photo of {the_thing}",
    "a detail of {the_thing}", "a photo of {the_thing}", "{thing} close-up", "a drawing of {a_thing}",
    "a cartoon of {a_thing}",
)
THING_ON_STUFF: tuple[str, ...] = (
    "{a_thing} {relation}", "a photo of {a_thing} {relation}", "{a_thing} against {stuff}",
    "close-up of {a_thing} with {stuff} behind it", "{thing}, {bare_stuff}", "a close-up of {a_thing} {relation}",
    "{a_thing} and {stuff}", "{thing} on a background of {bare_stuff}",
)
PLAIN_BACKGROUND: tuple[str, ...] = (
    "{a_thing} on a plain background", "{a_thing} isolated on a plain background", "a studio photo of {a_thing}",
    "{thing} on a blank background", "{thing}, isolated",
)
PARTIAL_VIEW: tuple[str, ...] = (
    "part of {a_thing}", "a cropped photo of {a_thing}", "{a_thing}, partly out of frame", "a detail of {the_thing}",
)
STUFF_CLOSEUP: tuple[str, ...] = (
    "{bare_stuff}", "a photo of {stuff}", "close-up of {stuff}", "a close-up photo of {stuff}", "{bare_stuff} texture",
    "the texture of {stuff}", "a background of {bare_stuff}", "{bare_stuff} background", "a view of {stuff}",
    "a patch of {bare_stuff}", "a detail of {stuff}", "a picture of {stuff}", "{bare_stuff}, close up",
)
SPECIAL_TEMPLATE_PROB = 0.5  # a plain-background or partial-view close-up uses its own templates this often


@dataclass(frozen=True)
class CloseUpInfo:
    """What a close-up's captions may say: the thing (or None for a stuff close-up), its named colour, whether
    part of it leaves the frame, the background stuff ordered by visible area (largest first; empty = plain)."""

    thing: str | None
    colour: str
    partial: bool
    stuff: tuple[str, ...]


def closeup_thing_words(rng: np.random.Generator, name: str, colour: str) -> dict[str, str]:
    """The three forms of a close-up's thing: {'a_thing': 'a red kite', 'the_thing': 'the red kite',
    'thing': 'red kite'}, with the colour (or its suffix, "a person in blue") half of the time, a synonym as
    often as in scene captions."""
    d = thing_def(name)
    noun = _noun(rng, name, d.synonyms)
    adj, suffix = "", ""
    if rng.random() < 0.5:
        if d.colour_suffix:
            suffix = " " + d.colour_suffix[0].format(colour=colour)
        else:
            adj = colour + " "
    words = adj + noun
    return {"a_thing": _with_article(words) + suffix, "the_thing": "the " + words + suffix, "thing": words + suffix}


def closeup_caption(rng: np.random.Generator, info: CloseUpInfo, mention_stuff_prob: float) -> str:
    """One web-style caption of a close-up; it always names the thing (or the stuff of a stuff close-up)."""
    if info.thing is None:
        noun, is_name = _stuff_noun(rng, info.stuff[0])
        fields = {"stuff": stuff_phrase(rng, info.stuff[0]) if is_name else "the " + noun, "bare_stuff": noun}
        text = _choice(rng, STUFF_CLOSEUP).format(**fields)
    else:
        fields = closeup_thing_words(rng, info.thing, info.colour)
        if info.stuff and rng.random() < mention_stuff_prob:
            stuff = info.stuff[0]
            fields.update(relation=_relation(rng, info.thing, stuff), stuff=stuff_phrase(rng, stuff),
                          bare_stuff=_stuff_noun(rng, stuff)[0])
            template = _choice(rng, THING_ON_STUFF)
        elif not info.stuff and rng.random() < SPECIAL_TEMPLATE_PROB:
            template = _choice(rng, PLAIN_BACKGROUND)
        elif info.partial and rng.random() < SPECIAL_TEMPLATE_PROB:
            template = _choice(rng, PARTIAL_VIEW)
        else:
            template = _choice(rng, THING_CLOSEUP)
        text = template.format(**fields)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def closeup_captions(rng: np.random.Generator, info: CloseUpInfo, n: int, mention_stuff_prob: float) -> list[str]:
    """``n`` captions of one close-up, distinct where the draws allow it (as :func:`captions`)."""
    out: list[str] = []
    for _ in range(n):
        text = closeup_caption(rng, info, mention_stuff_prob)
        for _retry in range(3):
            if text not in out:
                break
            text = closeup_caption(rng, info, mention_stuff_prob)
        out.append(text)
    return out
