"""CLIPModule: one open_clip model, trained with a contrastive loss over the global batch.

Manual optimisation, because one optimizer step may hold several backward passes (gradient
caching). Per step: encode the per-rank batch, all-gather the embeddings inside the loss, backward,
(with grad caching: one gradient all-reduce for the step), clip, step, clamp the logit scale.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from clipscale.chunking import measure_chunk_size
from clipscale.distributed import all_reduce_gradients
from clipscale.flops import StepFlops, peak_tflops, step_flops
from clipscale.gradcache import (
    cached_backward,
    check_grad_cache,
    encode,
    encode_foils,
    logit_params,
    refuse_batch_norm,
)
from clipscale.guard import NonFiniteGuard, guard_options
from clipscale.metering import StepMeter, is_last_step, is_logging_step
from clipscale.models import build_model, image_preprocess
from clipscale.optim import (
    ContinuableSchedule,
    build_optimizer,
    group_table,
    parameter_groups,
    steps_with_amp_scaling,
    unscale_and_clip,
)
from clipscale.staging import ImageNormalizer, chunk_to_device, split_staged, stages_on_host
from clipscale.towers import keep_locked_in_eval, lock_towers, locked_towers

LAST_LOGGED = ("train/loss", "train/temperature")  # kept in checkpoints for the run summary
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learnable temperature at 1/100


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
            cache_dir=model.get("cache_dir"),
            grad_checkpointing=model.get("grad_checkpointing", False),
            patch_dropout=model.get("patch_dropout"),
            **dict(model.get("kwargs") or {}),
        )
        lock_towers(self.model, model)  # model.lock_image*, model.lock_text* (open_clip's flags)
        self.locked = locked_towers(self.model)  # no trained parameter: eval mode, no graph
        keep_locked_in_eval(self.model, self.locked)  # and in train(), which Lightning may call
        # the weights' image preprocessing (or model.image_*), as the data modules apply it
        self.preprocess = image_preprocess(model)
        rank_zero_info(
            "clipscale: image preprocessing "
            + ", ".join(f"{key} {value}" for key, value in self.preprocess.items())
        )
        # model.compile: one compiled function encodes a chunk (or the whole batch): both towers
        # and the normalisation in one graph, called by both grad-cache passes. It is not a
        # submodule, so checkpoint keys stay those of the open_clip model.
        self._compile = bool(model.get("compile"))
        self._compiled_encode = None  # built on first use (see compiled_encode)
        self.loss_fn = instantiate(loss)
        grad_cache = dict(grad_cache or {})
        check_grad_cache(
            grad_cache.get("chunk_size"),
            grad_cache.get("memory_fraction", 0.8),
            grad_cache.get("stage_on_host", "auto"),
        )
        self.chunk_size = grad_cache.get("chunk_size")  # null, an int, or "auto" until step one
        self.memory_fraction = grad_cache.get("memory_fraction", 0.8)
        self.stage_on_host = grad_cache.get("stage_on_host", "auto")
        if self.chunk_size is not None:
            refuse_batch_norm(self.model, model["name"], self.chunk_size, self.locked)
        self.max_logit_scale = model.get("max_logit_scale", MAX_LOGIT_SCALE)
        self.guard = NonFiniteGuard(**(guard or {}))  # skips NaN/Inf steps (clipscale/guard.py)
        self._restored_last_logged: dict[str, float] = {}  # a checkpoint's LAST_LOGGED values
        self.step_flops: StepFlops | None = None  # per-sample FLOPs, counted in on_train_start
        self.meter = StepMeter()  # samples/s, FLOPs, sample counters (clipscale/metering.py)
        # uint8 images are normalised on the device (clipscale/staging.py)
        self.normalize = ImageNormalizer(self.preprocess["mean"], self.preprocess["std"])

    # --- encoders -------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, texts: torch.Tensor):
        """L2-normalised (image_features [B, D], text_features [B, D]); compiled with model.compile."""
        encoder = self.compiled_encode() or functools.partial(
            encode, self.model, locked=self.locked
        )
        return encoder(images, texts)

    def compiled_encode(self):
        """The compiled chunk encoder with model.compile, else None. Built on first use and left
        out of pickles (ddp_spawn sends the module to its processes; each compiles its own)."""
        if self._compile and self._compiled_encode is None:
            self._compiled_encode = torch.compile(
                functools.partial(encode, self.model, locked=self.locked)
            )
        return self._compiled_encode

    def train(self, mode: bool = True):
        """Set train mode, except for locked towers: they stay in eval mode (as open_clip's
        frozen weights were evaluated: no dropout, fixed BatchNorm statistics)."""
        super().train(mode)
        keep_locked_in_eval(self.model, self.locked)
        return self

    def _apply(self, fn, recurse: bool = True):
        """Move or cast every tensor (nn.Module.to and Lightning's precision plugins come here),
        except that the logit scale and bias keep float32 when the rest is cast to bf16/fp16
        (trainer.precision=bf16-true): AdamW moves them by ~lr per step, far below bf16's
        resolution at their values (ulp 2^-6 at exp(2.66)), so in bf16 they would never train."""
        logits = [
            p for n, p in self.model.named_parameters(recurse=False) if n.startswith("logit_")
        ]
        kept = [p.data for p in logits]
        super()._apply(fn, recurse)
        for param, value in zip(logits, kept, strict=True):
            if param.dtype in (torch.float16, torch.bfloat16) and value.dtype == torch.float32:
                param.data = value.to(param.device)
        return self

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {**state, "_compiled_encode": None}

    def float_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images normalised on their device with the weights' mean and std (the loaders'
        uint8 batches are a quarter of the bytes); float images unchanged."""
        return self.normalize(images)

    def _prepare_chunk(self, images: torch.Tensor, texts: torch.Tensor):
        """A chunk as the encoder takes it: on the model's device, images normalised."""
        return chunk_to_device(images, texts, self.device, self.normalize)

    def stages_on_host(self, device: torch.device) -> bool:
        """grad_cache.stage_on_host for this run: auto means on CUDA with gradient caching."""
        return stages_on_host(self.chunk_size, self.stage_on_host, device)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """With host staging, images and texts stay in host memory (pinned on CUDA, so each
        chunk's copy is asynchronous); everything else moves as usual."""
        if not (isinstance(batch, dict) and self.stages_on_host(device)):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        staged, rest = split_staged(batch, device)
        return {**super().transfer_batch_to_device(rest, device, dataloader_idx), **staged}

    # --- the step -------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Count the FLOPs per sample of the trained architecture; start a throughput interval."""
        self.step_flops = step_flops(
            self._architecture_on_meta(),
            grad_checkpointing=bool(self.hparams.model.get("grad_checkpointing")),
            grad_cache=self.chunk_size is not None,
            locked=self.locked,
        )
        self.meter.start(self.step_flops, peak_tflops(self.device))
        self._continue_schedule()

    def _continue_schedule(self) -> None:
        """A resume that plans another total keeps the checkpoint's rates up to the resume step,
        then decays from the rate reached there over the new remaining steps (no jump)."""
        scheduler = self.lr_schedulers()
        schedule = scheduler.lr_lambdas[0]
        old_end, step = schedule.end_step, scheduler.last_epoch
        if not schedule.continue_to(step, int(self.trainer.estimated_stepping_batches)):
            return  # the optimizer's restored rate is the new schedule's at `step`: no jump
        rank_zero_info(
            f"clipscale: learning-rate schedule continued at step {step}: lr "
            f"{scheduler.optimizer.param_groups[0]['lr']:.4g}, decaying to "
            f"{schedule.min_lr_ratio:g} x base by step {schedule.end_step} (the checkpoint's "
            f"schedule ended at step {old_end})"
        )

    def _architecture_on_meta(self) -> torch.nn.Module:
        """The trained architecture with meta tensors (shapes only, nothing allocated): FLOPs are
        counted on it, so the trained model, wrapped or sharded by a strategy, stays untouched."""
        model = self.hparams.model
        with torch.device("meta"):
            architecture = build_model(
                model["name"],
                patch_dropout=model.get("patch_dropout"),
                device="meta",
                **dict(model.get("kwargs") or {}),
            )
        lock_towers(architecture, model)  # the counts skip the backward of locked parameters
        return architecture

    def _auto_chunk_size(self, images: torch.Tensor, texts: torch.Tensor) -> int:
        """grad_cache.chunk_size=auto, resolved on the first batch (clipscale/chunking.py)."""
        chunk, how = measure_chunk_size(
            self.model, self._prepare_chunk, images, texts, self.memory_fraction, self.device
        )
        rank_zero_info(
            f"clipscale: grad_cache.chunk_size=auto chose {chunk} of a {images.shape[0]}-sample "
            f"per-rank batch ({how})"
        )
        return chunk

    def _without_ddp_gradient_sync(self) -> None:
        """Gradient caching all-reduces the gradients once per step (all_reduce_gradients), so DDP
        must not after each backward. Lightning turns DDP's sync back on after every
        training_step, so this runs at every step, not once."""
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimizer step on this rank's part of the global contrastive batch."""
        images, texts = batch["images"], batch["texts"]  # [B, 3, H, W] (uint8 or float), [B, L]
        self.meter.start_clock(self.device)  # the first step starts the throughput clock
        if self.chunk_size == "auto":
            self.chunk_size = self._auto_chunk_size(images, texts)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)

        # Hard-negative captions (data.hard_negatives): tokens [B, F, L] and a mask [B, F].
        foils = (batch["foil_texts"], batch["foil_mask"]) if "foil_texts" in batch else None
        if self.chunk_size is None:
            extra = {}
            if foils is not None:
                extra["foils"] = (encode_foils(self.model, foils[0], self.locked), foils[1])
            embeddings = self.encode(self.float_images(images), texts)
            loss = self.loss_fn(*embeddings, *logit_params(self.model), **extra)
            self.manual_backward(loss)  # DDP averages the gradients here
            loss = loss.detach()
        else:
            self._without_ddp_gradient_sync()
            loss = cached_backward(
                self.model,
                images,
                texts,
                self.loss_fn,
                self.chunk_size,
                self.manual_backward,
                foils=foils,
                encode_fn=self.compiled_encode(),
                prepare=self._prepare_chunk,  # host-staged chunks are copied here, in both passes
                pad_last_chunk=self._compile,  # a compiled encoder sees one chunk shape only
                locked=self.locked,  # encoded once, in the first pass
            )
            all_reduce_gradients(self.parameters())

        step_lr = optimizer.param_groups[0]["lr"]  # the rate this update uses, logged below
        # optimizer.step() (clipping happens in on_before_optimizer_step, after fp16 unscaling) and
        # scheduler.step(), unless the loss or a gradient is NaN/Inf on some rank.
        options = guard_options(self.trainer)
        stepped = self.guard.step(
            loss,
            optimizer,
            scheduler,
            self.global_step,
            check=is_logging_step(self.trainer),  # the device path reads its counters only then
            **options,
        )
        if stepped:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, self.max_logit_scale)
        self.log(
            "train/skipped_steps", self.guard.skipped_steps, rank_zero_only=True
        )  # no host sync
        if options["loss_only"]:  # 16-mixed: the GradScaler's own skips
            self.log(
                "train/scaler_overflow_steps", self.guard.scaler_overflow_steps, rank_zero_only=True
            )

        self._log_step(loss, batch, step_lr)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Run-long counters survive a resume: skipped steps (the guard, all ranks agree) and the
        skipped samples as of the last logging step (no collective here: rank 0 alone may save)."""
        checkpoint["clipscale_counters"] = {
            "guard": self.guard.state_dict(),
            "skipped_samples": self.meter.skipped_total,
        }
        if isinstance(self.chunk_size, int):  # the gradient-caching chunk the run trains with
            checkpoint["clipscale_grad_cache_chunk_size"] = self.chunk_size
        checkpoint["clipscale_last_logged"] = self.last_logged_metrics()
        checkpoint["clipscale_preprocess"] = self.preprocess  # what evaluate applies to its images

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what on_save_checkpoint wrote (absent in checkpoints of older versions)."""
        counters = checkpoint.get("clipscale_counters")
        if counters:
            self.guard.load_state_dict(counters["guard"])
            self.meter.skipped_total = int(counters["skipped_samples"])
        self._reuse_chunk_size(checkpoint.get("clipscale_grad_cache_chunk_size"))
        self._restored_last_logged = checkpoint.get("clipscale_last_logged", {})

    def last_logged_metrics(self) -> dict[str, float]:
        """LAST_LOGGED as last logged on rank 0: by this run, else by the run it resumed (a
        checkpoint at max_steps resumes without a step, e.g. to finish its final validation)."""
        logged = self.trainer.callback_metrics
        current = {key: float(logged[key]) for key in LAST_LOGGED if key in logged}
        return current or dict(self._restored_last_logged)

    def _reuse_chunk_size(self, chunk_size: int | None) -> None:
        """grad_cache.chunk_size=auto continues with the chunk of the run it resumes. Measured
        again, the peak would include the loaded AdamW moments (on CUDA it is the absolute peak),
        could pick a smaller chunk and the resumed run would no longer be bit-identical."""
        if self.chunk_size != "auto" or chunk_size is None:
            return
        self.chunk_size = int(chunk_size)
        rank_zero_info(
            f"clipscale: grad_cache.chunk_size=auto reuses the chunk of {chunk_size} that the "
            "resumed run chose (kept in its checkpoint, not measured again)"
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the global norm of the true gradients. Lightning calls this inside
        `optimizer.step()`, after a 16-mixed loss scaler has unscaled the gradients, except for an
        optimizer that unscales inside its own step (fused AdamW, the CUDA default): Lightning
        refuses to clip those, so they are unscaled and clipped here (optim.unscale_and_clip)."""
        grad_clip = self.hparams.optim.get("grad_clip_norm")
        if not grad_clip:
            return
        precision = self.trainer.precision_plugin
        scaler = precision.scaler if isinstance(precision, MixedPrecision) else None
        if scaler is not None and steps_with_amp_scaling(optimizer):
            unscale_and_clip(optimizer, scaler, grad_clip)
        else:
            self.clip_gradients(
                optimizer, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm"
            )

    def _log_step(self, loss: torch.Tensor, batch: dict, lr: float) -> None:
        """Count this step; at a logging step (is_logging_step) read and log the metrics."""
        self.meter.count(batch)
        if not is_logging_step(self.trainer):
            return
        logit_scale = self.model.logit_scale.detach().exp()
        metrics = {
            "train/loss": loss,
            "train/logit_scale": logit_scale,
            "train/temperature": 1.0 / logit_scale,
            "train/lr": torch.tensor(lr),
            **self.meter.read(batch, self.device),
        }
        if isinstance(self.chunk_size, int):
            metrics["train/grad_cache_chunk_size"] = torch.tensor(float(self.chunk_size))
        self.log_dict(metrics, prog_bar=False, rank_zero_only=True)
        self.log("loss", loss, prog_bar=True, logger=False, rank_zero_only=True)
        if is_last_step(self.trainer):
            # Lightning sends logged values to the loggers every log_every_n_steps batches or when
            # training stops: say that it stops here, so the last step's metrics are written too.
            self.trainer.should_stop = True

    # --- optimisers -----------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW (or the configured optimizer) over CLIP's parameter groups; warmup then cosine."""
        optim = self.hparams.optim
        # optim.optimizer.fused: auto -> fused AdamW when the parameters are on CUDA (resolved
        # here: Lightning has moved the model to its device before configure_optimizers).
        groups = parameter_groups(
            self.model,
            optim["optimizer"].get("weight_decay", 0.0),
            image_lr_scale=optim.get("image_lr_scale", 1.0),
            text_lr_scale=optim.get("text_lr_scale", 1.0),
            layer_decay=optim.get("layer_decay"),
        )
        optimizer = build_optimizer(optim["optimizer"], groups)
        rank_zero_info(group_table(optimizer, self.locked))
        total_steps = int(self.trainer.estimated_stepping_batches)
        schedule = ContinuableSchedule(
            optim["warmup_steps"], total_steps, optim.get("min_lr_ratio", 0.0)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
