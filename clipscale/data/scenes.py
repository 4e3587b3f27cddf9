"""The two-object world: shapes and colours, scenes, what captions state about them, and foils.

Shared vocabulary of the synthetic demo data (clipscale.data.synthetic) and the compositional
probe (clipscale.data.probe): both draw with these shapes and colours, and both caption two-object
scenes with this grammar. A scene holds two shapes of different colours and different shapes, one
in the left half of the canvas and one in the right half. What a caption says is a `Statement`, so
its truth can be checked against the scene:

    relation  "a red circle left of a blue square"   the first object on that side of the second
    negation  "a red circle and no green triangle"   the first object present, the second absent

Foils are false statements made from a true one:

    attribute_swap  the two colours exchanged         "a blue circle left of a red square"
    relation_swap   the relation reversed, or the     "a red circle right of a blue square",
                    two objects exchanged             "a blue square left of a red circle"
    negation        "no" before an object that is     "a red circle and no blue square"
                    there
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 185),
    "orange": (240, 135, 25),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (15, 15, 15)}
CANVAS = 64  # drawn larger than the tiny model's 32 px input so the resize gives smooth edges


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, radius: int, fill) -> None:
    """Draw one of SHAPES centred at (x, y) with the given radius and fill colour."""
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill
        )
    else:
        arm = max(2, radius // 3)
        draw.rectangle((x - radius, y - arm, x + radius, y + arm), fill=fill)
        draw.rectangle((x - arm, y - radius, x + arm, y + radius), fill=fill)


FOIL_TYPES = ("attribute_swap", "relation_swap", "negation")
SIDES = ("left", "right")


@dataclass(frozen=True)
class Thing:
    """A coloured shape, as a caption names it."""

    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"

    def with_article(self) -> str:
        """ "a red circle", "an orange square": the indefinite article the colour's sound takes."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self}"


@dataclass(frozen=True)
class Scene:
    """Two things of different colours and shapes: `left` in the left half, `right` in the right."""

    left: Thing
    right: Thing
    background: str

    def side_of(self, thing: Thing) -> str | None:
        """ "left"/"right" where `thing` is, None if the scene does not hold it."""
        return {self.left: "left", self.right: "right"}.get(thing)

    def mirrored(self) -> Scene:
        """The scene seen in a mirror: the two things change sides."""
        return Scene(self.right, self.left, self.background)

    def to_json(self) -> dict:
        """The scene as plain JSON (the `scene` field of probe.jsonl)."""
        return {
            "objects": [
                {"colour": t.colour, "shape": t.shape, "side": side}
                for t, side in ((self.left, "left"), (self.right, "right"))
            ],
            "background": self.background,
        }


@dataclass(frozen=True)
class Statement:
    """`relation`: `first` is on `side` of `second`; `negation`: `first` there, `second` not."""

    kind: str  # "relation" or "negation"
    first: Thing
    second: Thing
    side: str = "left"

    def text(self) -> str:
        """The caption."""
        if self.kind == "relation":
            return f"{self.first.with_article()} {self.side} of {self.second.with_article()}"
        return f"{self.first.with_article()} and no {self.second}"

    def mirrored(self) -> Statement:
        """The relation with its side reversed: true of the mirrored scene where this one holds."""
        if self.kind != "relation":
            raise ValueError(f"only a relation has a mirror image, not {self.text()!r}")
        return Statement(
            "relation", self.first, self.second, "right" if self.side == "left" else "left"
        )

    def holds(self, scene: Scene) -> bool:
        """Whether the statement is true of `scene`."""
        first, second = scene.side_of(self.first), scene.side_of(self.second)
        if self.kind == "relation":
            return first == self.side and second is not None and second != first
        return first is not None and second is None


def draw_scene(rng: random.Random) -> Scene:
    """A random scene: two distinct colours, two distinct shapes, a background."""
    shapes = rng.sample(SHAPES, 2)
    colours = rng.sample(tuple(COLOURS), 2)
    background = rng.choice(tuple(BACKGROUNDS))
    return Scene(Thing(colours[0], shapes[0]), Thing(colours[1], shapes[1]), background)


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene drawn on a CANVAS² image: each thing inside its own half, never overlapping."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    middle = CANVAS // 2
    for thing, side in ((scene.left, "left"), (scene.right, "right")):
        radius = rng.randint(7, 12)
        low, high = (
            (radius + 1, middle - radius - 2)
            if side == "left"
            else (
                middle + radius + 2,
                CANVAS - radius - 2,
            )
        )
        x, y = rng.randint(low, high), rng.randint(radius + 1, CANVAS - radius - 2)
        fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[thing.colour])
        draw_shape(draw, thing.shape, x, y, radius, fill)
    return image


def absent_thing(scene: Scene, rng: random.Random) -> Thing:
    """A coloured shape the scene does not hold."""
    while True:
        thing = Thing(rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        if scene.side_of(thing) is None:
            return thing


def true_relation(scene: Scene, rng: random.Random) -> Statement:
    """A true relation caption, either way round ("A left of B" or "B right of A")."""
    if rng.random() < 0.5:
        return Statement("relation", scene.left, scene.right, "left")
    return Statement("relation", scene.right, scene.left, "right")


def true_negation(scene: Scene, rng: random.Random) -> Statement:
    """A true negation caption: a thing that is there, and no thing that is not."""
    return Statement("negation", rng.choice((scene.left, scene.right)), absent_thing(scene, rng))


def true_caption(scene: Scene, rng: random.Random) -> Statement:
    """The training caption of a two-object scene: a relation (2/3) or a negation (1/3)."""
    return true_negation(scene, rng) if rng.random() < 1 / 3 else true_relation(scene, rng)


def make_foil(kind: str, scene: Scene, caption: Statement, rng: random.Random) -> Statement | None:
    """A false statement of type `kind` made from the true `caption`; None if `kind` does not apply."""
    if kind not in FOIL_TYPES:
        raise ValueError(f"unknown foil type {kind!r}; expected one of {list(FOIL_TYPES)}")
    if kind == "negation":
        # the mentioned thing (or, for a relation, its first thing) and "no" the other, present one
        other = scene.right if caption.first == scene.left else scene.left
        return Statement("negation", caption.first, other)
    if caption.kind != "relation":
        return None
    first, second = caption.first, caption.second
    if kind == "attribute_swap":
        swapped = Thing(second.colour, first.shape), Thing(first.colour, second.shape)
        return Statement("relation", *swapped, caption.side)
    if rng.random() < 0.5:
        return caption.mirrored()
    return Statement("relation", second, first, caption.side)
