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


def encode_foils(model, foil_texts: torch.Tensor) -> torch.Tensor:
    """L2-normalised foil caption embeddings [B, F, D] of foil tokens [B, F, L]."""
    flat = model.encode_text(foil_texts.flatten(0, 1))  # [B*F, D]
    return F.normalize(flat, dim=-1).view(*foil_texts.shape[:2], -1)


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
    foils: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gradient-cached forward/backward of `loss_fn` on (images, texts); returns the loss value.

    `backward(scalar)` runs each back-propagation (the Lightning module passes manual_backward).
    Chunks need not divide the batch: the last one is smaller. `foils` = (foil tokens [B, F, L],
    foil mask [B, F]): hard-negative captions, encoded and cached with their samples' chunk.
    """
    if chunk_size < 1:
        raise ValueError(
            f"grad_cache.chunk_size must be a positive integer or null, got {chunk_size}"
        )
    image_chunks = images.split(chunk_size)
    text_chunks = texts.split(chunk_size)
    foil_chunks = foils[0].split(chunk_size) if foils is not None else [None] * len(image_chunks)

    def encode_chunk(index: int) -> list[torch.Tensor]:
        """[image_emb, text_emb] (+ foil_emb) of chunk `index`, in one fixed order of RNG use."""
        embeddings = list(encode(model, image_chunks[index], text_chunks[index]))
        if foils is not None:
            embeddings.append(encode_foils(model, foil_chunks[index]))
        return embeddings

    # Pass 1: embeddings without graph, remembering each chunk's RNG state.
    rng_states, cached = [], []
    with torch.no_grad():
        for index in range(len(image_chunks)):
            rng_states.append(_rng_state(images.device))
            cached.append(encode_chunk(index))
    rng_after = _rng_state(images.device)

    # The loss on the cached embeddings: its graph holds only embeddings and the logit parameters.
    # leaves: image [B, D], text [B, D] (and foil [B, F, D])
    leaves = [torch.cat(parts).requires_grad_(True) for parts in zip(*cached, strict=True)]
    extra = {} if foils is None else {"foils": (leaves[2], foils[1])}
    loss = loss_fn(leaves[0], leaves[1], *logit_params(model), **extra)
    backward(loss)  # grads reach logit_scale (and logit_bias) here, once
    grads = [leaf.grad.split(chunk_size) for leaf in leaves]

    # Pass 2: re-encode each chunk with graph and push its slice of the cached gradient through.
    for index in range(len(image_chunks)):
        _set_rng_state(rng_states[index], images.device)
        embeddings = encode_chunk(index)
        # A scalar whose gradient w.r.t. the embeddings is exactly the cached slice.
        surrogate = sum(
            (emb * grad[index]).sum() for emb, grad in zip(embeddings, grads, strict=True)
        )
        backward(surrogate)
    _set_rng_state(rng_after, images.device)
    return loss.detach()
