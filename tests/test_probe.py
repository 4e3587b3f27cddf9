"""The two-object probe and training split: foils are false of the scene, captions are true,
the scene matches the pixels, the probe is deterministic, and the default demo is unchanged."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clipscale.data.probe import main as probe_main
from clipscale.data.synthetic import (
    COLOURS,
    SyntheticCaptions,
    SyntheticDataModule,
    draw_sample,
    draw_two_object_sample,
)
from clipscale.models import build_tokenizer

MODEL = "clipscale-tiny"
RELATION = re.compile(r"^an? (\w+) (\w+) (left|right) of an? (\w+) (\w+)$")
NEGATION = re.compile(r"^an? (\w+) (\w+) and no (\w+) (\w+)$")


def is_true(text: str, scene: dict) -> bool:
    """Truth of a caption in the probe grammar, read from the scene description alone."""
    where = {(o["colour"], o["shape"]): o["side"] for o in scene["objects"]}
    if match := RELATION.match(text):
        c1, s1, side, c2, s2 = match.groups()
        first, second = where.get((c1, s1)), where.get((c2, s2))
        return first == side and second is not None and second != side
    match = NEGATION.match(text)
    assert match, f"caption outside the probe grammar: {text!r}"
    c1, s1, c2, s2 = match.groups()
    return (c1, s1) in where and (c2, s2) not in where


def colour_sides(image: Image.Image) -> dict[str, set[str]]:
    """{colour name: halves ("left"/"right") holding 20+ pixels of that colour (±25 a channel)}."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    middle = pixels.shape[1] // 2
    found: dict[str, set[str]] = {}
    for name, rgb in COLOURS.items():
        close = (np.abs(pixels - np.array(rgb)) <= 25).all(axis=2)
        for side, half in (("left", close[:, :middle]), ("right", close[:, middle:])):
            if half.sum() >= 20:
                found.setdefault(name, set()).add(side)
    return found


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    output = tmp_path_factory.mktemp("probe") / "two_objects"
    probe_main(["--output", str(output)])  # the shipped defaults: 500 per type, seed 0
    lines = [json.loads(line) for line in (output / "probe.jsonl").read_text().splitlines()]
    return output, lines


def test_probe_has_500_per_type_with_false_foils_and_true_captions(probe):
    _, lines = probe
    types = [line["type"] for line in lines]
    assert {t: types.count(t) for t in set(types)} == {
        "attribute_swap": 500,
        "relation_swap": 500,
        "negation": 500,
    }
    for line in lines:
        assert is_true(line["caption"], line["scene"]), line
        assert line["foils"] and all(foil != line["caption"] for foil in line["foils"])
        for foil in line["foils"]:
            assert not is_true(foil, line["scene"]), (foil, line)
        if line["type"] == "negation":
            # "no X" where X is in the scene: the negated thing is one of the scene's objects
            c, s = NEGATION.match(line["foils"][0]).groups()[2:]
            assert {"colour": c, "shape": s} in [
                {"colour": o["colour"], "shape": o["shape"]} for o in line["scene"]["objects"]
            ]
    # both forms of relation_swap occur: the relation reversed and the objects exchanged
    swaps = [line for line in lines if line["type"] == "relation_swap"]
    reversed_ = sum(
        RELATION.match(w["caption"]).group(3) != RELATION.match(w["foils"][0]).group(3)
        for w in swaps
    )
    assert 0 < reversed_ < len(swaps)


def test_probe_scene_matches_the_pixels(probe):
    output, lines = probe
    for line in lines[::25]:
        sides = colour_sides(Image.open(output / line["image"]))
        for thing in line["scene"]["objects"]:
            assert sides.get(thing["colour"]) == {thing["side"]}, (line, sides)


def test_probe_is_deterministic(probe, tmp_path):
    output, lines = probe
    probe_main(["--output", str(tmp_path / "again"), "--per-type", "20"])
    again = (tmp_path / "again" / "probe.jsonl").read_text().splitlines()
    kinds = {"attribute_swap": 0, "relation_swap": 500, "negation": 1000}
    for line in map(json.loads, again):
        index = int(line["image"].split("_")[-1].split(".")[0])
        assert line == lines[kinds[line["type"]] + index]
        first = (output / line["image"]).read_bytes()
        assert (tmp_path / "again" / line["image"]).read_bytes() == first
    with pytest.raises(SystemExit):
        probe_main(["--output", str(tmp_path / "again")])  # refuses to overwrite


def check_caption_and_foils_against_pixels(image: Image.Image, caption: str, foils: list[str]):
    """The caption is true of the drawn pixels and every foil is false, read from colours alone."""
    sides = colour_sides(image)
    assert len(sides) == 2 and all(len(s) == 1 for s in sides.values())
    colour_side = {colour: next(iter(s)) for colour, s in sides.items()}
    assert caption not in foils
    for text in [caption, *foils]:
        if match := RELATION.match(text):
            c1, _, side, c2, _ = match.groups()
            # colours alone decide relation captions here: colours differ in a scene
            holds = colour_side.get(c1) == side and colour_side.get(c2) not in (None, side)
            assert holds == (text == caption), (text, caption, sides)
        else:
            c1, _, c2, _ = NEGATION.match(text).groups()
            assert c1 in sides  # the mentioned thing's colour is in the image
            if text != caption:
                assert c2 in sides  # a foil negates a colour that is there


def test_two_object_training_foils_are_false_and_differ():
    types = ("attribute_swap", "relation_swap", "negation")
    for index in range(200):
        image, caption, foils = draw_two_object_sample(0, "train", index, types, 3)
        assert foils and len(foils) <= 3
        check_caption_and_foils_against_pixels(image, caption, foils)
    # the image and caption do not depend on which foils are asked for
    plain = draw_two_object_sample(0, "train", 5)
    with_foils = draw_two_object_sample(0, "train", 5, types, 3)
    assert plain[1] == with_foils[1] and plain[0].tobytes() == with_foils[0].tobytes()


def test_hard_negative_batches_have_fixed_foil_shapes_and_masks():
    module = SyntheticDataModule(
        MODEL,
        batch_size=6,
        objects=2,
        hard_negatives=["relation_swap", "negation"],
        max_hard_negatives=3,
    )
    dataset = module.dataset("train")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(6)])
    assert batch["foil_texts"].shape == (6, 3, batch["texts"].shape[1])
    assert batch["foil_mask"].dtype == torch.bool and batch["foil_mask"].shape == (6, 3)
    assert not batch["foil_mask"][:, 2].any()  # two types: at most two foils a sample
    tokenizer = build_tokenizer(MODEL)
    for i in range(6):
        _, caption, foils = draw_two_object_sample(0, "train", i, ("relation_swap", "negation"), 3)
        assert batch["foil_mask"][i].sum() == len(foils)
        assert torch.equal(batch["foil_texts"][i, : len(foils)], tokenizer(foils))
        assert torch.equal(batch["texts"][i], tokenizer([caption])[0])
    assert (batch["labels"] == -1).all()
    assert "foil_texts" not in module.dataset("val")[0]  # held-out split: one object, no foils


def test_mirror_samples_are_the_mirrored_scene_with_a_relation_caption_true_of_it():
    types = ("attribute_swap", "relation_swap")
    for index in range(200):
        image, caption, _ = draw_two_object_sample(0, "train", index, types, 3)
        mirror, mirror_caption, mirror_foils = draw_two_object_sample(
            0, "train", index, types, 3, mirrored=True
        )
        assert mirror.tobytes() == ImageOps.mirror(image).tobytes()
        assert RELATION.match(mirror_caption) and len(mirror_foils) == 2
        check_caption_and_foils_against_pixels(mirror, mirror_caption, mirror_foils)
        # the pair differs in sides only: the mirror's caption is false of the original scene
        check_caption_and_foils_against_pixels(image, caption, [mirror_caption])
        if RELATION.match(caption):  # a relation caption is mirrored by reversing its side
            side = RELATION.match(caption).group(3)
            flipped = {"left": "right", "right": "left"}[side]
            assert mirror_caption == caption.replace(f" {side} of ", f" {flipped} of ")


def test_mirror_pair_batches_hold_each_scene_next_to_its_mirror():
    module = SyntheticDataModule(
        MODEL,
        batch_size=6,
        train_samples=12,
        objects=2,
        hard_negatives=["relation_swap"],
        max_hard_negatives=2,
        mirror_pairs=True,
    )
    dataset = module.dataset("train")
    assert len(dataset) == 6  # items are pairs: 12 samples
    loader = module.train_dataloader()
    assert len(loader) == 2
    tokenizer = build_tokenizer(MODEL)
    pairs = {}
    for index in range(len(dataset)):
        texts = [
            tokenizer([draw_two_object_sample(0, "train", index, ("relation_swap",), 2, m)[1]])[0]
            for m in (False, True)
        ]
        pairs[tuple(texts[0].tolist())] = index, texts[1]
    seen = []
    for batch in loader:
        assert batch["images"].shape[0] == 6 and batch["foil_texts"].shape == (6, 2, 32)
        for k in range(3):
            index, mirror_text = pairs[tuple(batch["texts"][2 * k].tolist())]
            assert torch.equal(batch["texts"][2 * k + 1], mirror_text)
            assert torch.equal(batch["images"][2 * k], dataset.sample(index)["images"])
            # the mirror's pixels are the original's crop seen in a mirror
            assert torch.equal(batch["images"][2 * k + 1], batch["images"][2 * k].flip(-1))
            seen.append(index)
    assert sorted(seen) == list(range(6))  # one epoch: every scene once, with its mirror
    assert "foil_texts" not in module.dataset("val")[0]  # held-out split unchanged


def test_default_synthetic_data_is_the_one_object_demo():
    module = SyntheticDataModule(MODEL, batch_size=4)
    dataset = module.dataset("train")
    reference = SyntheticCaptions(10, "train", 0, dataset.transform, dataset.tokenizer)
    for index in (0, 3, 9):
        ours, theirs = dataset[index], reference[index]
        assert set(ours) == {"images", "texts", "labels"}
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        _, caption, label = draw_sample(0, "train", index)
        assert ours["labels"].item() == label
        assert torch.equal(ours["texts"], dataset.tokenizer([caption])[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objects": 2, "hard_negatives": ["attribute_swap", "colour_swap"]}, "'colour_swap'"),
        ({"objects": 2, "hard_negatives": "negation"}, "data.hard_negatives"),
        ({"objects": 1, "hard_negatives": ["negation"]}, "data.objects=2"),
        ({"objects": 3}, "data.objects"),
        ({"objects": 1, "mirror_pairs": True}, "data.objects=2"),
        ({"objects": 2, "mirror_pairs": True, "batch_size": 7}, "must be even, got 7"),
        ({"objects": 2, "mirror_pairs": "yes"}, "data.mirror_pairs"),
        (
            {"objects": 2, "hard_negatives": ["negation"], "max_hard_negatives": 0},
            "max_hard_negatives",
        ),
    ],
)
def test_bad_hard_negative_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SyntheticDataModule(MODEL, **kwargs)


def test_builtin_names_the_default_probe_written_once(tmp_path, monkeypatch):
    from clipscale.data.probe import builtin_probe_dir, resolve_probe_dirs, write_probe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (root,) = resolve_probe_dirs(["builtin"])
    assert root == builtin_probe_dir() and root.is_relative_to(tmp_path / "cache")
    reference = write_probe(tmp_path / "reference")
    assert (root / "probe.jsonl").read_text() == (reference / "probe.jsonl").read_text()
    written = (root / "probe.jsonl").stat().st_mtime_ns
    assert builtin_probe_dir() == root and (root / "probe.jsonl").stat().st_mtime_ns == written
    assert resolve_probe_dirs([str(tmp_path / "mine")]) == [tmp_path / "mine"]
