"""Build open_clip models, image transforms and tokenizers from clipscale's model config."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
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


def check_pretrained(pretrained: str | None, name: str | None = None) -> str | None:
    """model.pretrained: null, a local file of weights (an open_clip state dict, big_vision .npz,
    or a clipscale training checkpoint), or one of open_clip's tags for architecture `name`.
    Returns the file's kind (WEIGHTS, TRAINING), None for null or a tag."""
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        if Path(pretrained).suffix in (".npz", ".npy"):  # big_vision SigLIP: open_clip reads it
            return WEIGHTS
        return read_checkpoint(pretrained, "model.pretrained", (WEIGHTS, TRAINING))[0]
    tags = open_clip.list_pretrained_tags_by_model(name) if name else []
    if pretrained not in tags:
        raise ValueError(
            f"model.pretrained={pretrained!r} is neither a local file nor an open_clip tag of "
            f"model.name={name}; its tags are {tags or 'none'} (open_clip.list_pretrained())"
        )
    return None


def load_weights(model: torch.nn.Module, name: str, state_dict: dict, path: str) -> None:
    """Load `state_dict` (open_clip keys) into `model`, architecture `name`; a mismatch is one
    CheckpointError line naming the file `path`."""
    try:  # weights of another architecture (or a wrong model_name) are told in one line
        loaded = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # a shape that differs: "size mismatch for NAME: ..."
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        problem = next((line for line in lines if "size mismatch" in line), lines[-1])
        raise CheckpointError(f"checkpoint={path} does not fit {name}: {problem}") from None
    for problem, keys in (("lacks", loaded.missing_keys), ("has unknown", loaded.unexpected_keys)):
        if keys:
            raise CheckpointError(
                f"checkpoint={path} does not fit {name}: it {problem} weights "
                f"{', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
            )


def hub_cache(cache_dir: str | None) -> str:
    """Where open_clip looks for (and downloads) a tag's weights: model.cache_dir or the HF cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return cache_dir or HF_HUB_CACHE


def build_model(
    name: str,
    pretrained: str | None = None,
    grad_checkpointing: bool = False,
    patch_dropout: float | None = None,
    cache_dir: str | None = None,
    **model_kwargs,
) -> torch.nn.Module:
    """Create an open_clip CLIP model: random init, or `pretrained` weights (see check_pretrained;
    a tag is loaded by open_clip's own loader, from `cache_dir` or by downloading)."""
    check_model_name(name)
    kind = check_pretrained(pretrained, name)
    try:
        model = open_clip.create_model(
            name,
            pretrained=None if kind == TRAINING else pretrained,
            pretrained_text=False,  # base text-tower weights would come from a hub
            force_patch_dropout=patch_dropout,
            cache_dir=cache_dir,
            **model_kwargs,
        )
    except RuntimeError as error:
        if kind is not None or "Failed to download" not in str(error):
            raise
        raise ValueError(
            f"model.pretrained={pretrained} for {name} is not in the cache {hub_cache(cache_dir)} "
            "(set model.cache_dir to where it is) and could not be downloaded"
        ) from None
    if kind == TRAINING:  # a clipscale run's weights (read through the one checkpoint reader)
        load_weights(model, name, read_model_checkpoint(pretrained, name).state_dict, pretrained)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # model.image_<key> overrides
PREPROCESS_DEFAULTS = {  # open_clip's own, for weights without a preprocessing config
    "mean": OPENAI_DATASET_MEAN,
    "std": OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def image_preprocess(model_cfg: dict | None) -> dict:
    """Image mean, std, interpolation and resize mode for the model config `model_cfg`: those of
    its weights (an open_clip tag's pretrained config), each replaced by model.image_<key> when
    set; open_clip's defaults for random init and local files."""
    model_cfg = dict(model_cfg or {})
    name, pretrained = model_cfg.get("name"), model_cfg.get("pretrained")
    weights = {}
    if name and pretrained and not os.path.isfile(pretrained):
        weights = open_clip.get_pretrained_cfg(name, pretrained)
    chosen = {}
    for key in PREPROCESS_KEYS:
        value = model_cfg.get(f"image_{key}")
        value = value if value is not None else weights.get(key, PREPROCESS_DEFAULTS[key])
        chosen[key] = tuple(float(v) for v in value) if key in ("mean", "std") else str(value)
    return chosen


def build_transforms(
    name: str, is_train: bool, as_uint8: bool = False, preprocess: dict | None = None
):
    """open_clip's image transform for `name` (train: with its random-resized-crop augmentation),
    with `preprocess` (image_preprocess: mean, std, interpolation, resize mode; default open_clip's).

    `as_uint8` stops before the float conversion and normalisation and returns uint8 [3, H, W]:
    a quarter of the bytes to move between processes; `normalize_images` finishes on the device.
    """
    check_model_name(name)
    image_size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    transform = image_transform(image_size, is_train=is_train, **(preprocess or {}))
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
    preprocess: dict | None = None  # image_preprocess values a training checkpoint records


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
        return CheckpointModel(
            model_cfg["name"],
            dict(model_cfg.get("kwargs") or {}),
            state_dict,
            payload.get("clipscale_preprocess"),
        )
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
    load_weights(model, checkpoint.name, checkpoint.state_dict, path)
    return model.eval()


def load_clip_from_checkpoint(
    path: str, model_name: str | None = None
) -> tuple[torch.nn.Module, str]:
    """(model, model_name) from a clipscale training checkpoint or an open_clip state dict file."""
    checkpoint = read_model_checkpoint(path, model_name)
    return clip_from_checkpoint(checkpoint, path), checkpoint.name
