"""Build open_clip models, image transforms and tokenizers from clipscale's model config."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import open_clip
import torch
from open_clip.transform import image_transform
from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

# Model sizes shipped with clipscale (e.g. the CPU demo's "clipscale-tiny") are plain open_clip
# JSON configs; registering the folder makes them valid `model_name`s for every open_clip call,
# including open_clip.create_model_and_transforms in a user's own code after `import clipscale.models`.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# open_clip warns on every build without weights; clipscale builds without them on purpose
# (random init, or weights loaded from a checkpoint right after).
logging.getLogger().addFilter(
    lambda record: not record.getMessage().startswith("No pretrained weights loaded for model")
)


def check_model_name(name: str) -> None:
    """Raise a ValueError naming `name` if open_clip has no architecture of that name."""
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower().replace("/", "-") in m.lower()][:8]
        hint = f" Close matches: {close}." if close else ""
        raise ValueError(
            f"model.name={name!r} is not an open_clip architecture nor a clipscale model config.{hint} "
            f"See open_clip.list_models() or clipscale/model_configs/."
        )


def check_pretrained(pretrained: str | None) -> None:
    """Only local weight files are allowed: nothing is downloaded at run time."""
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(
            f"model.pretrained={pretrained!r} is not a local file. clipscale never downloads "
            "weights: pass a path to an open_clip state dict, or null for random initialisation."
        )


def build_model(
    name: str,
    pretrained: str | None = None,
    grad_checkpointing: bool = False,
    patch_dropout: float | None = None,
    **model_kwargs,
) -> torch.nn.Module:
    """Create an open_clip CLIP model (random init unless `pretrained` is a local file)."""
    check_model_name(name)
    check_pretrained(pretrained)
    model = open_clip.create_model(
        name,
        pretrained=pretrained,
        pretrained_text=False,  # base text-tower weights would come from a hub: never at run time
        force_patch_dropout=patch_dropout,
        **model_kwargs,
    )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_transforms(name: str, is_train: bool, as_uint8: bool = False):
    """open_clip's image transform for `name` (train: with its random-resized-crop augmentation).

    `as_uint8` stops before the float conversion and normalisation and returns uint8 [3, H, W]:
    a quarter of the bytes to move between processes; `normalize_images` finishes on the device.
    """
    check_model_name(name)
    image_size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    transform = image_transform(image_size, is_train=is_train)
    if not as_uint8:
        return transform
    kept = [t for t in transform.transforms if not isinstance(t, ToTensor | Normalize)]
    return Compose([*kept, PILToTensor()])


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, exactly what open_clip's ToTensor + Normalize compute."""
    # as_tensor: mean/std already on the device (CLIPModule keeps them there) are not copied again
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float().div(255) - mean) / std


def build_tokenizer(name: str):
    """open_clip's tokenizer for `name`; the BPE vocabulary ships inside the open_clip package."""
    check_model_name(name)
    return open_clip.get_tokenizer(name)


def load_checkpoint_file(path: str):
    """torch.load that unpickles tensors and plain containers only: a checkpoint file from a third
    party cannot run code. Lightning checkpoints of clipscale load this way too."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint={path!r} holds Python objects beyond tensors and plain containers, "
            f"which clipscale refuses to unpickle (they can run code): {str(error).splitlines()[0]}"
        ) from error


def load_clip_from_checkpoint(
    path: str, model_name: str | None = None
) -> tuple[torch.nn.Module, str]:
    """Load (model, model_name) from a clipscale Lightning checkpoint or an open_clip state dict.

    A Lightning checkpoint of ours names its architecture in `hyper_parameters.model.name`; an
    open_clip file holds only weights, so `model_name` must be given for it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint={path!r} does not exist")
    payload = load_checkpoint_file(path)
    if isinstance(payload, dict) and "state_dict" in payload and "hyper_parameters" in payload:
        model_cfg = payload["hyper_parameters"]["model"]
        model_name = model_cfg["name"]
        prefix = "model."
        state_dict = {
            k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)
        }
    else:
        if model_name is None:
            raise ValueError(
                f"{path!r} is a plain state dict (open_clip format); give its architecture with "
                "model_name=... (e.g. ViT-B-32)"
            )
        state_dict = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    model = build_model(model_name)
    model.load_state_dict(state_dict)
    return model.eval(), model_name
