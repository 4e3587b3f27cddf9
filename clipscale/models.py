"""Build open_clip models, image transforms and tokenizers from clipscale's model config."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transform import image_transform
from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

from clipscale.checkpoints import TRAINING, WEIGHTS, CheckpointError, describe, read_checkpoint

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
    """Only local files of open_clip weights are allowed: nothing is downloaded at run time."""
    if pretrained is None:
        return
    if not os.path.isfile(pretrained):
        raise ValueError(
            f"model.pretrained={pretrained!r} is not a local file. clipscale never downloads "
            "weights: pass a path to an open_clip state dict, or null for random initialisation."
        )
    if Path(pretrained).suffix in (".npz", ".npy"):
        return  # big_vision SigLIP weights: open_clip reads and converts them itself
    read_checkpoint(
        pretrained,
        "model.pretrained",
        (WEIGHTS,),
        fixes={
            TRAINING: f"continue that run with ckpt_path={pretrained}, or write its weights "
            f"with python -m clipscale.export checkpoint={pretrained} output=FILE"
        },
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


@dataclass
class CheckpointModel:
    """What a checkpoint file holds of a CLIP model: enough to build it and load its weights."""

    name: str  # open_clip architecture
    kwargs: dict  # further open_clip model arguments the run used (e.g. init_logit_bias for SigLIP)
    state_dict: dict  # open_clip keys


def read_model_checkpoint(path: str, model_name: str | None = None) -> CheckpointModel:
    """The model in a clipscale training checkpoint or an open_clip state dict file.

    A training checkpoint names its architecture and arguments in `hyper_parameters.model`; an
    open_clip file holds only weights, so `model_name` must be given for it.
    """
    kind, payload = read_checkpoint(path, "checkpoint", (TRAINING, WEIGHTS))
    if kind == TRAINING:
        model_cfg = payload["hyper_parameters"]["model"]
        prefix = "model."
        state_dict = {
            k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)
        }
        return CheckpointModel(model_cfg["name"], dict(model_cfg.get("kwargs") or {}), state_dict)
    if model_name is None:
        raise CheckpointError(
            f"checkpoint={path} holds {describe(kind, payload)}, which do not name their "
            "architecture; give it with model_name=... (e.g. ViT-B-32)"
        )
    state_dict = payload.get("state_dict", payload)
    return CheckpointModel(
        model_name, {}, {k.removeprefix("module."): v for k, v in state_dict.items()}
    )


def clip_from_checkpoint(checkpoint: CheckpointModel, path: str) -> torch.nn.Module:
    """Build the checkpoint's model and load its weights (eval mode); the file is `path`."""
    model = build_model(checkpoint.name, **checkpoint.kwargs)
    try:  # weights of another architecture (or a wrong model_name) are told in one line
        loaded = model.load_state_dict(checkpoint.state_dict, strict=False)
    except RuntimeError as error:  # a shape that differs: "size mismatch for NAME: ..."
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        problem = next((line for line in lines if "size mismatch" in line), lines[-1])
        raise CheckpointError(
            f"checkpoint={path} does not fit {checkpoint.name}: {problem}"
        ) from None
    for problem, keys in (("lacks", loaded.missing_keys), ("has unknown", loaded.unexpected_keys)):
        if keys:
            raise CheckpointError(
                f"checkpoint={path} does not fit {checkpoint.name}: it {problem} weights "
                f"{', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
            )
    return model.eval()


def load_clip_from_checkpoint(
    path: str, model_name: str | None = None
) -> tuple[torch.nn.Module, str]:
    """(model, model_name) from a clipscale training checkpoint or an open_clip state dict file."""
    checkpoint = read_model_checkpoint(path, model_name)
    return clip_from_checkpoint(checkpoint, path), checkpoint.name
