"""Locked towers (LiT) and per-tower rates: a step with `model.lock_image` is open_clip's step after
`lock_image_tower()`, on 1 and 2 ranks, with and without gradient caching; the locked tower is
never changed, gets no optimizer state, runs in eval mode, is encoded once per cached step and its
FLOPs count accordingly; `optim.*_lr_scale` and `optim.layer_decay` set each parameter's rate."""

from __future__ import annotations

import contextlib
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from torch.utils.flop_counter import FlopCounterMode

from clipscale.errors import ConfigError
from clipscale.flops import step_flops
from clipscale.gradcache import cached_backward
from clipscale.losses import ClipLoss
from clipscale.optim import build_optimizer, parameter_groups
from tests.numerics import assert_relative_close
from tests.test_module_ddp import PER_RANK_BATCH, WORLD, FixedPairs, one_step
from tests.test_module_step import fit, make_module
from tests.test_module_step import tiny_resnet as tiny_resnet  # noqa: F401 (a fixture)

LR = 0.5


def open_clip_locked_step(initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's own LiT step: lock_image_tower(), its ClipLoss on the whole 12-sample batch,
    plain SGD over the parameters left trainable; returns the parameters after the step."""
    model = open_clip.create_model("clipscale-tiny")
    model.load_state_dict(initial)
    model.lock_image_tower()
    data = FixedPairs()
    image_features = F.normalize(model.encode_image(data.images), dim=-1)
    text_features = F.normalize(model.encode_text(data.texts), dim=-1)
    OpenClipLoss()(image_features, text_features, model.logit_scale.exp()).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("devices", [1, WORLD])
@pytest.mark.parametrize("chunk_size", [None, 4])  # 4 does not divide the per-rank batch of 6
def test_locked_image_step_equals_open_clip_lock_image_tower_step(devices, chunk_size):
    module = make_module(lr=LR, chunk=chunk_size, lock_image=True)
    initial = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    expected = open_clip_locked_step(initial)
    if devices == 1:
        after = one_step(module, PER_RANK_BATCH * WORLD, devices=1)
    else:  # 2 gloo processes, each with 6 of the 12 samples
        after = one_step(module, PER_RANK_BATCH, devices=WORLD, strategy="ddp_spawn")
    for name, param in expected.items():
        if name.startswith("visual."):
            assert torch.equal(after[name], initial[name]), name
        else:  # fp32: parameters within 1e-6, updates within DESIGN.md's 1e-5 relative
            assert (after[name] - param).abs().max() <= 1e-6, name
            update, reference = after[name] - initial[name], param - initial[name]
            assert_relative_close(update, reference, 1e-5, name=name)


def test_locked_tower_bytes_never_change_and_get_no_optimizer_state(tmp_path):
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 0.5}
    module = make_module(chunk=4, optimizer=adamw, lock_image=True)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(module, steps=5, batch_size=PER_RANK_BATCH, dataset=FixedPairs())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for name, tensor in initial.items():
        if name.startswith("visual."):
            assert torch.equal(module.model.state_dict()[name], tensor), name
            assert torch.equal(saved["state_dict"][f"model.{name}"], tensor), name
    assert not torch.equal(module.model.text_projection, initial["text_projection"])
    trained = sum(p.requires_grad for p in module.model.parameters())
    assert len(saved["optimizer_states"][0]["state"]) == trained
    assert trained == sum(
        not n.startswith("visual.") for n in initial if n in dict(module.model.named_parameters())
    )


@contextlib.contextmanager
def math_attention():
    """Attention as matmuls FlopCounterMode counts: in eval mode without a graph (a locked tower)
    nn.MultiheadAttention otherwise runs one fused kernel whose FLOPs it does not see."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_cached_step_encodes_a_locked_tower_once_in_eval_mode_and_counts_its_flops():
    module = make_module(chunk=4, lock_image=True)
    module.train()
    calls = []
    module.model.visual.register_forward_hook(lambda m, i, o: calls.append(m.training))
    data = FixedPairs()
    batch = PER_RANK_BATCH * WORLD  # 12 samples: chunks of 4, 4, 4
    loss_fn = ClipLoss(gather=False)
    with FlopCounterMode(display=False) as step_counter, math_attention():
        cached_backward(module.model, data.images, data.texts, loss_fn, 4, locked=module.locked)
    assert calls == [False, False, False]  # once per chunk (no second pass), in eval mode
    # The loss alone on [12, D] features: the step's FLOPs less these are the encoders' FLOPs.
    features = [torch.randn(batch, 64, requires_grad=True) for _ in range(2)]
    with FlopCounterMode(display=False) as loss_counter:
        loss_fn(*features, module.model.logit_scale.exp()).backward()
    measured = step_counter.get_total_flops() - loss_counter.get_total_flops()
    # Counted on a CPU copy of the model: the meta device's attention kernels count a little more.
    counted = step_flops(copy.deepcopy(module.model), False, True, locked=module.locked)
    assert counted.hardware() * batch == pytest.approx(measured, rel=1e-9)
    unlocked = step_flops(make_module().model, False, grad_cache=True)
    # image: one forward instead of forward, backward and the first-pass forward
    assert counted.hardware() < unlocked.hardware()


def test_per_tower_rates_and_layer_decay_set_each_parameters_rate():
    model = make_module().model  # clipscale-tiny: 2 blocks per tower
    groups = parameter_groups(model, 0.1, image_lr_scale=0.1, text_lr_scale=2.0, layer_decay=0.5)
    optimizer = build_optimizer(
        {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1.0}, groups
    )
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr_of = {name: rate[id(p)] for name, p in model.named_parameters()}
    # EVA-CLIP: stem = layer 0, block i = layer i + 1, head = layer 3; factor 0.5^(3 - layer)
    expected = {
        "visual.conv1.weight": 0.1 * 0.5**3,
        "visual.positional_embedding": 0.1 * 0.5**3,
        "visual.transformer.resblocks.0.attn.in_proj_weight": 0.1 * 0.5**2,
        "visual.transformer.resblocks.1.mlp.c_fc.bias": 0.1 * 0.5,
        "visual.proj": 0.1,
        "token_embedding.weight": 2.0 * 0.5**3,
        "transformer.resblocks.1.ln_1.weight": 2.0 * 0.5,
        "text_projection": 2.0,
        "logit_scale": 1.0,
    }
    for name, value in expected.items():
        assert lr_of[name] == pytest.approx(value, rel=1e-12), name
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert id(model.visual.proj) in decayed and id(model.logit_scale) not in decayed
    with pytest.raises(ConfigError, match=r"optim.layer_decay=1.5 is invalid"):
        parameter_groups(model, 0.1, layer_decay=1.5)
    with pytest.raises(ConfigError, match=r"optim.image_lr_scale=-1 is invalid"):
        parameter_groups(model, 0.1, image_lr_scale=-1)


def test_gradient_caching_accepts_batch_norm_in_a_locked_tower(tiny_resnet):
    module = make_module(
        model=tiny_resnet, chunk=4, lock_image=True
    )  # BatchNorm in the image tower
    stats = {k: v.clone() for k, v in module.model.visual.state_dict().items() if "running" in k}
    fit(module, steps=1)
    for name, value in module.model.visual.state_dict().items():
        if name in stats:  # eval mode: fixed statistics, the same per sample in every chunk
            assert torch.equal(value, stats[name]), name
