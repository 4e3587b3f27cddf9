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

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from clipscale.errors import ConfigError
from clipscale.towers import tower_modules

LossFn = Callable[..., torch.Tensor]
# encode_fn(images, texts) -> (image_emb, text_emb); prepare(images, texts) -> (images, texts)
EncodeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
PrepareFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logit_params(model) -> tuple[torch.Tensor, ...]:
    """(exp(logit_scale),) or (exp(logit_scale), logit_bias): the loss's arguments after features."""
    scale = model.logit_scale.exp()
    bias = getattr(model, "logit_bias", None)
    return (scale,) if bias is None else (scale, bias)


def encode(model, images, texts, locked: frozenset[str] = frozenset()) -> tuple:
    """L2-normalised (image_features [B, D], text_features [B, D]). A tower named in `locked`
    ("image", "text": clipscale/towers.py) runs without a graph; a None input gives None."""
    return (
        encode_tower(model.encode_image, images, "image" in locked),
        encode_tower(model.encode_text, texts, "text" in locked),
    )


def encode_tower(encoder, inputs: torch.Tensor | None, locked: bool) -> torch.Tensor | None:
    """L2-normalised encoder(inputs) [B, D], without a graph for a locked tower."""
    if inputs is None:
        return None
    with torch.no_grad() if locked else contextlib.nullcontext():
        return F.normalize(encoder(inputs), dim=-1)


def encode_foils(model, foil_texts: torch.Tensor, locked: frozenset[str] = frozenset()):
    """L2-normalised foil caption embeddings [B, F, D] of foil tokens [B, F, L]."""
    flat = encode_tower(model.encode_text, foil_texts.flatten(0, 1), "text" in locked)  # [B*F, D]
    return flat.view(*foil_texts.shape[:2], -1)


def full_batch_backward(model, images, texts, loss_fn: LossFn) -> torch.Tensor:
    """Encode the whole batch with a graph, compute the loss and back-propagate; returns the loss."""
    loss = loss_fn(*encode(model, images, texts), *logit_params(model))
    loss.backward()
    return loss.detach()


def rng_state(device: torch.device) -> tuple:
    """The CPU generator's state and, on CUDA, `device`'s: what a replayed encode must draw again."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Restore a state taken by rng_state."""
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows`: a compiled encoder sees one shape only."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])])


def cached_backward(
    model,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: LossFn,
    chunk_size: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    foils: tuple[torch.Tensor, torch.Tensor] | None = None,
    encode_fn: EncodeFn | None = None,
    prepare: PrepareFn | None = None,
    pad_last_chunk: bool = False,
    locked: frozenset[str] = frozenset(),
    chunk_backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Gradient-cached forward/backward of `loss_fn` on (images, texts); returns the loss value.

    `backward(loss)` back-propagates the loss (the Lightning module passes manual_backward, which
    multiplies it by the fp16 loss scale under 16-mixed); `chunk_backward(surrogate)` runs pass 2's
    back-propagations. Those start from the cached embedding gradients, which already carry any
    loss scale, so they must not scale again: the default is a plain backward pass.
    Chunks need not divide the batch: the last one is smaller. `foils` = (foil tokens [B, F, L],
    foil mask [B, F]): hard-negative captions, encoded and cached with their samples' chunk.

    `encode_fn(images, texts)` encodes one chunk (default: `encode(model, ...)`; the module passes
    a compiled one). `prepare(images, texts)` turns a chunk as stored into encoder inputs: with
    host staging the batch stays in (pinned) host memory and each chunk is copied to the device
    and normalised here, in both passes, so the device never holds the whole batch's images.
    `pad_last_chunk` pads a smaller last chunk with zero rows to `chunk_size` and drops their
    embeddings: a compiled encoder then never sees a new shape. Exact, because every layer is
    per-sample (BatchNorm is refused upstream) and the padded rows get no gradient.
    `locked` towers (clipscale/towers.py: no trained parameter, eval mode, so no randomness) are
    encoded once, in pass 1: pass 2 re-encodes only the trained towers.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"grad_cache.chunk_size must be a positive integer or null, got {chunk_size!r}"
        )
    encode_fn = encode_fn or (lambda im, tx: encode(model, im, tx, locked))
    device = next(model.parameters()).device  # the RNG to replay is the encoder's, not the batch's
    image_chunks = images.split(chunk_size)
    text_chunks = texts.split(chunk_size)
    foil_chunks = foils[0].split(chunk_size) if foils is not None else [None] * len(image_chunks)

    def encode_chunk(index: int, skip: frozenset[str] = frozenset()) -> list:
        """[image_emb, text_emb] (+ foil_emb) of chunk `index`, in one fixed order of RNG use;
        None for the towers in `skip`."""
        chunk_images = None if "image" in skip else image_chunks[index]
        chunk_texts = None if "text" in skip else text_chunks[index]
        if prepare is not None:
            chunk_images, chunk_texts = prepare(chunk_images, chunk_texts)
        rows = len(text_chunks[index])
        if pad_last_chunk and rows < chunk_size:
            chunk_images, chunk_texts = (
                None if chunk is None else pad_rows(chunk, chunk_size)
                for chunk in (chunk_images, chunk_texts)
            )
        embeddings = [
            None if emb is None else emb[:rows] for emb in encode_fn(chunk_images, chunk_texts)
        ]
        if foils is not None:
            skipped = "text" in skip
            embeddings.append(None if skipped else encode_foils(model, foil_chunks[index], locked))
        return embeddings

    # Pass 1: embeddings without graph, remembering each chunk's RNG state.
    rng_states, cached = [], []
    with torch.no_grad():
        for index in range(len(image_chunks)):
            rng_states.append(rng_state(device))
            cached.append(encode_chunk(index))
    rng_after = rng_state(device)

    # The loss on the cached embeddings: its graph holds only embeddings and the logit parameters.
    # leaves: image [B, D], text [B, D] (and foil [B, F, D])
    leaves = [torch.cat(parts).requires_grad_(True) for parts in zip(*cached, strict=True)]
    del cached
    extra = {} if foils is None else {"foils": (leaves[2], foils[1])}
    loss = loss_fn(leaves[0], leaves[1], *logit_params(model), **extra)
    backward(loss)  # grads reach logit_scale (and logit_bias) here, once
    # A leaf the loss did not use has no gradient; its gradient is zero. (SigLIP adds foil terms
    # only when some rank has a valid foil, so without one the foil leaf is left out.)
    grads = [
        (torch.zeros_like(leaf) if leaf.grad is None else leaf.grad).split(chunk_size)
        for leaf in leaves
    ]

    # Pass 2: re-encode each chunk's trained towers with graph and push its slice of the cached
    # gradient through (a locked tower has no parameter to reach).
    for index in range(len(image_chunks) if len(locked) < 2 else 0):
        set_rng_state(rng_states[index], device)
        embeddings = encode_chunk(index, skip=locked)
        # A scalar whose gradient w.r.t. the embeddings is exactly the cached slice.
        surrogate = sum(
            (emb * grad[index]).sum()
            for emb, grad in zip(embeddings, grads, strict=True)
            if emb is not None
        )
        chunk_backward(surrogate)
    set_rng_state(rng_after, device)
    return loss.detach()


# --- the grad_cache config keys (grad_cache.chunk_size=auto itself: clipscale/chunking.py) ------


def check_grad_cache(chunk_size, memory_fraction=0.8, stage_on_host="auto") -> None:
    """Refuse grad_cache values that cannot work, naming the key and what it accepts."""
    positive_int = (
        isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0
    )
    if chunk_size is not None and chunk_size != "auto" and not positive_int:
        raise ConfigError(
            f"grad_cache.chunk_size={chunk_size!r} is invalid: it must be a positive integer, "
            "auto (the largest power of two that fits grad_cache.memory_fraction of the "
            "device memory) or null (no gradient caching)"
        )
    if (
        isinstance(memory_fraction, bool)
        or not isinstance(memory_fraction, int | float)
        or not 0 < memory_fraction <= 1
    ):
        raise ConfigError(
            f"grad_cache.memory_fraction={memory_fraction!r} is invalid: it must be a number in "
            "(0, 1], the share of device memory grad_cache.chunk_size=auto may fill (default 0.8)"
        )
    if stage_on_host not in ("auto", True, False):
        raise ConfigError(
            f"grad_cache.stage_on_host={stage_on_host!r} is invalid: it must be auto (on CUDA "
            "with gradient caching), true or false"
        )


def refuse_batch_norm(
    model: torch.nn.Module, model_name: str, chunk_size, locked: frozenset[str] = frozenset()
) -> None:
    """Gradient caching is exact only for per-sample layers: BatchNorm normalises each chunk with
    that chunk's statistics (not the batch's) and updates its running statistics in both passes.
    A locked tower is exempt: in eval mode its BatchNorm uses fixed statistics, per sample."""
    exempt = {
        id(m) for tower in locked for top in tower_modules(model, tower) for m in top.modules()
    }
    layer = next(
        (m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in exempt), None
    )
    if layer is not None:
        raise ConfigError(
            f"grad_cache.chunk_size={chunk_size} cannot be exact for model.name={model_name}: it "
            f"has {type(layer).__name__} layers, which normalise each chunk with its own "
            "statistics. Use grad_cache.chunk_size=null (loss.chunk_size still bounds the loss "
            "memory), or a model without BatchNorm (e.g. a ViT)"
        )
