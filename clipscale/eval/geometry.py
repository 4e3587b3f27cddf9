"""Geometry of the shared embedding sphere: the modality gap and how the two modalities spread.

Liang et al. (2022, "Mind the Gap") show that CLIP's image and text embeddings live on two
separate cones of the sphere, and that the gap between them depends on the temperature; Wang &
Isola (2020) describe contrastive embeddings by the alignment of matched pairs and the uniformity
of each modality. Every metric here is a function of a few sums over the N pairs, so it costs
O(N·D) and never builds an N×N matrix:

    sum_i sum_j<>i  x_i·y_j = (Σx)·(Σy) - Σ x_i·y_i
    sum_i sum_j<>i  x_i·x_j = |Σx|² - Σ |x_i|²
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def modality_gap_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict:
    """Gap and spread metrics of N matched pairs (row i of each `[N, D]` tensor is a pair)."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"need matched [N, D] image and text features, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    n = image_features.shape[0]
    if n < 2:
        raise ValueError(f"geometry needs at least 2 pairs to compare unmatched ones, got {n}")
    # float64: the sums below subtract nearly equal quantities when the embeddings are collapsed
    x = F.normalize(image_features.double(), dim=-1)  # [N, D]
    y = F.normalize(text_features.double(), dim=-1)  # [N, D]
    image_sum, text_sum = x.sum(0), y.sum(0)  # [D]
    matched_sum = (x * y).sum()
    pairs_off_diagonal = n * (n - 1)
    image_centroid, text_centroid = image_sum / n, text_sum / n
    centroid_cosine = F.cosine_similarity(image_centroid, text_centroid, dim=0).clamp(-1.0, 1.0)
    return {
        # Liang et al.'s gap: the vector between the modality centroids, here its length
        "modality_gap": (image_centroid - text_centroid).norm().item(),
        "modality_gap_angle_deg": math.degrees(math.acos(centroid_cosine.item())),
        "matched_cosine": (matched_sum / n).item(),
        "unmatched_cosine": ((image_sum @ text_sum - matched_sum) / pairs_off_diagonal).item(),
        # within-modality mean cosine: 1 = collapsed to a point, ~0 = spread over the sphere
        "image_mean_cosine": ((image_sum @ image_sum - n) / pairs_off_diagonal).item(),
        "text_mean_cosine": ((text_sum @ text_sum - n) / pairs_off_diagonal).item(),
        # Wang & Isola's alignment: mean squared distance of matched pairs (= 2 - 2·cos)
        "alignment": ((x - y).pow(2).sum(-1).mean()).item(),
    }
