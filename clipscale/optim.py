"""CLIP's optimiser parameter groups and the warmup-then-cosine learning-rate schedule (continued
without a jump when a resumed run plans more steps)."""

from __future__ import annotations

import math
import re

import torch

from clipscale.errors import ConfigError
from clipscale.towers import IMAGE, TEXT, tower_of


def exclude_from_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Gains, biases, embeddings and the logit scale/bias are not decayed (as in CLIP)."""
    return param.ndim < 2 or "embedding" in name or "logit_" in name


def is_number(value) -> bool:
    """An int or a float; True and False are not numbers here."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_lr_scaling(image_lr_scale, text_lr_scale, layer_decay) -> None:
    """Refuse optim.image_lr_scale / text_lr_scale / layer_decay values that cannot work."""
    for key, value in (("image_lr_scale", image_lr_scale), ("text_lr_scale", text_lr_scale)):
        if not (is_number(value) and value >= 0):
            raise ConfigError(
                f"optim.{key}={value!r} is invalid: it must be a number >= 0, the factor on "
                "optim.optimizer.lr for that tower's parameters (1 = the base rate)"
            )
    if layer_decay is not None and not (is_number(layer_decay) and 0 < layer_decay <= 1):
        raise ConfigError(
            f"optim.layer_decay={layer_decay!r} is invalid: it must be null (off) or a number in "
            "(0, 1], each block's rate being scaled by layer_decay^(its depth from the top)"
        )


BLOCK_INDEX = re.compile(r"\.resblocks\.(\d+)\.")  # open_clip's transformer blocks, in both towers
STEM = ("embedding", "conv1", "ln_pre", "cls_emb")  # what comes before the first block


def tower_depth(names: list[str], tower: str) -> int:
    """Number of transformer blocks in `tower` (0 for a tower without open_clip resblocks)."""
    indices = [
        int(m.group(1)) for n in names if tower_of(n) == tower and (m := BLOCK_INDEX.search(n))
    ]
    return max(indices, default=-1) + 1


def layer_id(name: str, depth: int) -> int:
    """EVA-CLIP's layer numbering: 0 for the stem, i + 1 for block i, depth + 1 for the head."""
    block = BLOCK_INDEX.search(name)
    if block:
        return int(block.group(1)) + 1
    return 0 if any(part in name for part in STEM) else depth + 1


def lr_scales(model, image_lr_scale=1.0, text_lr_scale=1.0, layer_decay=None) -> dict[str, float]:
    """Each parameter's factor on the base rate: its tower's scale, times layer_decay^(depth of
    its layer from the top of its tower) with layer decay. The logit scale/bias keep factor 1."""
    check_lr_scaling(image_lr_scale, text_lr_scale, layer_decay)
    names = [name for name, _ in model.named_parameters()]
    depth = {tower: tower_depth(names, tower) for tower in (IMAGE, TEXT)}
    if layer_decay is not None and not all(depth.values()):
        raise ConfigError(
            f"optim.layer_decay={layer_decay} needs transformer blocks in both towers; this "
            f"model has {depth[IMAGE]} image and {depth[TEXT]} text blocks. Use optim.layer_decay=null"
        )
    tower_scale = {IMAGE: image_lr_scale, TEXT: text_lr_scale, None: 1.0}
    scales = {}
    for name in names:
        tower = tower_of(name)
        scale = float(tower_scale[tower])
        if layer_decay is not None and tower is not None:
            scale *= layer_decay ** (depth[tower] + 1 - layer_id(name, depth[tower]))
        scales[name] = scale
    return scales


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    image_lr_scale: float = 1.0,
    text_lr_scale: float = 1.0,
    layer_decay: float | None = None,
) -> list[dict]:
    """AdamW groups of the trained parameters (locked ones get no optimizer state): one per rate
    factor (`lr_scales`), split into decayed weight matrices and what `exclude_from_weight_decay`
    names. Without rate scaling these are the two groups [decayed, not decayed]."""
    scales = lr_scales(model, image_lr_scale, text_lr_scale, layer_decay)
    groups: dict[tuple[float, bool], dict] = {}
    layers: dict[tuple[float, bool], set] = {}
    names = [name for name, _ in model.named_parameters()]
    depth = {tower: tower_depth(names, tower) for tower in (IMAGE, TEXT)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = scales[name]
        for decayed in (True, False):  # a rate's decayed group first, as the two groups always were
            key = (scale, decayed)
            groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decayed else 0.0})
            groups[key]["lr_scale"] = scale
            layers.setdefault(key, set())
        key = (scale, not exclude_from_weight_decay(name, param))
        groups[key]["params"].append(param)
        tower = tower_of(name)
        layers[key].add((tower or "logit", layer_id(name, depth[tower]) if tower else 0))
    return [
        {**group, "name": group_name(layers[key])}
        for key, group in groups.items()
        if group["params"]
    ]


def group_name(layers: set[tuple[str, int]]) -> str:
    """'image 0-3, text 1' for a group holding layers 0..3 of the image tower and 1 of the text."""
    parts = []
    for tower in sorted({tower for tower, _ in layers}):
        ids = sorted(layer for t, layer in layers if t == tower)
        span = str(ids[0]) if ids[0] == ids[-1] else f"{ids[0]}-{ids[-1]}"
        parts.append(tower if tower == "logit" else f"{tower} {span}")
    return ", ".join(parts)


def group_table(optimizer: torch.optim.Optimizer, locked: frozenset[str]) -> str:
    """The optimizer's parameter groups as printed at start: layers, rate, weight decay, sizes."""
    lines = [
        "clipscale: optimizer groups (layers: 0 = stem, i + 1 = block i, then the head)"
        + (f"; locked towers, not trained: {', '.join(sorted(locked))}" if locked else ""),
        f"  {'layers':<24} {'lr':>10} {'weight decay':>12} {'tensors':>8} {'parameters':>12}",
    ]
    for group in optimizer.param_groups:
        numel = sum(p.numel() for p in group["params"])
        lines.append(
            f"  {group.get('name', ''):<24} {group['lr']:>10.3g} {group['weight_decay']:>12g} "
            f"{len(group['params']):>8} {numel:>12,}"
        )
    return "\n".join(lines)


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
    if "lr" in cfg:  # each group's rate: the base rate times the group's factor (lr_scales)
        groups = [{**group, "lr": cfg["lr"] * group.get("lr_scale", 1.0)} for group in groups]
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
