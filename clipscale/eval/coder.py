"""Cross-modal neighbour features: an image described by its similarities to nearby texts.

Following the CODER line of work (Yi et al., CVPR 2024), an image is represented not by its own
embedding but by its cosine similarities to a bank of text embeddings, keeping only its K nearest
texts. Here the bank is every prompt template filled with every class name ([C·T, D]), which
gives two classifiers that need no training:
- zero-shot: a similarity-weighted vote of the K nearest prompts for their classes;
- few-shot: nearest class prototype, each prototype the normalised mean neighbour feature of that
  class's labelled support images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbour_features(features: torch.Tensor, text_bank: torch.Tensor, k: int) -> torch.Tensor:
    """Rows [N, M]: each feature's cosines to its k nearest bank texts, zero elsewhere, normalised."""
    if not 1 <= k <= text_bank.shape[0]:
        raise ValueError(f"coder k={k} must be between 1 and the bank size {text_bank.shape[0]}")
    similarities = F.normalize(features, dim=-1) @ F.normalize(text_bank, dim=-1).T  # [N, M]
    nearest = similarities.topk(k, dim=1)
    sparse = torch.zeros_like(similarities).scatter_(1, nearest.indices, nearest.values)
    return F.normalize(sparse, dim=-1)


def neighbour_zeroshot_logits(
    image_features: torch.Tensor,
    text_bank: torch.Tensor,
    bank_class: torch.Tensor,
    num_classes: int,
    k: int,
) -> torch.Tensor:
    """Class scores [N, C]: the summed neighbour-feature weight of each class's prompts."""
    features = neighbour_features(image_features, text_bank, k)  # [N, M]
    scores = torch.zeros(features.shape[0], num_classes, dtype=features.dtype)
    return scores.index_add_(1, bank_class.to(scores.device), features.to(scores.device))


def neighbour_fewshot_logits(
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    query_features: torch.Tensor,
    text_bank: torch.Tensor,
    num_classes: int,
    k: int,
) -> torch.Tensor:
    """Scores [Q, C]: cosine of each query's neighbour feature to each class prototype."""
    support = neighbour_features(support_features, text_bank, k)  # [S, M]
    prototypes = torch.zeros(num_classes, support.shape[1], dtype=support.dtype)
    prototypes.index_add_(0, support_labels, support)
    # a class without support images keeps a zero prototype and scores 0 for every query
    return neighbour_features(query_features, text_bank, k) @ F.normalize(prototypes, dim=-1).T


def split_support_query(
    labels: torch.Tensor, shots: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first `shots` samples of each class (support) and of all others (query)."""
    if shots < 1:
        raise ValueError(f"coder shots={shots} must be at least 1")
    order = torch.arange(labels.numel())
    # position of each sample among the samples of its class, in dataset order
    position_in_class = torch.zeros_like(labels)
    for c in range(num_classes):
        members = labels == c
        position_in_class[members] = torch.arange(int(members.sum()))
    is_support = position_in_class < shots
    if not (~is_support).any():
        raise ValueError(f"coder shots={shots} leaves no query images; use fewer shots")
    return order[is_support], order[~is_support]
