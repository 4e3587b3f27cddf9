"""`imagenet:DIR` zero-shot: an ImageFolder of the 1,000 ILSVRC class folders is scored with
open_clip's shipped class names and OpenAI templates, in the class order and with the classifier
of open_clip's own zero-shot code; another number of class folders is refused in one line."""

from __future__ import annotations

from dataclasses import replace

import open_clip
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torchvision.datasets import ImageFolder

from clipscale.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier, zeroshot_dataset_info
from clipscale.models import build_tokenizer, build_transforms
from tests.conftest import run_cli

MODEL = "clipscale-tiny"
IMAGE_CLASSES = (0, 1, 417, 998, 999)  # the classes holding images (two each); others are empty
TEMPLATES = 2  # open_clip's code gets the same first two templates: 1,000 x 80 prompts is slow


def write_folders(root, classes: int, with_images=IMAGE_CLASSES):
    """`classes` wnid-like class folders (sorted order = class order), tiny random images."""
    gen = torch.Generator().manual_seed(3)
    for index in range(classes):
        folder = root / f"n{index:08d}"
        folder.mkdir(parents=True)
        for copy in range(2 if index in with_images else 0):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{index}_{copy}.png")
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("imagenet") / "val", 1000)


@pytest.fixture(scope="module")
def model_and_preprocess():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    return model.eval(), preprocess


def test_imagenet_entry_uses_open_clips_names_templates_and_class_order(
    imagenet, model_and_preprocess
):
    model, preprocess = model_and_preprocess
    info = zeroshot_dataset_info(f"imagenet:{imagenet}")
    assert info.classnames == list(IMAGENET_CLASSNAMES)
    assert [t.format(c="goldfish") for t in info.templates] == [
        template("goldfish") for template in OPENAI_IMAGENET_TEMPLATES
    ]
    assert len(info.templates) == 80
    info = replace(info, templates=info.templates[:TEMPLATES])
    tokenizer = build_tokenizer(MODEL)

    expected = build_zero_shot_classifier(
        model,
        tokenizer=open_clip.get_tokenizer(MODEL),
        classnames=IMAGENET_CLASSNAMES,
        templates=OPENAI_IMAGENET_TEMPLATES[:TEMPLATES],
        num_classes_per_batch=None,
        device="cpu",
    )  # [D, 1000]
    actual = zeroshot_classifier(model, tokenizer, info.classnames, info.templates)
    assert (actual - expected).abs().max() <= 1e-6

    # open_clip's evaluation reads the folder with torchvision's ImageFolder (sorted wnids)
    folder = ImageFolder(str(imagenet), transform=preprocess, allow_empty=True)
    images = torch.stack([image for image, _ in folder])
    labels = torch.tensor([label for _, label in folder])
    with torch.no_grad():
        features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    ranks = (features @ expected).argsort(dim=1, descending=True)  # [N, 1000]
    hits1 = ranks[:, 0] == labels
    hits5 = (ranks[:, :5] == labels[:, None]).any(dim=1)

    metrics = evaluate_zeroshot(model, tokenizer, build_transforms(MODEL, False), info, 4)
    assert metrics["num_samples"] == len(labels) == 2 * len(IMAGE_CLASSES)
    assert metrics["top1"] == pytest.approx(hits1.double().mean().item())
    assert metrics["top5"] == pytest.approx(hits5.double().mean().item())
    per_class = {
        IMAGENET_CLASSNAMES[c]: hits1[labels == c].double().mean().item() for c in IMAGE_CLASSES
    }
    assert metrics["per_class_top1"] == pytest.approx(per_class)


def test_a_folder_without_the_1000_classes_is_refused_in_one_line(tmp_path):
    folder = write_folders(tmp_path / "val", 999, with_images=(0,))
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), weights)
    result = run_cli(
        f"checkpoint={weights}",
        f"model_name={MODEL}",
        f"zeroshot=[imagenet:{folder}]",
        f"paths.output_dir={tmp_path / 'out'}",
        module="clipscale.evaluate",
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: imagenet:{folder} must be an ImageFolder of the 1,000")
    assert "has 999 sub-folders" in lines[-1]
    assert "Traceback" not in result.stderr
