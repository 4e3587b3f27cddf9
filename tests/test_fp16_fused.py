"""trainer.precision=16-mixed with the shipped optimizer settings (fused AdamW, clipping at 1.0):
a fused optimizer unscales inside its step, so the gradients are unscaled before they are clipped,
and the update equals that of the non-fused AdamW, which Lightning's scaler unscales itself."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import OmegaConf

from clipscale.module import CLIPModule
from tests.numerics import assert_relative_close, relative_error
from tests.test_module_step import fit, update

STEPS, SCALE = 3, 1024.0


@pytest.fixture
def shipped_optim(compose_config, tmp_path) -> dict:
    """configs/optim/adamw.yaml as shipped (lr, betas, eps, weight decay, grad_clip_norm 1.0);
    one warmup step so that every step of this short run moves the weights."""
    cfg = compose_config([f"paths.output_dir={tmp_path}", "optim.warmup_steps=1"])
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    assert optim["grad_clip_norm"] == 1.0 and optim["optimizer"]["fused"] == "auto"
    return optim


def fp16_update(optim: dict, fused: bool, clip: float | None) -> torch.Tensor:
    """The parameter change of STEPS 16-mixed steps with a real CPU loss scaler (Lightning turns
    16-mixed into bf16 on CPU unless it is given one)."""
    torch.manual_seed(0)
    module = CLIPModule(
        model={"name": "clipscale-tiny"},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            **optim,
            "optimizer": {**optim["optimizer"], "fused": fused},
            "grad_clip_norm": clip,
        },
    )
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    fit(module, steps=STEPS, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert scaler.get_scale() == SCALE  # every step ran on scaled gradients, none was skipped
    return update(module, start)


def test_fp16_with_fused_adamw_clips_the_unscaled_gradients(shipped_optim):
    fused = fp16_update(shipped_optim, fused=True, clip=1.0)  # crashed: Lightning refused to clip
    reference = fp16_update(shipped_optim, fused=False, clip=1.0)
    # Fused and for-each AdamW round differently, by float32 epsilons per element.
    assert_relative_close(fused, reference, 1e-5, name="fused vs for-each update")
    # The bound is active: without clipping the update is another one.
    unclipped = fp16_update(shipped_optim, fused=True, clip=None)
    assert relative_error(unclipped, reference) > 1e-2
