"""Procedural scenes for the embedded tiny VLM: 72x72 images of 1 to 5 shapes, with question/answer turns
whose answers are computed from the scene's ground truth (the list of :class:`Shape`).

A scene is a pure function of its seed: ``make_scene(seed)`` draws the shapes (distinct cells of a 3x3
grid, distinct colour-and-kind pairs so that "the red circle" names one shape), ``render(scene)`` paints
them and ``make_turn(scene, seed)`` picks a question and answers it from the shapes alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

IMAGE_SIZE = 72
GRID = 3
CELL = IMAGE_SIZE / GRID

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 20), "white": (245, 245, 245)}
KINDS = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
SIZES = {"small": 6, "large": 9}          # half-extent in pixels
TEXTURES = ("solid", "striped", "hollow")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
NUMBERS = ("no", "one", "two", "three", "four", "five")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
BACKGROUNDS = ((30, 30, 30), (45, 45, 50), (20, 25, 35), (60, 55, 50))


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    texture: str
    row: int              # 0 top .. 2 bottom
    column: int           # 0 left .. 2 right
    dx: int               # jitter of the centre inside its cell, pixels
    dy: int

    @property
    def centre(self) -> Tuple[float, float]:
        return (self.column + 0.5) * CELL + self.dx, (self.row + 0.5) * CELL + self.dy

    @property
    def name(self) -> str:
        """``red circle``: unique within a scene."""
        return f"{self.colour} {self.kind}"

    @property
    def phrase(self) -> str:
        """``a large striped red circle``."""
        return f"a {self.size} {self.texture} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    seed: int
    shapes: Tuple[Shape, ...]            # in reading order (row, then column)
    background: Tuple[int, int, int]


@dataclass(frozen=True)
class Turn:
    kind: str                 # which question family (describe, count, where, ...)
    question: str
    answer: str


def position_name(row: int, column: int) -> str:
    if row == 1 and column == 1:
        return "center"
    return f"{ROWS[row]} {COLUMNS[column]}"


def at_position(row: int, column: int) -> str:
    return "in the center" if (row, column) == (1, 1) else f"at the {position_name(row, column)}"


def make_scene(seed: int, num_shapes: Optional[int] = None) -> Scene:
    rng = random.Random(f"scene-{seed}")
    count = num_shapes if num_shapes is not None else rng.randint(1, 5)
    if not 1 <= count <= 5:
        raise ValueError(f"num_shapes must be in [1, 5], got {count}")
    cells = rng.sample(range(GRID * GRID), count)
    pairs = rng.sample([(colour, kind) for colour in COLOURS for kind in KINDS], count)
    shapes = []
    for cell, (colour, kind) in zip(cells, pairs):
        size = rng.choice(tuple(SIZES))
        jitter = int(CELL / 2 - SIZES[size] - 1)
        shapes.append(Shape(kind=kind, colour=colour, size=size, texture=rng.choice(TEXTURES), row=cell // GRID,
                            column=cell % GRID, dx=rng.randint(-jitter, jitter), dy=rng.randint(-jitter, jitter)))
    shapes.sort(key=lambda s: (s.row, s.column))
    return Scene(seed=seed, shapes=tuple(shapes), background=rng.choice(BACKGROUNDS))


# ---- rendering --------------------------------------------------------------------------------------------------

def _outline(shape: Shape) -> list:
    """The shape's polygon (or ellipse box for a circle) in pixel coordinates."""
    cx, cy = shape.centre
    r = SIZES[shape.size]
    if shape.kind == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape.kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape.kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape.kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    w = max(2, r // 3)      # cross: a plus sign of arm half-width w
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def shape_mask(shape: Shape) -> Image.Image:
    """An ``L`` mask (255 where the shape is painted), texture applied."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    points = _outline(shape)
    fill, outline, width = (None, 255, 2) if shape.texture == "hollow" else (255, None, 1)
    if shape.kind == "circle":
        draw.ellipse(points, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(points, fill=fill, outline=outline, width=width)
    if shape.texture == "striped":
        stripes = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        stripe_draw = ImageDraw.Draw(stripes)
        for y in range(0, IMAGE_SIZE, 4):
            stripe_draw.rectangle([0, y, IMAGE_SIZE, y + 1], fill=255)
        mask = Image.composite(mask, stripes.point(lambda _: 0), stripes)
    return mask


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    for shape in scene.shapes:
        image.paste(COLOURS[shape.colour], (0, 0, IMAGE_SIZE, IMAGE_SIZE), shape_mask(shape))
    return image


# ---- questions and answers --------------------------------------------------------------------------------------

def _count_phrase(count: int, singular: str, plural: str) -> str:
    if count == 1:
        return f"there is one {singular}."
    return f"there are {NUMBERS[count]} {plural}."


def _join(phrases: List[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(scene: Scene) -> str:
    count = len(scene.shapes)
    head = "there is one shape" if count == 1 else f"there are {NUMBERS[count]} shapes"
    parts = [f"{shape.phrase} {at_position(shape.row, shape.column)}" for shape in scene.shapes]
    return f"{head}: {_join(parts)}."


def related(scene: Scene, target: Shape, relation: str) -> List[Shape]:
    """Shapes strictly left of / right of / above / below ``target`` (by grid cell), in reading order."""
    d_row, d_column = RELATIONS[relation]
    result = []
    for shape in scene.shapes:
        if shape is target:
            continue
        if d_column and (shape.column - target.column) * d_column > 0:
            result.append(shape)
        elif d_row and (shape.row - target.row) * d_row > 0:
            result.append(shape)
    return result


def _question(rng: random.Random, scene: Scene, kind: str) -> Turn:
    shapes = scene.shapes
    target = rng.choice(shapes)
    if kind == "describe":
        question = rng.choice(("describe the image.", "what do you see?", "describe the shapes in the image.",
                               "what is in the picture?"))
        return Turn(kind, question, describe(scene))
    if kind == "count_all":
        question = rng.choice(("how many shapes are there?", "how many shapes are in the image?"))
        return Turn(kind, question, _count_phrase(len(shapes), "shape", "shapes"))
    if kind == "count_colour":
        colour = target.colour if rng.random() < 0.7 else rng.choice(tuple(COLOURS))
        count = sum(shape.colour == colour for shape in shapes)
        question = rng.choice((f"how many {colour} shapes are there?", f"how many shapes are {colour}?"))
        return Turn(kind, question, _count_phrase(count, f"{colour} shape", f"{colour} shapes"))
    if kind == "count_kind":
        shape_kind = target.kind if rng.random() < 0.7 else rng.choice(KINDS)
        count = sum(shape.kind == shape_kind for shape in shapes)
        question = f"how many {PLURALS[shape_kind]} are there?"
        return Turn(kind, question, _count_phrase(count, shape_kind, PLURALS[shape_kind]))
    if kind == "where":
        question = rng.choice((f"where is the {target.name}?", f"where is the {target.name} in the image?"))
        return Turn(kind, question, f"the {target.name} is {at_position(target.row, target.column)}.")
    if kind == "what_at":
        row, column = rng.randrange(GRID), rng.randrange(GRID)
        if rng.random() < 0.7:
            row, column = target.row, target.column
        found = [shape for shape in shapes if (shape.row, shape.column) == (row, column)]
        question = rng.choice((f"what is {at_position(row, column)}?", f"which shape is {at_position(row, column)}?"))
        answer = f"{found[0].phrase}." if found else f"there is nothing {at_position(row, column)}."
        return Turn(kind, question, answer)
    if kind == "relation":
        relation = rng.choice(tuple(RELATIONS))
        found = related(scene, target, relation)
        question = f"what is {relation} the {target.name}?"
        answer = (f"{_join([shape.phrase for shape in found])} {'is' if len(found) == 1 else 'are'} {relation} "
                  f"the {target.name}." if found else f"nothing is {relation} the {target.name}.")
        return Turn(kind, question, answer)
    if kind == "exists":
        colour, shape_kind = target.colour, target.kind
        if rng.random() < 0.5:
            colour, shape_kind = rng.choice(tuple(COLOURS)), rng.choice(KINDS)
        found = [shape for shape in shapes if (shape.colour, shape.kind) == (colour, shape_kind)]
        question = f"is there a {colour} {shape_kind}?"
        answer = (f"yes, the {colour} {shape_kind} is {at_position(found[0].row, found[0].column)}." if found
                  else f"no, there is no {colour} {shape_kind}.")
        return Turn(kind, question, answer)
    if kind == "colour_of":
        where = at_position(target.row, target.column)
        question = rng.choice((f"what colour is the {target.kind} {where}?",
                               f"which colour has the {target.kind} {where}?"))
        return Turn(kind, question, f"the {target.kind} {where} is {target.colour}.")
    if kind == "attributes":
        question = rng.choice((f"is the {target.name} large or small?", f"what does the {target.name} look like?"))
        return Turn(kind, question, f"the {target.name} is {target.size} and {target.texture}.")
    raise ValueError(f"unknown question kind {kind!r}")


QUESTION_KINDS = ("describe", "count_all", "count_colour", "count_kind", "where", "what_at", "relation", "exists",
                  "colour_of", "attributes")
# Training mix: descriptions are the long answers the demo generates, so they get the largest share.
QUESTION_WEIGHTS = (4, 1, 1, 1, 1, 1, 2, 1, 1, 1)


# Short answers that each name one or two facts read off the image: the recipe's first joint steps use only
# these, so that the text model learns to look at the image before it learns the long descriptions' grammar.
GROUNDING_KINDS = ("count_all", "count_colour", "count_kind", "where", "what_at", "exists", "colour_of", "attributes")


def make_turn(scene: Scene, seed: int, kind: Optional[str] = None, kinds: Optional[Tuple[str, ...]] = None) -> Turn:
    """The question and answer of ``seed`` (``kind``: that family; else drawn with the training weights,
    among ``kinds`` when given)."""
    rng = random.Random(f"turn-{seed}")
    if kind is None:
        pool = QUESTION_KINDS if kinds is None else tuple(kinds)
        if not pool or any(k not in QUESTION_KINDS for k in pool):
            raise ValueError(f"kinds must be a non-empty subset of {', '.join(QUESTION_KINDS)}, got {kinds!r}")
        kind = rng.choices(pool, weights=[QUESTION_WEIGHTS[QUESTION_KINDS.index(k)] for k in pool])[0]
    if kind not in QUESTION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(QUESTION_KINDS)}, got {kind!r}")
    return _question(rng, scene, kind)


def vocabulary() -> List[str]:
    """Every word and punctuation mark the grammar can produce (the tokenizer's vocabulary, minus specials)."""
    words = set("there is are one shape shapes a an the at in of and nothing no yes it how many what where which "
                "colour has does look like large or small describe image images do you see picture center middle "
                "top bottom left right above below is".split())
    words |= set(COLOURS) | set(KINDS) | set(PLURALS.values()) | set(SIZES) | set(TEXTURES) | set(NUMBERS)
    words |= set(ROWS) | set(COLUMNS) | {"user", "assistant"}
    words |= {".", ",", "?", ":"}
    return sorted(words)
