"""Image preprocessing follows the weights: a SigLIP tag's mean/std 0.5 (and resize mode) reach the
training data, validation and device decode; model.image_* override them; the module normalises
uint8 batches with them, the checkpoint records them and evaluate applies them."""

from __future__ import annotations

import io

import open_clip
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.transforms import Normalize, Resize

from clipscale.data.decode import DeviceTransform
from clipscale.export import export_checkpoint
from clipscale.models import build_transforms, image_preprocess, read_model_checkpoint
from clipscale.train import build_module
from tests.test_module_step import fit

SIGLIP = ("ViT-B-16-SigLIP", "webli")


def normalize_of(transform) -> Normalize:
    return next(step for step in transform.transforms if isinstance(step, Normalize))


def test_a_siglip_tag_brings_its_mean_std_and_resize_mode(compose_config, tmp_path):
    name, tag = SIGLIP
    expected = open_clip.get_pretrained_cfg(name, tag)  # open_clip's record for those weights
    assert expected["mean"] == expected["std"] == (0.5, 0.5, 0.5)
    cfg = compose_config(
        [f"model.name={name}", f"model.pretrained={tag}", f"paths.output_dir={tmp_path}"]
    )
    # The data module alone (no weights needed), on tiny images: SigLIP's tokenizer would be a
    # Hugging Face download, and what is checked is the image preprocessing the tag brings.
    datamodule = instantiate(cfg.data, model_name="clipscale-tiny")
    transform = datamodule.dataset("val").transform
    assert normalize_of(transform).mean == (0.5, 0.5, 0.5)
    assert normalize_of(transform).std == (0.5, 0.5, 0.5)
    resize = next(step for step in transform.transforms if isinstance(step, Resize))
    assert resize.size == (32, 32)  # squash: both sides resized (shortest: one int, then a crop)
    decoder = DeviceTransform(transform, "cpu").decoder  # data.decode=device and evaluation
    assert decoder.normalize == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    overridden = image_preprocess({"name": name, "pretrained": tag, "image_std": [0.25] * 3})
    assert overridden["mean"] == (0.5, 0.5, 0.5) and overridden["std"] == (0.25, 0.25, 0.25)


def test_training_normalisation_checkpoint_and_evaluate_use_the_overrides(compose_config, tmp_path):
    cfg = compose_config(
        ["model.image_mean=[0.5,0.5,0.5]", "model.image_std=[0.5,0.5,0.5]"]
        + [f"paths.output_dir={tmp_path}"]
    )
    module = build_module(cfg)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (images.double() / 255 - 0.5) / 0.5
    assert torch.allclose(module.float_images(images).double(), expected, atol=1e-6)
    trainer = fit(module, steps=1)
    trainer.save_checkpoint(tmp_path / "run.ckpt")  # on_save_checkpoint records the values
    recorded = read_model_checkpoint(str(tmp_path / "run.ckpt"))
    transform = build_transforms(recorded.name, False, preprocess=recorded.preprocess)
    assert normalize_of(transform).mean == (0.5, 0.5, 0.5)
    # export: the load call it prints passes them to open_clip
    path, name, kwargs = export_checkpoint(str(tmp_path / "run.ckpt"), str(tmp_path / "out.pt"))
    _, _, loaded_transform = open_clip.create_model_and_transforms(name, str(path), **kwargs)
    assert normalize_of(loaded_transform).std == (0.5, 0.5, 0.5)


def test_device_decode_of_a_squash_transform_matches_the_worker_path():
    from clipscale.data import decode

    preprocess = image_preprocess({"name": SIGLIP[0], "pretrained": SIGLIP[1]})
    transform = build_transforms("clipscale-tiny", False, preprocess=preprocess)
    gen = torch.Generator().manual_seed(0)
    # a 48 x 80 image: squash changes its aspect ratio, where shortest would crop it
    pixels = torch.randint(0, 256, (48, 80, 3), generator=gen, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    encoded = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    on_device, valid = DeviceTransform(transform, "cpu").decode([encoded])
    on_worker = transform(Image.open(io.BytesIO(buffer.getvalue())))
    assert valid.all() and on_device.shape == (1, *on_worker.shape)
    levels = (on_device[0] - on_worker).abs() * 255 * 0.5  # normalised (std 0.5) -> pixel levels
    assert levels.mean() <= decode.MEAN_ABS_TOLERANCE, levels.mean()
