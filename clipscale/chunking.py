"""grad_cache.chunk_size=auto: the largest chunk whose measured forward/backward fits memory.

Resolved on the first batch of a run: each candidate chunk of that batch is encoded and backpropagated
once (eager), its peak memory measured, and the largest that fits `grad_cache.memory_fraction` of
the device memory, less the AdamW moments the first optimizer step allocates, is kept. Ranks agree
on the smallest choice. A resumed run reuses the chunk its checkpoint records (module.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from clipscale.distributed import min_over_ranks
from clipscale.errors import ConfigError
from clipscale.gradcache import encode, rng_state, set_rng_state


def candidate_chunks(batch_size: int) -> list[int]:
    """Powers of two below the per-rank batch, then the batch itself, smallest first."""
    sizes, size = [], 1
    while size < batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, batch_size]


def choose_chunk_size(measure: Callable[[int], int | None], batch_size: int, budget: int) -> int:
    """The largest candidate chunk whose measured peak memory (`measure(chunk)` bytes, None when
    it ran out of memory) is within `budget` bytes. Memory grows with the chunk, so candidates are
    tried smallest first and the search stops at the first that does not fit."""
    chosen, tried = None, []
    for chunk in candidate_chunks(batch_size):
        peak = measure(chunk)
        tried.append((chunk, peak))
        if peak is None or peak > budget:
            break
        chosen = chunk
    if chosen is None:
        raise ConfigError(
            f"grad_cache.chunk_size=auto: even a chunk of 1 needs {tried[0][1]} bytes, over the "
            f"budget of {budget} bytes; raise grad_cache.memory_fraction or use a smaller model"
        )
    return chosen


def peak_bytes_cuda(run: Callable[[], None], device: torch.device) -> int | None:
    """Peak allocated CUDA memory while `run()` executes; None when it ran out of memory."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(device)


def peak_bytes_cpu(run: Callable[[], None]) -> int:
    """Peak bytes held by torch's CPU allocations while `run()` executes, from the profiler's
    allocation events (every tensor allocation and free is recorded with its size); Python's
    tracemalloc does not see torch's allocator, and the process RSS is blurred by malloc reuse."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def device_memory(device: torch.device) -> int:
    """Total bytes of the device's memory (the host's physical memory for a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_chunk_size(
    model: torch.nn.Module,
    prepare: Callable,
    images: torch.Tensor,
    texts: torch.Tensor,
    memory_fraction: float,
    device: torch.device,
) -> tuple[int, str]:
    """(chunk, how it was chosen) for this per-rank batch: `prepare(images, texts)` puts a chunk
    on the device as the step does. The random state is restored afterwards, so training draws
    what it would have drawn."""
    state = rng_state(device)
    params = [p for p in model.parameters() if p.requires_grad]
    moments = 2 * sum(p.numel() * p.element_size() for p in params)

    def run(chunk: int) -> None:
        chunk_images, chunk_texts = prepare(images[:chunk], texts[:chunk])
        embeddings = encode(model, chunk_images, chunk_texts)
        sum((emb * torch.ones_like(emb)).sum() for emb in embeddings).backward()
        for p in params:
            p.grad = None

    if device.type == "cuda":
        measure = lambda chunk: peak_bytes_cuda(lambda: run(chunk), device)  # noqa: E731
    else:
        measure = lambda chunk: peak_bytes_cpu(lambda: run(chunk))  # noqa: E731
    total = device_memory(device)
    budget = int(memory_fraction * total) - moments
    chunk = min_over_ranks(choose_chunk_size(measure, images.shape[0], budget))
    set_rng_state(state, device)
    how = (
        f"measured peak within {memory_fraction:g} x {total / 2**30:.1f} GiB {device.type} "
        f"memory, less {moments / 2**30:.2f} GiB of AdamW moments"
    )
    return chunk, how
