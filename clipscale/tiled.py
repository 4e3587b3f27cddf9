"""Memory-bounded InfoNCE: cross-entropy over a B×N logit matrix computed in square tiles.

The dense loss holds the [B, N] logits, their softmax and its gradient at once: 4 GiB each in
float32 at B = N = 32,768. Here the forward streams over tiles of `chunk_size` rows × `chunk_size`
columns, keeps a running log-sum-exp per row, and saves only the inputs and two [B] vectors (each
row's max and log-sum). The backward recomputes each tile's softmax from them, so the largest
temporary is one chunk_size × chunk_size tile whatever B and N are. The price is one extra tile matmul per tile
in the backward (the recomputation), the same trade FlashAttention makes.

Precision: matmuls run in the input dtype (so bf16 uses tensor cores on GPU); logits, the
log-sum-exp and the gradient accumulators are float32 (float64 for float64 inputs).
"""

import torch

# The float dtypes the kernel accepts; half precision accumulates in float32.
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for logits, log-sum-exp and gradient sums: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot(first: torch.Tensor, second: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ first * second over all entries, in `dtype`, without a product-sized temporary."""
    return torch.dot(first.reshape(-1).to(dtype), second.reshape(-1).to(dtype))


def _scaled(tile: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * tile rounded once to the tile's dtype (rounding scale first would bias bf16)."""
    return (tile.to(scale.dtype) * scale).to(tile.dtype)


def _row_logsumexp(
    queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row max and log Σ exp(logit - max) of scale * queries @ keys.T, tile by tile."""
    acc_dtype = _accumulate_dtype(queries.dtype)
    # Kept apart rather than summed into one log-sum-exp: at logits of ~1e3 the sum's rounding
    # (ulp 6e-5 in float32) would shift every recomputed probability by as much.
    row_max = torch.empty(queries.shape[0], dtype=acc_dtype, device=queries.device)  # [B]
    row_log_sum = torch.empty_like(row_max)  # [B]
    for row_start in range(0, queries.shape[0], chunk_size):
        rows = slice(row_start, row_start + chunk_size)
        scaled_query_tile = _scaled(queries[rows], scale)  # [c, D]
        # Running maximum and sum of exp(logit - maximum) per row: the online softmax, exact
        # and overflow-free because every exponent is ≤ 0.
        running_max = torch.full(
            (scaled_query_tile.shape[0],), -torch.inf, dtype=acc_dtype, device=queries.device
        )
        running_sum = torch.zeros_like(running_max)
        for col_start in range(0, keys.shape[0], chunk_size):
            key_tile = keys[col_start : col_start + chunk_size]  # [c', D]
            logits = (scaled_query_tile @ key_tile.T).to(acc_dtype)  # [c, c']
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            running_sum.mul_(torch.exp(running_max - new_max))
            running_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
            running_max = new_max
        row_max[rows] = running_max
        row_log_sum[rows] = running_sum.log()
    return row_max, row_log_sum


class _TiledCrossEntropySum(torch.autograd.Function):
    """Sum of row-wise softmax cross-entropy with positives on a shifted diagonal."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, label_offset, chunk_size):
        acc_dtype = _accumulate_dtype(queries.dtype)
        scale = logit_scale.detach().to(acc_dtype)
        positive_keys = keys[label_offset : label_offset + queries.shape[0]]  # [B, D]
        positive_dot = _dot(queries, positive_keys, acc_dtype)  # Σ_i q_i·k_{i+offset}
        row_max, row_log_sum = _row_logsumexp(queries, keys, scale, chunk_size)  # [B], [B]
        ctx.save_for_backward(queries, keys, logit_scale, row_max, row_log_sum)
        ctx.label_offset = label_offset
        ctx.chunk_size = chunk_size
        # At least float32 even for bf16 inputs: the sum over B rows would lose digits in bf16.
        out_dtype = torch.promote_types(acc_dtype, logit_scale.dtype)
        return (row_max.sum() + row_log_sum.sum() - scale * positive_dot).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        queries, keys, logit_scale, row_max, row_log_sum = ctx.saved_tensors
        offset, chunk_size = ctx.label_offset, ctx.chunk_size
        need_q, need_k, need_scale = ctx.needs_input_grad[:3]
        acc_dtype = row_max.dtype
        scale = logit_scale.detach().to(acc_dtype)
        positives = slice(offset, offset + queries.shape[0])

        # With P the row softmax and logit_ij = scale * q_i·k_j:
        #   d/dq_i = scale * (Σ_j P_ij k_j - k_{i+offset}),
        #   d/dk_j = scale * (Σ_i P_ij q_i - q_{j-offset}),
        #   d/dscale = Σ_i q_i · (Σ_j P_ij k_j - k_{i+offset}) = Σ_i q_i · (d/dq_i) / scale.
        # Only the softmax sums need the tiles; grad_q's sums also serve d/dscale.
        need_row_sums = need_q or need_scale
        zeros = dict(dtype=acc_dtype, device=queries.device)
        grad_q = torch.zeros(queries.shape, **zeros) if need_row_sums else None  # [B, D]
        grad_k = torch.zeros(keys.shape, **zeros) if need_k else None  # [N, D]
        for row_start in range(0, queries.shape[0], chunk_size):
            rows = slice(row_start, row_start + chunk_size)
            query_tile = queries[rows]  # [c, D]
            scaled_query_tile = _scaled(query_tile, scale)
            for col_start in range(0, keys.shape[0], chunk_size):
                cols = slice(col_start, col_start + chunk_size)
                logits = (scaled_query_tile @ keys[cols].T).to(acc_dtype)  # [c, c']
                probs = logits.sub_(row_max[rows, None]).sub_(row_log_sum[rows, None]).exp_()
                # Back to the input dtype so the two gradient matmuls run at its speed.
                probs = probs.to(queries.dtype)
                if need_row_sums:
                    grad_q[rows] += probs @ keys[cols]  # [c, D]
                if need_k:
                    grad_k[cols] += probs.T @ query_tile  # [c', D]

        # Every gradient entry carries the factor scale * grad_output; applied in place.
        factor = scale * grad_output.to(acc_dtype)
        grad_q_out = grad_k_out = grad_scale_out = None
        if need_row_sums:
            grad_q.sub_(keys[positives])
        if need_scale:
            grad_scale = grad_output.to(acc_dtype) * _dot(queries, grad_q, acc_dtype)
            grad_scale_out = grad_scale.to(logit_scale.dtype)
        if need_q:
            grad_q_out = grad_q.mul_(factor).to(queries.dtype)
        if need_k:
            grad_k[positives] -= queries
            grad_k_out = grad_k.mul_(factor).to(keys.dtype)
        return grad_q_out, grad_k_out, grad_scale_out, None, None


def _check_inputs(queries, keys, logit_scale, label_offset, chunk_size) -> None:
    """Raise ValueError naming the bad argument and the fix."""
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must be [B, D] and [N, D] with the same D, got "
            f"{tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if queries.dtype != keys.dtype or queries.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"queries and keys must share one float dtype of {_SUPPORTED_DTYPES}, got "
            f"{queries.dtype} and {keys.dtype}; cast them first"
        )
    if queries.device != keys.device or logit_scale.device != queries.device:
        raise ValueError(
            f"queries, keys and logit_scale must be on one device, got {queries.device}, "
            f"{keys.device} and {logit_scale.device}"
        )
    if logit_scale.dim() != 0 or not logit_scale.is_floating_point():
        raise ValueError(
            f"logit_scale must be a 0-dim float tensor (the exponentiated scale), got shape "
            f"{tuple(logit_scale.shape)} dtype {logit_scale.dtype}"
        )
    num_rows, num_keys = queries.shape[0], keys.shape[0]
    if not 0 <= label_offset <= num_keys - num_rows:
        raise ValueError(
            f"label_offset={label_offset} puts row positives outside the {num_keys} keys for "
            f"{num_rows} queries; it must lie in [0, {num_keys - num_rows}] (the rank's first "
            f"global index)"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def tiled_cross_entropy_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    label_offset: int = 0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Σ_i cross-entropy(logit_scale * q_i·K.T, target i + label_offset) in chunk² tiles."""
    _check_inputs(queries, keys, logit_scale, label_offset, chunk_size)
    return _TiledCrossEntropySum.apply(queries, keys, logit_scale, label_offset, chunk_size)
