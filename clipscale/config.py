"""Start-up validation of a composed config: a bad value stops the run before anything is built.

Misspelled keys and unknown group options (logger=foo) are refused earlier, when the command line
is composed (clipscale.cli.compose_or_explain); this checks the values.
"""

from __future__ import annotations

import importlib.util

import torch
from omegaconf import DictConfig

from clipscale.errors import ConfigError
from clipscale.models import check_model_name, check_pretrained
from clipscale.optim import check_lr_scaling

SIGLIP_MISSING_BIAS = "loss=siglip needs a learnable logit bias (model.kwargs.init_logit_bias)"
# trainer.precision values clipscale trains with (README: "Precision"); Lightning's short aliases
# name the same settings.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
PRECISION_REFUSED = {  # names Lightning knows, with why clipscale cannot train exactly with them
    "16-true": "fp16 weights and gradients without a loss scaler: small gradients underflow to "
    "zero; use 16-mixed (GPUs without bf16) or bf16-true",
    "transformer-engine": "Transformer Engine replaces the model's layers, which clipscale does "
    "not support; use bf16-mixed",
    "transformer-engine-float16": "Transformer Engine replaces the model's layers, which "
    "clipscale does not support; use 16-mixed",
}


def _positive_int_or_null(cfg: DictConfig, key: str, allow_null: bool) -> None:
    value = cfg
    for part in key.split("."):
        value = value.get(part) if value is not None else None
    if value is None and allow_null:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or null" if allow_null else "a positive integer"
        raise ConfigError(f"{key}={value!r} is invalid: it must be {allowed}")


def check_precision(precision) -> str:
    """trainer.precision as one of PRECISIONS (aliases resolved); ConfigError for another value."""
    name = PRECISION_ALIASES.get(str(precision), str(precision))
    if name in PRECISION_REFUSED:
        raise ConfigError(f"trainer.precision={precision}: {PRECISION_REFUSED[name]}")
    if name not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision Lightning knows: use one of "
            f"{', '.join(PRECISIONS)}"
        )
    return name


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError (or ValueError from the model registry) for the first bad value found."""
    _positive_int_or_null(cfg, "data.batch_size", allow_null=False)
    _positive_int_or_null(cfg, "trainer.max_steps", allow_null=False)
    from clipscale.gradcache import check_grad_cache  # null, a positive int or auto; fraction

    check_grad_cache(**cfg.grad_cache)
    from clipscale.losses import check_loss_options  # loss.chunk_size, loss.kernel

    try:
        check_loss_options(cfg.loss.get("chunk_size"), cfg.loss.get("kernel", "auto"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_model_name(cfg.model.name)
    check_pretrained(cfg.model.pretrained, cfg.model.name)
    optim = cfg.optim
    check_lr_scaling(
        optim.get("image_lr_scale", 1.0), optim.get("text_lr_scale", 1.0), optim.get("layer_decay")
    )

    precision = check_precision(cfg.trainer.get("precision", "32-true"))
    if precision == "64-true" and cfg.loss.get("kernel", "auto") == "triton":
        raise ConfigError(
            "loss.kernel=triton with trainer.precision=64-true: the Triton kernel computes in "
            "float16/bfloat16/float32; use loss.kernel=torch (or auto) for float64"
        )
    chunk = cfg.grad_cache.chunk_size
    strategy = str(cfg.trainer.get("strategy", "auto")).lower()
    if chunk is not None and ("deepspeed" in strategy or "fsdp" in strategy):
        raise ConfigError(
            f"grad_cache.chunk_size={chunk} with trainer.strategy={strategy}: gradient caching "
            "reduces gradients itself once per step and supports the ddp strategy (and one device)"
        )
    if cfg.loss.get("_target_", "").endswith("SigLipLoss") and "init_logit_bias" not in (
        cfg.model.get("kwargs") or {}
    ):
        raise ConfigError(
            f"{SIGLIP_MISSING_BIAS}: add +model.kwargs.init_logit_bias=-10 "
            "+model.kwargs.init_logit_scale=2.3026"
        )


def check_precision_hardware(trainer_cfg: DictConfig) -> None:
    """16-mixed needs CUDA: on CPU Lightning has no fp16 loss scaler and silently trains in
    bf16-mixed instead, so refuse at start (a check of this machine, like the one below)."""
    precision = str(trainer_cfg.get("precision"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if PRECISION_ALIASES.get(precision, precision) == "16-mixed" and (
        accelerator == "cpu" or not torch.cuda.is_available()
    ):
        raise ConfigError(
            "trainer.precision=16-mixed needs a CUDA GPU (the fp16 loss scaler runs there; on CPU "
            "Lightning would train in bf16-mixed instead): on CPU use trainer.precision=bf16-mixed "
            "or 32-true"
        )


def check_strategy_hardware(trainer_cfg: DictConfig) -> None:
    """DeepSpeed and FSDP run on CUDA GPUs only, and DeepSpeed needs its package: refuse at start
    (a check of this machine, not of the config's values, hence not part of validate_config)."""
    strategy = str(trainer_cfg.get("strategy", "auto")).lower()
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    name = "deepspeed" if "deepspeed" in strategy else "fsdp" if "fsdp" in strategy else None
    if name is None:
        return
    needs = f"trainer={name} needs CUDA GPUs"
    if name == "deepspeed":
        needs += (
            " and the deepspeed package (docker/Dockerfile.deepspeed builds an image with it; "
            "docker/README.md has the pip steps)"
        )
    if accelerator == "cpu" or not torch.cuda.is_available():
        found = "trainer.accelerator=cpu" if accelerator == "cpu" else "no CUDA device is visible"
        raise ConfigError(f"{needs}; here {found}: on CPUs use trainer=ddp")
    if name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{needs}; it is not installed here")
