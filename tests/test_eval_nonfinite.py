"""A model that outputs NaN/inf must score as wrong, never as perfect, and the rows are counted.

The references are plain Python loops in float64 that apply the stated rules directly: a query
whose own scores are not finite gets the worst rank, a non-finite wrong candidate never outranks
a right one, and ties count against the model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipscale.eval.callback import ValidationCallback
from clipscale.eval.datasets import eval_loader, read_dataset_info
from clipscale.eval.retrieval import (
    image_to_text_ranks,
    retrieval_metrics,
    score_image_caption_set,
    text_to_image_ranks,
)
from clipscale.eval.zeroshot import evaluate_zeroshot, topk_correct, zeroshot_classifier
from clipscale.models import build_model, build_tokenizer, build_transforms
from tests.eval_fixtures import write_classification_dataset, write_retrieval_dataset

MODEL = "clipscale-tiny"


def _features(n: int, dim: int, seed: int, bad_rows=(), value=float("nan")) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    features[list(bad_rows)] = value
    return features


def _reference_rank(scores: list[float], positive: list[bool]) -> int:
    """1 + wrong candidates at least as high as the best right one; non-finite = worst."""
    finite_right = [s for s, p in zip(scores, positive, strict=True) if p and math.isfinite(s)]
    wrong = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not finite_right:
        return 1 + len(wrong)
    best = max(finite_right)
    return 1 + sum(1 for s in wrong if math.isfinite(s) and s >= best)


def _reference_ranks(queries, gallery, positive) -> list[int]:
    scores = (queries.double() @ gallery.double().T).tolist()
    return [_reference_rank(row, pos) for row, pos in zip(scores, positive.tolist(), strict=True)]


@pytest.mark.parametrize(
    ("bad_images", "bad_texts", "value"),
    [
        (range(9), range(14), float("nan")),  # everything NaN
        ([1, 4], [0, 5, 6], float("nan")),  # some of each
        ([2], [], float("inf")),
        ([], [3, 4], float("-inf")),
    ],
)
def test_retrieval_ranks_with_nonfinite_features_match_the_reference(bad_images, bad_texts, value):
    owners = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 8])  # 9 images, 14 captions
    images = _features(9, 6, 0, bad_images, value)
    texts = _features(14, 6, 1, bad_texts, value)
    positive = owners[None, :] == torch.arange(9)[:, None]  # [I, T]
    i2t = image_to_text_ranks(images, texts, owners)
    t2i = text_to_image_ranks(texts, images, owners)
    assert i2t.tolist() == _reference_ranks(images, texts, positive)
    assert t2i.tolist() == _reference_ranks(texts, images, positive.T)
    metrics = score_image_caption_set(
        images, texts, owners, torch.tensor([0, 2, 3, 4, 6, 7, 9, 10, 12])
    )
    assert metrics["nonfinite_image_features"] == len(bad_images)
    assert metrics["nonfinite_text_features"] == len(bad_texts)
    assert metrics["nonfinite_features"] == len(bad_images) + len(bad_texts)
    assert metrics["image_to_text_R@1"] == retrieval_metrics(i2t, t2i)["image_to_text_R@1"]


def test_all_nan_retrieval_is_the_worst_score_not_the_best():
    owners = torch.arange(12)
    nan = torch.full((12, 4), float("nan"))
    metrics = retrieval_metrics(
        image_to_text_ranks(nan, nan, owners), text_to_image_ranks(nan, nan, owners)
    )
    assert metrics["image_to_text_R@1"] == metrics["text_to_image_R@10"] == 0.0
    assert metrics["image_to_text_mean_rank"] == metrics["text_to_image_median_rank"] == 12.0


def test_zeroshot_topk_with_nonfinite_scores_matches_the_reference():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 7, generator=generator).double()
    targets = torch.randint(0, 7, (40,), generator=generator)
    logits[[0, 5, 9], :] = float("nan")  # whole rows, as NaN image features give
    logits[[11, 12], [2, 4]] = float("nan")  # single entries
    logits[13, targets[13]] = float("inf")
    logits[20:23] = logits[20:23, :1]  # tied rows
    for k in (1, 5):
        expected = []
        for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
            if not all(math.isfinite(s) for s in row):
                expected.append(False)
                continue
            above = sum(
                1
                for c, s in enumerate(row)
                if s > row[target] or (s == row[target] and c != target)
            )
            expected.append(above + 1 <= k)
        assert topk_correct(logits, targets, k).tolist() == expected
    assert topk_correct(torch.full((6, 3), float("nan")), torch.arange(6) % 3, 3).sum() == 0


def _nan_after_encoding(model, bad) -> None:
    """Make `model.encode_image` return NaN rows for the images `bad(images)` [B] selects."""
    encode = model.encode_image

    def encode_image(images, **kwargs):
        features = encode(images, **kwargs)
        return features.masked_fill(bad(images)[:, None], float("nan"))

    model.encode_image = encode_image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    return write_classification_dataset(root / "shapes", 30, per_shard=12), write_retrieval_dataset(
        root / "captions", 10, captions_per_image=1
    )


@pytest.mark.parametrize("all_rows", [True, False])
def test_evaluate_zeroshot_with_a_nan_model_counts_misses(shapes, all_rows):
    torch.manual_seed(0)
    model = build_model(MODEL).eval()
    tokenizer, transform = build_tokenizer(MODEL), build_transforms(MODEL, False)
    info = read_dataset_info(shapes[0])
    clean = evaluate_zeroshot(model, tokenizer, transform, info, 8)
    # an image is "bad" when its top-left pixel is brighter than the median: a fixed subset
    bad = (
        (lambda x: torch.ones(x.shape[0], dtype=torch.bool))
        if all_rows
        else (lambda x: x[:, 0, 0, 0] > 0.5)
    )
    _nan_after_encoding(model, bad)
    broken = evaluate_zeroshot(model, tokenizer, transform, info, 8)
    # reference: the clean model's per-sample hits, with the NaN samples turned into misses
    classifier = zeroshot_classifier(model, tokenizer, info.classnames, info.templates)
    hits = bad_count = total = 0
    for _, images, targets in eval_loader(info.shards, transform, False, 8):
        with torch.no_grad():
            feats = F.normalize(model.encode_image(images), dim=-1).double()
        scores = (feats @ classifier.double()).tolist()
        for row, target in zip(scores, targets, strict=True):
            total += 1
            if any(math.isnan(s) for s in row):
                bad_count += 1
            elif max(range(len(row)), key=row.__getitem__) == target:
                hits += 1
    assert broken["nonfinite_image_features"] == broken["nonfinite_features"] == bad_count
    assert broken["num_samples"] == total == 30
    assert broken["top1"] == pytest.approx(hits / total)
    if all_rows:
        assert bad_count == 30 and broken["top1"] == broken["top5"] == 0.0
    else:
        assert 0 < bad_count < 30 and broken["top1"] <= clean["top1"]
    assert clean["nonfinite_features"] == 0


def test_validation_callback_logs_the_nonfinite_count(shapes):
    torch.manual_seed(0)
    model = build_model(MODEL)
    _nan_after_encoding(model, lambda x: torch.ones(x.shape[0], dtype=torch.bool))
    captions = f"{shapes[1]}/test/0.tar"
    callback = ValidationCallback(
        every_n_steps=1, zeroshot=[str(shapes[0])], val_shards=captions, batch_size=8
    )
    metrics = callback.compute(model, MODEL)
    assert metrics["val/zeroshot/shapes/nonfinite_features"] == 30
    assert metrics["val/zeroshot/shapes/top1"] == 0.0
    assert metrics["val/nonfinite_image_features"] == 10
    assert (
        metrics["val/image_to_text_R@1"] == 0.0 and metrics["val/text_to_image_mean_rank"] == 10.0
    )
