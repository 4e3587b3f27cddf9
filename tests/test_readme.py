"""The README's training commands work as written: each `python -m clipscale.train` line of its
bash blocks runs a few steps, from a scratch directory holding the files the commands name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipscale.data.shards import write_shards
from tests.conftest import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every command runs a few small steps: these replace the command's own values ...
FORCED = {"trainer.max_steps": "2", "data.batch_size": "8"}
# ... and these apply where the command does not set the key itself.
QUIET = {
    "eval.every_n_steps": "null",
    "eval.demo_zeroshot": "false",
    "trainer.enable_progress_bar": "false",
    "logger": "none",
}
# Commands that need what this machine lacks (GPUs) or data a user brings.
NEEDS_A_CLUSTER = ("+experiment=vit_b_32_32k", "+experiment=laion", "torchrun --nproc_per_node=8")


def readme_commands() -> list[str]:
    """Every `python -m clipscale.train ...` command in the README's bash blocks, one per string."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if "clipscale.train" in command and not command.startswith("#"):
                commands.append(command)
    return commands


def write_readme_shards(folder: Path, name: str, count: int, per_shard: int) -> None:
    """Shards in `folder/name/` like the README's (shard-000000.tar, ..., sizes.json)."""
    rng = np.random.default_rng(len(name))
    images = folder / f"{name}-images"
    images.mkdir()
    pairs = []
    for index in range(count):
        path = images / f"{index:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        pairs.append((str(path), f"a photo numbered {index}"))
    write_shards(pairs, folder / name, per_shard, resize=None, workers=1)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working directory with the shards the README's webdataset example reads."""
    folder = tmp_path_factory.mktemp("readme")
    write_readme_shards(folder, "shards", count=80, per_shard=8)  # shard-000000 .. 000009
    write_readme_shards(folder, "val", count=8, per_shard=8)  # one validation shard
    return folder


def settings(values: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def short_run(run: Path) -> Path:
    """`run`, holding a short demo run's checkpoints (trained on first use)."""
    if not (run / "checkpoints" / "last.ckpt").exists():
        arguments = [*settings(FORCED), *settings(QUIET), f"paths.output_dir={run}"]
        result = run_cli(*arguments, cwd=run.parents[1])
        assert result.returncode == 0, result.stderr[-3000:]
    return run


COMMANDS = [c for c in readme_commands() if not any(skip in c for skip in NEEDS_A_CLUSTER)]


def test_the_readme_has_training_commands_to_check():
    assert len(COMMANDS) >= 5, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_training_command_runs(command, scratch, tmp_path):
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = ["-m", "torch.distributed.run", *words[1:]]
    else:
        assert words[:3] == ["python", "-m", "clipscale.train"], command
        words = words[1:]
    forced = dict(FORCED)
    if any(word.startswith("ckpt_path=") for word in words):
        run = short_run(scratch / "runs" / "resumable")
        words = [w.replace("runs/<run>", str(run)) for w in words]
        forced["trainer.max_steps"] = "4"  # 2 more steps than the checkpoint's
    if "+experiment=demo_lit" in words:  # it starts from the demo's run, runs/demo
        short_run(scratch / "runs" / "demo")
    words = [w for w in words if w.split("=")[0] not in forced]
    keys = {w.split("=")[0] for w in words if "=" in w}
    quiet = {key: value for key, value in QUIET.items() if key not in keys}
    if "paths.output_dir" not in keys and "ckpt_path" not in keys:
        quiet["paths.output_dir"] = str(tmp_path)
    module, *arguments = words[1:]  # python -m <module> <arguments>
    result = run_cli(
        *arguments, *settings(forced), *settings(quiet), module=module, cwd=scratch, timeout=900
    )
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert "clipscale run finished" in result.stdout
