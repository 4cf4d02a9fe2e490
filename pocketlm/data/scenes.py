"""Procedural scenes with questions about them, Sort-of-CLEVR style: coloured shapes on a grid,
drawn with Pillow, and questions about one object's attributes, two objects' relation, or a count.

Everything follows from a seed: scene(seed) is the same picture and objects on every machine.
Training and test scenes come from disjoint seed ranges (TRAIN_SEEDS, TEST_SEEDS), and one colour x
shape combination (HELD_OUT) never appears in a training scene, so a test on the scenes that hold it
measures composition rather than recall.

    s = scene(12)                       # objects + an RGB uint8 image (SIZE x SIZE x 3)
    for q in questions(s, seed=12):     # [Question(kind="attribute", text=..., answer=...), ...]
        ...
    answer(q.text, s.things)            # the answer read off any list of objects (a model's decoded scene)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from pocketlm.errors import InputError

SIZE = 64                 # pixels per side
GRID = 4                  # objects sit in the cells of a GRID x GRID board, at most one a cell
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "purple": (160, 60, 200), "white": (240, 240, 240)}
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "large")
HELD_OUT = ("blue", "triangle")      # never in a training scene
MAX_OBJECTS = 6
TRAIN_SEEDS = range(0, 1_000_000)
TEST_SEEDS = range(1_000_000_000, 1_001_000_000)


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    things: list[Thing]
    image: np.ndarray

    @property
    def has_held_out(self) -> bool:
        return any((t.colour, t.shape) == HELD_OUT for t in self.things)


@dataclass(frozen=True)
class Question:
    kind: str       # attribute | relation | count
    text: str
    answer: str


def _split(seed: int) -> str:
    if seed in TRAIN_SEEDS:
        return "train"
    if seed in TEST_SEEDS:
        return "test"
    raise InputError(f"scene seed {seed}: expected one in the train range {TRAIN_SEEDS} or the test range {TEST_SEEDS}")


def scene(seed: int) -> Scene:
    """1 to MAX_OBJECTS objects in distinct cells; colour x shape pairs unique within a scene (so "the
    red circle" names one object). Training seeds never draw HELD_OUT."""
    rng = random.Random(seed)
    train = _split(seed) == "train"
    pairs = [(c, s) for c in COLOURS for s in SHAPES if not (train and (c, s) == HELD_OUT)]
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    things = [Thing(c, s, rng.choice(SIZES), cell // GRID, cell % GRID) for (c, s), cell in zip(rng.sample(pairs, n), cells)]
    return Scene(seed, things, render(things))


def render(things: list[Thing]) -> np.ndarray:
    from PIL import Image, ImageDraw

    scale = 4  # drawn at 4x and downsampled: smooth edges at 64 px
    cell = SIZE * scale // GRID
    img = Image.new("RGB", (SIZE * scale, SIZE * scale), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for t in things:
        half = cell * (0.42 if t.size == "large" else 0.24)
        cx, cy = (t.col + 0.5) * cell, (t.row + 0.5) * cell
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = COLOURS[t.colour]
        if t.shape == "square":
            draw.rectangle(box, fill=colour)
        elif t.shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS))


def questions(s: Scene, seed: int | None = None) -> list[Question]:
    """One question of each kind about the scene (relation only with two or more objects)."""
    rng = random.Random(s.seed if seed is None else seed)
    out = [_attribute(s, rng), _count(s, rng)]
    if len(s.things) >= 2:
        out.insert(1, _relation(s, rng))
    return out


def _attribute(s: Scene, rng: random.Random) -> Question:
    t = rng.choice(s.things)
    ask = rng.choice(("colour", "shape", "size"))
    if ask == "shape" and sum(u.colour == t.colour for u in s.things) == 1:
        return Question("attribute", f"What shape is the {t.colour} object?", t.shape)
    if ask == "colour" and sum(u.shape == t.shape for u in s.things) == 1:
        return Question("attribute", f"What colour is the {t.shape}?", t.colour)
    return Question("attribute", f"Is the {t.name} small or large?", t.size)


def _relation(s: Scene, rng: random.Random) -> Question:
    a, b = rng.sample(s.things, 2)
    ask = rng.choice(("left", "above", "nearest"))
    if ask == "left" and a.col != b.col:
        return Question("relation", f"Is the {a.name} left of the {b.name}?", "yes" if a.col < b.col else "no")
    if ask == "above" and a.row != b.row:
        return Question("relation", f"Is the {a.name} above the {b.name}?", "yes" if a.row < b.row else "no")
    dist = {u: (u.row - a.row) ** 2 + (u.col - a.col) ** 2 for u in s.things if u is not a}
    nearest = sorted(dist, key=dist.get)
    if len(nearest) == 1 or dist[nearest[0]] < dist[nearest[1]]:  # a unique nearest object
        return Question("relation", f"What colour is the object nearest the {a.name}?", nearest[0].colour)
    return Question("relation", f"Is the {a.name} left of the {b.name}?" if a.col != b.col else
                    f"Is the {a.name} above the {b.name}?", "yes" if (a.col, a.row) < (b.col, b.row) else "no")


def _count(s: Scene, rng: random.Random) -> Question:
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        return Question("count", f"How many {shape}s are there?", str(sum(t.shape == shape for t in s.things)))
    colour = rng.choice(list(COLOURS))
    return Question("count", f"How many {colour} objects are there?", str(sum(t.colour == colour for t in s.things)))


def answer(text: str, things: list[Thing]) -> str | None:
    """The answer to a question of questions()'s templates, read off `things` (the true objects, or a
    model's decoded ones), or None where the question names no single object among them."""
    words = text.rstrip("?").split()
    by_name = {t.name: t for t in things}
    if text.startswith("How many "):
        what = words[2].removesuffix("s")
        return str(sum(t.shape == what or t.colour == what for t in things))
    if text.startswith("What shape is the "):
        found = [t.shape for t in things if t.colour == words[4]]
        return found[0] if len(found) == 1 else None
    if text.startswith("What colour is the object nearest the "):
        a = by_name.get(" ".join(words[-2:]))
        if a is None:
            return None
        d = sorted(((t.row - a.row) ** 2 + (t.col - a.col) ** 2, t.colour) for t in things if t is not a)
        return d[0][1] if d and (len(d) == 1 or d[0][0] < d[1][0]) else None
    if text.startswith("What colour is the "):
        found = [t.colour for t in things if t.shape == words[-1]]
        return found[0] if len(found) == 1 else None
    if text.endswith(" small or large?"):
        t = by_name.get(" ".join(words[2:4]))
        return None if t is None else t.size
    for rel in (" left of the ", " above the "):
        if rel in text:
            first, second = text[len("Is the "):-1].split(rel)
            a, b = by_name.get(first), by_name.get(second)
            if a is None or b is None:
                return None
            return "yes" if (a.col < b.col if "left" in rel else a.row < b.row) else "no"
    raise InputError(f"{text!r}: not one of the scene question templates")


def about_held_out(q: Question, s: Scene) -> bool:
    """Whether the question's answer is read off the HELD_OUT object: it names it, or asks for the
    colour of the only triangle / the shape of the only blue object, or counts triangles or blue
    objects, in a scene that holds it."""
    if not s.has_held_out:
        return False
    colour, shape = HELD_OUT
    return (f"{colour} {shape}" in q.text or q.text in (f"What colour is the {shape}?", f"What shape is the {colour} object?",
            f"How many {shape}s are there?", f"How many {colour} objects are there?"))
