"""Run every benchmarks/bench_*.py in turn (each prints its own table), then a summary.

python benchmarks/run_all.py              # all of them (what `make bench` runs)
python benchmarks/run_all.py loss_memory  # only those whose file name contains a word given
"""

import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARK_DIR.parent


def main() -> int:
    """Run the selected benchmarks; exit status 1 if any of them failed."""
    selected = sys.argv[1:]
    scripts = [
        script
        for script in sorted(BENCHMARK_DIR.glob("bench_*.py"))
        if not selected or any(word in script.name for word in selected)
    ]
    if not scripts:
        print(f"no benchmarks/bench_*.py matches {selected}", file=sys.stderr)
        return 1
    # The package is importable from a checkout that was not pip-installed, too.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))

    summary = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env)
        summary.append((script.name, completed.returncode, time.perf_counter() - start))

    print(f"\n{'benchmark':<32} {'status':>8} {'seconds':>8}")
    for name, returncode, seconds in summary:
        status = "ok" if returncode == 0 else f"exit {returncode}"
        print(f"{name:<32} {status:>8} {seconds:>8.0f}")
    return int(any(returncode != 0 for _, returncode, _ in summary))


if __name__ == "__main__":
    sys.exit(main())
