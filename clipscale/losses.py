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


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be [B, D] with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


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


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch; same call as open_clip.loss.ClipLoss.

    `chunk_size` computes it in tiles of that many rows/columns with a streaming log-sum-exp, so
    the N×N logits and their softmax never exist; value and gradients are unchanged.
    """

    def __init__(self, gather: bool = True, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"loss.chunk_size must be a positive integer or null, got {chunk_size}"
            )
        self.gather = gather
        self.chunk_size = chunk_size

    def forward(self, image_features, text_features, logit_scale, foils=None) -> torch.Tensor:
        """Global loss (scalar) from this rank's L2-normalised features [B, D] and the exp'd scale.

        `foils` = (foil_features [B, F, D], foil_mask [B, F]) adds every rank's valid foil captions
        as extra negatives of the image→text direction (hard negatives, as NegCLIP).
        """
        _check_features(image_features, text_features)
        all_image, all_text, offset, num_ranks = _gather_pair(
            image_features, text_features, self.gather
        )
        num_global = all_image.shape[0]
        all_foils = gather_foils(foils, self.gather)
        text_keys = all_text if all_foils is None else torch.cat([all_text, all_foils])
        if self.chunk_size is None:
            row_sums = dense_cross_entropy_sum(
                image_features, text_keys, logit_scale, offset
            ) + dense_cross_entropy_sum(text_features, all_image, logit_scale, offset)
        else:
            from clipscale.tiled import tiled_cross_entropy_sum

            row_sums = tiled_cross_entropy_sum(
                image_features, text_keys, logit_scale, offset, self.chunk_size
            ) + tiled_cross_entropy_sum(
                text_features, all_image, logit_scale, offset, self.chunk_size
            )
        local_loss = row_sums / (2 * num_global)  # mean over N rows, mean of the two directions
        return _global_value(local_loss, num_ranks)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) over the global batch with a learnable bias.

    Value: -(1/N) * sum over all N×N pairs of log sigmoid(z_ij * (logit_scale * x_i·y_j + logit_bias)),
    z_ij = +1 for matched pairs and -1 otherwise; the same value as open_clip's SigLipLoss.
    """

    def __init__(self, gather: bool = True):
        super().__init__()
        self.gather = gather

    def forward(
        self, image_features, text_features, logit_scale, logit_bias, foils=None
    ) -> torch.Tensor:
        """Global loss (scalar); `logit_bias` is the model's learnable bias (open_clip's name).

        `foils` as in ClipLoss: each valid foil caption is one more negative pair for every image.
        """
        _check_features(image_features, text_features)
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs a model with a learnable logit_bias: set "
                "model.init_logit_bias (e.g. -10) and model.init_logit_scale (e.g. 2.3026 = ln 10)"
            )
        _, all_text, offset, num_ranks = _gather_pair(image_features, text_features, self.gather)
        num_global = all_text.shape[0]
        logits = logit_scale * image_features @ all_text.T + logit_bias  # [B, N]
        signs = -torch.ones_like(logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        signs[rows, rows + offset] = 1.0
        local_sum = -F.logsigmoid(signs * logits).sum()
        all_foils = gather_foils(foils, self.gather)
        if all_foils is not None and len(all_foils):
            foil_logits = logit_scale * image_features @ all_foils.T + logit_bias  # [B, M]
            local_sum = local_sum - F.logsigmoid(-foil_logits).sum()
        return _global_value(local_sum / num_global, num_ranks)
