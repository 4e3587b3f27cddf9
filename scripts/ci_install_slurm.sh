#!/usr/bin/env bash
# Install the SLURM pieces the test suite needs for its single-node cluster (Debian/Ubuntu, root).
# Only the controller, the node daemon, the client commands and munge: the `slurm-wlm` meta
# package pulls 43 packages and none of them is needed. Nothing starts by itself; the pytest
# fixture in tests/slurm_cluster.py writes the configuration and starts and stops the daemons.
set -euo pipefail

if command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
    && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/ci_install_slurm.sh: must run as root (apt-get install)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
