"""Zero-shot classification with a prompt-template ensemble, computed as clip_benchmark does.

A class embedding is the normalised mean of its normalised template embeddings; an image's class
is the one whose embedding has the highest cosine with the image's. A sample whose scores hold a
NaN or an infinity counts as a miss, and the non-finite feature rows are counted. Counts (not per-rank
accuracies) are summed over ranks, so a sharded run reports exactly the single-process numbers.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from clipscale.distributed import all_gather_rows, all_reduce_sum, rank, world_size
from clipscale.eval.coder import (
    neighbour_fewshot_logits,
    neighbour_zeroshot_logits,
    split_support_query,
)
from clipscale.eval.datasets import (
    EvalDatasetInfo,
    eval_loader,
    image_folder_info,
    read_dataset_info,
)

log = logging.getLogger(__name__)

IMAGENET = "imagenet:"  # eval.zeroshot / zeroshot= entry `imagenet:DIR`
IMAGENET_CLASSES = len(IMAGENET_CLASSNAMES)  # the 1,000 ILSVRC-2012 classes


def imagenet_info(root: str) -> EvalDatasetInfo:
    """ImageNet validation as an ImageFolder of the 1,000 ILSVRC class folders (wnids, whose
    sorted order is the class order), with open_clip's shipped class names and 80 OpenAI
    templates: the classifier open_clip's own ImageNet zero-shot evaluation builds."""
    folder = Path(root)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if len(classes) != IMAGENET_CLASSES:
        raise ValueError(
            f"{IMAGENET}{root} must be an ImageFolder of the {IMAGENET_CLASSES:,} ILSVRC class "
            f"folders (n01440764, ...); it has {len(classes)} sub-folders. Give the validation "
            "set's root, or evaluate another folder without the imagenet: prefix"
        )
    info = image_folder_info(folder)
    if info is None:
        raise ValueError(f"{IMAGENET}{root} holds no images (jpg, jpeg, png, webp)")
    # OpenAI's templates are functions of the class name; "{c}" makes them clipscale templates
    templates = [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]
    return replace(info, name="imagenet", classnames=list(IMAGENET_CLASSNAMES), templates=templates)


def zeroshot_dataset_info(entry: str) -> EvalDatasetInfo:
    """A zero-shot dataset given as `imagenet:DIR` or as a folder that read_dataset_info reads."""
    entry = str(entry)
    if entry.startswith(IMAGENET):
        return imagenet_info(entry[len(IMAGENET) :])
    return read_dataset_info(entry)


@torch.no_grad()
def template_embeddings(
    model, tokenizer, classnames, templates, device="cpu", prompts_per_call: int = 1024
) -> torch.Tensor:
    """Normalised embeddings [C, T, D] of every template filled with every class name."""
    prompts = [template.format(c=classname) for classname in classnames for template in templates]
    # a few large encoder calls instead of one per class: C = 1000 classes is 1000 small calls
    embeddings = [
        F.normalize(
            model.encode_text(tokenizer(prompts[i : i + prompts_per_call]).to(device)), dim=-1
        )
        for i in range(0, len(prompts), prompts_per_call)
    ]
    return torch.cat(embeddings).reshape(len(classnames), len(templates), -1)


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu") -> torch.Tensor:
    """Class embeddings [D, C]: the normalised mean of each class's normalised template embeddings."""
    embeddings = template_embeddings(model, tokenizer, classnames, templates, device)  # [C, T, D]
    return F.normalize(embeddings.mean(dim=1), dim=-1).T


@torch.no_grad()
def zeroshot_logits(model, classifier, images) -> torch.Tensor:
    """Scores [B, C] of a batch of images against the class embeddings."""
    image_features = F.normalize(model.encode_image(images), dim=-1)  # [B, D]
    return image_features @ classifier


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample bool [B]: is the target among the k highest scores (ties, NaN/inf are misses)."""
    target_scores = logits.gather(1, targets[:, None])  # [B, 1]
    # the target's rank when every tied class is placed before it, so a constant score is wrong
    rank = (logits >= target_scores).sum(dim=1)
    # every comparison with NaN is false (rank 0 would count as a hit): a row with any
    # non-finite score is a miss, so a model that outputs NaN scores 0, not 1
    return (rank <= min(k, logits.shape[1])) & torch.isfinite(logits).all(dim=1)


def nonfinite_rows(features: torch.Tensor) -> int:
    """Number of rows of `features` [N, ...] holding a NaN or an infinity."""
    return int((~torch.isfinite(features.reshape(features.shape[0], -1))).any(dim=1).sum())


def warn_nonfinite(name: str, images: int, texts: int) -> None:
    """Log a warning when an evaluation met non-finite image or text features."""
    if images or texts:
        log.warning(
            "%s: %d image and %d text feature rows are NaN/inf; they were scored as misses",
            name,
            images,
            texts,
        )


def accuracy_from_counts(totals: torch.Tensor, hits: torch.Tensor, classnames) -> dict:
    """top-1 style metrics from per-class sample counts [C] and correct counts [C]."""
    present = totals > 0
    per_class = hits[present].double() / totals[present]
    return {
        "accuracy": (hits.sum().double() / totals.sum()).item(),
        # clip_benchmark's mean_per_class_recall: the classes that occur in the labels
        "mean_per_class": per_class.mean().item(),
        "per_class": {
            classnames[c]: (hits[c].double() / totals[c]).item()
            for c in torch.nonzero(present).flatten()
        },
    }


def _check_targets(targets: torch.Tensor, num_classes: int, name: str) -> None:
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"dataset {name!r}: label {targets.max().item()} outside 0..{num_classes - 1}; "
            f"classnames.txt lists {num_classes} classes, one per label"
        )


@torch.no_grad()
def evaluate_zeroshot(
    model,
    tokenizer,
    transform,
    info: EvalDatasetInfo,
    batch_size: int,
    device="cpu",
    coder_k: int | None = None,
    coder_shots: int | None = None,
    **loader_kw,
) -> dict:
    """top1/top5, mean per-class recall, per-class top-1, and optionally the CODER accuracies.

    With `coder_k`, images are also classified by their cross-modal neighbour features (see
    clipscale.eval.coder): `coder_top1` beside `top1`; with `coder_shots` too, the first that
    many images of each class are the few-shot support and the rest are scored both ways.
    """
    if coder_shots is not None and coder_k is None:
        raise ValueError(
            "coder_shots needs coder_k (the number of neighbour texts), got coder_k=None"
        )
    this_rank, num_ranks = rank(), world_size()
    num_classes = len(info.classnames)
    bank = template_embeddings(model, tokenizer, info.classnames, info.templates, device)
    classifier = F.normalize(bank.mean(dim=1), dim=-1).T  # [D, C]
    text_bank = bank.flatten(0, 1)  # [C*T, D]
    bank_class = torch.arange(num_classes, device=device).repeat_interleave(bank.shape[1])
    counts = torch.zeros(4, num_classes, dtype=torch.long)  # rows: samples, top1, top5, coder
    nonfinite_images = torch.zeros(1, dtype=torch.long)  # summed over ranks below
    kept = []
    loader = eval_loader(
        info.sources,
        transform,
        False,
        batch_size,
        rank=this_rank,
        world_size=num_ranks,
        **loader_kw,
    )
    for indices, images, targets in loader:
        targets = torch.tensor(targets)
        _check_targets(targets, num_classes, info.name)
        image_features = F.normalize(model.encode_image(images.to(device)), dim=-1).cpu()
        nonfinite_images += nonfinite_rows(image_features)
        logits = image_features @ classifier.cpu()  # [B, C]
        rows = [torch.ones_like(targets, dtype=torch.bool)]
        rows += [topk_correct(logits, targets, 1), topk_correct(logits, targets, 5)]
        if coder_k is not None:
            coder_logits = neighbour_zeroshot_logits(
                image_features, text_bank.cpu(), bank_class.cpu(), num_classes, coder_k
            )
            rows.append(topk_correct(coder_logits, targets, 1))
        for row, correct in enumerate(rows):
            counts[row].index_add_(0, targets, correct.long())
        if coder_shots is not None:
            kept.append(torch.cat([indices[:, None], targets[:, None], image_features], dim=1))
    counts = all_reduce_sum(counts)
    nonfinite_images = int(all_reduce_sum(nonfinite_images).item())
    nonfinite_prompts = nonfinite_rows(bank.flatten(0, 1))  # the same on every rank
    if counts[0].sum() == 0:
        raise ValueError(f"zero-shot dataset {str(info.root)!r} has no samples")
    top1 = accuracy_from_counts(counts[0], counts[1], info.classnames)
    metrics = {
        "top1": top1["accuracy"],
        # with fewer than 5 classes every target is in the top 5: top5 is then 1.0
        "top5": (counts[2].sum().double() / counts[0].sum()).item(),
        "mean_per_class_recall": top1["mean_per_class"],
        "num_samples": int(counts[0].sum()),
        "per_class_top1": top1["per_class"],
        # feature rows with NaN/inf (images + prompts); their samples were scored as misses
        "nonfinite_features": nonfinite_images + nonfinite_prompts,
        "nonfinite_image_features": nonfinite_images,
        "nonfinite_text_features": nonfinite_prompts,
        "skipped_samples": loader.skipped_samples(),  # unreadable samples, left out
    }
    if this_rank == 0:
        warn_nonfinite(info.name, nonfinite_images, nonfinite_prompts)
    if coder_k is not None:
        metrics["coder_top1"] = (counts[3].sum().double() / counts[0].sum()).item()
    if coder_shots is not None:
        metrics.update(
            _fewshot(
                kept,
                classifier.cpu(),
                text_bank.cpu(),
                bank_class.cpu(),
                num_classes,
                coder_k,
                coder_shots,
            )
        )
    return metrics


def _fewshot(kept, classifier, text_bank, bank_class, num_classes, coder_k, shots) -> dict:
    width = classifier.shape[0] + 2
    rows = torch.cat(kept) if kept else torch.zeros(0, width)
    rows = all_gather_rows(rows)
    rows = rows[rows[:, 0].argsort()]  # dataset order, the same on every rank
    targets, image_features = rows[:, 1].long(), rows[:, 2:]
    support, query = split_support_query(targets, shots, num_classes)
    fewshot_logits = neighbour_fewshot_logits(
        image_features[support],
        targets[support],
        image_features[query],
        text_bank,
        num_classes,
        coder_k,
    )
    plain_logits = image_features[query] @ classifier
    return {
        "coder_fewshot_top1": topk_correct(fewshot_logits, targets[query], 1)
        .double()
        .mean()
        .item(),
        "fewshot_query_top1": topk_correct(plain_logits, targets[query], 1).double().mean().item(),
        "fewshot_shots": shots,
    }
