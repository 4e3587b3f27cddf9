"""CLIP's optimiser parameter groups and the warmup-then-cosine learning-rate schedule (continued
without a jump when a resumed run plans more steps)."""

from __future__ import annotations

import math

import torch

from clipscale.errors import ConfigError


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


def cosine_decay(start_multiplier: float, steps: int, min_lr_ratio: float):
    """LR multiplier over `steps` steps from `start_multiplier` down to `min_lr_ratio` (cosine)."""

    def multiplier(step: int) -> float:
        progress = min(1.0, step / max(1, steps))
        return min_lr_ratio + (start_multiplier - min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return multiplier


class ContinuableSchedule:
    """warmup_cosine, continued without a jump when a resumed run plans another total.

    LambdaLR keeps a callable object's attributes in its state dict, so a checkpoint restores the
    schedule the run trained with; `continue_to` then keeps it up to the resume step and decays
    from the rate reached there over the new remaining steps (once per lengthened resume).
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.decays: list[list] = []  # [start step, multiplier there, end step] per continuation

    @property
    def end_step(self) -> int:
        """The step at which the rate reaches min_lr_ratio."""
        return self.decays[-1][2] if self.decays else self.total_steps

    def __call__(self, step: int) -> float:
        for start, start_multiplier, end in reversed(self.decays):
            if step >= start:
                return cosine_decay(start_multiplier, end - start, self.min_lr_ratio)(step - start)
        return warmup_cosine(self.warmup_steps, self.total_steps, self.min_lr_ratio)(step)

    def continue_to(self, step: int, total_steps: int) -> bool:
        """Plan `total_steps` from `step` on, the rates up to `step` unchanged; False if no change."""
        if total_steps == self.end_step:
            return False
        if step < self.warmup_steps and not self.decays:
            self.total_steps = total_steps  # warmup is the same whatever the total
        else:
            self.decays.append([step, self(step), total_steps])
        return True


def resolve_fused(value, params) -> bool | None:
    """optim.optimizer.fused: auto -> fused kernels when every parameter is on CUDA (one launch
    per step instead of one per tensor group); false elsewhere, because on CPU the fused path
    is not the tested default. None (key absent) leaves the optimizer's own default."""
    if value is None or isinstance(value, bool):
        return value
    if value == "auto":
        return all(p.is_cuda and p.is_floating_point() for p in params)
    raise ConfigError(
        f"optim.optimizer.fused={value!r} is invalid: it must be auto (fused AdamW on CUDA), "
        "true or false"
    )


def build_optimizer(optimizer_cfg: dict, groups: list[dict]) -> torch.optim.Optimizer:
    """Instantiate optim.optimizer (a partial) over `groups`, with `fused` resolved for the device
    the parameters are on (Lightning moves the model before configure_optimizers)."""
    from hydra.utils import instantiate

    cfg = dict(optimizer_cfg)
    fused = resolve_fused(cfg.pop("fused", None), [p for g in groups for p in g["params"]])
    extra = {} if fused is None else {"fused": fused}
    return instantiate(cfg)(groups, **extra)


def steps_with_amp_scaling(optimizer) -> bool:
    """True for optimizers whose step takes a GradScaler's scale and found_inf itself (torch's
    fused Adam, AdamW and SGD): they unscale inside the step and can skip it on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def unscale_and_clip(optimizer, scaler, max_norm: float) -> None:
    """Clip the global gradient norm of an optimizer that unscales inside its step to `max_norm`,
    on the true gradients. Left to itself it would unscale after any clipping; once unscale_ has
    run, GradScaler.step hands it found_inf (Inf/NaN still skip the step) and no scale."""
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
