"""CLIPModule: one open_clip model, trained with a contrastive loss over the global batch.

Manual optimisation, because one optimizer step may hold several backward passes (gradient
caching). Per step: encode the per-rank batch, all-gather the embeddings inside the loss, backward,
(with grad caching: one gradient all-reduce for the step), clip, step, clamp the logit scale.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from hydra.utils import instantiate
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from clipscale.config import ConfigError
from clipscale.distributed import all_reduce_gradients, all_reduce_sum, world_size
from clipscale.flops import forward_flops_per_sample, peak_tflops, train_flops_per_sample
from clipscale.gradcache import cached_backward, encode, encode_foils, logit_params
from clipscale.guard import NonFiniteGuard, guard_options
from clipscale.models import build_model, normalize_images
from clipscale.optim import parameter_groups, warmup_cosine

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learnable temperature at 1/100


def refuse_batch_norm(model: torch.nn.Module, model_name: str, chunk_size) -> None:
    """Gradient caching is exact only for per-sample layers: BatchNorm normalises each chunk with
    that chunk's statistics (not the batch's) and updates its running statistics in both passes."""
    layer = next((m for m in model.modules() if isinstance(m, _BatchNorm)), None)
    if layer is not None:
        raise ConfigError(
            f"grad_cache.chunk_size={chunk_size} cannot be exact for model.name={model_name}: it "
            f"has {type(layer).__name__} layers, which normalise each chunk with its own "
            "statistics. Use grad_cache.chunk_size=null (loss.chunk_size still bounds the loss "
            "memory), or a model without BatchNorm (e.g. a ViT)"
        )


class CLIPModule(L.LightningModule):
    """LightningModule around an open_clip CLIP model (see module docstring for the step)."""

    def __init__(
        self,
        model: dict,
        loss: dict,
        optim: dict,
        grad_cache: dict | None = None,
        guard: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = build_model(
            model["name"],
            pretrained=model.get("pretrained"),
            grad_checkpointing=model.get("grad_checkpointing", False),
            patch_dropout=model.get("patch_dropout"),
            **dict(model.get("kwargs") or {}),
        )
        if model.get("compile"):
            # In place (nn.Module.compile), so checkpoint keys stay those of the open_clip model.
            self.model.visual.compile()
            self.model.transformer.compile()
        self.loss_fn = instantiate(loss)
        self.chunk_size = (grad_cache or {}).get("chunk_size")
        if self.chunk_size is not None:
            refuse_batch_norm(self.model, model["name"], self.chunk_size)
        self.max_logit_scale = model.get("max_logit_scale", MAX_LOGIT_SCALE)
        self.guard = NonFiniteGuard(**(guard or {}))  # skips NaN/Inf steps (clipscale/guard.py)
        self._last_step_start: float | None = None
        self._skipped_total = 0
        self._flops_per_sample = 0.0
        self._peak_tflops: float | None = None

    # --- encoders -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, texts: torch.Tensor):
        """L2-normalised (image_features [B, D], text_features [B, D])."""
        return encode(self.model, images, texts)

    def float_images(self, images: torch.Tensor) -> torch.Tensor:
        """Loaders may send uint8 images (4× less to copy); normalise them here, on the device."""
        if images.dtype != torch.uint8:
            return images
        cfg = self.model.visual.preprocess_cfg
        return normalize_images(images, cfg["mean"], cfg["std"])

    # --- the step -------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """With grad caching, DDP must not all-reduce after every backward: we do it once per step."""
        wrapped = self.trainer.strategy.model
        if self.chunk_size is not None and isinstance(wrapped, DistributedDataParallel):
            wrapped.require_backward_grad_sync = False
        image_size = self.model.visual.image_size  # an int (ResNet) or (height, width) (ViT)
        forward = forward_flops_per_sample(
            self.model,
            image_size if isinstance(image_size, int) else image_size[0],
            self.model.context_length,
            self.device,
        )
        self._flops_per_sample = train_flops_per_sample(forward, self.chunk_size is not None)
        self._peak_tflops = peak_tflops(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimizer step on this rank's part of the global contrastive batch."""
        images, texts = self.float_images(batch["images"]), batch["texts"]  # [B, 3, H, W], [B, L]
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)

        # Hard-negative captions (data.hard_negatives): tokens [B, F, L] and a mask [B, F].
        foils = (batch["foil_texts"], batch["foil_mask"]) if "foil_texts" in batch else None
        if self.chunk_size is None:
            extra = (
                {} if foils is None else {"foils": (encode_foils(self.model, foils[0]), foils[1])}
            )
            loss = self.loss_fn(*self.encode(images, texts), *logit_params(self.model), **extra)
            self.manual_backward(loss)  # DDP averages the gradients here
            loss = loss.detach()
        else:
            loss = cached_backward(
                self.model,
                images,
                texts,
                self.loss_fn,
                self.chunk_size,
                self.manual_backward,
                foils=foils,
            )
            all_reduce_gradients(self.parameters())

        step_lr = optimizer.param_groups[0]["lr"]  # the rate this update uses, logged below
        # optimizer.step() (clipping happens in on_before_optimizer_step, after fp16 unscaling) and
        # scheduler.step(), unless the loss or a gradient is NaN/Inf on some rank.
        stepped = self.guard.step(
            loss, optimizer, scheduler, self.global_step, **guard_options(self.trainer)
        )
        if stepped:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, self.max_logit_scale)
        self.log("train/skipped_steps", self.guard.skipped_steps, rank_zero_only=True)  # no host sync

        self._log_step(loss, batch, step_lr)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the global gradient norm. Lightning calls this inside `optimizer.step()`, after a
        16-mixed loss scaler has unscaled the gradients, so the bound applies to the true gradients."""
        grad_clip = self.hparams.optim.get("grad_clip_norm")
        if grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm"
            )

    def _log_step(self, loss: torch.Tensor, batch: dict, lr: float) -> None:
        global_batch = batch["images"].shape[0] * world_size()
        logit_scale = self.model.logit_scale.detach().exp()
        metrics = {
            "train/loss": loss,
            "train/logit_scale": logit_scale,
            "train/temperature": 1.0 / logit_scale,
            "train/lr": torch.tensor(lr),
            "train/global_batch_size": torch.tensor(float(global_batch)),
        }
        now = time.perf_counter()
        if self._last_step_start is not None:
            samples_per_second = global_batch / (now - self._last_step_start)
            # Achieved model TFLOP/s per device, and its fraction of the device's bf16 peak.
            tflops = samples_per_second * self._flops_per_sample / world_size() / 1e12
            metrics["train/samples_per_second"] = torch.tensor(samples_per_second)
            metrics["train/tflops_per_device"] = torch.tensor(tflops)
            if self._peak_tflops:
                metrics["train/mfu"] = torch.tensor(tflops / self._peak_tflops)
        self._last_step_start = now
        if "skipped" in batch:
            local = sum(int(count) for count in batch["skipped"].values())
            self._skipped_total += int(all_reduce_sum(torch.tensor(local, device=self.device)))
            metrics["train/skipped_samples"] = torch.tensor(float(self._skipped_total))
        if "cpu_decoded_samples" in batch:  # data.decode=device (clipscale/data/decode.py)
            metrics["train/cpu_decoded_samples"] = self._cpu_decoded(batch["cpu_decoded_samples"])
        self.log_dict(metrics, prog_bar=False, rank_zero_only=True)
        self.log("loss", loss, prog_bar=True, logger=False, rank_zero_only=True)

    def _cpu_decoded(self, count: int) -> torch.Tensor:
        """Images decoded by the CPU fallback over all ranks: summed once per logging interval.

        The count is a host int, so adding it costs no device sync; the all-reduce runs only
        every `log_every_n_steps` steps (the value logged in between is the last sum).
        """
        self._cpu_local = getattr(self, "_cpu_local", 0) + int(count)
        self._cpu_steps = getattr(self, "_cpu_steps", 0) + 1
        interval = getattr(self._trainer, "log_every_n_steps", 1) or 1
        if self._cpu_steps % interval == 1 % interval:
            local = torch.tensor(self._cpu_local, device=self.device)
            self._cpu_total = getattr(self, "_cpu_total", 0) + int(all_reduce_sum(local))
            self._cpu_local = 0
        return torch.tensor(float(self._cpu_total))

    # --- optimisers -----------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW (or the configured optimizer) over CLIP's parameter groups; warmup then cosine."""
        optim = self.hparams.optim
        optimizer = instantiate(optim["optimizer"])(
            parameter_groups(self.model, optim["optimizer"].get("weight_decay", 0.0))
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(optim["warmup_steps"], total_steps, optim.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
