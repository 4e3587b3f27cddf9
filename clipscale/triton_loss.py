"""Fused Triton kernels for InfoNCE rows and SigLIP pairs: no logit tile ever reaches GPU memory.

`cross_entropy_rows(queries [B, D], keys [N, D], logit_scale, label_offset)` returns
Σ_i [logsumexp_j(s·q_i·k_j) − s·q_i·k_{i+offset}], the same sum as
`clipscale.losses.dense_cross_entropy_sum`; `sigmoid_pairs_sum` returns −Σ_ij logsigmoid(z_ij·x_ij)
with x_ij = s·q_i·k_j + b. Both are autograd Functions over three or four Triton kernels.

Forward. One program per block of query rows holds its queries on chip and streams over blocks of
keys. InfoNCE keeps each row's running maximum and sum of exponentials (the online softmax, float32)
and the positive logit, and writes three [B] float32 vectors; SigLIP's sum has no normaliser, so it
writes one [B] vector of row sums. No [B, N] tile ever reaches global memory.

Backward. Both losses have the same logit gradient, g·(P − onehot), with P the row softmax
exp(x − lse) (InfoNCE) or sigmoid(x) (SigLIP; −∂logsigmoid(z·x)/∂x = sigmoid(x) − [z = 1]). So
dQ = s·dlogits @ K, dK = s·dlogitsᵀ @ Q, ds = Σ dlogits ⊙ (Q Kᵀ), db = Σ dlogits. P is recomputed
from the inputs (and, for InfoNCE, the saved row statistics), block by block.

Two backward kernels rather than one with atomics, counted with c = 2·B·N·D FLOPs per B×N matmul:
- Two kernels (this file, FlashAttention-2's choice): the dQ kernel walks row blocks and recomputes
  Q Kᵀ (c) then adds dlogits @ K (c); the dK kernel walks key blocks and recomputes K Qᵀ (c) then
  adds dlogitsᵀ @ Q (c). Backward = 4c, forward + backward = 5c. Each program owns its output block,
  so there are no atomics and the result is bit-identical run to run (resume tests rely on that).
- One kernel with atomics: recompute once (c), dQ in registers (c), dK by atomically adding each
  [BLOCK, D] float32 partial into global memory (c): backward 3c, total 4c, 20% fewer FLOPs. The
  price is ceil(B / BLOCK_M)·N·D float32 atomic adds: at B = N = 32,768, D = 512, BLOCK_M = 64 that
  is 8.6·10⁹ adds, 34 GB of float32 added in place, to save c = 1.1·10¹² FLOPs. dK itself (64 MiB)
  does not fit the 50 MB L2 of an H100/H200, so much of that traffic reaches HBM; at the H200's
  datasheet ratio (4.8 TB/s against 989 dense bf16 TFLOP/s) moving 34 GB takes as long as ~7·10¹²
  FLOPs, six times what the atomics save, before any contention: every row-block program starts on
  key block 0 at once, so the adds collide on the same addresses unless each program staggers its
  key order. And float32 atomics make dK depend on arrival order: no longer deterministic.
So the two-kernel version should win whenever its tiles run near the tensor-core rate. This was
decided without a GPU: `benchmarks/bench_loss_gpu.py` must confirm it by the achieved TFLOP/s of
forward + backward counted as 5c (the dK kernel adds no cost beyond its count if that rate holds).

Precision. The matmuls run in the compute dtype: the input dtype (fp16/bf16 on tensor cores, with
float32 accumulation), or, for float32 inputs under torch autocast on the tensors' device type, the
autocast dtype, recorded at forward and reused by backward. Inputs are cast once per pass, before
the launch, and the copies are dropped after it (backward casts again): at N = 2²⁰, D = 512 each
bf16 copy is 1 GiB, which the saved tensors would otherwise hold from forward to backward. Casting
on load inside the kernel instead was rejected: the pipelined float32 blocks need twice the shared
memory (224 KiB at D = 512, 64 × 32 blocks, 3 stages; the limit is 227 KiB). float32 without
autocast uses IEEE float32 dot products (no TF32), so the CPU tests under the interpreter compare
exactly. Exponentials, log-sum-exp, the SigLIP softplus and every accumulator are float32; dQ and
dK are written in the input dtype. float64 is refused: the PyTorch paths handle it.

Block sizes (`_BLOCKS_BY_ROW_BYTES`) were chosen without a GPU from what the compiler reports: each
kernel was compiled for sm_90 (triton.compile with an explicit target) and its cubin read with
cuobjdump. Spill-free choices at D = 512, bf16: forward 64 × 64 rows, 8 warps (209 registers, 128
KiB shared); backward 32 × 32 (255 registers, no stack); 64 × 64 in the backward spills (504-byte
stack). Whether smaller spill-free blocks beat larger spilling ones is for the GPU benchmark to
measure; `block_m`/`block_n` override the table (the tests use 16/32 under the interpreter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = None
except ImportError as error:  # triton ships with CUDA builds of torch; CPU-only builds lack it
    triton = tl = None
    _TRITON_IMPORT_ERROR = error

MAX_DIM = 1024
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _jit(fn):
    """triton.jit when triton imported; otherwise the plain function (never launched)."""
    return fn if triton is None else triton.jit(fn)


@_jit
def _load_block(base_ptr, offs_rows, offs_dim, num_rows, dim, stride, DOT_DTYPE: tl.constexpr):
    """[len(offs_rows), BLOCK_D] block of a row-major matrix, zero outside it, cast for tl.dot."""
    # int64 row offsets: N·D passes 2³¹ at N = 2²¹, D = 1024.
    pointers = base_ptr + offs_rows[:, None].to(tl.int64) * stride + offs_dim[None, :]
    mask = (offs_rows[:, None] < num_rows) & (offs_dim[None, :] < dim)
    return tl.load(pointers, mask=mask, other=0.0).to(DOT_DTYPE)


@_jit
def _log1p(x):
    """log(1 + x) for x ≥ 0, accurate when x ≪ 1 (no tl.log1p in every backend)."""
    # 1 + x drops x's low digits; log(y)·x/(y − 1) divides that same rounding back out (Goldberg).
    y = 1.0 + x
    rounded = y - 1.0
    return tl.where(rounded == 0.0, x, tl.log(y) * (x / tl.where(rounded == 0.0, 1.0, rounded)))


@_jit
def _cross_entropy_forward_kernel(
    queries_ptr, keys_ptr, scale_ptr, row_max_ptr, row_log_sum_ptr, positive_ptr,
    num_rows, num_keys, dim, label_offset, stride_q, stride_k,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per query row: max and log Σ exp(logit − max) over all keys, and the positive logit."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    queries = _load_block(queries_ptr, offs_m, offs_d, num_rows, dim, stride_q, DOT_DTYPE)
    scale = tl.load(scale_ptr)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    positive = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys = _load_block(keys_ptr, offs_n, offs_d, num_keys, dim, stride_k, DOT_DTYPE)
        logits = scale * tl.dot(queries, tl.trans(keys), input_precision=PRECISION)  # [M, N]
        is_positive = offs_n[None, :] == offs_m[:, None] + label_offset
        positive += tl.sum(tl.where(is_positive, logits, 0.0), axis=1)
        logits = tl.where(offs_n[None, :] < num_keys, logits, float("-inf"))
        # Online softmax: rescale the old sum to the new maximum; every exponent stays ≤ 0.
        # The first block always has a valid key, so new_max is finite from then on.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        running_max = new_max
    # Max and log-sum kept apart (as clipscale.tiled does): folding them into one float32 lse
    # would round away up to ulp(max) of every recomputed log-probability.
    row_mask = offs_m < num_rows
    tl.store(row_max_ptr + offs_m, running_max, mask=row_mask)
    tl.store(row_log_sum_ptr + offs_m, tl.log(running_sum), mask=row_mask)
    tl.store(positive_ptr + offs_m, positive, mask=row_mask)


@_jit
def _sigmoid_forward_kernel(
    queries_ptr, keys_ptr, scale_ptr, bias_ptr, row_loss_ptr,
    num_rows, num_keys, dim, label_offset, stride_q, stride_k,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per query row: −Σ_j logsigmoid(z_ij·(s·q_i·k_j + b)), z = +1 only at j = i + offset."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    queries = _load_block(queries_ptr, offs_m, offs_d, num_rows, dim, stride_q, DOT_DTYPE)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    row_loss = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys = _load_block(keys_ptr, offs_n, offs_d, num_keys, dim, stride_k, DOT_DTYPE)
        logits = scale * tl.dot(queries, tl.trans(keys), input_precision=PRECISION) + bias
        is_positive = offs_n[None, :] == offs_m[:, None] + label_offset
        signed = tl.where(is_positive, logits, -logits)
        # −logsigmoid(t) = softplus(−t) = max(−t, 0) + log1p(exp(−|t|)), finite for any t.
        loss = tl.maximum(-signed, 0.0) + _log1p(tl.exp(-tl.abs(signed)))
        row_loss += tl.sum(tl.where(offs_n[None, :] < num_keys, loss, 0.0), axis=1)
    tl.store(row_loss_ptr + offs_m, row_loss, mask=offs_m < num_rows)


@_jit
def _logit_grad(
    raw, scale, bias, row_max, row_log_sum, is_positive, valid, SIGMOID: tl.constexpr
):  # fmt: skip
    """dloss/dlogit / g for a tile of raw dot products: P − onehot, zero outside the matrix."""
    if SIGMOID:
        probs = tl.sigmoid(scale * raw + bias)
    else:
        probs = tl.exp((scale * raw - row_max) - row_log_sum)
    return tl.where(valid, probs - tl.where(is_positive, 1.0, 0.0), 0.0)


@_jit
def _backward_queries_kernel(
    queries_ptr, keys_ptr, scale_ptr, bias_ptr, grad_out_ptr, row_max_ptr, row_log_sum_ptr,
    grad_queries_ptr, scale_grad_ptr, bias_grad_ptr,
    num_rows, num_keys, dim, label_offset, stride_q, stride_k, stride_grad,
    SIGMOID: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per query-row block: dQ rows, and per-row Σ dlogit·q·k and Σ dlogit."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < num_rows
    queries = _load_block(queries_ptr, offs_m, offs_d, num_rows, dim, stride_q, DOT_DTYPE)
    scale = tl.load(scale_ptr)
    grad_out = tl.load(grad_out_ptr)
    bias = 0.0
    row_max = tl.zeros([BLOCK_M, 1], tl.float32)
    row_log_sum = tl.zeros([BLOCK_M, 1], tl.float32)
    if SIGMOID:
        bias = tl.load(bias_ptr)
    else:
        row_max = tl.load(row_max_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
        row_log_sum = tl.load(row_log_sum_ptr + offs_m, mask=row_mask, other=0.0)[:, None]
    grad_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    scale_grad = tl.zeros([BLOCK_M], tl.float32)
    bias_grad = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keys = _load_block(keys_ptr, offs_n, offs_d, num_keys, dim, stride_k, DOT_DTYPE)
        raw = tl.dot(queries, tl.trans(keys), input_precision=PRECISION)  # [M, N]
        is_positive = offs_n[None, :] == offs_m[:, None] + label_offset
        valid = offs_n[None, :] < num_keys
        dlogits = _logit_grad(raw, scale, bias, row_max, row_log_sum, is_positive, valid, SIGMOID)
        grad_acc += tl.dot(dlogits.to(DOT_DTYPE), keys, input_precision=PRECISION)
        scale_grad += tl.sum(dlogits * raw, axis=1)
        bias_grad += tl.sum(dlogits, axis=1)
    grad_pointers = grad_queries_ptr + offs_m[:, None].to(tl.int64) * stride_grad + offs_d[None, :]
    grad_mask = row_mask[:, None] & (offs_d[None, :] < dim)
    grad_queries = grad_acc * (scale * grad_out)
    tl.store(grad_pointers, grad_queries.to(grad_queries_ptr.dtype.element_ty), mask=grad_mask)
    tl.store(scale_grad_ptr + offs_m, scale_grad * grad_out, mask=row_mask)
    tl.store(bias_grad_ptr + offs_m, bias_grad * grad_out, mask=row_mask)


@_jit
def _backward_keys_kernel(
    queries_ptr, keys_ptr, scale_ptr, bias_ptr, grad_out_ptr, row_max_ptr, row_log_sum_ptr,
    grad_keys_ptr,
    num_rows, num_keys, dim, label_offset, stride_q, stride_k, stride_grad,
    SIGMOID: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per key block (BLOCK_N keys held, BLOCK_M query rows streamed): dK rows."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keys = _load_block(keys_ptr, offs_n, offs_d, num_keys, dim, stride_k, DOT_DTYPE)
    scale = tl.load(scale_ptr)
    grad_out = tl.load(grad_out_ptr)
    bias = 0.0
    if SIGMOID:
        bias = tl.load(bias_ptr)
    grad_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, num_rows, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < num_rows
        queries = _load_block(queries_ptr, offs_m, offs_d, num_rows, dim, stride_q, DOT_DTYPE)
        # The tile transposed, [N, M], so both matmuls need no transposed accumulator.
        raw = tl.dot(keys, tl.trans(queries), input_precision=PRECISION)
        row_max = tl.zeros([1, BLOCK_M], tl.float32)
        row_log_sum = tl.zeros([1, BLOCK_M], tl.float32)
        if not SIGMOID:
            row_max = tl.load(row_max_ptr + offs_m, mask=row_mask, other=0.0)[None, :]
            row_log_sum = tl.load(row_log_sum_ptr + offs_m, mask=row_mask, other=0.0)[None, :]
        is_positive = offs_n[:, None] == offs_m[None, :] + label_offset
        dlogits = _logit_grad(
            raw, scale, bias, row_max, row_log_sum, is_positive, row_mask[None, :], SIGMOID
        )
        grad_acc += tl.dot(dlogits.to(DOT_DTYPE), queries, input_precision=PRECISION)
    grad_pointers = grad_keys_ptr + offs_n[:, None].to(tl.int64) * stride_grad + offs_d[None, :]
    grad_mask = (offs_n[:, None] < num_keys) & (offs_d[None, :] < dim)
    grad_keys = grad_acc * (scale * grad_out)
    tl.store(grad_pointers, grad_keys.to(grad_keys_ptr.dtype.element_ty), mask=grad_mask)


def available(tensor: torch.Tensor) -> tuple[bool, str]:
    """(True, "") when the kernels can run on `tensor`'s device, else (False, why and the fix)."""
    if triton is None:
        return False, f"triton cannot be imported ({_TRITON_IMPORT_ERROR}); install torch with CUDA"
    from triton.runtime.interpreter import InterpretedFunction

    # triton.jit reads TRITON_INTERPRET when the kernels are defined (this module's import), so
    # the kernels' own type says whether they run in the interpreter.
    interpreted = isinstance(_cross_entropy_forward_kernel, InterpretedFunction)
    if tensor.device.type == "cuda":
        if interpreted:
            return False, (
                "the Triton kernels were loaded under TRITON_INTERPRET=1, which runs them on CPU "
                "tensors only; unset it for CUDA tensors"
            )
        return True, ""
    if tensor.device.type == "cpu":
        if interpreted:
            return True, ""
        return False, (
            "the Triton kernels run on CUDA tensors, or on CPU tensors only in Triton's "
            "interpreter (set TRITON_INTERPRET=1 in the environment before starting Python; slow, "
            "meant for tests)"
        )
    return False, f"the Triton kernels run on CUDA tensors, not on {tensor.device.type}"


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype for float32 under autocast, else the input's own."""
    device_type = features.device.type
    if features.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return features.dtype


def _triton_dtype(dtype: torch.dtype):
    """The triton.language dtype for a torch compute dtype."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[
        dtype
    ]


class Blocks(NamedTuple):
    """One kernel's launch shape: rows held per program, rows streamed per step, warps, stages."""

    held: int
    streamed: int
    num_warps: int
    num_stages: int


# (forward, backward) blocks by bytes per feature row (BLOCK_D × element size). Chosen by compiling
# every kernel for sm_90 (H100/H200) and reading the cubin (cuobjdump -res-usage): the 16-bit rows
# spill no registers (no stack frame), and every row, float32 included, fits the 227 KiB of shared
# memory per block. float32 (IEEE products, no tensor cores) is a correctness path and does spill
# at D ≥ 512. The backward holds a [held, BLOCK_D] float32 accumulator as well as its operand,
# hence its smaller blocks. Not timed on a GPU.
_BLOCKS_BY_ROW_BYTES = {
    128: (Blocks(128, 64, 4, 3), Blocks(64, 64, 4, 3)),  # D ≤ 64 in 16-bit
    256: (Blocks(128, 64, 8, 3), Blocks(128, 64, 8, 3)),  # D = 128
    512: (Blocks(64, 64, 8, 3), Blocks(64, 64, 8, 3)),  # D = 256
    1024: (Blocks(64, 64, 8, 3), Blocks(32, 32, 8, 3)),  # D = 512
    2048: (Blocks(32, 32, 8, 2), Blocks(16, 32, 8, 2)),  # D = 1024
    4096: (Blocks(16, 16, 8, 2), Blocks(16, 16, 8, 2)),  # D = 1024 in float32
}


class _KernelConfig:
    """Everything the kernels need besides tensors, fixed at forward and reused in backward."""

    def __init__(self, dim: int, compute_dtype: torch.dtype, block_m, block_n):
        self.block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs every side ≥ 16
        self.compute_dtype = compute_dtype
        row_bytes = max(128, self.block_d * compute_dtype.itemsize)
        self.forward, self.backward = _BLOCKS_BY_ROW_BYTES[row_bytes]
        if block_m or block_n:  # an explicit choice (tests, tuning) applies to every kernel
            self.forward = self.forward._replace(
                held=block_m or self.forward.held, streamed=block_n or self.forward.streamed
            )
            self.backward = self.backward._replace(
                held=block_m or self.backward.held, streamed=block_n or self.backward.streamed
            )

    def launch(self, blocks: Blocks, held_name: str, streamed_name: str) -> dict:
        """Constexpr and launch arguments of one kernel."""
        return {
            "DOT_DTYPE": _triton_dtype(self.compute_dtype),
            # IEEE float32 products, never TF32, so float32 results are exact to float32.
            "PRECISION": "ieee" if self.compute_dtype == torch.float32 else None,
            "BLOCK_D": self.block_d,
            held_name: blocks.held,
            streamed_name: blocks.streamed,
            "num_warps": blocks.num_warps,
            "num_stages": blocks.num_stages,
        }


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a 0-dim tensor that the kernels read by pointer (no host sync)."""
    return value.detach().to(torch.float32).contiguous()


def _launch_backward(ctx, grad_output, sigmoid: bool):
    """Run the dQ and/or dK kernels; returns (grad_q, grad_k, scale_rows, bias_rows)."""
    queries, keys, scale, bias, row_max, row_log_sum = ctx.saved_tensors
    config, offset = ctx.config, ctx.kernel_offset
    # The compute-dtype copies are made again rather than kept from forward: at N = 2²⁰, D = 512
    # they are 1 GiB each, and one elementwise pass costs far less than the matmuls.
    queries_c, keys_c = queries.to(config.compute_dtype), keys.to(config.compute_dtype)
    num_rows, dim = queries.shape
    num_keys = keys.shape[0]
    need_q, need_k = ctx.needs_input_grad[:2]
    need_rows = need_q or any(ctx.needs_input_grad[2:4])
    grad_out = _scalar(grad_output)
    tensors = (queries_c, keys_c, scale, bias, grad_out, row_max, row_log_sum)
    grad_q = grad_k = scale_rows = bias_rows = None
    if need_rows:
        grad_q = torch.empty_like(
            queries
        )  # written in the input dtype, e.g. float32 under autocast
        scale_rows = torch.empty(num_rows, dtype=torch.float32, device=queries.device)
        bias_rows = torch.empty_like(scale_rows)
        grid = (triton.cdiv(num_rows, config.backward.held),)
        _backward_queries_kernel[grid](
            *tensors, grad_q, scale_rows, bias_rows,
            num_rows, num_keys, dim, offset, queries_c.stride(0), keys_c.stride(0), grad_q.stride(0),
            SIGMOID=sigmoid, **config.launch(config.backward, "BLOCK_M", "BLOCK_N"),
        )  # fmt: skip
    if need_k:
        grad_k = torch.empty_like(keys)
        # The dK kernel holds key rows and streams query rows.
        grid = (triton.cdiv(num_keys, config.backward.held),)
        _backward_keys_kernel[grid](
            *tensors, grad_k,
            num_rows, num_keys, dim, offset, queries_c.stride(0), keys_c.stride(0), grad_k.stride(0),
            SIGMOID=sigmoid, **config.launch(config.backward, "BLOCK_N", "BLOCK_M"),
        )  # fmt: skip
    return grad_q if need_q else None, grad_k, scale_rows, bias_rows


class _CrossEntropyRows(torch.autograd.Function):
    """Σ_i cross-entropy of row i of s·Q·Kᵀ with target column i + label_offset."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, label_offset, config):
        num_rows, dim = queries.shape
        scale = _scalar(logit_scale)
        row_max, row_log_sum, positive = (
            torch.empty(num_rows, dtype=torch.float32, device=queries.device) for _ in range(3)
        )
        queries_c, keys_c = queries.to(config.compute_dtype), keys.to(config.compute_dtype)
        grid = (triton.cdiv(num_rows, config.forward.held),)
        _cross_entropy_forward_kernel[grid](
            queries_c, keys_c, scale, row_max, row_log_sum, positive,
            num_rows, keys.shape[0], dim, label_offset, queries_c.stride(0), keys_c.stride(0),
            **config.launch(config.forward, "BLOCK_M", "BLOCK_N"),
        )  # fmt: skip
        ctx.save_for_backward(queries, keys, scale, scale, row_max, row_log_sum)
        ctx.config, ctx.kernel_offset, ctx.scale_dtype = config, label_offset, logit_scale.dtype
        return (row_max + row_log_sum - positive).sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad_q, grad_k, scale_rows, _ = _launch_backward(ctx, grad_output, sigmoid=False)
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = scale_rows.sum().to(ctx.scale_dtype)
        return grad_q, grad_k, grad_scale, None, None


class _SigmoidPairsSum(torch.autograd.Function):
    """−Σ_ij logsigmoid(z_ij·(s·q_i·k_j + b)), z_ij = +1 only at j = i + kernel_offset."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, kernel_offset, config):
        num_rows, dim = queries.shape
        scale, bias = _scalar(logit_scale), _scalar(logit_bias)
        row_loss = torch.empty(num_rows, dtype=torch.float32, device=queries.device)
        queries_c, keys_c = queries.to(config.compute_dtype), keys.to(config.compute_dtype)
        grid = (triton.cdiv(num_rows, config.forward.held),)
        _sigmoid_forward_kernel[grid](
            queries_c, keys_c, scale, bias, row_loss,
            num_rows, keys.shape[0], dim, kernel_offset, queries_c.stride(0), keys_c.stride(0),
            **config.launch(config.forward, "BLOCK_M", "BLOCK_N"),
        )  # fmt: skip
        # row_max/row_log_sum are unused by the sigmoid kernels; `scale` fills their slots.
        ctx.save_for_backward(queries, keys, scale, bias, scale, scale)
        ctx.config, ctx.kernel_offset = config, kernel_offset
        ctx.scale_dtype, ctx.bias_dtype = logit_scale.dtype, logit_bias.dtype
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad_q, grad_k, scale_rows, bias_rows = _launch_backward(ctx, grad_output, sigmoid=True)
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_scale = scale_rows.sum().to(ctx.scale_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = bias_rows.sum().to(ctx.bias_dtype)
        return grad_q, grad_k, grad_scale, grad_bias, None, None


def _check_scalar(name: str, value, device) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
        raise ValueError(f"{name} must be a 0-dim float tensor, got {value!r:.80}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")


def _check_inputs(queries, keys, logit_scale, label_offset) -> None:
    """Raise ValueError naming the bad argument and the fix; label_offset None = no positives."""
    for name, features in (("queries", queries), ("keys", keys)):
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"{name} must be a 2-D [rows, D] tensor, got {features!r:.80}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must have the same feature size D, got queries "
            f"{tuple(queries.shape)} and keys {tuple(keys.shape)}"
        )
    if not 1 <= queries.shape[1] <= MAX_DIM:
        raise ValueError(
            f"queries/keys feature size D={queries.shape[1]} is outside the kernel's 1..{MAX_DIM}; "
            f"use loss.kernel=torch for larger embeddings"
        )
    if queries.dtype != keys.dtype or queries.dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            f"queries and keys must share one dtype of float16, bfloat16 or float32, got "
            f"{queries.dtype} and {keys.dtype}; float64 runs on loss.kernel=torch"
        )
    if queries.device != keys.device:
        raise ValueError(f"queries are on {queries.device} but keys are on {keys.device}")
    _check_scalar("logit_scale", logit_scale, queries.device)
    if queries.shape[0] == 0:
        raise ValueError("queries must have at least one row")
    if label_offset is None:
        return
    num_rows, num_keys = queries.shape[0], keys.shape[0]
    if not isinstance(label_offset, int) or not 0 <= label_offset <= num_keys - num_rows:
        raise ValueError(
            f"label_offset={label_offset!r} puts the positives of {num_rows} queries outside the "
            f"{num_keys} keys; it must be an int in [0, {num_keys - num_rows}] (the rank's first "
            f"global row)"
        )


def _check_blocks(block_m, block_n) -> None:
    """Raise ValueError unless each explicit block size is a power of two ≥ 16."""
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (not isinstance(value, int) or value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two ≥ 16 (tl.dot's minimum), got {value}")


def _require_available(tensor: torch.Tensor) -> None:
    ok, reason = available(tensor)
    if not ok:
        raise RuntimeError(reason)


def cross_entropy_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    label_offset: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Σ_i [logsumexp_j(s·q_i·k_j) − s·q_i·k_{i+label_offset}] as a 0-dim float32 tensor."""
    _check_inputs(queries, keys, logit_scale, label_offset)
    _check_blocks(block_m, block_n)
    _require_available(queries)
    config = _KernelConfig(queries.shape[1], _compute_dtype(queries), block_m, block_n)
    return _CrossEntropyRows.apply(
        queries.contiguous(), keys.contiguous(), logit_scale, label_offset, config
    )


def sigmoid_pairs_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    label_offset: int | None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """−Σ_ij logsigmoid(z_ij·(s·q_i·k_j + b)) as a 0-dim float32 tensor.

    z_ij = +1 where j == i + label_offset and −1 elsewhere; label_offset=None makes every pair
    negative (hard-negative foil columns).
    """
    _check_inputs(queries, keys, logit_scale, label_offset)
    _check_scalar("logit_bias", logit_bias, queries.device)
    if keys.shape[0] == 0:  # no foils this step: an empty sum, still connected to the graph
        return (queries.sum() * 0 + logit_scale * 0 + logit_bias * 0).float()
    _check_blocks(block_m, block_n)
    _require_available(queries)
    config = _KernelConfig(queries.shape[1], _compute_dtype(queries), block_m, block_n)
    # An offset of N matches no key column: every pair negative.
    kernel_offset = keys.shape[0] if label_offset is None else label_offset
    return _SigmoidPairsSum.apply(
        queries.contiguous(), keys.contiguous(), logit_scale, logit_bias, kernel_offset, config
    )
