"""CLIP's optimiser parameter groups and the warmup-then-cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch


def exclude_from_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Gains, biases, embeddings and the logit scale/bias are not decayed (as in CLIP)."""
    return param.ndim < 2 or "embedding" in name or "logit_" in name


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything `exclude_from_weight_decay` names."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine to `min_lr_ratio`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
