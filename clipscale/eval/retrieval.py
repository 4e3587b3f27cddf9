"""Image↔text retrieval: Recall@K and ranks, scored in chunks so no N×N matrix is ever held.

Rank convention: the rank of a query is 1 + the number of wrong candidates scoring at least as
high as its best right one, so ties count against the model (a collapsed model that scores
everything equal gets rank = gallery size, not 1). Without ties this is the usual rank, and
Recall@K agrees with clip_benchmark's "at least one positive in the top K". A non-finite
score (from NaN/inf features) is the worst possible score: a query whose right answers score NaN
gets the worst rank, and a NaN wrong candidate never outranks anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipscale.distributed import all_gather_rows, rank, world_size
from clipscale.eval.datasets import eval_loader
from clipscale.eval.geometry import modality_gap_metrics
from clipscale.eval.zeroshot import nonfinite_rows, warn_nonfinite

RECALL_KS = (1, 5, 10)
# Largest score tile [rows, gallery] held at once: 2**24 float32 = 64 MiB, at any gallery size
MAX_TILE_ELEMENTS = 2**24


def _query_chunks(query_rows: torch.Tensor, gallery_size: int, max_tile_elements: int):
    rows_per_chunk = max(1, max_tile_elements // max(gallery_size, 1))
    return query_rows.split(rows_per_chunk)


def _finite_or_worst(scores: torch.Tensor) -> torch.Tensor:
    # NaN compares false with everything, so a NaN positive would get rank 1; -inf ranks last
    # (and ties with other -inf count against the query, as all ties do)
    return scores.masked_fill(~torch.isfinite(scores), float("-inf"))


@torch.no_grad()
def image_to_text_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image_index: torch.Tensor,
    query_rows: torch.Tensor | None = None,
    max_tile_elements: int = MAX_TILE_ELEMENTS,
) -> torch.Tensor:
    """Rank [Q] of each queried image's best own caption among all T captions.

    `text_image_index[t]` is the row in `image_features` that caption t describes; `query_rows`
    (default: all images) picks the images to score, so ranks can split the queries.
    """
    captioned = torch.zeros(image_features.shape[0], dtype=torch.bool)
    captioned[text_image_index.cpu()] = True
    if not captioned.all():
        missing = torch.nonzero(~captioned).flatten()[:5].tolist()
        raise ValueError(f"images {missing} have no caption; every image needs at least one")
    if query_rows is None:
        query_rows = torch.arange(image_features.shape[0])
    ranks = [torch.zeros(0, dtype=torch.long, device=image_features.device)]
    for rows in _query_chunks(query_rows, text_features.shape[0], max_tile_elements):
        rows = rows.to(image_features.device)
        scores = _finite_or_worst(image_features[rows] @ text_features.T)  # [c, T]
        positive = text_image_index[None, :] == rows[:, None]  # [c, T]
        best_positive = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(1 + ((scores >= best_positive) & ~positive).sum(dim=1))
    return torch.cat(ranks)


@torch.no_grad()
def text_to_image_ranks(
    text_features: torch.Tensor,
    image_features: torch.Tensor,
    text_image_index: torch.Tensor,
    query_rows: torch.Tensor | None = None,
    max_tile_elements: int = MAX_TILE_ELEMENTS,
) -> torch.Tensor:
    """Rank [Q] of each queried caption's own image among all I images."""
    if query_rows is None:
        query_rows = torch.arange(text_features.shape[0])
    ranks = [torch.zeros(0, dtype=torch.long, device=image_features.device)]
    for rows in _query_chunks(query_rows, image_features.shape[0], max_tile_elements):
        rows = rows.to(text_features.device)
        scores = _finite_or_worst(text_features[rows] @ image_features.T)  # [c, I]
        positive_score = scores.gather(1, text_image_index[rows, None])  # [c, 1]
        # counts the own image too, so this is 1 + the wrong images scoring at least as high
        ranks.append((scores >= positive_score).sum(dim=1))
    return torch.cat(ranks)


def _median(values: torch.Tensor) -> float:
    # the midpoint of the two middle values for an even count, as numpy.median
    ordered = values.double().sort().values
    n = ordered.numel()
    return ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).item()


def retrieval_metrics(
    image_to_text: torch.Tensor, text_to_image: torch.Tensor, ks=RECALL_KS
) -> dict:
    """Recall@K (fractions), mean and median rank from the ranks of every query."""
    metrics = {}
    for direction, ranks in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = (ranks <= k).double().mean().item()
        metrics[f"{direction}_mean_rank"] = ranks.double().mean().item()
        metrics[f"{direction}_median_rank"] = _median(ranks)
    return metrics


def contrastive_loss_in_blocks(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float, block_size: int
) -> float:
    """Symmetric InfoNCE over consecutive blocks of `block_size` pairs, averaged over blocks.

    The loss grows with log(batch size), so it is computed on blocks of the training batch size
    to be comparable with `train/loss`; a last incomplete block is left out (drop_last in
    training) unless it is the only one.
    """
    n = image_features.shape[0]
    num_blocks = max(1, n // block_size)
    losses = []
    for block in range(num_blocks):
        rows = slice(block * block_size, n if num_blocks == 1 else (block + 1) * block_size)
        logits = logit_scale * image_features[rows] @ text_features[rows].T  # [b, b]
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def _encode_share(model, tokenizer, loader, device):
    image_index, image_features, text_image_index, text_features = [], [], [], []
    for indices, images, captions in loader:
        image_index.append(indices)
        image_features.append(F.normalize(model.encode_image(images.to(device)), dim=-1).cpu())
        flat = [caption for per_image in captions for caption in per_image]
        owners = [
            index
            for index, per_image in zip(indices.tolist(), captions, strict=True)
            for _ in per_image
        ]
        text_image_index.append(torch.tensor(owners))
        text_features.append(
            F.normalize(model.encode_text(tokenizer(flat).to(device)), dim=-1).cpu()
        )
    if not image_index:
        # a rank may get no sample of a tiny set; it still joins the gathers with empty tensors
        width = model.text_projection.shape[1] if hasattr(model, "text_projection") else 0
        empty = torch.empty(0, dtype=torch.long), torch.empty(0, width)
        return empty[0], empty[1], empty[0], empty[1]
    return tuple(
        torch.cat(t) for t in (image_index, image_features, text_image_index, text_features)
    )


def encode_image_caption_set(model, tokenizer, loader, device):
    """Features of every image [I, D] and caption [T, D] in dataset order, on every rank.

    `loader`: this rank's eval_loader(..., captions=True). Each rank encodes its share; the
    shares are gathered and sorted back into dataset order, so every rank holds what one process
    would have computed. Returns
    (image_features, text_features, text_image_index [T], first_caption_row [I]).
    """
    image_index, image_features, text_image_index, text_features = (
        all_gather_rows(t) for t in _encode_share(model, tokenizer, loader, device)
    )
    image_index, image_order = image_index.sort()
    # Skipped samples leave gaps in the dataset indices: point each caption at its image's row.
    text_image_index = torch.searchsorted(image_index, text_image_index)
    # stable: the captions of one image come from one rank in file order and must stay so
    text_order = text_image_index.argsort(stable=True)
    text_image_index = text_image_index[text_order]
    is_first_caption = torch.ones_like(text_image_index, dtype=torch.bool)
    is_first_caption[1:] = text_image_index[1:] != text_image_index[:-1]
    return (
        image_features[image_order],
        text_features[text_order],
        text_image_index,
        torch.nonzero(is_first_caption).flatten(),
    )


def score_image_caption_set(
    image_features,
    text_features,
    text_image_index,
    first_caption,
    logit_scale=None,
    loss_block_size=None,
    name: str = "image-caption set",
) -> dict:
    """Retrieval and geometry (on image–first-caption pairs) of a gathered set, same on all ranks.

    Inputs are what `encode_image_caption_set` returns, already on the device to score on; with
    `logit_scale` and `loss_block_size`, the blockwise contrastive loss is added; `name` labels
    the warning about non-finite feature rows (counted in `nonfinite_*features`).
    """
    if image_features.shape[0] < 2:
        raise ValueError(f"an image-caption set needs 2+ images, got {image_features.shape[0]}")
    # every rank scores the queries i = rank (mod world size), then the ranks are gathered
    this_rank, num_ranks = rank(), world_size()
    my_images = torch.arange(this_rank, image_features.shape[0], num_ranks)
    my_texts = torch.arange(this_rank, text_features.shape[0], num_ranks)
    i2t = image_to_text_ranks(image_features, text_features, text_image_index, my_images)
    t2i = text_to_image_ranks(text_features, image_features, text_image_index, my_texts)
    metrics = retrieval_metrics(all_gather_rows(i2t), all_gather_rows(t2i))
    # rows with NaN/inf: the gathered set is the same on every rank, so no reduction is needed
    nonfinite_images, nonfinite_texts = (
        nonfinite_rows(image_features),
        nonfinite_rows(text_features),
    )
    metrics["nonfinite_features"] = nonfinite_images + nonfinite_texts
    metrics["nonfinite_image_features"] = nonfinite_images
    metrics["nonfinite_text_features"] = nonfinite_texts
    if this_rank == 0:
        warn_nonfinite(name, nonfinite_images, nonfinite_texts)
    paired_text = text_features[first_caption.to(text_features.device)]  # [I, D]
    metrics.update(modality_gap_metrics(image_features, paired_text))
    if loss_block_size is not None and logit_scale is not None:
        metrics["contrastive_loss"] = contrastive_loss_in_blocks(
            image_features, paired_text, logit_scale, loss_block_size
        )
    return metrics


def evaluate_retrieval(
    model, tokenizer, transform, shards, batch_size, device, loss_block_size=None, **loader_kw
) -> dict:
    """Encode a captioned set (sharded over ranks) and score it with `score_image_caption_set`.

    `skipped_samples`: samples left out as unreadable (clipscale.data.reading.SKIP_KINDS).
    """
    loader = eval_loader(
        shards, transform, True, batch_size, rank=rank(), world_size=world_size(), **loader_kw
    )
    encoded = encode_image_caption_set(model, tokenizer, loader, device)
    # scored on the model's device: 100k x 100k is minutes on a CPU, seconds on a GPU
    encoded = [t.to(device) for t in encoded]
    metrics = score_image_caption_set(*encoded, model.logit_scale.exp().item(), loss_block_size)
    metrics["skipped_samples"] = loader.skipped_samples()
    return metrics
