"""The job layouts SLURM really writes, read by clipscale.cluster (no daemons needed).

The variable values below are what SLURM 22.05 set in jobs on the local 2-node cluster
(scripts/slurm/local_cluster.sh): `--nodes=2 --ntasks-per-node=2` and `--nodes=2 --ntasks=4` give
SLURM_TASKS_PER_NODE=2(x2) (only the first also sets SLURM_NTASKS_PER_NODE), `--nodes=2
--ntasks=3` gives 2,1; both give SLURM_JOB_NODELIST=node[1-2].
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest

from clipscale.cluster import (
    ClusterError,
    expand_hostlist,
    launch_settings,
    tasks_per_node,
    uniform_tasks_per_node,
)
from tests.conftest import REPO_ROOT

TWO_BY_TWO = {
    "SLURM_JOB_ID": "41",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
}


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node[1-2]", ["node1", "node2"]),
        ("vm", ["vm"]),
        ("gpu[08-10,12]", ["gpu08", "gpu09", "gpu10", "gpu12"]),
        ("a[1-2],b3,c[7]", ["a1", "a2", "b3", "c7"]),
        ("rack1-n[001-002]-ib", ["rack1-n001-ib", "rack1-n002-ib"]),
    ],
)
def test_node_lists_expand_like_scontrol_show_hostnames(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_a_malformed_node_list_is_refused_naming_it():
    with pytest.raises(ClusterError, match=r"node\[1-x\]"):
        expand_hostlist("node[1-x]")


@pytest.mark.parametrize(
    ("spec", "counts"),
    [("2(x2)", [2, 2]), ("8", [8]), ("2,1", [2, 1]), ("4(x2),2,3(x2)", [4, 4, 2, 3, 3])],
)
def test_tasks_per_node_runs_expand(spec, counts):
    assert tasks_per_node(spec) == counts


def test_equal_task_counts_give_the_per_node_count():
    assert uniform_tasks_per_node("2(x2)") == 2
    assert uniform_tasks_per_node("8(x64)") == 8


def test_heterogeneous_task_counts_are_refused_naming_the_fix():
    with pytest.raises(ClusterError, match=r"2,1.*different task counts.*--ntasks-per-node"):
        uniform_tasks_per_node("2,1")


def test_launch_settings_of_a_two_by_two_job(tmp_path):
    settings = launch_settings({**TWO_BY_TWO, "CLIPSCALE_RUNS": str(tmp_path)}, [])
    run_dir = str(tmp_path / "slurm-41")
    assert settings == {
        "MASTER_ADDR": "node1",
        "MASTER_PORT": "20041",
        "RUN_DIR": run_dir,
        "OVERRIDES": [
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.num_nodes=2",
            f"paths.output_dir={run_dir}",
        ],
    }


def test_a_key_the_user_gives_replaces_the_scripts_own(tmp_path):
    overrides = ["trainer=deepspeed", f"paths.output_dir={tmp_path}/mine", "trainer.max_steps=5"]
    settings = launch_settings(TWO_BY_TWO, overrides)
    assert settings["OVERRIDES"] == ["trainer.devices=2", "trainer.num_nodes=2"]
    assert settings["RUN_DIR"] == f"{tmp_path}/mine"


def test_a_global_batch_is_split_over_the_ranks():
    settings = launch_settings({**TWO_BY_TWO, "CLIPSCALE_GLOBAL_BATCH": "32"}, [])
    assert settings["OVERRIDES"][-1] == "data.batch_size=8"  # 32 / (2 nodes × 2 tasks)


def test_a_restarted_job_resumes_from_its_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "slurm-41"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("checkpoints/step000005.ckpt", "hpc_ckpt_1.ckpt", "checkpoints/last.ckpt"):
        (run_dir / name).write_bytes(b"")
        time.sleep(0.01)  # distinct modification times, in this order
    env = {**TWO_BY_TWO, "CLIPSCALE_RUNS": str(tmp_path)}
    resume = launch_settings(env, [])["OVERRIDES"][-1]
    assert resume == f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    # A ckpt_path the user gave wins; the script adds none.
    overrides = launch_settings(env, ["ckpt_path=/elsewhere.ckpt"])["OVERRIDES"]
    assert not any(override.startswith("ckpt_path=") for override in overrides)


def run_launcher(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    """`python -m clipscale.cluster OVERRIDES` with exactly `env` (plus PATH) as its environment."""
    return subprocess.run(
        [sys.executable, "-m", "clipscale.cluster", *overrides],
        cwd=REPO_ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("env", "overrides", "names"),
    [
        ({**TWO_BY_TWO, "SLURM_TASKS_PER_NODE": "2,1"}, [], "--ntasks-per-node"),
        ({**TWO_BY_TWO, "CLIPSCALE_GLOBAL_BATCH": "30"}, [], "does not split over 2 nodes"),
        ({**TWO_BY_TWO, "CLIPSCALE_GLOBAL_BATCH": "32"}, ["data.batch_size=8"], "give one of"),
    ],
    ids=["heterogeneous", "indivisible-batch", "batch-twice"],
)
def test_bad_launches_end_in_one_error_line(env, overrides, names):
    result = run_launcher(env, *overrides)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert names in result.stderr


def test_the_launcher_prints_assignments_bash_can_eval(tmp_path):
    result = run_launcher({**TWO_BY_TWO, "CLIPSCALE_RUNS": str(tmp_path / "my runs")})
    assert result.returncode == 0, result.stderr
    script = f'eval {shlex.quote(result.stdout)}; echo "$MASTER_ADDR:$MASTER_PORT|$RUN_DIR|${{OVERRIDES[3]}}"'
    echoed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    run_dir = f"{tmp_path / 'my runs'}/slurm-41"
    assert echoed.stdout.strip() == f"node1:20041|{run_dir}|paths.output_dir={run_dir}"


@pytest.mark.parametrize("script", ["multi_node.sbatch", "single_node.sbatch"])
def test_a_job_script_run_without_slurm_says_to_submit_it(script):
    """`bash scripts/slurm/multi_node.sbatch` outside SLURM: one line naming sbatch, nothing run."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "slurm" / script), "trainer.accelerator=cpu"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "sbatch --nodes=N" in result.stderr and "torchrun" in result.stderr
