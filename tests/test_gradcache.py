"""Gradient caching gives the gradients of encoding the whole batch with a graph, random layers included."""

from __future__ import annotations

import open_clip.loss
import pytest
import torch

from clipscale.gradcache import cached_backward, encode
from clipscale.losses import ClipLoss, SigLipLoss
from clipscale.models import build_model
from tests.numerics import assert_relative_close

BATCH = 10


def tiny_model_with_random_layers(seed: int = 0, **kwargs) -> torch.nn.Module:
    """The tiny CLIP with patch dropout 0.5 and dropout 0.1 in every attention block of both towers."""
    torch.manual_seed(seed)
    model = build_model("clipscale-tiny", patch_dropout=0.5, **kwargs)
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            block.attn.dropout = (
                0.1  # nn.MultiheadAttention applies it to attention weights in training
            )
    return model.train()


def tiny_batch(batch: int = BATCH, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    texts = torch.randint(1, 49407, (batch, 32), generator=gen)
    return images, texts


def reference_gradients(model, images, texts, chunk_size, loss_fn):
    """Unbounded memory: encode every chunk *with* graph in the same order and RNG stream, one loss."""
    image_features, text_features = [], []
    for image_chunk, text_chunk in zip(
        images.split(chunk_size), texts.split(chunk_size), strict=True
    ):
        image_emb, text_emb = encode(model, image_chunk, text_chunk)
        image_features.append(image_emb)
        text_features.append(text_emb)
    args = [torch.cat(image_features), torch.cat(text_features), model.logit_scale.exp()]
    if isinstance(loss_fn, open_clip.loss.SigLipLoss):
        args.append(model.logit_bias)
    loss = loss_fn(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def cached_gradients(model, images, texts, chunk_size, loss_fn):
    loss = cached_backward(model, images, texts, loss_fn, chunk_size)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [3, 4, BATCH])  # 3 and 4 do not divide 10
def test_gradcache_matches_full_batch_with_dropout_and_patch_dropout(chunk_size):
    images, texts = tiny_batch()
    model = tiny_model_with_random_layers()
    torch.manual_seed(123)  # the random layers' stream, after the model is built
    ref_loss, ref_grads = reference_gradients(
        model, images, texts, chunk_size, open_clip.loss.ClipLoss()
    )
    model = tiny_model_with_random_layers()
    torch.manual_seed(123)
    loss, grads = cached_gradients(model, images, texts, chunk_size, ClipLoss())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in ref_grads.items():
        assert_relative_close(grads[name], grad, 1e-5, name=name)


def test_gradcache_without_rng_replay_would_differ():
    """The random layers really are random here: a second draw changes the gradients."""
    images, texts = tiny_batch()
    model = tiny_model_with_random_layers()
    torch.manual_seed(123)
    _, first = reference_gradients(model, images, texts, 4, open_clip.loss.ClipLoss())
    model = tiny_model_with_random_layers()
    torch.manual_seed(124)
    _, second = reference_gradients(model, images, texts, 4, open_clip.loss.ClipLoss())
    assert (first["visual.conv1.weight"] - second["visual.conv1.weight"]).abs().max() > 1e-4


def test_logit_scale_gets_the_full_batch_gradient_once():
    images, texts = tiny_batch(12)
    for chunk_size in (2, 5):  # 6 and 3 chunks: a per-chunk gradient would be 6× / 3× too large
        model = tiny_model_with_random_layers()
        torch.manual_seed(5)
        _, cached = cached_gradients(model, images, texts, chunk_size, ClipLoss())
        model = tiny_model_with_random_layers()
        torch.manual_seed(5)
        _, ref = reference_gradients(model, images, texts, chunk_size, open_clip.loss.ClipLoss())
        assert_relative_close(cached["logit_scale"], ref["logit_scale"], 1e-5, name="logit_scale")


def test_gradcache_with_sigmoid_loss_matches_full_batch():
    images, texts = tiny_batch()
    kwargs = {"init_logit_bias": -10.0, "init_logit_scale": 2.3026}
    model = tiny_model_with_random_layers(**kwargs)
    torch.manual_seed(9)
    _, ref = reference_gradients(model, images, texts, 4, open_clip.loss.SigLipLoss())
    model = tiny_model_with_random_layers(**kwargs)
    torch.manual_seed(9)
    _, cached = cached_gradients(model, images, texts, 4, SigLipLoss())
    for name in ("logit_bias", "logit_scale", "visual.conv1.weight", "token_embedding.weight"):
        assert_relative_close(cached[name], ref[name], 1e-5, name=name)


def test_gradcache_with_gradient_checkpointing_matches_full_batch():
    images, texts = tiny_batch()
    model = tiny_model_with_random_layers()
    torch.manual_seed(3)
    _, ref = reference_gradients(model, images, texts, 4, open_clip.loss.ClipLoss())
    model = tiny_model_with_random_layers(grad_checkpointing=True)
    torch.manual_seed(3)
    _, cached = cached_gradients(model, images, texts, 4, ClipLoss())
    for name, grad in ref.items():
        assert_relative_close(cached[name], grad, 1e-5, name=name)


def test_gradcache_rejects_a_non_positive_chunk():
    images, texts = tiny_batch()
    with pytest.raises(ValueError, match="grad_cache.chunk_size must be a positive integer"):
        cached_backward(tiny_model_with_random_layers(), images, texts, ClipLoss(), 0)


def test_gradcache_under_bf16_autocast_matches_full_batch_within_bf16_precision():
    """bf16-mixed: both passes run under autocast; the cached gradients match to bf16 accuracy."""
    images, texts = tiny_batch()
    grads = []
    for cached in (False, True):
        model = tiny_model_with_random_layers()
        torch.manual_seed(21)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if cached:
                cached_backward(model, images, texts, ClipLoss(), 4)
            else:
                reference_gradients(model, images, texts, 4, open_clip.loss.ClipLoss())
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    full, cached = grads
    for name in ("logit_scale", "visual.conv1.weight", "token_embedding.weight"):
        assert_relative_close(cached[name], full[name], 2e-2, name=name)
