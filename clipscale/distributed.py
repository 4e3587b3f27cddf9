"""Rank/world helpers and an all-gather whose backward gives each rank the summed gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [B, D] tensor into [P*B, D]; backward returns d/d(own slice) summed
    over ranks, because every rank's loss reads every rank's features."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        ctx.batch = tensor.shape[0]
        gathered = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor) if hasattr(
            dist, "all_gather_single"
        ) else dist.all_gather_into_tensor(gathered, tensor)
        return gathered  # [P*B, D]

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> torch.Tensor:
        grad_gathered = grad_gathered.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            grad_local = grad_gathered.new_empty((ctx.batch, *grad_gathered.shape[1:]))
            dist.reduce_scatter_tensor(grad_local, grad_gathered)
            return grad_local
        # gloo has no reduce-scatter: all-reduce the full gradient and keep our rows.
        dist.all_reduce(grad_gathered)
        start = rank() * ctx.batch
        return grad_gathered[start : start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather [B, ...] from every rank into [world*B, ...], differentiably (identity if 1 rank)."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (no gradient); returns the input unchanged on one rank."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor / world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks (no gradient)."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor


def all_reduce_gradients(parameters, bucket_numel: int = 2**25) -> None:
    """Average .grad over ranks, a few flat buckets of `bucket_numel` elements per dtype at a time."""
    if not is_distributed():
        return
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is None:
            continue
        bucket = buckets.setdefault(param.grad.dtype, [])
        bucket.append(param.grad)
        if sum(g.numel() for g in bucket) >= bucket_numel:
            _all_reduce_mean_flat(bucket)
            bucket.clear()
    for bucket in buckets.values():
        if bucket:
            _all_reduce_mean_flat(bucket)


def _all_reduce_mean_flat(grads: list[torch.Tensor]) -> None:
    """One all-reduce for many same-dtype gradients, written back in place."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
