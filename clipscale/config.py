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

SIGLIP_MISSING_BIAS = "loss=siglip needs a learnable logit bias (model.kwargs.init_logit_bias)"


def _positive_int_or_null(cfg: DictConfig, key: str, allow_null: bool) -> None:
    value = cfg
    for part in key.split("."):
        value = value.get(part) if value is not None else None
    if value is None and allow_null:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or null" if allow_null else "a positive integer"
        raise ConfigError(f"{key}={value!r} is invalid: it must be {allowed}")


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

    chunk = cfg.grad_cache.chunk_size
    if chunk is not None and str(cfg.trainer.get("precision")).startswith("16"):
        raise ConfigError(
            f"grad_cache.chunk_size={chunk} with trainer.precision={cfg.trainer.precision}: fp16 loss "
            "scaling and cached embedding gradients do not compose; use bf16-mixed or 32-true"
        )
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
