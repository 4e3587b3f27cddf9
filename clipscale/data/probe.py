"""The built-in compositional probe: two-object scenes with one true caption and one foil.

    python -m clipscale.data.probe --output data/probe/two_objects

Scenes, captions and foils are those of clipscale.data.scenes (the grammar the two-object demo
data trains on). The probe folder holds `probe.jsonl` (one sample a line: `image`, `caption`,
`foils`, `type`, and the `scene` it was drawn from) and the PNG images, in the layout
clipscale.eval.compositional reads. It is a pure function of `--seed` and `--per-type`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image

from clipscale.data.scenes import (
    FOIL_TYPES,
    Scene,
    Statement,
    draw_scene,
    make_foil,
    render_scene,
    true_negation,
    true_relation,
)
from clipscale.errors import ArgumentParser, known_errors


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
