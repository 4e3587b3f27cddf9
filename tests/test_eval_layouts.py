"""Evaluation datasets from ordinary folders and tables: the shard writer's zero-shot and
retrieval layouts read back by clip_benchmark, ImageFolder folders evaluated directly, foils."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import webdataset as wds
from clip_benchmark.datasets.builder import build_dataset

from clipscale.data.shards import main as shards_main
from clipscale.data.synthetic import CLASSNAMES, draw_sample
from clipscale.eval.datasets import DEFAULT_TEMPLATES, read_dataset_info
from clipscale.eval.retrieval import evaluate_retrieval
from clipscale.eval.zeroshot import evaluate_zeroshot
from clipscale.models import build_model, build_tokenizer, build_transforms

MODEL = "clipscale-tiny"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An ImageFolder of 30 drawn shapes (class folders "red_circle", ...) and a captions table."""
    root = tmp_path_factory.mktemp("layouts")
    labels = []
    for index in range(30):
        image, caption, label = draw_sample(0, "val", index)
        folder = root / "folders" / CLASSNAMES[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:03d}.png")
        image.save(root / f"r{index:03d}.png")
        labels.append((str(folder / f"{index:03d}.png"), label, caption))
    with open(root / "captions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "text", "foils"])
        for index, (_, _, caption) in enumerate(labels[:12]):
            writer.writerow([f"r{index:03d}.png", caption, json.dumps([f"not {caption}"])])
            if index % 3 == 0:  # a second caption for some images, on a later row
                writer.writerow([f"r{index:03d}.png", f"picture {index}", "[]"])
    return root, labels


def test_zeroshot_layout_reads_in_clip_benchmark_and_matches_imagefolder(inputs, tmp_path):
    root, labels = inputs
    output = tmp_path / "shapes"
    shards_main(
        ["--layout", "zeroshot", "--images", str(root / "folders"), "--output", str(output)]
        + ["--samples-per-shard", "7", "--workers", "1"]
    )
    present = sorted({CLASSNAMES[label] for _, label, _ in labels})
    assert (output / "classnames.txt").read_text().splitlines() == present
    assert (output / "test" / "nshards.txt").read_text().strip() == "5"
    theirs = build_dataset("wds/shapes", root=str(output), transform=lambda x: x, split="test")
    assert theirs.classes == present and theirs.templates == list(DEFAULT_TEMPLATES)
    # the folder's files in sorted order (class folders sorted, files sorted) with their labels
    expected = sorted(((p, present.index(CLASSNAMES[label])) for p, label, _ in labels))
    got = [int(target) for _, target in theirs]
    assert got == [label for _, label in expected]

    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    tokenizer, transform = build_tokenizer(MODEL), build_transforms(MODEL, False)
    from_shards = evaluate_zeroshot(model, tokenizer, transform, read_dataset_info(output), 8)
    folder_info = read_dataset_info(root / "folders")
    assert folder_info.classnames == present and folder_info.name == "folders"
    from_folder = evaluate_zeroshot(model, tokenizer, transform, folder_info, 8)
    assert from_folder == from_shards  # same images, labels and prompts: the same numbers
    assert from_folder["num_samples"] == 30


def test_retrieval_layout_groups_captions_and_evaluates(inputs, tmp_path):
    root, _ = inputs
    output = tmp_path / "captions"
    shards_main(
        ["--layout", "retrieval", "--table", str(root / "captions.csv"), "--output", str(output)]
        + ["--path-column", "file", "--caption-column", "text", "--workers", "1"]
    )
    assert (output / "dataset_type.txt").read_text().strip() == "retrieval"
    theirs = build_dataset(
        "wds/captions",
        root=str(output),
        transform=lambda x: x,
        split="test",
        task="zeroshot_retrieval",
    )
    with open(root / "captions.csv") as file:
        rows = list(csv.DictReader(file))
    expected = {}
    for row in rows:
        expected.setdefault(row["file"], []).append(row["text"])
    assert [list(captions) for _, captions in theirs] == list(expected.values())
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    info = read_dataset_info(output)
    metrics = evaluate_retrieval(
        model, build_tokenizer(MODEL), build_transforms(MODEL, False), info.shards, 8, "cpu"
    )
    assert 0 <= metrics["image_to_text_R@1"] <= 1 and metrics["nonfinite_features"] == 0


def test_training_shards_carry_foils_json(inputs, tmp_path):
    root, _ = inputs
    shards_main(
        ["--table", str(root / "captions.csv"), "--output", str(tmp_path / "train")]
        + ["--path-column", "file", "--caption-column", "text", "--foils-column", "foils"]
        + ["--workers", "1"]
    )
    with open(root / "captions.csv") as file:
        rows = list(csv.DictReader(file))
    samples = list(wds.WebDataset(str(tmp_path / "train" / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        assert json.loads(sample["foils.json"]) == json.loads(row["foils"])
        assert sample["txt"].decode() == row["text"]


def test_bad_foils_and_layout_inputs_are_refused(inputs, tmp_path):
    root, _ = inputs
    table = tmp_path / "bad.csv"
    table.write_text(f'path,caption,foils\n{root / "r000.png"},a caption,"[1, 2]"\n')
    with pytest.raises(ValueError, match=r"row 1, --foils-column 'foils'"):
        shards_main(
            ["--table", str(table), "--foils-column", "foils", "--output", str(tmp_path / "o")]
        )
    with pytest.raises(SystemExit):
        shards_main(
            ["--layout", "zeroshot", "--table", str(table), "--output", str(tmp_path / "z")]
        )
    (tmp_path / "flat").mkdir()
    draw_sample(0, "val", 0)[0].save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="one sub-folder of images per class"):
        shards_main(
            [
                "--layout",
                "zeroshot",
                "--images",
                str(tmp_path / "flat"),
                "--output",
                str(tmp_path / "z"),
            ]
        )
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        read_dataset_info(tmp_path / "flat")
