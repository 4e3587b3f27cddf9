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
        if hasattr(dist, "all_gather_single"):  # the newer name; torch < 2.10 has only the older
            dist.all_gather_single(gathered, tensor)
        else:
            dist.all_gather_into_tensor(gathered, tensor)
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


def communication_device() -> torch.device:
    """The device of the process group's tensors: NCCL moves only CUDA tensors, gloo (CPU runs)
    only CPU ones. Not the batch's device: a host-staged batch stays on the CPU under NCCL."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (itself on one rank)."""
    if not is_distributed():
        return value
    smallest = torch.tensor(value, device=communication_device())
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks, no gradient, on the tensor's own device (itself on one rank)."""
    if not is_distributed():
        return tensor
    summed = tensor.detach().to(communication_device(), copy=True)
    dist.all_reduce(summed)
    return summed.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different row counts."""
    if not is_distributed():
        return tensor
    device = communication_device()
    local_rows = torch.tensor([tensor.shape[0]], device=device)
    row_counts = [torch.zeros_like(local_rows) for _ in range(world_size())]
    dist.all_gather(row_counts, local_rows)
    # all_gather needs equal shapes: pad every share to the longest, then cut the padding off
    max_rows = int(max(row_counts).item())
    padded = tensor.new_zeros((max_rows, *tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor
    shares = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(shares, padded)
    return torch.cat(
        [share[: int(n.item())] for share, n in zip(shares, row_counts, strict=True)]
    ).to(tensor.device)


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
