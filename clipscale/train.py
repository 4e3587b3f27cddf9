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

import json
import subprocess
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from clipscale.config import validate_config
from clipscale.module import CLIPModule
from clipscale.preemption import wandb_resume_kwargs

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
    )


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    """Lightning Trainer with the configured callbacks and loggers (a requeued run keeps its wandb id)."""
    # A callback set to null in an override (e.g. by debug/) is left out.
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [
        instantiate(c, **wandb_resume_kwargs(c, output_dir))
        for c in (cfg.get("logger") or {}).values()
    ]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def log_run_facts(cfg: DictConfig, trainer: L.Trainer, output_dir: Path) -> dict:
    """Derived values (global batch, ranks, git SHA) printed on rank 0 and given to the loggers."""
    facts = {
        "world_size": trainer.world_size,
        "per_rank_batch": cfg.data.batch_size,
        "global_batch": cfg.data.batch_size * trainer.world_size,
        "grad_cache_chunk": cfg.grad_cache.chunk_size,
        "git_sha": git_sha(),
        "output_dir": str(output_dir),
    }
    rank_zero_info(
        f"clipscale: global batch {facts['global_batch']} = {facts['per_rank_batch']} per rank × "
        f"{facts['world_size']} ranks; grad-cache chunk {facts['grad_cache_chunk']}; "
        f"git {facts['git_sha']}; run dir {output_dir}"
    )
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run": facts})
    return facts


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
    validate_config(cfg)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer = build_trainer(cfg, output_dir)
    facts = log_run_facts(cfg, trainer, output_dir)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    last_ckpt = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last_ckpt)

    summary = {
        **facts,
        "steps": trainer.global_step,
        "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "temperature": float(trainer.callback_metrics.get("train/temperature", float("nan"))),
        "checkpoint": str(last_ckpt),
    }
    if cfg.eval.demo_zeroshot and hasattr(datamodule, "classnames") and trainer.is_global_zero:
        summary["zeroshot_top1"] = demo_zeroshot_accuracy(module, datamodule)
        summary["zeroshot_chance"] = 1 / len(datamodule.classnames)
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, trainer)
    return summary


def print_summary(summary: dict, trainer: L.Trainer) -> None:
    """Where everything is, and the numbers a user looks at first."""
    lines = [
        f"run dir     {summary['output_dir']}",
        f"checkpoint  {summary['checkpoint']}",
        f"config      {Path(summary['output_dir']) / '.hydra' / 'config.yaml'}",
        f"summary     {Path(summary['output_dir']) / 'summary.json'}",
    ]
    lines += [f"logs        {logger.log_dir or logger.save_dir}" for logger in trainer.loggers]
    lines.append(
        f"steps {summary['steps']}  global batch {summary['global_batch']}  "
        f"loss {summary['loss']:.4f}  temperature {summary['temperature']:.4f}"
    )
    if "zeroshot_top1" in summary:
        lines.append(
            f"held-out zero-shot top-1 {summary['zeroshot_top1']:.3f} "
            f"(chance {summary['zeroshot_chance']:.3f})"
        )
    print("\n".join(["", "clipscale run finished", *lines]), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    train(cfg)


if __name__ == "__main__":
    main()
