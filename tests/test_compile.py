"""model.compile=true: the compiled chunk encoder gives the eager model's loss and gradients,
with and without gradient caching, and a smaller last chunk compiles nothing new."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from clipscale.gradcache import cached_backward, encode
from clipscale.losses import ClipLoss
from clipscale.models import build_model
from clipscale.module import CLIPModule
from tests.numerics import assert_relative_close
from tests.test_gradcache import tiny_batch
from tests.test_module_ddp import one_step as ddp_one_step


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


def compiled_encoder(model):
    """The module's compiled chunk encoder, with a counter of the frames dynamo compiles."""
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(functools.partial(encode, model), backend=counter), counter


def eager_and_compiled_gradients(batch: int, chunk_size: int | None):
    """Gradients of one ClipLoss step, eager and with the compiled encoder (float32), and the
    counter of compiled frames (grad caching: a second step must compile nothing new)."""
    images, texts = tiny_batch(batch)
    torch._dynamo.reset()  # a fresh cache, so the counter sees every compilation of this test
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("clipscale-tiny").train()
        encode_fn, counter = compiled_encoder(model) if compiled else (None, None)
        if chunk_size is None:
            embeddings = (encode_fn or functools.partial(encode, model))(images, texts)
            ClipLoss()(*embeddings, model.logit_scale.exp()).backward()
        else:
            cached_backward(
                model, images, texts, ClipLoss(), chunk_size,
                encode_fn=encode_fn, pad_last_chunk=compiled,
            )  # fmt: skip
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return (*results, counter, model, encode_fn)


def test_compiled_chunk_encoder_matches_eager_with_a_smaller_last_chunk_and_no_recompile():
    """Grad caching, batch 10 in chunks of 4 (last chunk 2, padded): float32 gradients within
    1e-5 of eager; pass 1 (no grad) and pass 2 (grad) compile once each, and neither the padded
    last chunk nor a second step compiles anything."""
    eager, compiled, counter, model, encode_fn = eager_and_compiled_gradients(10, 4)
    for name, grad in eager.items():
        assert_relative_close(compiled[name], grad, 1e-5, name=name)
    frames = counter.frame_count
    assert frames >= 1
    images, texts = tiny_batch(10, seed=2)
    cached_backward(model, images, texts, ClipLoss(), 4, encode_fn=encode_fn, pad_last_chunk=True)
    assert counter.frame_count == frames, "a second step recompiled the chunk encoder"


@pytest.mark.slow  # a third inductor compilation (the whole batch with graph): ~30 s more
def test_compiled_encoder_without_grad_caching_matches_eager():
    eager, compiled, *_ = eager_and_compiled_gradients(8, None)
    for name, grad in eager.items():
        assert_relative_close(compiled[name], grad, 1e-5, name=name)


@pytest.mark.slow  # two spawned ranks each compile both grad-cache graphs: several minutes on CPU
def test_compiled_grad_caching_under_ddp_and_bf16_matches_eager():
    """model.compile=true with trainer.precision=bf16-mixed, 2 DDP ranks (gloo) and gradient
    caching with a smaller last chunk (6 per rank in chunks of 4): the update equals eager's
    within bf16 accuracy."""
    updates = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = CLIPModule(
            model={"name": "clipscale-tiny", "compile": compiled},
            loss={"_target_": "clipscale.losses.ClipLoss"},
            optim={
                "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5},
                "warmup_steps": 1,
                "grad_clip_norm": None,
            },
            grad_cache={"chunk_size": 4},
        )
        start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        after = ddp_one_step(module, 6, devices=2, strategy="ddp_spawn", precision="bf16-mixed")
        updates.append({n: after[n] - start[n] for n in start if "logit" not in n})
    eager, compiled = updates
    for name in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        assert_relative_close(compiled[name], eager[name], 2e-2, name=name)
