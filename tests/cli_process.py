"""`python -m <module> <args>` for tests, as a fork of an interpreter that has imported torch,
Lightning and open_clip once.

A new interpreter spends about 6 of a short command's 7 seconds importing them, and the suite runs
about a hundred commands. Here each command is a fork of one warm interpreter (multiprocessing's
forkserver, with those modules preloaded) that becomes the command: its own process, working
directory, environment, argv, stdout and stderr; `runpy` runs the module as `__main__` as
`python -m` does; exit status, atexit handlers and non-daemon threads end it as the interpreter
would. What a fork cannot reproduce falls back to a fresh interpreter (`fresh=True`): output printed
while those modules are imported (the noise tests), and environment variables read at import time
(any variable outside RUNTIME_ENV, e.g. HF_HUB_OFFLINE, PYTHONPATH, PATH).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing import forkserver
from pathlib import Path

# Imported once by the forkserver; every command is a fork of that interpreter.
PRELOAD = ["torch", "lightning", "open_clip", "clipscale.train", "clipscale.evaluate"]
# Variables read when a command runs (never at import), so a fork may set them itself: the
# commands' own; what the test process picks up from in-process tests (ddp_spawn sets MASTER_PORT,
# seed_everything PL_GLOBAL_SEED, torch.compile _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR for its
# own compile workers); pytest's (PYTEST_CURRENT_TEST changes with every test).
RUNTIME_ENV = ("WANDB_", "HYDRA_FULL_ERROR", "CLIPSCALE_", "PL_", "MASTER_", "_TORCHINDUCTOR_",
               "PYTEST_")  # fmt: skip

WARM = multiprocessing.get_context("forkserver")  # run_distributed's too (distributed_utils.py)
WARM.set_forkserver_preload(PRELOAD)
_server_env: dict[str, str] | None = None  # the forkserver's, taken when it starts (first use)
_lock = threading.Lock()


def warm_start(env: dict) -> bool:
    """Whether a process with environment `env` may be a fork of the warm interpreter: `env`
    differs from the forkserver's only in RUNTIME_ENV variables, which the fork then sets. The
    first call starts the forkserver (importing PRELOAD once), with today's environment."""
    global _server_env
    with _lock:
        if _server_env is None:
            forkserver.ensure_running()
            _server_env = dict(os.environ)
    changed = {k for k in env.keys() | _server_env.keys() if env.get(k) != _server_env.get(k)}
    return all(key.startswith(RUNTIME_ENV) for key in changed)


def run_module(module: str, args, *, cwd, env: dict, timeout: float, fresh: bool = False):
    """Run `python -m module args` in `cwd` with environment `env`; a CompletedProcess with text
    stdout and stderr, as subprocess.run(capture_output=True, text=True) returns it."""
    command = [sys.executable, "-m", module, *args]
    if fresh or not warm_start(env):
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    stdout, stderr = _output_files()
    process = WARM.Process(
        target=_become_the_command, args=(module, list(args), str(cwd), env, stdout, stderr)
    )
    process.start()
    try:
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout)
        return subprocess.CompletedProcess(command, process.exitcode, _read(stdout), _read(stderr))
    finally:
        for path in (stdout, stderr):
            Path(path).unlink(missing_ok=True)


def _output_files() -> tuple[str, str]:
    """Two new files for a command's stdout and stderr, in the temporary folder (not in the
    command's working directory, which tests compare before and after)."""
    paths = []
    for stream in ("stdout", "stderr"):
        handle, path = tempfile.mkstemp(prefix=f"clipscale-{stream}-")
        os.close(handle)
        paths.append(path)
    return paths[0], paths[1]


def _read(path: str) -> str:
    return Path(path).read_text(errors="backslashreplace")


def _become_the_command(module, args, cwd, env, stdout_path, stderr_path) -> None:
    """In the forked child: take the command's streams, directory, environment and argv, run the
    module as __main__, and exit as the interpreter would (atexit handlers, then the status)."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (the process's own stream)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, cwd)  # python -m puts the working directory first
    multiprocessing.set_start_method(None, force=True)  # the default (fork), not the forkserver
    sys.argv = [module, *args]  # runpy puts the module's file in argv[0]
    sys.modules.pop(module, None)  # preloaded as a module; it runs anew as __main__, as with -m
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:  # noqa: BLE001 (the interpreter prints any uncaught exception)
        traceback.print_exc()
        status = 1
    for thread in threading.enumerate():  # the interpreter waits for non-daemon threads ...
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # ... then runs the atexit handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _exit_status(code) -> int:
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
