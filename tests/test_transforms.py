"""uint8 batches normalised on the device equal open_clip's float transform exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipscale.models import build_transforms, normalize_images
from clipscale.module import CLIPModule


def photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (300, 260, 3), np.uint8))


@pytest.mark.parametrize("is_train", [False, True])
def test_uint8_transform_then_normalize_equals_the_float_transform(is_train):
    float_transform = build_transforms("ViT-B-32", is_train)
    uint8_transform = build_transforms("ViT-B-32", is_train, as_uint8=True)
    torch.manual_seed(0)  # the same random crop for both
    expected = torch.stack([float_transform(photo(i)) for i in range(3)])
    torch.manual_seed(0)
    pixels = torch.stack([uint8_transform(photo(i)) for i in range(3)])
    assert pixels.dtype == torch.uint8
    normalize = float_transform.transforms[-1]  # open_clip's Normalize, read rather than retyped
    torch.testing.assert_close(normalize_images(pixels, normalize.mean, normalize.std), expected)


def test_module_normalises_uint8_batches_and_leaves_float_batches():
    module = CLIPModule(
        model={"name": "clipscale-tiny"},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True},
            "warmup_steps": 1,
        },
    )
    transform = build_transforms("clipscale-tiny", False)
    uint8_transform = build_transforms("clipscale-tiny", False, as_uint8=True)
    texts = torch.zeros(2, 32, dtype=torch.long)
    uint8_batch = {
        "images": torch.stack([uint8_transform(photo(i)) for i in range(2)]),
        "texts": texts,
    }
    float_images = torch.stack([transform(photo(i)) for i in range(2)])
    normalised = module.float_images(uint8_batch["images"])
    torch.testing.assert_close(normalised, float_images)
    float_batch = {"images": float_images.clone(), "texts": texts}
    assert torch.equal(module.float_images(float_batch["images"]), float_images)
