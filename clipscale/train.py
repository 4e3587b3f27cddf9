"""Train a CLIP model: `python -m clipscale.train [+experiment=NAME] [key=value ...]`.

Launch commands (every key is a Hydra override; see configs/):
    # the embedded CPU demo (tiny model, synthetic captioned shapes), a few minutes on 2 cores
    python -m clipscale.train
    # 2 CPU processes, Lightning starts them; global batch = 2 × data.batch_size
    python -m clipscale.train trainer=ddp trainer.accelerator=cpu trainer.devices=2
    # 1 node, 8 GPUs with torchrun
    torchrun --nproc_per_node=8 -m clipscale.train +experiment=vit_b_32_32k trainer=ddp
    # many nodes: scripts/slurm/multi_node.sbatch (one srun task per GPU)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from clipscale.checkpoint_io import AtomicCheckpointIO
from clipscale.checkpoints import check_resumable
from clipscale.cli import (
    UserError,
    check_command_line,
    continue_from_saved_config,
    continues_run,
    hydra_run_dir,
    redacted,
)
from clipscale.config import check_precision_hardware, check_strategy_hardware, validate_config
from clipscale.distributed import all_reduce_sum
from clipscale.errors import known_errors
from clipscale.eval.callback import ValidationCallback
from clipscale.eval.curves import CurvesCallback
from clipscale.module import CLIPModule
from clipscale.preemption import wandb_resume_kwargs
from clipscale.progress import StepProgressBar

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def git_sha() -> str:
    """The commit this code runs from, or 'unknown' outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_module(cfg: DictConfig) -> CLIPModule:
    """The LightningModule from the model/loss/optim/grad_cache groups (plain dicts in hparams)."""
    section = lambda key: OmegaConf.to_container(cfg[key], resolve=True)  # noqa: E731
    return CLIPModule(
        model=section("model"),
        loss=section("loss"),
        optim=section("optim"),
        grad_cache=section("grad_cache"),
        guard=section("guard") if "guard" in cfg else None,
    )


class SeedPerRank(Callback):
    """Reseed every rank with seed + rank once the model exists, as open_clip does: initial weights
    stay identical across ranks while dropout, patch-dropout masks and crops differ between them."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs in every rank's process, spawned ones included, before a resume restores RNG state."""
        L.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


class EpochSizeCheck(Callback):
    """Warn once when an epoch holds fewer samples than one global batch (samples repeat in it)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the data module's epoch size after its setup; compare with the global batch."""
        samples = epoch_samples(trainer.datamodule)
        global_batch = trainer.world_size * trainer.datamodule.batch_size
        if samples is not None and samples < global_batch:
            rank_zero_warn(
                f"the training data has {samples} samples per epoch, fewer than one global batch "
                f"of {global_batch} ({trainer.datamodule.batch_size} per rank x "
                f"{trainer.world_size} ranks): every batch repeats samples"
            )


class FinishRestoredRun(Callback):
    """A checkpoint written at max_steps, before the final validation (a run killed during it),
    restores a finished fit: Lightning then skips the training loop and its on_train_end hooks,
    where the final validation runs. `finish` runs that validation after such a fit."""

    def __init__(self):
        self.trained = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The training loop ran: its on_train_end hooks ran too."""
        self.trained = True

    def finish(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """After fit (all ranks): the final validation and the curves showing it, if skipped."""
        if self.trained:
            return
        module.to(trainer.strategy.root_device)  # Lightning moves the module to the CPU after fit
        for callback in trainer.callbacks:
            if isinstance(callback, ValidationCallback):
                callback.on_train_end(trainer, module)
        for callback in trainer.callbacks:
            if isinstance(callback, CurvesCallback):
                callback.on_fit_end(trainer, module)


def epoch_samples(datamodule) -> int | None:
    """Samples in one training epoch of a clipscale data module, when it knows the number."""
    for owner, name in ((datamodule, "train_samples"), (datamodule, "samples_per_epoch")):
        if getattr(owner, name, None):
            return int(getattr(owner, name))
    stream = getattr(datamodule, "train_stream", None)
    return getattr(stream, "samples_per_epoch", None)


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    """Lightning Trainer with the configured callbacks and loggers (a requeued run keeps its wandb id)."""
    loggers = [
        instantiate(c, **wandb_resume_kwargs(c, output_dir))
        for c in (cfg.get("logger") or {}).values()
    ]
    # A callback set to null in an override (e.g. by debug/) is left out, and so is one that
    # needs a logger when there is none (logger=none).
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks += [SeedPerRank(cfg.seed), EpochSizeCheck(), FinishRestoredRun()]
    if cfg.trainer.get("enable_progress_bar", True):
        # step k/max_steps, continued on resume; it reads the logged values only when they are
        # new, so the bar adds no device synchronisation between logging steps
        every = cfg.trainer.get("log_every_n_steps", 1)
        callbacks.append(StepProgressBar(refresh_rate=every))
    # Every checkpoint file (periodic, last.ckpt, the requeue one) is written atomically.
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )


def log_run_facts(cfg: DictConfig, trainer: L.Trainer, module, output_dir: Path) -> dict:
    """Derived values (global batch, ranks, git SHA) printed on rank 0 and given to the loggers."""
    facts = {
        "parameters": sum(p.numel() for p in module.parameters()),
        "world_size": trainer.world_size,
        "per_rank_batch": cfg.data.batch_size,
        "global_batch": cfg.data.batch_size * trainer.world_size,
        "grad_cache_chunk": cfg.grad_cache.chunk_size,
        "git_sha": git_sha(),
        "output_dir": str(output_dir),
    }
    rank_zero_info(
        f"clipscale: {cfg.model.name} ({facts['parameters'] / 1e6:.1f}M parameters); "
        f"global batch {facts['global_batch']} = {facts['per_rank_batch']} per rank × "
        f"{facts['world_size']} ranks; grad-cache chunk {facts['grad_cache_chunk']}; "
        f"git {facts['git_sha']}; run dir {output_dir}"
    )
    for logger in trainer.loggers:
        # Secrets (keys, tokens, passwords, and values interpolated from such names) stay out.
        logger.log_hyperparams({**redacted(cfg), "run": facts})
    return facts


def preflight(cfg: DictConfig) -> None:
    """Refuse a bad checkpoint, missing shards or a strategy this machine cannot run, before any
    logger or file is created."""
    if cfg.ckpt_path is not None:
        check_resumable(cfg.ckpt_path)  # exists, readable, and a training checkpoint of ours
    check_strategy_hardware(cfg.trainer)  # DeepSpeed/FSDP: CUDA GPUs (and the deepspeed package)
    check_precision_hardware(cfg.trainer)  # 16-mixed: a CUDA GPU (its fp16 loss scaler)
    if str(cfg.data.get("_target_", "")).endswith("WebDataModule"):
        from clipscale.data.shards import check_shards

        try:  # what the data module's setup would refuse, inside every (spawned) rank
            check_shards(
                cfg.data.get("train_shards"),
                cfg.data.get("val_shards"),
                resampled=cfg.data.get("resampled", True),
                samples_per_epoch=cfg.data.get("samples_per_epoch"),
            )
        except (FileNotFoundError, ValueError) as error:
            raise UserError(str(error)) from error


def instantiate_or_explain(node: DictConfig):
    """instantiate(node), with a bad argument value reported as the one-line message it raised."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):
            raise UserError(str(error.__cause__)) from error
        raise


@torch.no_grad()
def demo_zeroshot_accuracy(module: CLIPModule, datamodule) -> float:
    """Top-1 zero-shot accuracy on the data module's held-out split (synthetic demo classes)."""
    from clipscale.eval.zeroshot import topk_correct, zeroshot_classifier, zeroshot_logits
    from clipscale.models import build_tokenizer

    model = module.model.eval()
    tokenizer = build_tokenizer(module.hparams.model["name"])
    classifier = zeroshot_classifier(
        model, tokenizer, datamodule.classnames, datamodule.templates, module.device
    )
    correct = total = 0
    for batch in datamodule.val_dataloader():
        logits = zeroshot_logits(model, classifier, batch["images"].to(module.device))
        correct += int(topk_correct(logits, batch["labels"].to(module.device), 1).sum())
        total += len(batch["labels"])
    model.train()
    return correct / total


def train(cfg: DictConfig) -> dict:
    """Build everything from `cfg`, fit, write last.ckpt, return the run's summary numbers."""
    try:
        validate_config(cfg)
    except ValueError as error:  # ConfigError, or the model registry's bad-name message
        raise UserError(str(error)) from error
    preflight(cfg)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(
        cfg.seed, workers=True, verbose=False
    )  # identical initial weights on all ranks

    datamodule = instantiate_or_explain(cfg.data)
    try:
        module = build_module(cfg)
    except ValueError as error:
        raise UserError(str(error)) from error
    trainer = build_trainer(cfg, output_dir)
    facts = log_run_facts(cfg, trainer, module, output_dir)
    shows_zeroshot = cfg.eval.demo_zeroshot and hasattr(datamodule, "classnames")
    zeroshot_before = None  # a run from pretrained weights also shows where it started
    if shows_zeroshot and cfg.model.pretrained and trainer.is_global_zero:
        zeroshot_before = demo_zeroshot_accuracy(module, datamodule)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    for callback in trainer.callbacks:
        if isinstance(callback, FinishRestoredRun):
            callback.finish(trainer, module)
    last_ckpt = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last_ckpt, weights_only=False)

    last_logged = module.last_logged_metrics()  # this run's, or the checkpoint's when none ran
    summary = {
        **facts,
        "steps": trainer.global_step,
        "loss": last_logged.get("train/loss", float("nan")),
        "temperature": last_logged.get("train/temperature", float("nan")),
        "checkpoint": str(last_ckpt),
        # Ranks other than 0 write no config record (hydra.output_subdir is null there).
        "config": str(output_dir / (HydraConfig.get().output_subdir or ".hydra") / "config.yaml"),
        **skipped_samples(datamodule),
    }
    if shows_zeroshot and trainer.is_global_zero:
        summary["zeroshot_top1"] = demo_zeroshot_accuracy(module, datamodule)
        summary["zeroshot_chance"] = 1 / len(datamodule.classnames)
        if zeroshot_before is not None:
            summary["zeroshot_top1_before"] = zeroshot_before
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, trainer)
    return summary


def skipped_samples(datamodule) -> dict:
    """`skipped_samples_by_kind`: what the loader skipped in this start's batches, all ranks (a
    collective: every rank calls it); empty for data without skips (the synthetic demo)."""
    if not hasattr(datamodule, "skipped_summary"):
        return {}
    counts = datamodule.skipped_summary()
    summed = all_reduce_sum(torch.tensor(list(counts.values())))
    return {"skipped_samples_by_kind": dict(zip(counts, summed.tolist(), strict=True))}


def logger_lines(logger) -> list[str]:
    """Where a logger wrote, as an absolute path; for offline wandb, the command that uploads
    every segment of the run (one per start: a resumed run adds one)."""
    if isinstance(logger, WandbLogger) and logger.experiment.settings.mode == "offline":
        pattern = Path(logger.save_dir).resolve() / "wandb" / f"offline-run-*-{logger.version}"
        segments = len(glob.glob(str(pattern)))
        return [
            f"wandb       wandb sync {pattern}  ({segments} offline segment{'s' * (segments != 1)})"
        ]
    return [f"logs        {Path(logger.log_dir or logger.save_dir).resolve()}"]


def print_summary(summary: dict, trainer: L.Trainer) -> None:
    """Where everything is, and the numbers a user looks at first."""
    lines = [
        f"run dir     {summary['output_dir']}",
        f"checkpoint  {summary['checkpoint']}",
        f"config      {summary['config']}",
        f"summary     {Path(summary['output_dir']) / 'summary.json'}",
    ]
    lines += [line for logger in trainer.loggers for line in logger_lines(logger)]
    lines.append(
        f"steps {summary['steps']}  global batch {summary['global_batch']}  "
        f"loss {summary['loss']:.4f}  temperature {summary['temperature']:.4f}"
    )
    if "zeroshot_top1" in summary:
        before = summary.get("zeroshot_top1_before")
        start = "" if before is None else f"; {before:.3f} before training, from model.pretrained"
        lines.append(
            f"held-out zero-shot top-1 {summary['zeroshot_top1']:.3f} "
            f"(chance {summary['zeroshot_chance']:.3f}{start})"
        )
    skipped = {kind: n for kind, n in summary.get("skipped_samples_by_kind", {}).items() if n}
    if skipped:
        lines.append("skipped samples " + ", ".join(f"{kind} {n}" for kind, n in skipped.items()))
    print("\n".join(["", "clipscale run finished", *lines]), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@known_errors(hydra_run_dir)
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    quiet_known_noise(cfg)
    train(cfg)


def quiet_known_noise(cfg: DictConfig) -> None:
    """Silence, each at its source, Lightning and torch messages that do not apply to clipscale
    runs (wandb's are silenced in preemption.RunWandbLogger)."""
    # Validation runs in clipscale's callback, not in a validation_step.
    warnings.filterwarnings("ignore", message="You passed in a `val_dataloader` but have no")
    if "SLURM_JOB_ID" not in os.environ:  # srun on the PATH of a machine not running a job
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
    # Lightning's own pytree call on a torch that renamed LeafSpec; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    # CLIPModule's transfer_batch_to_device (host staging) is the one meant: no data module has one.
    warnings.filterwarnings(
        "ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`"
    )
    # A checkpoint at step s holds the weights after s updates, as its global_step says and as an
    # exact resume needs; the note asks for the weights before the update instead.
    warnings.filterwarnings(
        "ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps"
    )
    # The data modules restore their stream position themselves (WebDataModule's state dict,
    # preemption.ResumableSampler); Lightning looks for a state dict on the DataLoader only.
    warnings.filterwarnings(
        "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
    )
    # data.num_workers is the user's setting, and an exact resume needs the same one on the next
    # machine; torch's advice counts the cores of this one and repeats it for every loader.
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes")
    if continues_run(cfg.ckpt_path, cfg.paths.output_dir):  # the run's own checkpoints are there
        checkpoints = re.escape(os.path.realpath(Path(cfg.paths.output_dir) / "checkpoints"))
        warnings.filterwarnings("ignore", message=f"Checkpoint directory {checkpoints} exists")


def main() -> None:
    """`python -m clipscale.train`: check the overrides as the shell passed them, then run Hydra."""
    cfg = check_command_line(CONFIG_DIR, "train")
    if cfg is not None and cfg.ckpt_path is not None:  # refused before anything is written
        known_errors()(check_resumable)(cfg.ckpt_path)
    continue_from_saved_config(CONFIG_DIR, "train")
    hydra_main()


if __name__ == "__main__":
    main()
