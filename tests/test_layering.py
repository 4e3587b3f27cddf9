"""The package's import graph: layers that import only downward, and no cycles.

Every `from clipscale... import` and `import clipscale...` is read with `ast`, imports inside
functions included (a deferred import is still a dependency). The layers below are the design's
(DESIGN.md, "Layout"), written once: a module may import its own layer and the layers before it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clipscale"

# Lowest first. A module may import modules of its own layer or of an earlier one.
LAYERS: list[list[str]] = [
    # shared vocabulary: every layer may use it
    ["clipscale", "clipscale.errors", "clipscale.data", "clipscale.eval"],
    # kernels, collectives and small leaves that know nothing of data, Lightning or evaluation
    [
        "clipscale.distributed",
        "clipscale.tiled",
        "clipscale.triton_loss",
        "clipscale.checkpoint_io",
        "clipscale.checkpoints",
        "clipscale.cluster",
        "clipscale.flops",
        "clipscale.towers",
        "clipscale.data.scenes",
        "clipscale.eval.coder",
        "clipscale.eval.geometry",
    ],
    # components: losses, models, the step's parts, Lightning callbacks that know no data
    [
        "clipscale.losses",
        "clipscale.models",
        "clipscale.optim",
        "clipscale.guard",
        "clipscale.gradcache",
        "clipscale.staging",
        "clipscale.metering",
        "clipscale.chunking",
        "clipscale.preemption",
        "clipscale.progress",
    ],
    # the training step
    ["clipscale.module"],
    # the data package, one way: sources -> reading -> decode -> batches -> stream -> loader
    ["clipscale.data.sources"],
    ["clipscale.data.reading"],
    ["clipscale.data.decode"],
    ["clipscale.data.pipeline"],
    ["clipscale.data.stream"],
    ["clipscale.data.loader"],
    ["clipscale.data.synthetic", "clipscale.data.probe"],
    ["clipscale.data.webdataset"],
    ["clipscale.data.shards"],
    # evaluation, which reads data but is never read by it
    ["clipscale.eval.datasets"],
    ["clipscale.eval.zeroshot", "clipscale.eval.compositional"],
    ["clipscale.eval.retrieval"],
    ["clipscale.eval.callback"],
    ["clipscale.eval.curves"],
    # start-up: validation, then the shared CLI glue
    ["clipscale.config"],
    ["clipscale.cli"],
    # entry points
    ["clipscale.train", "clipscale.evaluate", "clipscale.export"],
]


def module_name(path: Path) -> str:
    """`clipscale.data.decode` for clipscale/data/decode.py (a package's __init__ is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The clipscale modules `path` imports anywhere in its body (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module not in known:
                continue
            # `from clipscale import distributed` imports the submodule, not the package
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update(submodules & known or {node.module})
    return found


def import_graph() -> dict[str, set[str]]:
    """Each clipscale module and the clipscale modules it imports (itself left out)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imported_modules(path, known) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target, [*stack, target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def layer_of() -> dict[str, int]:
    return {name: index for index, layer in enumerate(LAYERS) for name in layer}


def test_every_module_has_a_layer():
    missing = sorted(set(import_graph()) - set(layer_of()))
    assert not missing, f"place these modules in LAYERS (tests/test_layering.py): {missing}"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_only_downward():
    layers = layer_of()
    upward = [
        f"{source} (layer {layers[source]}) imports {target} (layer {layers[target]})"
        for source, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if source in layers and target in layers and layers[target] > layers[source]
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipscale"):
                private += [
                    f"{module_name(path)}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}, ["b", "b2", "b"]),
    ],
)
def test_cycle_finder_finds_cycles(graph, expected):
    """The checker itself: a graph with a cycle is reported, one without is not."""
    assert find_cycle(graph) == expected
