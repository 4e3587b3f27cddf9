"""Every command, given a mistake a user makes, ends in one line: exit status 1, the last line starts
with `error:` and names the key or file, no traceback, and nothing left behind (no run directory,
wandb directory or output file). One line of CASES is one mistake; `{in}` is a folder of inputs
(INPUTS below) made fresh for each case, and each command runs in an empty working directory."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.conftest import run_cli
from tests.test_checkpoint_loading import RunsCode


class Case(NamedTuple):
    module: str  # python -m <module>
    args: str  # space-separated arguments; {in} is the inputs folder
    names: str  # what the error line must contain: the key or file, and the point


TRAIN, EVALUATE, EXPORT = "clipscale.train", "clipscale.evaluate", "clipscale.export"
SHARDS, PROBE = "clipscale.data.shards", "clipscale.data.probe"
CASES = {
    "misspelt key": Case(TRAIN, "trainer.max_step=3", "did you mean trainer.max_steps?"),
    "unknown option": Case(TRAIN, "logger=foo", "logger=foo: no such option; choose one of csv,"),
    "experiment without +": Case(TRAIN, "experiment=demo", "select it with +experiment=demo"),
    "key given twice": Case(TRAIN, "data.train_shards=/d/0.tar data.train_shards=/d/1.tar",
                            '"data.train_shards=/data/{000..009}.tar"'),
    "bad value": Case(TRAIN, "data.batch_size=0", "data.batch_size=0 is invalid"),
    "missing shards": Case(TRAIN, "data=webdataset data.train_shards={in}/s-{0..3}.tar",
                           "data.train_shards"),
    "resume a text file": Case(TRAIN, "ckpt_path={in}/notes.txt", "notes.txt is a text file"),
    "resume a truncated checkpoint": Case(TRAIN, "ckpt_path={in}/run/checkpoints/last.ckpt",
                                          "last.ckpt is a damaged or truncated torch file"),
    "resume open_clip weights": Case(TRAIN, "ckpt_path={in}/weights.pt",
                                     "use model.pretrained={in}/weights.pt"),
    "deepspeed on CPU": Case(TRAIN, "trainer=deepspeed trainer.accelerator=cpu",
                             "trainer=deepspeed needs CUDA GPUs and the deepspeed package"),
    "unknown precision": Case(TRAIN, "trainer.precision=fp8", "use one of 32-true, bf16-mixed,"),
    "fp16 on CPU": Case(TRAIN, "trainer.precision=16-mixed trainer.accelerator=cpu",
                        "on CPU use trainer.precision=bf16-mixed"),
    "fp16 without a scaler": Case(TRAIN, "trainer.precision=16-true", "use 16-mixed"),
    "evaluate without checkpoint": Case(EVALUATE, "zeroshot=[{in}]", "checkpoint= is required"),
    "evaluate a text file": Case(EVALUATE, "checkpoint={in}/notes.txt zeroshot=[{in}]",
                                 "checkpoint={in}/notes.txt is a text file"),
    "evaluate code": Case(EVALUATE, "checkpoint={in}/crafted.pt model_name=clipscale-tiny "
                          "zeroshot=[{in}]", "crafted.pt holds Python objects"),
    "evaluate weights without name": Case(EVALUATE, "checkpoint={in}/weights.pt zeroshot=[{in}]",
                                          "model_name="),
    "evaluate a string for a list": Case(EVALUATE, "checkpoint={in}/weights.pt zeroshot={in}",
                                         "write zeroshot=[{in}]"),
    "export a text file": Case(EXPORT, "checkpoint={in}/notes.txt output=model.pt",
                               "checkpoint={in}/notes.txt is a text file"),
    "export weights that do not fit": Case(EXPORT, "checkpoint={in}/weights.pt output=model.pt "
                                           "model_name=clipscale-tiny", "does not fit"),
    "export without checkpoint": Case(EXPORT, "output=model.pt", "missing checkpoint="),
    "shards from no table": Case(SHARDS, "--table {in}/nope.csv --output out", "--table"),
    "shards with bad foils": Case(SHARDS, "--table {in}/foils.csv --foils-column foils --output "
                                  "out --workers 1", "--foils-column 'foils'"),
    "probe with zero samples": Case(PROBE, "--output out --per-type 0", "--per-type 0"),
}  # fmt: skip


def write_inputs(folder: Path) -> None:
    """The files the cases name: a text file, open_clip weights, a pickle that would run code, a
    run whose checkpoint was cut short, and a table whose foils column is not a JSON list."""
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("notes, not a checkpoint\n")
    torch.save({"visual.proj": torch.zeros(2, 2)}, folder / "weights.pt")
    torch.save({"x": RunsCode(folder / "code-ran")}, folder / "crafted.pt")
    run = folder / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {"model.a": torch.zeros(1000)}}, run / "checkpoints" / "last.ckpt")
    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    (folder / "foils.csv").write_text('path,caption,foils\nnotes.txt,a caption,"[1, 2]"\n')


def snapshot(folder: Path) -> dict[str, int]:
    """Every path under `folder` with its size (folders as -1)."""
    return {
        str(path.relative_to(folder)): path.stat().st_size if path.is_file() else -1
        for path in sorted(folder.rglob("*"))
    }


def run_case(name: str, case: Case, root: Path) -> tuple[str, object, dict, dict]:
    """Run one case in `root/<name>/work` with inputs in `root/<name>/in`: the outcome and the
    snapshots of the case's folder before and after."""
    folder = root / name.replace(" ", "_")
    inputs, work = folder / "in", folder / "work"
    write_inputs(inputs)
    work.mkdir()
    before = snapshot(folder)
    args = case.args.replace("{in}", str(inputs)).split()
    result = run_cli(*args, module=case.module, cwd=work, env={"WANDB_MODE": "offline"})
    return name, result, before, snapshot(folder)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple]:
    """All cases, two at a time (each command spends seconds importing torch and Lightning)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(run_case, name, case, root) for name, case in CASES.items()]
        results = {name: (root / name.replace(" ", "_") / "in", result, before, after)
                   for name, result, before, after in (run.result() for run in runs)}  # fmt: skip
    return results


@pytest.mark.parametrize("name", CASES)
def test_a_mistake_ends_in_one_error_line_and_leaves_nothing(outcomes, name):
    inputs, result, before, after = outcomes[name]
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), output[-3000:]
    assert CASES[name].names.replace("{in}", str(inputs)) in last, last
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"
    assert not (inputs / "code-ran").exists()  # a crafted pickle was refused, never run
