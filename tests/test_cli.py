"""The CLI end to end: the default demo trains, learns, logs, checkpoints and resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_cli


def wandb_records(run_file: Path):
    """Payloads of a .wandb file: wandb's LevelDB-style log (32 KiB blocks, 7-byte record headers)."""
    block, header = 32768, 7
    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb transaction log"
    position, pending = header, b""  # the file starts with a 7-byte magic/version header
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]  # 1 full, 2 first, 3 middle, 4 last fragment
        payload = data[position + header : position + header + length]
        position += header + length
        if kind == 1:
            yield payload
        elif kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + payload
        elif kind == 4:
            yield pending + payload


def wandb_history_keys(run_dir: Path) -> set[str]:
    """Metric names in the history records of the offline wandb run under `run_dir`."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    keys = set()
    for payload in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The default demo exactly as `make train` runs it (no overrides but the run directory)."""
    run_dir = tmp_path_factory.mktemp("demo")
    result = run_cli(f"paths.output_dir={run_dir}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "clipscale run finished" in result.stdout
    return run_dir


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory) -> Path:
    """The default demo cut to 20 of its steps: everything it writes and logs, in seconds."""
    run_dir = tmp_path_factory.mktemp("short_demo")
    result = run_cli("trainer.max_steps=20", f"paths.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "clipscale run finished" in result.stdout
    return run_dir


def test_demo_writes_checkpoint_resolved_config_and_summary(short_demo):
    assert (short_demo / "checkpoints" / "last.ckpt").stat().st_size > 1_000_000
    config = OmegaConf.load(short_demo / ".hydra" / "config.yaml")
    assert config.model.name == "clipscale-tiny"
    assert config.paths.output_dir == str(short_demo)
    summary = json.loads((short_demo / "summary.json").read_text())
    assert summary["steps"] == config.trainer.max_steps == 20
    assert summary["global_batch"] == config.data.batch_size


def test_demo_logs_temperature_to_offline_wandb(short_demo):
    keys = wandb_history_keys(short_demo)
    expected = {"train/loss", "train/temperature", "train/logit_scale", "train/lr"}
    assert expected <= keys, f"missing {expected - keys}"
    assert {"train/samples_per_second", "train/tflops_per_device"} <= keys


@pytest.mark.slow  # the whole 300-step demo (about 80 s on 2 cores); CI runs it: make test-slow
def test_demo_learns_zero_shot_at_least_three_times_chance(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["zeroshot_top1"] >= 3 * summary["zeroshot_chance"], summary
    assert summary["loss"] < 4.0  # ln(128) = 4.85 is the loss of an untrained model


def read_csv_metrics(run_dir: Path) -> list[dict]:
    (metrics,) = run_dir.glob("csv/metrics.csv")
    with metrics.open() as handle:
        return list(csv.DictReader(handle))


def test_resume_continues_the_step_count(short_demo, tmp_path):
    summary = json.loads((short_demo / "summary.json").read_text())
    resumed_steps = summary["steps"] + 5
    result = run_cli(
        f"ckpt_path={short_demo / 'checkpoints' / 'last.ckpt'}",
        f"trainer.max_steps={resumed_steps}",
        "logger=csv",
        "eval.demo_zeroshot=false",
        f"paths.output_dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == resumed_steps
    logged_steps = sorted(
        int(row["step"]) for row in read_csv_metrics(tmp_path) if row["train/loss"]
    )
    # Only the 5 new steps ran, numbered after the checkpoint's, with the temperature it had learned.
    assert len(logged_steps) == 5 and logged_steps[0] >= summary["steps"]
    first = next(row for row in read_csv_metrics(tmp_path) if row["train/temperature"])
    assert abs(float(first["train/temperature"]) - summary["temperature"]) < 0.01


def assert_two_rank_run(run_dir: Path, per_rank_batch: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["global_batch"] == 2 * per_rank_batch
    logged = {
        float(row["train/global_batch_size"])
        for row in read_csv_metrics(run_dir)
        if row["train/global_batch_size"]
    }
    assert logged == {2.0 * per_rank_batch}
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


TWO_RANK_ARGS = (
    "trainer.max_steps=3",
    "data.batch_size=16",
    "data.num_workers=0",
    "logger=csv",
    "eval.every_n_steps=null",
    "eval.demo_zeroshot=false",
)


def test_lightning_launches_two_cpu_ranks_with_a_doubled_global_batch(tmp_path):
    result = run_cli(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        *TWO_RANK_ARGS,
        f"paths.output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 32 = 16 per rank × 2 ranks" in result.stdout + result.stderr
    assert_two_rank_run(tmp_path, 16)


def test_torchrun_launches_two_cpu_ranks_with_a_doubled_global_batch(tmp_path):
    result = run_cli(
        "--nproc_per_node=2",
        "-m",
        "clipscale.train",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        *TWO_RANK_ARGS,
        f"paths.output_dir={tmp_path}",
        module="torch.distributed.run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_two_rank_run(tmp_path, 16)
