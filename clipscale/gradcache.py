"""The gradient-caching step: a contrastive batch far larger than activation memory, exactly.

Pass 1 encodes the per-rank batch chunk by chunk without a graph. The loss over the (global) batch
is then differentiated with respect to the embeddings and logit scale only: that graph is tiny.
Pass 2 re-encodes each chunk with a graph and back-propagates its slice of the cached embedding
gradient. By the chain rule the parameter gradients equal those of encoding the whole batch at once,
provided both passes see the same randomness (dropout, patch dropout, stochastic depth): each
chunk's RNG state is recorded before pass 1 and restored before pass 2.
Activation memory is bounded by one chunk; the logit scale gets its gradient once, from the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]


def logit_params(model) -> tuple[torch.Tensor, ...]:
    """(exp(logit_scale),) or (exp(logit_scale), logit_bias): the loss's arguments after features."""
    scale = model.logit_scale.exp()
    bias = getattr(model, "logit_bias", None)
    return (scale,) if bias is None else (scale, bias)


def encode(model, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image_features [B, D], text_features [B, D])."""
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(model.encode_text(texts), dim=-1)
    return image_features, text_features


def full_batch_backward(model, images, texts, loss_fn: LossFn) -> torch.Tensor:
    """Encode the whole batch with a graph, compute the loss and back-propagate; returns the loss."""
    loss = loss_fn(*encode(model, images, texts), *logit_params(model))
    loss.backward()
    return loss.detach()


def _rng_state(device: torch.device) -> tuple:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def cached_backward(
    model,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: LossFn,
    chunk_size: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Gradient-cached forward/backward of `loss_fn` on (images, texts); returns the loss value.

    `backward(scalar)` runs each back-propagation (the Lightning module passes manual_backward).
    Chunks need not divide the batch: the last one is smaller.
    """
    if chunk_size < 1:
        raise ValueError(
            f"grad_cache.chunk_size must be a positive integer or null, got {chunk_size}"
        )
    image_chunks = images.split(chunk_size)
    text_chunks = texts.split(chunk_size)

    # Pass 1: embeddings without graph, remembering each chunk's RNG state.
    rng_states, image_features, text_features = [], [], []
    with torch.no_grad():
        for image_chunk, text_chunk in zip(image_chunks, text_chunks, strict=True):
            rng_states.append(_rng_state(images.device))
            image_emb, text_emb = encode(model, image_chunk, text_chunk)
            image_features.append(image_emb)
            text_features.append(text_emb)
    rng_after = _rng_state(images.device)

    # The loss on the cached embeddings: its graph holds only embeddings and the logit parameters.
    image_leaf = torch.cat(image_features).requires_grad_(True)  # [B, D]
    text_leaf = torch.cat(text_features).requires_grad_(True)  # [B, D]
    loss = loss_fn(image_leaf, text_leaf, *logit_params(model))
    backward(loss)  # grads reach logit_scale (and logit_bias) here, once
    image_grads = image_leaf.grad.split(chunk_size)
    text_grads = text_leaf.grad.split(chunk_size)

    # Pass 2: re-encode each chunk with graph and push its slice of the cached gradient through.
    for index, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks, strict=True)):
        _set_rng_state(rng_states[index], images.device)
        image_emb, text_emb = encode(model, image_chunk, text_chunk)
        # A scalar whose gradient w.r.t. the embeddings is exactly the cached slice.
        surrogate = (image_emb * image_grads[index]).sum() + (text_emb * text_grads[index]).sum()
        backward(surrogate)
    _set_rng_state(rng_after, images.device)
    return loss.detach()
