"""Evaluation metrics on hand-built embeddings whose answers are known or computed independently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k
from open_clip.loss import ClipLoss

from clipscale.eval.coder import neighbour_features, neighbour_zeroshot_logits, split_support_query
from clipscale.eval.geometry import modality_gap_metrics
from clipscale.eval.retrieval import (
    contrastive_loss_in_blocks,
    image_to_text_ranks,
    retrieval_metrics,
    text_to_image_ranks,
)
from clipscale.eval.zeroshot import accuracy_from_counts, topk_correct


def _captioned_set(num_images: int, captions: list[int], dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    owners = torch.tensor([i for i, n in enumerate(captions) for _ in range(n)])
    texts = F.normalize(
        images[owners] + 0.8 * torch.randn(len(owners), dim, generator=generator), dim=-1
    )
    return images, texts, owners


def _reference_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    # sort each row, the rank is the 1-based position of the first positive (no ties in floats)
    order = scores.argsort(dim=1, descending=True)
    return positive.gather(1, order).float().argmax(dim=1) + 1


def test_zeroshot_topk_on_perfect_reversed_and_tied_scores():
    targets = torch.tensor([0, 3, 7, 9, 2])
    perfect = F.one_hot(targets, 10).float()
    assert topk_correct(perfect, targets, 1).all()
    reversed_scores = -perfect  # the target scores lowest: rank 10
    assert not topk_correct(reversed_scores, targets, 5).any()
    assert topk_correct(reversed_scores, targets, 10).all()
    tied = torch.zeros(5, 10)  # a collapsed model must not get credit for ties
    assert not topk_correct(tied, targets, 1).any()
    assert topk_correct(tied, targets, 10).all()


def test_zeroshot_topk_matches_sorting_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 30, generator=generator)
    targets = torch.randint(0, 30, (500,), generator=generator)
    ranks = _reference_ranks(logits, F.one_hot(targets, 30).bool())
    for k in (1, 5):
        assert torch.equal(topk_correct(logits, targets, k), ranks <= k)


def test_per_class_accuracy_from_counts():
    totals, hits = torch.tensor([4, 0, 2]), torch.tensor([1, 0, 2])
    result = accuracy_from_counts(totals, hits, ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["mean_per_class"] == pytest.approx((0.25 + 1.0) / 2)  # class b has no samples
    assert result["per_class"] == {"a": 0.25, "c": 1.0}


def test_retrieval_perfect_and_reversed_embeddings_with_several_captions():
    images = torch.eye(12)  # [12, 12], orthogonal images
    owners = torch.tensor([i for i in range(12) for _ in range(1 + i % 3)])  # 1-3 captions each
    perfect = retrieval_metrics(
        image_to_text_ranks(images, images[owners], owners),
        text_to_image_ranks(images[owners], images, owners),
    )
    assert all(
        perfect[f"{d}_R@{k}"] == 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
    )
    assert perfect["image_to_text_median_rank"] == perfect["text_to_image_mean_rank"] == 1.0
    # captions pointing away from their image: own pairs score -1, all others 0
    i2t = image_to_text_ranks(images, -images[owners], owners)
    t2i = text_to_image_ranks(-images[owners], images, owners)
    captions_per_image = torch.bincount(owners)
    assert torch.equal(i2t, len(owners) - captions_per_image + 1)
    assert torch.equal(t2i, torch.full_like(t2i, 12))
    assert retrieval_metrics(i2t, t2i)["text_to_image_R@10"] == 0.0


def test_retrieval_ties_count_against_the_model():
    images = torch.ones(6, 4) / 2  # every score equal
    owners = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5])
    assert torch.equal(
        image_to_text_ranks(images, images[owners], owners), 8 - torch.bincount(owners) + 1
    )
    assert torch.equal(text_to_image_ranks(images[owners], images, owners), torch.full((8,), 6))


@pytest.mark.parametrize("max_tile_elements", [7, 2**24])
def test_retrieval_random_matches_clip_benchmark_and_sorting(max_tile_elements):
    captions = [1 + (i * 7) % 4 for i in range(60)]
    images, texts, owners = _captioned_set(60, captions, dim=16, seed=1)
    i2t = image_to_text_ranks(images, texts, owners, max_tile_elements=max_tile_elements)
    t2i = text_to_image_ranks(texts, images, owners, max_tile_elements=max_tile_elements)
    positive = torch.zeros(len(owners), 60, dtype=torch.bool)
    positive[torch.arange(len(owners)), owners] = True  # [T, I], clip_benchmark's layout
    assert torch.equal(i2t, _reference_ranks(images @ texts.T, positive.T))
    assert torch.equal(t2i, _reference_ranks(texts @ images.T, positive))
    ours = retrieval_metrics(i2t, t2i)
    for k in (1, 5, 10):
        # clip_benchmark: text_retrieval = image->text, image_retrieval = text->image
        text_retrieval = (recall_at_k(images @ texts.T, positive.T, k) > 0).float().mean().item()
        image_retrieval = (recall_at_k(texts @ images.T, positive, k) > 0).float().mean().item()
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(text_retrieval)
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(image_retrieval)
    assert ours["text_to_image_median_rank"] == pytest.approx(t2i.double().median().item(), abs=0.5)


def test_blockwise_contrastive_loss_equals_open_clip_per_block():
    images, texts, _ = _captioned_set(40, [1] * 40, dim=8, seed=2)
    reference = ClipLoss()
    blocks = [reference(images[i : i + 16], texts[i : i + 16], 20.0).item() for i in (0, 16)]
    # 40 pairs in blocks of 16: two full blocks, the last 8 pairs left out (as drop_last)
    assert contrastive_loss_in_blocks(images, texts, 20.0, 16) == pytest.approx(sum(blocks) / 2)


def test_geometry_opposite_caps_versus_mixed_modalities():
    generator = torch.Generator().manual_seed(3)
    pole = F.one_hot(torch.tensor(0), 16).float()
    noise = lambda: 0.05 * torch.randn(2000, 16, generator=generator)  # noqa: E731
    caps = modality_gap_metrics(pole + noise(), -pole + noise())
    assert caps["modality_gap"] > 1.9 and caps["modality_gap_angle_deg"] > 175
    assert caps["matched_cosine"] < -0.8 and caps["unmatched_cosine"] < -0.8
    assert caps["image_mean_cosine"] > 0.8 and caps["text_mean_cosine"] > 0.8
    assert caps["alignment"] > 3.6  # |x - y|^2 near 4 for antipodal pairs
    mixed = modality_gap_metrics(
        torch.randn(2000, 16, generator=generator), torch.randn(2000, 16, generator=generator)
    )
    assert mixed["modality_gap"] < 0.1
    assert abs(mixed["image_mean_cosine"]) < 0.01 and abs(mixed["unmatched_cosine"]) < 0.01


def test_geometry_sums_equal_pairwise_definitions():
    images, texts, _ = _captioned_set(50, [1] * 50, dim=8, seed=4)
    metrics = modality_gap_metrics(images, texts)
    off_diagonal = ~torch.eye(50, dtype=torch.bool)
    assert metrics["unmatched_cosine"] == pytest.approx(
        (images @ texts.T)[off_diagonal].mean().item(), abs=1e-6
    )
    assert metrics["text_mean_cosine"] == pytest.approx(
        (texts @ texts.T)[off_diagonal].mean().item(), abs=1e-6
    )
    assert metrics["matched_cosine"] == pytest.approx(
        (images * texts).sum(1).mean().item(), abs=1e-6
    )
    angle = math.degrees(
        math.acos(F.cosine_similarity(images.mean(0), texts.mean(0), dim=0).item())
    )
    assert metrics["modality_gap_angle_deg"] == pytest.approx(angle, abs=1e-3)


def test_neighbour_features_vote_for_the_nearest_class_prompts():
    generator = torch.Generator().manual_seed(5)
    prototypes = torch.eye(6)  # class c prompts lie near e_c
    bank = F.normalize(
        prototypes.repeat_interleave(3, 0) + 0.1 * torch.randn(18, 6, generator=generator), dim=-1
    )
    bank_class = torch.arange(6).repeat_interleave(3)
    labels = torch.randint(0, 6, (30,), generator=generator)
    images = F.normalize(prototypes[labels] + 0.2 * torch.randn(30, 6, generator=generator), dim=-1)
    features = neighbour_features(images, bank, k=4)
    assert torch.equal((features != 0).sum(1), torch.full((30,), 4))
    assert torch.allclose(features.norm(dim=1), torch.ones(30))
    assert torch.equal(
        neighbour_zeroshot_logits(images, bank, bank_class, 6, k=3).argmax(1), labels
    )
    support, query = split_support_query(torch.tensor([0, 1, 0, 0, 1, 2]), shots=2, num_classes=3)
    assert support.tolist() == [0, 1, 2, 4, 5] and query.tolist() == [3]
