"""Two-object scenes, their captions and foils, and the built-in compositional probe.

    python -m clipscale.data.probe --output data/probe/two_objects

A scene holds two shapes of different colours and different shapes, one in the left half of the
canvas and one in the right half, drawn like the demo data (clipscale.data.synthetic). What a
caption says is a `Statement`, so its truth can be checked against the scene:

    relation  "a red circle left of a blue square"   the first object on that side of the second
    negation  "a red circle and no green triangle"   the first object present, the second absent

Foils are false statements made from a true one:

    attribute_swap  the two colours exchanged         "a blue circle left of a red square"
    relation_swap   the relation reversed, or the     "a red circle right of a blue square",
                    two objects exchanged             "a blue square left of a red circle"
    negation        "no" before an object that is     "a red circle and no blue square"
                    there

The probe folder holds `probe.jsonl` (one sample a line: `image`, `caption`, `foils`, `type`, and
the `scene` it was drawn from) and the PNG images, in the layout clipscale.eval.compositional
reads. It is a pure function of `--seed` and `--per-type`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from clipscale.data.synthetic import BACKGROUNDS, CANVAS, COLOURS, SHAPES, draw_shape
from clipscale.errors import ArgumentParser, known_errors

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


def probe_sample(
    seed: int, kind: str, index: int
) -> tuple[Image.Image, Scene, Statement, Statement]:
    """(image, scene, true caption, foil) of probe sample `index` of type `kind`."""
    rng = random.Random(f"probe/{seed}/{kind}/{index}")
    scene = draw_scene(rng)
    caption = true_negation(scene, rng) if kind == "negation" else true_relation(scene, rng)
    foil = make_foil(kind, scene, caption, rng)
    return render_scene(scene, rng), scene, caption, foil


def write_probe(output: Path, per_type: int = 500, seed: int = 0) -> Path:
    """Write `per_type` samples of each foil type: output/probe.jsonl and output/images/*.png."""
    if per_type < 1:
        raise ValueError(f"--per-type {per_type}: expected a positive integer")
    (output / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for kind in FOIL_TYPES:
        for index in range(per_type):
            image, scene, caption, foil = probe_sample(seed, kind, index)
            name = f"images/{kind}_{index:05d}.png"
            image.save(output / name)
            line = {"image": name, "caption": caption.text(), "foils": [foil.text()], "type": kind}
            lines.append(json.dumps({**line, "scene": scene.to_json()}))
    (output / "probe.jsonl").write_text("\n".join(lines) + "\n")
    return output


BUILTIN = "builtin"  # the name that stands for the default probe in eval.compositional


def builtin_probe_dir() -> Path:
    """The default probe (seed 0, 500 per type), written once into the user's cache folder.

    Written to a private sibling first and renamed into place, so ranks or runs that start
    together never read a half-written probe.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "clipscale" / "probes" / "two_objects"
    if not (target / "probe.jsonl").is_file():
        draft = target.with_name(f"{target.name}.{os.getpid()}")
        write_probe(draft)
        try:
            draft.rename(target)
        except OSError:  # another process put it there first
            shutil.rmtree(draft, ignore_errors=True)
    return target


def resolve_probe_dirs(roots) -> list[Path]:
    """Probe folders from config entries, `builtin` standing for builtin_probe_dir()."""
    return [builtin_probe_dir() if str(root) == BUILTIN else Path(root) for root in roots or ()]


def main(argv: list[str] | None = None) -> None:
    """Command line: write the built-in two-object probe."""
    parser = ArgumentParser(
        prog="python -m clipscale.data.probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for probe.jsonl + images"
    )
    parser.add_argument("--per-type", type=int, default=500, help="samples of each foil type")
    parser.add_argument("--seed", type=int, default=0, help="the probe is a function of this seed")
    args = parser.parse_args(argv)
    if (args.output / "probe.jsonl").exists():
        parser.error(f"--output {args.output} already holds a probe.jsonl; choose an empty folder")
    if args.per_type < 1:
        parser.error(f"--per-type {args.per_type}: expected a positive integer")
    write_probe(args.output, args.per_type, args.seed)
    print(f"wrote {3 * args.per_type} probe samples ({args.per_type} per type) to {args.output}")


if __name__ == "__main__":
    known_errors(also=(OSError,))(main)()  # e.g. an --output that cannot be written: one line
