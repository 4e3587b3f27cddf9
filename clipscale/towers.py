"""The two towers of an open_clip model: which parameters belong to which, and locking them (LiT).

Locking uses open_clip's own `lock_image_tower` / `lock_text_tower`, so `model.lock_*` keys mean
what open_clip's `--lock-*` flags mean. A tower with no trainable parameter left is "locked": it
runs in eval mode without a graph, and gradient caching encodes it once (clipscale/gradcache.py).
"""

from __future__ import annotations

import torch

from clipscale.errors import ConfigError

IMAGE, TEXT = "image", "text"


def tower_of(name: str) -> str | None:
    """IMAGE or TEXT for a parameter name of an open_clip model; None for the logit scale/bias."""
    if name.startswith("visual."):
        return IMAGE
    return None if name.startswith("logit_") else TEXT


def lock_towers(model, model_cfg: dict) -> None:
    """Apply model.lock_image* and model.lock_text* (open_clip's flags) to `model` in place."""
    if model_cfg.get("lock_image"):
        model.lock_image_tower(
            unlocked_groups=int(model_cfg.get("lock_image_unlocked_groups", 0)),
            freeze_bn_stats=bool(model_cfg.get("lock_image_freeze_bn_stats", False)),
        )
    if model_cfg.get("lock_text"):
        freeze_layer_norm = bool(model_cfg.get("lock_text_freeze_layer_norm", True))
        if not freeze_layer_norm and not hasattr(model, "text"):
            raise ConfigError(
                f"model.lock_text_freeze_layer_norm=false is not possible for "
                f"model.name={model_cfg['name']}: open_clip's own text transformer always "
                "locks its LayerNorms with the tower; set it to true (or use a Hugging Face text tower)"
            )
        model.lock_text_tower(
            unlocked_layers=int(model_cfg.get("lock_text_unlocked_layers", 0)),
            freeze_layer_norm=freeze_layer_norm,
        )


def locked_towers(model) -> frozenset[str]:
    """The towers of `model` none of whose parameters is trained."""
    trained = {tower_of(name) for name, p in model.named_parameters() if p.requires_grad}
    return frozenset({IMAGE, TEXT} - trained)


def tower_modules(model, tower: str) -> list[torch.nn.Module]:
    """The submodules holding `tower` (open_clip's CLIP keeps its text tower's parts at top level)."""
    if tower == IMAGE:
        return [model.visual]
    if hasattr(model, "text"):
        return [model.text]
    return [model.token_embedding, model.transformer, model.ln_final]


def keep_locked_in_eval(model, locked: frozenset[str]) -> None:
    """Put the locked towers back in eval mode (dropout off, BatchNorm statistics fixed)."""
    for tower in locked:
        for module in tower_modules(model, tower):
            module.eval()
