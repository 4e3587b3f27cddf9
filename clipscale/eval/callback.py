"""Validation during training: zero-shot, retrieval, contrastive loss and geometry under `val/`.

Runs on every rank: each encodes its share of every dataset, counts and features are reduced or
gathered (clipscale.eval.datasets), so the logged numbers equal a single process's. The held-out
image-caption set is `val_shards` (training-format shards) or, without them, the data module's
`val_dataloader()`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader, IterableDataset, Subset

from clipscale.data.decode import DeviceTransform
from clipscale.data.probe import resolve_probe_dirs
from clipscale.distributed import all_gather_rows, rank, world_size
from clipscale.eval.compositional import evaluate_compositional, read_probe
from clipscale.eval.datasets import expand_shard_pattern, read_dataset_info
from clipscale.eval.retrieval import (
    evaluate_retrieval,
    score_image_caption_set,
)
from clipscale.eval.zeroshot import (
    evaluate_zeroshot,
    topk_correct,
    zeroshot_classifier,
    zeroshot_dataset_info,
)
from clipscale.models import build_tokenizer, build_transforms


def _scalars(prefix: str, metrics: dict) -> dict[str, float]:
    # loggers take numbers only: per-class dictionaries stay in metrics.json (evaluate CLI)
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def format_validation(step: int, metrics: dict[str, float]) -> str:
    """`validation at step N:`, then a line per dataset (the logged names' common prefix) with
    its metrics rounded to 4 digits: `  val/zeroshot/NAME: {'top1': ..., 'top5': ...}`."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        group, name = key.rsplit("/", 1)
        groups.setdefault(group, {})[name] = round(value, 4)
    lines = [f"  {group}: {values}" for group, values in groups.items()]
    return "\n".join([f"validation at step {step}:", *lines])


def _datamodule_share(loader: DataLoader, num_workers: int):
    """(dataset indices [B], batch) of this rank's share of a data module's validation loader."""
    this_rank, num_ranks = rank(), world_size()
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset):
        # map-style: this rank loads only its indices rank, rank + P, ...
        indices = list(range(this_rank, len(dataset), num_ranks))
        share = DataLoader(
            Subset(dataset, indices),
            batch_size=loader.batch_size,
            num_workers=num_workers,
            collate_fn=loader.collate_fn,
        )
        start = 0
        for batch in share:
            size = batch["images"].shape[0]
            yield torch.tensor(indices[start : start + size]), batch
            start += size
        return
    if getattr(dataset, "world_size", 1) == num_ranks > 1:
        # a stream already split over ranks (WebDataModule's): keep every batch; number the
        # samples rank-interleaved so the indices stay unique over ranks
        seen = 0
        for batch in loader:
            size = batch["images"].shape[0]
            yield (torch.arange(seen, seen + size)) * num_ranks + this_rank, batch
            seen += size
        return
    # iterable (e.g. a webdataset stream): every rank reads the stream, keeps every P-th batch
    offset = 0
    for number, batch in enumerate(loader):
        size = batch["images"].shape[0]
        if number % num_ranks == this_rank:
            yield torch.arange(offset, offset + size), batch
        offset += size


@contextlib.contextmanager
def full_parameters(trainer, model: torch.nn.Module):
    """While validating, make `model`'s parameters whole under a sharded strategy.

    The encoders are called directly (model.encode_image), not through the strategy's wrapped
    forward, so whatever that forward would gather must be gathered here. FSDP: the root unit's own
    parameters (patch and token embeddings, projections, final norms, logit scale) are gathered
    for the duration; each wrapped transformer block still gathers its own in its forward, one at a
    time, so memory stays at one block beyond the root. DeepSpeed ZeRO-3: the CLIP module's own
    parameters (positional embedding, text projection, logit scale), which code reads as
    attributes and no forward hook fetches, are gathered on every rank (read-only); submodules
    fetch theirs in their forward hooks. DDP, single device and ZeRO-1/2 hold whole parameters.
    """
    wrapped = getattr(trainer.strategy, "model", None)
    if isinstance(wrapped, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, recurse=False):
            yield
    elif getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        own = list(model.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            yield
    else:
        yield


def _val_loader(datamodule):
    """The data module's validation DataLoader, or None (no data module, or no held-out data)."""
    if datamodule is None or not hasattr(datamodule, "val_dataloader"):
        return None
    loader = datamodule.val_dataloader()
    return loader if isinstance(loader, DataLoader) else None


class ValidationCallback(Callback):
    """Evaluate every `every_n_steps` optimizer steps (and after the last) and log under `val/`.

    Args:
        every_n_steps: steps between evaluations; None or 0 turns the callback off.
        zeroshot: clip_benchmark-layout classification folders, logged `val/zeroshot/NAME/...`.
        retrieval: clip_benchmark-layout retrieval folders, logged `val/retrieval/NAME/...`.
        compositional: probe folders (probe.jsonl + images), logged
            `val/compositional/NAME/<type>` (and `overall`, chance levels, sample counts).
        val_shards: held-out training-format shards (jpg/png/webp + txt): a brace pattern,
            `a::b`, or a list of those, as `data.val_shards` takes them; None uses the data
            module's val_dataloader() when it has one.
        batch_size: images per encoder call.
        num_workers: loader processes per rank.
        max_samples: evaluate at most this many samples of each dataset (None = all).
        loss_block_size: pairs per block of the validation contrastive loss; None = the global
            training batch (data module batch size × ranks), so it tracks `train/loss`.
    """

    def __init__(
        self,
        every_n_steps: int | None,
        zeroshot: list[str] | tuple = (),
        retrieval: list[str] | tuple = (),
        compositional: list[str] | tuple = (),
        val_shards: str | list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        max_samples: int | None = None,
        loss_block_size: int | None = None,
    ):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 0):
            raise ValueError(
                f"eval.every_n_steps must be a positive integer or null, got {every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps or 0
        # read metadata now so a wrong folder fails at start-up, not after hours of training
        # a zero-shot entry is a folder or imagenet:DIR
        self.zeroshot = [zeroshot_dataset_info(entry) for entry in zeroshot or ()]
        self.retrieval = [read_dataset_info(root) for root in retrieval or ()]
        for info in self.zeroshot + self.retrieval:
            expected = "classification" if info in self.zeroshot else "retrieval"
            if info.dataset_type != expected:
                raise ValueError(
                    f"{str(info.root)!r} is a {info.dataset_type} dataset, listed as {expected}"
                )
        self.compositional = resolve_probe_dirs(compositional)
        for root in self.compositional:
            read_probe(root)  # a bad line fails at start-up
        self.val_shards = (
            expand_shard_pattern(val_shards, "data.val_shards") if val_shards else None
        )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_samples, self.loss_block_size = max_samples, loss_block_size
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Evaluate when the optimizer step count reaches a multiple of `every_n_steps`."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        """Evaluate the final weights too, unless the last step was just evaluated."""
        if self.every_n_steps and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer, pl_module) -> dict[str, float]:
        """Evaluate on all ranks, log to every logger (rank 0 writes), remember the numbers."""
        self._last_step = trainer.global_step
        datamodule = getattr(trainer, "datamodule", None)
        with full_parameters(trainer, pl_module.model):  # FSDP/ZeRO-3: gather what is sharded
            metrics = self.compute(pl_module.model, pl_module.hparams.model["name"], datamodule)
        if not metrics:  # nothing configured to validate on: no line, no empty log entry
            return metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append((trainer.global_step, metrics))
        rank_zero_info(format_validation(trainer.global_step, metrics))
        return metrics

    @torch.no_grad()
    def compute(self, model, model_name: str, datamodule=None) -> dict[str, float]:
        """All validation metrics of `model` as a flat {`val/...`: number} dict (same on all ranks)."""
        was_training = model.training
        model.eval()
        try:
            return self._compute(model, model_name, datamodule)
        finally:
            model.train(was_training)

    def _compute(self, model, model_name, datamodule) -> dict[str, float]:
        device = next(model.parameters()).device
        # the training data's mean/std/interpolation/resize mode (those of the model's weights)
        preprocess = getattr(datamodule, "preprocess", None)
        tokenizer = build_tokenizer(model_name)
        transform = build_transforms(model_name, False, preprocess=preprocess)
        if getattr(datamodule, "decode_mode", lambda: "worker")() == "device":
            transform = DeviceTransform(transform, device)  # data.decode=device's decoder
        loader_kw = {"num_workers": self.num_workers, "max_samples": self.max_samples}
        num_ranks = world_size()
        block = (
            self.loss_block_size or getattr(datamodule, "batch_size", self.batch_size) * num_ranks
        )
        metrics = {}
        for info in self.zeroshot:
            result = evaluate_zeroshot(
                model, tokenizer, transform, info, self.batch_size, device, **loader_kw
            )
            metrics.update(_scalars(f"val/zeroshot/{info.name}/", result))
        for info in self.retrieval:
            result = evaluate_retrieval(
                model, tokenizer, transform, info.shards, self.batch_size, device, **loader_kw
            )
            metrics.update(_scalars(f"val/retrieval/{info.name}/", result))
        for root in self.compositional:
            result = evaluate_compositional(
                model, tokenizer, transform, root, self.batch_size, device, self.max_samples
            )
            metrics.update(_scalars(f"val/compositional/{root.name}/", result))
        if self.val_shards:  # val/skipped_samples counts its unreadable samples
            shards, size = self.val_shards, self.batch_size
            result = evaluate_retrieval(
                model, tokenizer, transform, shards, size, device, block, **loader_kw
            )
            metrics.update(_scalars("val/", result))
        elif isinstance(loader := _val_loader(datamodule), DataLoader):
            metrics.update(
                self._datamodule_metrics(model, tokenizer, datamodule, loader, device, block)
            )
        return metrics

    def _datamodule_metrics(
        self, model, tokenizer, datamodule, loader, device, block
    ) -> dict[str, float]:
        rows = []
        for indices, batch in _datamodule_share(loader, self.num_workers):
            image_features = F.normalize(model.encode_image(batch["images"].to(device)), dim=-1)
            text_features = F.normalize(model.encode_text(batch["texts"].to(device)), dim=-1)
            labels = batch.get("labels", torch.full_like(indices, -1))
            # [B, 2 + 2D]: index, label, image features, text features; one gather for all
            rows.append(
                torch.cat(
                    [
                        indices[:, None].float(),
                        labels[:, None].float().cpu(),
                        image_features.cpu(),
                        text_features.cpu(),
                    ],
                    1,
                )
            )
        rows = all_gather_rows(
            torch.cat(rows) if rows else torch.zeros(0, 2 + 2 * model.text_projection.shape[1])
        )
        rows = rows[rows[:, 0].argsort()]  # dataset order
        if self.max_samples is not None:
            rows = rows[: self.max_samples]
        labels = rows[:, 1].long()
        image_features, text_features = rows[:, 2:].to(device).chunk(2, dim=1)
        pairs = torch.arange(rows.shape[0], device=device)
        scale = model.logit_scale.exp().item()
        metrics = score_image_caption_set(image_features, text_features, pairs, pairs, scale, block)
        if hasattr(datamodule, "classnames") and (labels >= 0).all():
            classifier = zeroshot_classifier(
                model, tokenizer, datamodule.classnames, datamodule.templates, device
            )
            logits = image_features @ classifier  # [N, C]
            metrics["zeroshot_top1"] = (
                topk_correct(logits, labels.to(device), 1).double().mean().item()
            )
        return _scalars("val/", metrics)
