"""Contrastive losses over the global batch: symmetric InfoNCE (CLIP) and sigmoid (SigLIP).

Who owns what under torch.distributed with P ranks of B samples each (N = P*B):
rank r holds rows r*B .. r*B+B-1 of the global N×N similarity matrix, i.e. its own images against
all N texts and its own texts against all N images. Features are all-gathered *with* gradient, so
rank r's partial loss L_r reaches every rank's features, and the gather's backward sums those
contributions. The global loss is L = sum_r L_r. Each rank back-propagates P*L_r: after DDP's
gradient *mean* over ranks, every parameter (and logit_scale) holds exactly dL/dθ, the gradient one
process would compute on the concatenated batch. The returned value is L itself on every rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipscale.distributed import all_reduce_sum, gather_with_grad, rank, world_size


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be [B, D] with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.dtype != text_features.dtype:
        raise ValueError(
            f"image_features are {image_features.dtype} but text_features are "
            f"{text_features.dtype}; cast both towers' outputs to one dtype"
        )
    devices = {image_features.device, text_features.device}
    if isinstance(logit_scale, torch.Tensor):
        devices.add(logit_scale.device)
    if len(devices) > 1:
        raise ValueError(
            f"image_features, text_features and logit_scale must be on one device, got "
            f"{image_features.device}, {text_features.device} and "
            f"{getattr(logit_scale, 'device', 'a Python number')}"
        )


KERNELS = ("auto", "torch", "triton")


def check_loss_options(chunk_size, kernel) -> None:
    """Raise ValueError naming loss.chunk_size / loss.kernel, at construction time."""
    if kernel not in KERNELS:
        raise ValueError(
            f"loss.kernel={kernel!r} is unknown; choose one of {', '.join(KERNELS)} (auto: the "
            f"fused Triton kernel on CUDA when loss.chunk_size is set, PyTorch elsewhere)"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"loss.chunk_size must be a positive integer or null, got {chunk_size!r}")


def select_backend(kernel: str, chunk_size, features: torch.Tensor) -> str:
    """ "dense", "tiles" or "triton" for these features; explains the fix when triton cannot run.

    auto: the fused kernel on CUDA tensors when chunk_size is set and the kernel can take them
    (fp16/bf16/fp32, D ≤ 1024), the PyTorch tiles for other tiled cases, the dense matrix when
    chunk_size is null. torch: tiles or dense by chunk_size. triton: the kernel whatever
    chunk_size is (it streams in its own blocks); an error when it cannot run here.
    """
    if kernel == "torch" or (kernel == "auto" and chunk_size is None):
        return "dense" if chunk_size is None else "tiles"
    if kernel == "auto":
        if not features.is_cuda or features.dtype == torch.float64:
            return "tiles"
        from clipscale import triton_loss

        usable = available_kernel(features)[0] and features.shape[1] <= triton_loss.MAX_DIM
        return "triton" if usable else "tiles"
    ok, reason = available_kernel(features)
    if not ok:
        raise ValueError(
            f"loss.kernel=triton cannot run on these {features.device.type} features: {reason}. "
            f"Use loss.kernel=auto or loss.kernel=torch (PyTorch tiles with loss.chunk_size), "
            f"or, for testing on CPU, set TRITON_INTERPRET=1 before starting Python"
        )
    from clipscale import triton_loss

    if features.shape[1] > triton_loss.MAX_DIM:
        raise ValueError(
            f"loss.kernel=triton supports embeddings up to D={triton_loss.MAX_DIM}, got "
            f"D={features.shape[1]}; use loss.kernel=torch with loss.chunk_size"
        )
    if features.dtype == torch.float64:
        raise ValueError(
            "loss.kernel=triton computes in float16/bfloat16/float32, got float64 features; "
            "use loss.kernel=torch for float64"
        )
    return "triton"


def available_kernel(features: torch.Tensor) -> tuple[bool, str]:
    """triton_loss.available, importing the module only when asked (it imports triton)."""
    from clipscale import triton_loss

    return triton_loss.available(features)


def _gather_pair(image_features, text_features, gather: bool):
    """(all_image [N, D], all_text [N, D], row offset of this rank, number of ranks)."""
    if not gather or world_size() == 1:
        return image_features, text_features, 0, 1
    all_image = gather_with_grad(image_features)
    all_text = gather_with_grad(text_features)
    return all_image, all_text, rank() * image_features.shape[0], world_size()


def gather_foils(foils, gather: bool) -> torch.Tensor | None:
    """Every rank's valid foil (hard-negative) caption embeddings, [M, D], gathered with gradient.

    `foils` is (foil_features [B, F, D], foil_mask [B, F] bool) or None. Foils are extra columns of
    the image→text direction only (NegCLIP); the mask drops padding slots after the gather, so
    every rank's collective has the same shape.
    """
    if foils is None:
        return None
    foil_features, foil_mask = foils
    if foil_features.ndim != 3 or foil_mask.shape != foil_features.shape[:2]:
        raise ValueError(
            "foils must be (foil_features [B, F, D], foil_mask [B, F]), got shapes "
            f"{tuple(foil_features.shape)} and {tuple(foil_mask.shape)}"
        )
    flat = foil_features.reshape(-1, foil_features.shape[-1])  # [B*F, D]
    mask = foil_mask.reshape(-1).to(flat.dtype)
    if gather and world_size() > 1:
        flat = gather_with_grad(flat)  # [P*B*F, D]
        mask = all_gather_no_grad(mask)
    return flat[mask.bool()]


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally shaped tensor, without a gradient path."""
    with torch.no_grad():
        return gather_with_grad(tensor.detach())


def _global_value(local_loss: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Value: sum of every rank's partial loss. Gradient: num_ranks * d(local_loss), see module doc."""
    if num_ranks == 1:
        return local_loss
    scaled = local_loss * num_ranks
    return scaled + (all_reduce_sum(local_loss) - scaled).detach()


def dense_cross_entropy_sum(queries, keys, logit_scale, label_offset: int) -> torch.Tensor:
    """Sum over rows i of cross-entropy of logit_scale * q_i·K with target key i + label_offset."""
    logits = logit_scale * queries @ keys.T  # [B, N]
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    # Half-precision logits are widened for the log-sum-exp; float64 stays float64.
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="sum"
    )


def _row_sums(backend, queries, keys, logit_scale, offset, chunk_size) -> torch.Tensor:
    """Σ_i cross-entropy of row i (target i + offset) by the chosen backend."""
    if backend == "dense":
        return dense_cross_entropy_sum(queries, keys, logit_scale, offset)
    if backend == "tiles":
        from clipscale.tiled import tiled_cross_entropy_sum

        return tiled_cross_entropy_sum(queries, keys, logit_scale, offset, chunk_size)
    from clipscale.triton_loss import cross_entropy_rows

    return cross_entropy_rows(queries, keys, logit_scale, offset)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch; same call as open_clip.loss.ClipLoss.

    `chunk_size` computes it in tiles of that many rows/columns with a streaming log-sum-exp, so
    the N×N logits and their softmax never exist; value and gradients are unchanged. `kernel`
    picks who computes the tiles (see `select_backend`): auto, torch or triton.
    """

    def __init__(self, gather: bool = True, chunk_size: int | None = None, kernel: str = "auto"):
        super().__init__()
        check_loss_options(chunk_size, kernel)
        self.gather = gather
        self.chunk_size = chunk_size
        self.kernel = kernel

    def forward(self, image_features, text_features, logit_scale, foils=None) -> torch.Tensor:
        """Global loss (scalar) from this rank's L2-normalised features [B, D] and the exp'd scale.

        `foils` = (foil_features [B, F, D], foil_mask [B, F]) adds every rank's valid foil captions
        as extra negatives of the image→text direction (hard negatives, as NegCLIP).
        """
        _check_features(image_features, text_features, logit_scale)
        backend = select_backend(self.kernel, self.chunk_size, image_features)
        all_image, all_text, offset, num_ranks = _gather_pair(
            image_features, text_features, self.gather
        )
        num_global = all_image.shape[0]
        all_foils = gather_foils(foils, self.gather)
        text_keys = all_text if all_foils is None else torch.cat([all_text, all_foils])
        row_sums = _row_sums(
            backend, image_features, text_keys, logit_scale, offset, self.chunk_size
        ) + _row_sums(backend, text_features, all_image, logit_scale, offset, self.chunk_size)
        local_loss = row_sums / (2 * num_global)  # mean over N rows, mean of the two directions
        return _global_value(local_loss, num_ranks)


def _dense_sigmoid_sum(queries, keys, logit_scale, logit_bias, offset) -> torch.Tensor:
    """−Σ_ij logsigmoid(z_ij·(s·q_i·k_j + b)) from the full [B, N] matrix; offset None: all z = −1."""
    logits = logit_scale * queries @ keys.T + logit_bias  # [B, N]
    signs = -torch.ones_like(logits)
    if offset is not None:
        rows = torch.arange(logits.shape[0], device=logits.device)
        signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _sigmoid_sum(backend, queries, keys, logit_scale, logit_bias, offset, chunk_size):
    if backend == "dense":
        return _dense_sigmoid_sum(queries, keys, logit_scale, logit_bias, offset)
    if backend == "tiles":
        from clipscale.tiled import tiled_sigmoid_sum

        return tiled_sigmoid_sum(queries, keys, logit_scale, logit_bias, offset, chunk_size)
    from clipscale.triton_loss import sigmoid_pairs_sum

    return sigmoid_pairs_sum(queries, keys, logit_scale, logit_bias, offset)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) over the global batch with a learnable bias.

    Value: -(1/N) * sum over all N×N pairs of log sigmoid(z_ij * (logit_scale * x_i·y_j + logit_bias)),
    z_ij = +1 for matched pairs and -1 otherwise; the same value as open_clip's SigLipLoss.
    `chunk_size` and `kernel` as in ClipLoss: the sum has no normaliser, so tiles are independent.
    """

    def __init__(self, gather: bool = True, chunk_size: int | None = None, kernel: str = "auto"):
        super().__init__()
        check_loss_options(chunk_size, kernel)
        self.gather = gather
        self.chunk_size = chunk_size
        self.kernel = kernel

    def forward(
        self, image_features, text_features, logit_scale, logit_bias, foils=None
    ) -> torch.Tensor:
        """Global loss (scalar); `logit_bias` is the model's learnable bias (open_clip's name).

        `foils` as in ClipLoss: each valid foil caption is one more negative pair for every image.
        """
        _check_features(image_features, text_features, logit_scale)
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs a model with a learnable logit_bias: set "
                "model.init_logit_bias (e.g. -10) and model.init_logit_scale (e.g. 2.3026 = ln 10)"
            )
        backend = select_backend(self.kernel, self.chunk_size, image_features)
        _, all_text, offset, num_ranks = _gather_pair(image_features, text_features, self.gather)
        num_global = all_text.shape[0]
        args = (logit_scale, logit_bias)
        local_sum = _sigmoid_sum(backend, image_features, all_text, *args, offset, self.chunk_size)
        all_foils = gather_foils(foils, self.gather)
        if all_foils is not None and len(all_foils):
            local_sum = local_sum + _sigmoid_sum(
                backend, image_features, all_foils, *args, None, self.chunk_size
            )
        return _global_value(local_sum / num_global, num_ranks)
