"""The training step's honest metrics, fused AdamW resolution and grad_cache.chunk_size=auto.

- FLOP metrics from a real Trainer run (CSV logger) equal the FLOPs torch's FlopCounterMode counts
  over an executed step (foils, gradient checkpointing, patch dropout, gradient caching); the
  last step's metrics are written even off the logging interval; no MFU on CPU.
- The progress bar counts optimizer steps, also in a run resumed in mid-epoch.
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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from clipscale.chunking import candidate_chunks, choose_chunk_size, peak_bytes_cpu
from clipscale.config import ConfigError
from clipscale.gradcache import check_grad_cache, encode
from clipscale.models import build_model
from clipscale.module import CLIPModule
from clipscale.optim import build_optimizer, parameter_groups, resolve_fused
from clipscale.progress import StepProgressBar
from tests.test_module_step import RandomPairs

BATCH = 8


def make_module(chunk=None, optimizer=None, model=None, **grad_cache) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(
        model={"name": "clipscale-tiny", **(model or {})},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": optimizer or {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "warmup_steps": 1,
        },
        grad_cache={"chunk_size": chunk, **grad_cache},
    )


class FoilPairs(RandomPairs):
    """RandomPairs with `foils` hard-negative captions per sample (the last one masked out)."""

    def __init__(self, foils: int):
        super().__init__(length=64)
        gen = torch.Generator().manual_seed(8)
        self.foil_texts = torch.randint(1, 49407, (len(self.texts), foils, 32), generator=gen)
        self.foil_mask = torch.arange(foils) < foils - 1

    def __getitem__(self, index: int) -> dict:
        return {
            **super().__getitem__(index),
            "foil_texts": self.foil_texts[index],
            "foil_mask": self.foil_mask,
        }


def fit_with_csv(module, tmp_path, steps: int, log_every: int, dataset=None, callbacks=()):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=log_every,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    loader = DataLoader(dataset or RandomPairs(length=64), batch_size=BATCH)
    trainer.fit(module, train_dataloaders=loader)
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("train/tflops_per_device")]


class ExecutedFlops(Callback):
    """The FLOPs torch's FlopCounterMode counts over each executed training step: encoders forward
    and backward, whatever gradient checkpointing and caching recompute, the loss."""

    def __init__(self):
        self.per_step: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._counter.__exit__(None, None, None)
        self.per_step.append(self._counter.get_total_flops())


def step_flops_per_sample(tmp_path, model=None, chunk=None, foils=0) -> dict[str, float]:
    """One executed training step's counted FLOPs and the logged model / hardware FLOPs, each per
    sample. Attention runs as PyTorch's math kernel, made of matmuls the counter sees (it has no
    formula for the CPU flash kernel)."""
    executed = ExecutedFlops()
    dataset = FoilPairs(foils) if foils else None
    with sdpa_kernel(SDPBackend.MATH):
        (row,) = fit_with_csv(make_module(chunk, model=model), tmp_path, 1, 1, dataset, [executed])
    per_sample = 1e12 / float(row["train/samples_per_second"])  # TFLOP/s per device -> FLOPs
    return {
        "executed": executed.per_step[0] / BATCH,
        "model": float(row["train/tflops_per_device"]) * per_sample,
        "hardware": float(row["train/hardware_tflops_per_device"]) * per_sample,
    }


# name: (model config, grad_cache.chunk_size, foil captions per sample)
FLOP_CASES = {
    "plain": ({}, None, 0),
    "foils": ({}, None, 3),
    "grad_checkpointing": ({"grad_checkpointing": True}, None, 0),
    "patch_dropout": ({"patch_dropout": 0.5}, None, 0),
    "grad_cache": ({}, 3, 0),
    "all_at_once": ({"grad_checkpointing": True, "patch_dropout": 0.5}, 3, 2),
}


@pytest.mark.parametrize("case", FLOP_CASES)
def test_logged_flops_are_the_flops_counted_over_an_executed_step(tmp_path, case):
    """Hardware FLOPs = what an executed step runs; model FLOPs = what the same step runs without
    recomputation (no gradient checkpointing, no gradient caching). The metrics leave out the
    loss's similarity matmuls (about 12 x batch x embed_dim per sample here, 0.02% of a sample's
    encoder FLOPs, a little more with foils), so the counted step may exceed them by that much
    and by no more than 0.1%; a missing or extra encoder pass would be off by 15% or more."""
    model, chunk, foils = FLOP_CASES[case]
    run = step_flops_per_sample(tmp_path / "run", model, chunk, foils)
    useful_model = {key: value for key, value in model.items() if key != "grad_checkpointing"}
    useful = (
        run
        if (chunk, useful_model) == (None, model)
        else step_flops_per_sample(tmp_path / "useful", useful_model, None, foils)
    )
    for logged, counted in ((run["hardware"], run["executed"]), (run["model"], useful["executed"])):
        assert 0 <= counted - logged <= 1e-3 * counted, (logged, counted)


def test_the_last_step_is_logged_when_it_ends_no_interval(tmp_path):
    """5 steps logged every 2: Lightning writes steps 2 and 4 (0-based 1 and 3) and, because the
    module says training stops, step 5 too, with the loss and the throughput."""
    rows = fit_with_csv(make_module(), tmp_path, steps=5, log_every=2)
    assert [int(row["step"]) for row in rows] == [1, 3, 4]
    for row in rows:
        assert float(row["train/loss"]) > 0 and float(row["train/samples_per_second"]) > 0
        assert "train/mfu" not in row and "train/hfu" not in row  # no known peak on a CPU


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
    for row in rows:  # auto turned gradient caching on: its first pass is counted as hardware work
        hardware, model = row["train/hardware_tflops_per_device"], row["train/tflops_per_device"]
        assert float(hardware) > float(model)


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
    from clipscale.train import build_trainer

    cfg = compose_config(["trainer.log_every_n_steps=7", f"paths.output_dir={tmp_path}"])
    trainer = build_trainer(cfg, tmp_path)
    (bar,) = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
    assert bar.refresh_rate == trainer.log_every_n_steps == 7


class ShownAtFirstStep(Callback):
    """What the step progress bar shows when the fit's first step begins: (title, n, total)."""

    shown = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        (bar,) = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
        tqdm = bar.train_progress_bar
        self.shown = self.shown or (tqdm.desc, tqdm.n, tqdm.total)


def test_the_progress_bar_counts_steps_after_a_resume_in_mid_epoch(tmp_path):
    """8 batches an epoch, a checkpoint at step 3: the resumed fit starts inside the epoch, where
    Lightning calls no on_train_epoch_start, and still shows `step 3/5`."""
    loader = DataLoader(RandomPairs(length=8 * BATCH), batch_size=BATCH)

    def fit(steps: int, ckpt_path=None, checkpoint=None) -> tuple:
        shown = ShownAtFirstStep()
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                            enable_checkpointing=checkpoint is not None, enable_model_summary=False,
                            callbacks=[StepProgressBar(), shown, *([checkpoint] if checkpoint else [])])  # fmt: skip
        trainer.fit(make_module(), train_dataloaders=loader, ckpt_path=ckpt_path)
        return shown.shown

    every_3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    assert fit(3, checkpoint=every_3) == ("step", 0, 3)
    (path,) = tmp_path.glob("*.ckpt")
    assert fit(5, ckpt_path=path) == ("step", 3, 5)
