"""The training step's honest metrics, fused AdamW resolution and grad_cache.chunk_size=auto.

- FLOP metrics from a real Trainer run (CSV logger): hardware / model TFLOP/s is exactly 4/3 with
  gradient caching and 1 without; model TFLOP/s = samples/s x 3 x the forward FLOPs counted by
  torch's FlopCounterMode; metrics are written at the logging interval only; no MFU on CPU.
- optim.optimizer.fused=auto resolves to the device of the parameters.
- The auto chunk search measures real peak memory (torch's allocation events) and picks the
  largest chunk under a budget.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from clipscale.config import ConfigError
from clipscale.flops import forward_flops_per_sample
from clipscale.gradcache import (
    candidate_chunks,
    check_grad_cache,
    choose_chunk_size,
    encode,
    peak_bytes_cpu,
)
from clipscale.models import build_model
from clipscale.module import CLIPModule
from clipscale.optim import build_optimizer, parameter_groups, resolve_fused
from tests.test_module_step import RandomPairs

BATCH = 8


def make_module(chunk=None, optimizer=None, **grad_cache) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(
        model={"name": "clipscale-tiny"},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": optimizer or {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "warmup_steps": 1,
        },
        grad_cache={"chunk_size": chunk, **grad_cache},
    )


def fit_with_csv(module, tmp_path, steps: int, log_every: int) -> list[dict]:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=log_every,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(RandomPairs(length=64), batch_size=BATCH))
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("train/tflops_per_device")]


@pytest.mark.parametrize("chunk, ratio", [(None, 1.0), (3, 4 / 3)])
def test_flop_metrics_hold_their_invariants_in_a_trainer_run(tmp_path, chunk, ratio):
    rows = fit_with_csv(make_module(chunk), tmp_path, steps=4, log_every=2)
    # Written at steps 2 and 4 (0-based 1 and 3) only: values are read at the logging interval.
    assert [int(row["step"]) for row in rows] == [1, 3]
    model = build_model("clipscale-tiny")
    forward = forward_flops_per_sample(model, 32, 32, torch.device("cpu"))
    for row in rows:
        model_tflops = float(row["train/tflops_per_device"])
        hardware_tflops = float(row["train/hardware_tflops_per_device"])
        samples_per_second = float(row["train/samples_per_second"])
        assert model_tflops > 0
        assert hardware_tflops / model_tflops == pytest.approx(ratio, rel=1e-6)
        assert model_tflops == pytest.approx(samples_per_second * 3 * forward / 1e12, rel=1e-5)
        assert "train/mfu" not in row and "train/hfu" not in row  # no known peak on a CPU
        if chunk is not None:
            assert float(row["train/grad_cache_chunk_size"]) == chunk


def test_fused_auto_resolves_to_the_parameters_device():
    cpu_params = [torch.nn.Parameter(torch.zeros(2))]
    assert resolve_fused("auto", cpu_params) is False
    assert resolve_fused(True, cpu_params) is True and resolve_fused(None, cpu_params) is None
    with pytest.raises(ConfigError, match=r"optim.optimizer.fused='yes' is invalid"):
        resolve_fused("yes", cpu_params)
    model = build_model("clipscale-tiny")
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "fused": "auto"}
    optimizer = build_optimizer(adamw, parameter_groups(model, 0.1))
    assert optimizer.defaults["fused"] is False  # CPU parameters
    if torch.cuda.is_available():
        assert resolve_fused("auto", [torch.nn.Parameter(torch.zeros(2, device="cuda"))]) is True


def test_configure_optimizers_resolves_fused_in_a_trainer_run():
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "fused": "auto"}
    module = make_module(optimizer=adamw)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(RandomPairs(), batch_size=BATCH))
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is False


@pytest.mark.parametrize(
    "values, key",
    [
        ({"chunk_size": 0}, "grad_cache.chunk_size=0"),
        ({"chunk_size": -4}, "grad_cache.chunk_size=-4"),
        ({"chunk_size": 1.5}, "grad_cache.chunk_size=1.5"),
        ({"chunk_size": "big"}, "grad_cache.chunk_size='big'"),
        ({"chunk_size": "auto", "memory_fraction": 0}, "grad_cache.memory_fraction=0"),
        ({"chunk_size": "auto", "memory_fraction": 1.5}, "grad_cache.memory_fraction=1.5"),
        ({"chunk_size": 4, "stage_on_host": "yes"}, "grad_cache.stage_on_host='yes'"),
    ],
)
def test_bad_grad_cache_values_are_refused_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " is invalid"):
        check_grad_cache(**values)


def test_auto_chunk_search_picks_the_largest_chunk_under_a_measured_budget():
    """Real measurements: peak bytes of torch's CPU allocations during a forward/backward."""
    torch.manual_seed(0)
    model = build_model("clipscale-tiny").train()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(32, 3, 32, 32, generator=gen)
    texts = torch.randint(1, 49407, (32, 32), generator=gen)
    measured: dict[int, list[int]] = {}

    def measure(chunk: int) -> int:
        def run():
            embeddings = encode(model, images[:chunk], texts[:chunk])
            sum(emb.sum() for emb in embeddings).backward()

        peak = peak_bytes_cpu(run)
        model.zero_grad(set_to_none=True)
        measured.setdefault(chunk, []).append(peak)
        return peak

    assert candidate_chunks(32) == [1, 2, 4, 8, 16, 32]
    assert candidate_chunks(24) == [1, 2, 4, 8, 16, 24]
    peaks = {chunk: measure(chunk) for chunk in (4, 8, 16, 32)}
    assert peaks[4] < peaks[8] < peaks[16] < peaks[32]  # activations grow with the chunk
    assert peaks[32] - peaks[16] > 100_000  # a real difference, not allocator noise
    measured.clear()
    budget = (peaks[8] + peaks[16]) // 2
    assert choose_chunk_size(measure, 32, budget) == 8
    assert sorted(measured) == [1, 2, 4, 8, 16]  # stopped at the first chunk over budget
    assert choose_chunk_size(measure, 32, peaks[32] * 2) == 32  # all fits: the whole batch
    with pytest.raises(ConfigError, match="grad_cache.chunk_size=auto: even a chunk of 1"):
        choose_chunk_size(measure, 32, 1000)


def test_auto_chunk_in_a_trainer_run_picks_the_whole_batch_on_cpu_and_logs_it(tmp_path):
    """On CPU the budget is 0.8 x host RAM: the tiny model's 8-sample batch fits whole."""
    rows = fit_with_csv(make_module("auto"), tmp_path, steps=2, log_every=1)
    assert [float(row["train/grad_cache_chunk_size"]) for row in rows] == [BATCH, BATCH]
    assert float(rows[0]["train/hardware_tflops_per_device"]) / float(
        rows[0]["train/tflops_per_device"]
    ) == pytest.approx(4 / 3, rel=1e-6)


BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step_gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_step_benchmark_skips_in_one_line_without_cuda():
    result = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("\n") == 1 and "no CUDA device; skipped" in result.stdout


@pytest.mark.slow  # every benchmark path (both recipes, caching, staging, profiler): ~2.5 min
def test_gpu_step_benchmark_runs_its_code_paths_on_cpu():
    result = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke"], capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "| clipscale-tiny @ 16 | open_clip recipe |" in table
    assert "| clipscale-tiny @ 16 | grad cache 4, host uint8 staged |" in table
    assert "Top 15 kernels" in table and "| 128 |" in table


def test_the_progress_bar_refreshes_at_the_logging_interval(compose_config, tmp_path):
    """Reading the bar's metrics waits for the device: it refreshes only when metrics are new."""
    from clipscale.progress import StepProgressBar
    from clipscale.train import build_trainer

    cfg = compose_config(["trainer.log_every_n_steps=7", f"paths.output_dir={tmp_path}"])
    trainer = build_trainer(cfg, tmp_path)
    (bar,) = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
    assert bar.refresh_rate == trainer.log_every_n_steps == 7
