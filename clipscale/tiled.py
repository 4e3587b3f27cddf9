"""Memory-bounded contrastive losses: InfoNCE and SigLIP over a B×N logit matrix in square tiles.

The dense losses hold the [B, N] logits, their softmax (or sigmoid) and its gradient at once: 4 GiB
each in float32 at B = N = 32,768. Here the forward streams over tiles of `chunk_size` rows ×
`chunk_size` columns and saves only the inputs (and, for InfoNCE, two [B] vectors: each row's max
and log-sum of exponentials). The backward recomputes each tile from them, so the largest
temporary is one chunk_size × chunk_size tile whatever B and N are. The price is one extra tile
matmul per tile in the backward (the recomputation), the same trade FlashAttention makes. SigLIP's
sum has no normaliser, so its tiles are independent and nothing but the inputs is saved.

Precision. The tile matmuls run in the *compute dtype*: the input dtype, or, for float32 inputs
under torch.autocast on the inputs' device type, the autocast dtype (bf16/fp16). The compute dtype
is decided in forward and stored on ctx, because autograd runs backward outside the autocast
region: without that, a bf16-mixed run computed every backward tile matmul in float32 (issue 9:
~2.7× slower on an H200). Logits, log-sum-exp, sigmoids and every accumulator are float32 (float64
for float64 inputs, so the float64 path stays exact). The scale multiplies the float32 product of
the rounded features, and the positive logits are read off those same tile products, so
the positive term cancels exactly against its place in the log-sum-exp. The logit gradient
P − onehot is formed in float32 before it is cast for the matmul: once training has made P_ii ≈ 1,
casting P first and subtracting the positive key afterwards would lose the small difference to
bf16's 8 significant bits.
"""

import torch

# The float dtypes the kernel accepts; half precision accumulates in float32.
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for logits, log-sum-exp and gradient sums: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """Matmul dtype: the autocast dtype for float32 features under autocast, else their own."""
    device_type = features.device.type
    if features.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return features.dtype


def _product(first: torch.Tensor, second: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """first @ second in acc_dtype (float32/64), however the operands are stored.

    On CUDA, half-precision operands go through torch.mm's out_dtype, so the tensor cores' float32
    accumulator is kept rather than rounded to 8 bits and widened again. Elsewhere (no such kernel
    on CPU) the product is rounded to the operand dtype first; the InfoNCE forward therefore takes
    the positive logits from these same products, so that rounding cancels in the loss.
    """
    if first.is_cuda and first.dtype != acc_dtype:
        try:
            return torch.mm(first, second, out_dtype=acc_dtype)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm.dtype
            pass
    return (first @ second).to(acc_dtype)


def _tile_products(queries_c, keys_c, row_chunk: int, col_chunk: int):
    """Yield (rows, cols, raw) for every tile: raw = q_rows·k_colsᵀ in the accumulate dtype.

    queries_c/keys_c are already in the compute dtype, so each matmul runs at its speed
    (tensor cores for bf16 on GPU); the product is widened before anything else touches it.
    """
    acc_dtype = _accumulate_dtype(queries_c.dtype)
    for row_start in range(0, queries_c.shape[0], row_chunk):
        rows = slice(row_start, row_start + row_chunk)
        query_tile = queries_c[rows]  # [c, D]
        for col_start in range(0, keys_c.shape[0], col_chunk):
            cols = slice(col_start, col_start + col_chunk)
            yield rows, cols, _product(query_tile, keys_c[cols].T, acc_dtype)  # [c, c']


def _row_logsumexp(queries_c, keys_c, scale, label_offset, chunk_size):
    """Per-row max and log Σ exp(logit − max) of scale · queries @ keys.T, tile by tile.

    Also returns Σ_i q_i·k_{i+offset} read off the same tile products, so the positive logits
    carry exactly the rounding of their place in the log-sum-exp.
    """
    acc_dtype = _accumulate_dtype(queries_c.dtype)
    # Kept apart rather than summed into one log-sum-exp: at logits of ~1e3 the sum's rounding
    # (ulp 6e-5 in float32) would shift every recomputed probability by as much.
    row_max = torch.full((queries_c.shape[0],), -torch.inf, dtype=acc_dtype, device=scale.device)
    row_sum = torch.zeros_like(row_max)
    positive_dot = torch.zeros((), dtype=acc_dtype, device=scale.device)
    # The online softmax: a running max and sum of exp(logit − max) per row, exact and
    # overflow-free because every exponent is ≤ 0.
    for rows, cols, logits in _tile_products(queries_c, keys_c, chunk_size, chunk_size):
        positive_dot += logits.diagonal(rows.start + label_offset - cols.start).sum()
        logits.mul_(scale)
        new_max = torch.maximum(row_max[rows], logits.amax(dim=1))
        row_sum[rows] = row_sum[rows] * torch.exp(row_max[rows] - new_max) + logits.sub_(
            new_max[:, None]
        ).exp_().sum(dim=1)
        row_max[rows] = new_max
    return row_max, row_sum.log(), positive_dot


def _subtract_positives(dlogits, rows: slice, cols: slice, label_offset) -> None:
    """dlogits −= 1 at the tile's positives (global row i, column i + offset), in place.

    They lie on one diagonal of the tile: local column − local row = rows.start + offset −
    cols.start; torch.diagonal is empty when that diagonal misses the tile.
    """
    if label_offset is not None:
        dlogits.diagonal(rows.start + label_offset - cols.start).sub_(1.0)


def _tiled_backward(ctx, grad_output, logit_grad, sigmoid: bool):
    """Shared backward: dQ, dK, d scale (and d bias) from per-tile logit gradients.

    `logit_grad(rows, logits)` turns a float32 tile of logits into P (softmax or sigmoid) in place.
    With G = P − onehot (both losses' ∂L/∂logit):
    dQ = s·G @ K, dK = s·Gᵀ @ Q, d s = Σ G ⊙ (Q Kᵀ), d b = Σ G.
    """
    queries, keys, logit_scale = ctx.saved_tensors[:3]
    offset, chunk_size, compute = ctx.label_offset, ctx.chunk_size, ctx.compute_dtype
    need_q, need_k, need_scale = ctx.needs_input_grad[:3]
    need_bias = sigmoid and ctx.needs_input_grad[3]
    acc_dtype = _accumulate_dtype(compute)
    scale = logit_scale.detach().to(acc_dtype)
    queries_c, keys_c = queries.to(compute), keys.to(compute)
    zeros = dict(dtype=acc_dtype, device=queries.device)
    grad_q = torch.zeros(queries.shape, **zeros) if need_q else None  # [B, D]
    grad_k = torch.zeros(keys.shape, **zeros) if need_k else None  # [N, D]
    grad_scale = torch.zeros((), **zeros)
    grad_bias = torch.zeros((), **zeros)
    with torch.autocast(queries.device.type, enabled=False):  # dtypes are chosen explicitly
        for rows, cols, products in _tile_products(queries_c, keys_c, chunk_size, chunk_size):
            dlogits = logit_grad(rows, products * scale)  # P, float32, a second tile
            _subtract_positives(dlogits, rows, cols, offset)  # G = P − onehot, still float32
            # d s and d b straight from the float32 tile: both sums cancel (Σ G = 0 per InfoNCE
            # row), so reading them off bf16 gradient products would lose most of their digits.
            if need_scale:
                grad_scale += torch.dot(dlogits.reshape(-1), products.reshape(-1))
            if need_bias:
                grad_bias += dlogits.sum()
            dlogits = dlogits.to(compute)  # cast only for the matmuls
            if need_q:
                grad_q[rows] += _product(dlogits, keys_c[cols], acc_dtype)  # [c, D]
            if need_k:
                grad_k[cols] += _product(dlogits.T, queries_c[rows], acc_dtype)  # [c', D]

    grad_out = grad_output.to(acc_dtype)
    factor = scale * grad_out  # every feature gradient carries it
    grad_q_out = grad_k_out = grad_scale_out = grad_bias_out = None
    if need_scale:
        grad_scale_out = (grad_out * grad_scale).to(logit_scale.dtype)
    if need_q:
        grad_q_out = grad_q.mul_(factor).to(queries.dtype)
    if need_k:
        grad_k_out = grad_k.mul_(factor).to(keys.dtype)
    if need_bias:
        grad_bias_out = (grad_out * grad_bias).to(ctx.bias_dtype)
    return grad_q_out, grad_k_out, grad_scale_out, grad_bias_out


class _TiledCrossEntropySum(torch.autograd.Function):
    """Sum of row-wise softmax cross-entropy with positives on a shifted diagonal."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, label_offset, chunk_size):
        compute = compute_dtype(queries)
        acc_dtype = _accumulate_dtype(compute)
        scale = logit_scale.detach().to(acc_dtype)
        with torch.autocast(queries.device.type, enabled=False):
            queries_c, keys_c = queries.to(compute), keys.to(compute)
            row_max, row_log_sum, positive_dot = _row_logsumexp(
                queries_c, keys_c, scale, label_offset, chunk_size
            )
        ctx.save_for_backward(queries, keys, logit_scale, row_max, row_log_sum)
        ctx.label_offset, ctx.chunk_size, ctx.compute_dtype = label_offset, chunk_size, compute
        # At least float32 even for bf16 inputs: the sum over B rows would lose digits in bf16.
        out_dtype = torch.promote_types(acc_dtype, logit_scale.dtype)
        return (row_max.sum() + row_log_sum.sum() - scale * positive_dot).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        row_max, row_log_sum = ctx.saved_tensors[3:]

        def softmax(rows, logits):
            return logits.sub_(row_max[rows, None]).sub_(row_log_sum[rows, None]).exp_()

        grad_q, grad_k, grad_scale, _ = _tiled_backward(ctx, grad_output, softmax, sigmoid=False)
        return grad_q, grad_k, grad_scale, None, None


class _TiledSigmoidSum(torch.autograd.Function):
    """−Σ_ij logsigmoid(z_ij·(s·q_i·k_j + b)), z_ij = +1 only at j = i + label_offset."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, label_offset, chunk_size):
        compute = compute_dtype(queries)
        acc_dtype = _accumulate_dtype(compute)
        scale = logit_scale.detach().to(acc_dtype)
        bias = logit_bias.detach().to(acc_dtype)
        total = torch.zeros((), dtype=acc_dtype, device=queries.device)
        with torch.autocast(queries.device.type, enabled=False):
            queries_c, keys_c = queries.to(compute), keys.to(compute)
            for rows, cols, logits in _tile_products(queries_c, keys_c, chunk_size, chunk_size):
                logits.mul_(scale).add_(bias)
                # −logsigmoid(−x) = softplus(x) for every pair; the positives get
                # −logsigmoid(x) = softplus(x) − x instead, so x is subtracted there.
                total += torch.nn.functional.softplus(logits).sum()
                if label_offset is not None:
                    total -= logits.diagonal(rows.start + label_offset - cols.start).sum()
        ctx.save_for_backward(queries, keys, logit_scale, logit_bias)
        ctx.label_offset, ctx.chunk_size, ctx.compute_dtype = label_offset, chunk_size, compute
        ctx.bias_dtype = logit_bias.dtype
        out_dtype = torch.promote_types(acc_dtype, logit_scale.dtype)
        return total.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        bias = ctx.saved_tensors[3].detach().to(_accumulate_dtype(ctx.compute_dtype))

        def sigmoid(rows, logits):
            return logits.add_(bias).sigmoid_()

        grads = _tiled_backward(ctx, grad_output, sigmoid, sigmoid=True)
        return *grads, None, None


def _check_inputs(queries, keys, logit_scale, label_offset, chunk_size, allow_no_positives=False):
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
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if label_offset is None and allow_no_positives:
        return
    num_rows, num_keys = queries.shape[0], keys.shape[0]
    if (
        not isinstance(label_offset, int)
        or isinstance(label_offset, bool)
        or not 0 <= label_offset <= num_keys - num_rows
    ):
        raise ValueError(
            f"label_offset={label_offset!r} puts row positives outside the {num_keys} keys for "
            f"{num_rows} queries; it must be an int in [0, {num_keys - num_rows}] (the rank's "
            f"first global index)"
        )


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


def tiled_sigmoid_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    label_offset: int | None = 0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """−Σ_ij logsigmoid(z_ij·(s·q_i·k_j + b)) in chunk² tiles; z = +1 only at j = i + offset.

    label_offset=None makes every pair negative (hard-negative foil columns).
    """
    _check_inputs(queries, keys, logit_scale, label_offset, chunk_size, allow_no_positives=True)
    if logit_bias.dim() != 0 or logit_bias.device != queries.device:
        raise ValueError(
            f"logit_bias must be a 0-dim tensor on {queries.device}, got shape "
            f"{tuple(logit_bias.shape)} on {logit_bias.device}"
        )
    return _TiledSigmoidSum.apply(queries, keys, logit_scale, logit_bias, label_offset, chunk_size)
