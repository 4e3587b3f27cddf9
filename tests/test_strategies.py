"""Strategy configs (trainer=default|ddp|deepspeed|fsdp): they compose, build, or refuse clearly.

DeepSpeed and FSDP run on CUDA GPUs only; on a CPU machine the tests check the composed config,
the strategy object where it builds without a GPU, and that the refusal names the problem.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from open_clip.transformer import ResidualAttentionBlock

from clipscale.config import ConfigError, validate_config

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
SHARDED = ("deepspeed", "fsdp")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def compose_train(tmp_path: Path, *overrides: str):
    """The training config with `overrides`, no logger, run dir under `tmp_path`."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train", overrides=["logger=none", f"paths.output_dir={tmp_path}", *overrides]
        )


@pytest.mark.parametrize(
    ("trainer", "strategy_target"),
    [
        ("default", "auto"),
        ("ddp", "lightning.pytorch.strategies.DDPStrategy"),
        ("deepspeed", "lightning.pytorch.strategies.DeepSpeedStrategy"),
        ("fsdp", "lightning.pytorch.strategies.FSDPStrategy"),
    ],
)
def test_strategy_config_composes_with_the_gathered_loss(tmp_path, trainer, strategy_target):
    """Each trainer config composes, passes start-up validation and keeps the all-gather loss."""
    cfg = compose_train(tmp_path, f"trainer={trainer}")
    validate_config(cfg)
    strategy = cfg.trainer.strategy
    assert (strategy if isinstance(strategy, str) else strategy._target_) == strategy_target
    assert cfg.loss.gather is True
    assert cfg.trainer.default_root_dir == str(tmp_path)
    if trainer in SHARDED:
        assert cfg.trainer.precision == "bf16-mixed"


def test_deepspeed_zero_stage_and_offload_are_keys(tmp_path):
    """ZeRO stage and optimizer/parameter offload are plain overrides of trainer.strategy."""
    cfg = compose_train(
        tmp_path,
        "trainer=deepspeed",
        "trainer.strategy.stage=3",
        "trainer.strategy.offload_optimizer=true",
        "trainer.strategy.offload_parameters=true",
        "model.grad_checkpointing=true",
    )
    strategy = cfg.trainer.strategy
    assert (strategy.stage, strategy.offload_optimizer, strategy.offload_parameters) == (3, 1, 1)
    assert cfg.model.grad_checkpointing is True


@pytest.mark.parametrize("trainer", SHARDED)
def test_grad_cache_with_a_sharded_strategy_is_refused_naming_ddp(tmp_path, trainer):
    """Gradient caching reduces gradients itself: with ZeRO/FSDP the run stops and says use ddp."""
    cfg = compose_train(tmp_path, f"trainer={trainer}", "grad_cache.chunk_size=4")
    with pytest.raises(ConfigError, match="ddp"):
        validate_config(cfg)
    validate_config(compose_train(tmp_path, "trainer=ddp", "grad_cache.chunk_size=4"))


@pytest.mark.parametrize(
    ("trainer", "devices", "strategy_type"),
    [("default", 1, SingleDeviceStrategy), ("ddp", 2, DDPStrategy)],
)
def test_cpu_trainer_builds_with_bf16(tmp_path, trainer, devices, strategy_type):
    """default and ddp build a CPU Trainer with bf16 mixed precision (the GPU setting, here on CPU)."""
    cfg = compose_train(
        tmp_path,
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        "trainer.precision=bf16-mixed",
    )
    built = instantiate(cfg.trainer)
    assert isinstance(built.strategy, strategy_type)
    assert built.precision == "bf16-mixed"
    assert built.num_devices == devices


@pytest.mark.skipif(HAS_DEEPSPEED, reason="checks the message shown when deepspeed is missing")
def test_deepspeed_without_the_package_says_how_to_install(tmp_path):
    """Without the optional extra, building the strategy names the package to install."""
    cfg = compose_train(tmp_path, "trainer=deepspeed")
    with pytest.raises(Exception, match="you must have DeepSpeed installed"):
        instantiate(cfg.trainer)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed (clipscale[deepspeed]) is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_deepspeed_on_cpu_is_refused_naming_cuda(tmp_path):
    """With deepspeed installed but no GPU, Lightning refuses the strategy and says CUDA is needed."""
    cfg = compose_train(tmp_path, "trainer=deepspeed", "trainer.accelerator=cpu")
    with pytest.raises(Exception, match="CUDA"):
        built = instantiate(cfg.trainer)
        built.strategy.setup_environment()


def test_fsdp_on_cpu_is_refused_naming_the_gpu_accelerator(tmp_path):
    """Lightning's FSDP strategy needs a GPU accelerator and says so when given the CPU."""
    cfg = compose_train(tmp_path, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1")
    with pytest.raises(Exception, match="requires a GPU accelerator"):
        instantiate(cfg.trainer)


def test_fsdp_wraps_each_transformer_block(tmp_path):
    """The FSDP strategy object builds anywhere; its wrap policy shards per transformer block."""
    cfg = compose_train(tmp_path, "trainer=fsdp")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {ResidualAttentionBlock}
    assert strategy.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trainer", SHARDED)
def test_sharded_trainer_builds_on_gpu(tmp_path, trainer):
    """On a GPU machine the DeepSpeed (if installed) and FSDP Trainers build on one device."""
    if trainer == "deepspeed" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed (clipscale[deepspeed]) is not installed")
    cfg = compose_train(tmp_path, f"trainer={trainer}", "trainer.devices=1")
    built = instantiate(cfg.trainer)
    assert type(built.strategy).__name__.lower().startswith(trainer[:4])


def test_submitit_slurm_launcher_composes_for_a_sweep(tmp_path):
    """The README's sweep: hydra/launcher=submitit_slurm with nodes, tasks and the USR2 warning."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.nodes=1",
                "hydra.launcher.tasks_per_node=8",
                "hydra.launcher.gpus_per_node=8",
                "hydra.launcher.signal_delay_s=120",
                "callbacks.requeue.signal_name=SIGUSR2",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 8, 8)
    assert instantiate(cfg.callbacks.requeue).signum.name == "SIGUSR2"


@pytest.mark.parametrize(("trainer", "devices"), [("default", 1), ("ddp", 2)])
def test_every_run_writes_checkpoints_through_the_atomic_writer(tmp_path, trainer, devices):
    """build_trainer hands AtomicCheckpointIO to the strategy (periodic, last and requeue saves)."""
    from clipscale.checkpoint_io import AtomicCheckpointIO
    from clipscale.train import build_trainer

    cfg = compose_train(
        tmp_path, f"trainer={trainer}", "trainer.accelerator=cpu", f"trainer.devices={devices}"
    )
    built = build_trainer(cfg, tmp_path)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)


def validation_line(output: str) -> dict[str, float]:
    """The metrics, by logged name, of the last `validation at step N:` block a run printed: a
    line `  GROUP: {NAME: value, ...}` per dataset (clipscale.eval.callback.format_validation)."""
    import ast

    lines = output.splitlines()
    start = max(i for i, text in enumerate(lines) if "validation at step" in text)
    metrics = {}
    for text in lines[start + 1 :]:
        if not text.startswith("  "):
            break
        group, values = text.strip().split(": ", 1)
        metrics.update({f"{group}/{name}": v for name, v in ast.literal_eval(values).items()})
    return metrics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "strategy",
    [
        ("fsdp",),
        ("deepspeed", "trainer.strategy.stage=2"),
        ("deepspeed", "trainer.strategy.stage=3"),
    ],
    ids=str,
)
def test_sharded_strategy_trains_and_validates_like_ddp(tmp_path, strategy):
    """One GPU: two steps and a validation under FSDP / ZeRO-2 / ZeRO-3 (the callback gathers the
    sharded parameters) give DDP's training loss and validation numbers within bf16 tolerance."""
    if strategy[0] == "deepspeed" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed (clipscale[deepspeed]) is not installed")
    from tests.conftest import run_cli

    common = [
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
        "data.batch_size=16",
        "data.num_workers=0",
        "eval.every_n_steps=2",
        "eval.demo_zeroshot=false",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    runs = {}
    for name, overrides in (
        ("ddp", ["trainer=ddp"]),
        ("sharded", [f"trainer={strategy[0]}", *strategy[1:]]),
    ):
        result = run_cli(*common, *overrides, f"paths.output_dir={tmp_path / name}", timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = validation_line(result.stdout + result.stderr)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs[name]["train/loss"] = summary["loss"]
    for key in (
        "train/loss",
        "val/contrastive_loss",
        "val/image_to_text_mean_rank",
        "val/modality_gap",
    ):
        assert runs["sharded"][key] == pytest.approx(runs["ddp"][key], rel=3e-2), key
