"""model.compile=true: the compiled towers give the eager model's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from clipscale.module import CLIPModule
from tests.numerics import assert_relative_close


def make_module(compile_towers: bool) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(
        model={"name": "clipscale-tiny", "compile": compile_towers},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "warmup_steps": 1,
        },
    )


@pytest.mark.slow  # inductor compiles C++ kernels for the CPU: about a minute here
def test_compiled_towers_match_eager_loss_and_gradients():
    gen = torch.Generator().manual_seed(1)
    images, texts = (
        torch.randn(8, 3, 32, 32, generator=gen),
        torch.randint(1, 49407, (8, 32), generator=gen),
    )
    results = []
    for compile_towers in (False, True):
        module = make_module(compile_towers)
        loss = module.loss_fn(*module.encode(images, texts), module.model.logit_scale.exp())
        loss.backward()
        results.append((loss.detach(), module.model.visual.conv1.weight.grad))
        assert set(module.state_dict()) == set(make_module(False).state_dict())
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    assert_relative_close(compiled_grad, eager_grad, 1e-4, name="visual.conv1.weight")
