"""Every shipped config composes; bad values stop the run at start with a message naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from clipscale.config import ConfigError, check_strategy_hardware, validate_config
from clipscale.train import CONFIG_DIR, build_module
from tests.conftest import run_cli

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# recipes whose weights are another run's output (tests/test_lit_demo.py runs demo_lit on one)
OTHER_RUNS_WEIGHTS = {"demo_lit": ["model.pretrained=null"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(compose_config, tmp_path, experiment):
    overrides = [f"+experiment={experiment}", f"paths.output_dir={tmp_path}"]
    cfg = compose_config(overrides + OTHER_RUNS_WEIGHTS.get(experiment, []))
    validate_config(cfg)
    assert cfg.data.batch_size >= 1 and cfg.trainer.max_steps >= 1
    with open_dict(cfg):
        del cfg["hydra"]  # hydra's own keys resolve only inside a real run
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation of ours resolves


def test_demo_defaults_build_module_and_datamodule(compose_config, tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    module = build_module(cfg)
    datamodule = instantiate(cfg.data)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["images"].shape == (cfg.data.batch_size, 3, 32, 32)
    assert batch["texts"].shape == (cfg.data.batch_size, 32)
    assert module.hparams.model["name"] == "clipscale-tiny"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", r"data.batch_size=0 is invalid: it must be a positive integer"),
        ("trainer.max_steps=-1", r"trainer.max_steps=-1 is invalid"),
        ("grad_cache.chunk_size=0", r"grad_cache.chunk_size=0 is invalid"),
        ("loss.kernel=cuda", r"loss.kernel='cuda' is unknown; choose one of auto, torch, triton"),
        ("model.name=ViT-B-33", r"model.name='ViT-B-33' is not an open_clip architecture"),
        ("optim.layer_decay=0", r"optim.layer_decay=0 is invalid: it must be null \(off\) or"),
        (
            "model.pretrained=/nonexistent.pt",
            r"model.pretrained='/nonexistent.pt' is neither a local file nor an open_clip tag",
        ),
    ],
)
def test_bad_values_fail_validation_with_named_key(compose_config, tmp_path, override, message):
    cfg = compose_config([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_grad_cache_takes_fp16_and_the_triton_kernel_refuses_float64(compose_config, tmp_path):
    output = f"paths.output_dir={tmp_path}"
    # The loss scale rides on the cached embedding gradients (tests/test_precision_matrix.py).
    validate_config(
        compose_config(["grad_cache.chunk_size=8", "trainer.precision=16-mixed", output])
    )
    cfg = compose_config(["trainer.precision=64-true", "loss.kernel=triton", output])
    with pytest.raises(ConfigError, match="loss.kernel=triton with trainer.precision=64-true"):
        validate_config(cfg)


@pytest.mark.parametrize("trainer", ["deepspeed", "fsdp"])
def test_sharded_strategies_without_cuda_say_what_they_need(compose_config, tmp_path, trainer):
    cfg = compose_config([f"trainer={trainer}", f"paths.output_dir={tmp_path}"])
    validate_config(cfg)  # the values are fine; this machine is what lacks
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(ConfigError, match=f"trainer={trainer} needs CUDA GPUs.*no CUDA device"):
        check_strategy_hardware(cfg.trainer)
    with pytest.raises(ConfigError, match="here trainer.accelerator=cpu: on CPUs use trainer=ddp"):
        check_strategy_hardware(OmegaConf.merge(cfg.trainer, {"accelerator": "cpu"}))
    check_strategy_hardware(OmegaConf.create({"strategy": "ddp", "accelerator": "cpu"}))


def test_debug_preset_runs_five_steps_without_loggers(tmp_path):
    result = run_cli("debug=default", f"paths.output_dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["global_batch"] == 16
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "csv").exists()
