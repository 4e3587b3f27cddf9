"""The fused Triton loss kernels against float64 dense math, run in Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before the kernels are defined, so the kernels run in one child
process (this file executed as `python -m tests.test_triton_loss INPUTS OUTPUTS`): the parent
writes every case's inputs, the child writes the kernels' values and gradients, and the tests here
compare them with references computed in float64 in this process. Block sizes are 16/32 so that
ragged last blocks, several row blocks and several key blocks all occur at small sizes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipscale.triton_loss as triton_loss
from clipscale.triton_loss import available, cross_entropy_rows, sigmoid_pairs_sum
from tests.numerics import relative_error

REPO_ROOT = Path(__file__).resolve().parents[1]
# The letters in a case's last field: which inputs require grad.
GRAD_LETTERS = {"queries": "q", "keys": "k", "logit_scale": "s", "logit_bias": "b"}
# d loss / d value applied by the child's backward, so the kernels' use of grad_output is checked.
GRAD_WEIGHT = 0.37

# name: (loss, dtype, B, N, D, label_offset, block_m, block_n, which inputs require grad)
CASES = {
    "ce_fp32_d64_ragged": ("ce", torch.float32, 40, 40, 64, 0, 16, 16, "qks"),
    "ce_fp32_rank1_of_3_with_foils": ("ce", torch.float32, 24, 83, 64, 24, 16, 32, "qks"),
    "ce_fp32_d512_last_rank": ("ce", torch.float32, 20, 45, 512, 25, 16, 16, "qks"),
    "ce_fp32_d40_padded": ("ce", torch.float32, 17, 33, 40, 16, 16, 16, "qks"),
    "ce_fp32_keys_only": ("ce", torch.float32, 24, 50, 64, 10, 16, 16, "k"),
    "ce_fp16_d64": ("ce", torch.float16, 40, 70, 64, 30, 16, 32, "qks"),
    "ce_fp16_d512": ("ce", torch.float16, 24, 50, 512, 13, 16, 16, "qks"),
    # open_clip's clamp (scale 100) and keys given as a transposed view (not row-major).
    "ce_fp32_scale100_strided_keys": ("ce", torch.float32, 24, 50, 64, 20, 16, 16, "qks"),
    "sigmoid_fp32_d64": ("sigmoid", torch.float32, 24, 72, 64, 24, 16, 32, "qksb"),
    "sigmoid_fp32_foils_all_negative": ("sigmoid", torch.float32, 20, 13, 64, None, 16, 16, "qksb"),
    "sigmoid_fp32_d512": ("sigmoid", torch.float32, 17, 40, 512, 7, 16, 16, "qksb"),
    "sigmoid_fp16_d512": ("sigmoid", torch.float16, 24, 40, 512, 16, 16, 16, "qksb"),
}
# (float32 inputs, the loss under torch.autocast("cpu", float16)) vs the same with float16 inputs.
AUTOCAST_CASES = {
    "ce_autocast": ("ce", torch.float32, 24, 40, 64, 8, 16, 16, "qks"),
    "sigmoid_autocast": ("sigmoid", torch.float32, 24, 40, 64, 8, 16, 16, "qksb"),
}


def make_inputs(case, seed: int, name: str = "") -> dict:
    """L2-normalised features with each positive key near its query (as after some training)."""
    loss, dtype, num_rows, num_keys, dim, offset, *_ = case
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(
        torch.randn(num_rows, dim, generator=generator, dtype=torch.float64), dim=1
    )
    keys = F.normalize(torch.randn(num_keys, dim, generator=generator, dtype=torch.float64), dim=1)
    if offset is not None:
        keys[offset : offset + num_rows] = F.normalize(
            queries + 3.0 * keys[offset : offset + num_rows], dim=1
        )
    keys = keys.to(dtype)
    if "strided_keys" in name:
        keys = keys.T.contiguous().T  # same values, column-major strides (torch.save keeps them)
    return {
        "queries": queries.to(dtype),
        "keys": keys,
        "logit_scale": torch.tensor(
            100.0 if "scale100" in name else 14.3 if loss == "ce" else 10.0
        ),
        "logit_bias": torch.tensor(-6.0),
    }


def run_kernel(case, inputs: dict, autocast_dtype=None) -> dict:
    """Value and gradients of the Triton loss (called in the interpreter child)."""
    loss, *_, block_m, block_n, needs_grad = case
    leaves = {
        name: tensor.clone().requires_grad_(GRAD_LETTERS[name] in needs_grad)
        for name, tensor in inputs.items()
    }
    label_offset = case[5]
    blocks = dict(block_m=block_m, block_n=block_n)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float16, enabled=bool(autocast_dtype)):
        if loss == "ce":
            value = cross_entropy_rows(
                leaves["queries"], leaves["keys"], leaves["logit_scale"], label_offset, **blocks
            )
        else:
            value = sigmoid_pairs_sum(
                leaves["queries"], leaves["keys"], leaves["logit_scale"],
                leaves["logit_bias"], label_offset, **blocks,
            )  # fmt: skip
    (value * GRAD_WEIGHT).backward()
    return {"value": value.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


def reference(case, inputs: dict) -> dict:
    """Float64 dense value and gradients, written out here independently of the kernels."""
    loss, _, num_rows, num_keys, _, offset, *_ = case
    leaves = {name: tensor.double().requires_grad_() for name, tensor in inputs.items()}
    logits = leaves["logit_scale"] * leaves["queries"] @ leaves["keys"].T  # [B, N]
    if loss == "ce":
        labels = torch.arange(num_rows) + offset
        value = F.cross_entropy(logits, labels, reduction="sum")
    else:
        signs = -torch.ones(num_rows, num_keys, dtype=torch.float64)
        if offset is not None:
            signs[torch.arange(num_rows), torch.arange(num_rows) + offset] = 1.0
        value = -F.logsigmoid(signs * (logits + leaves["logit_bias"])).sum()
    (value * GRAD_WEIGHT).backward()
    return {"value": value.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


def _child_main(inputs_path: str, outputs_path: str) -> None:
    """Runs under TRITON_INTERPRET=1: every case's kernel results, and available() as seen here."""
    saved = torch.load(inputs_path)
    results = {name: run_kernel(CASES[name], inputs) for name, inputs in saved["cases"].items()}
    for name, inputs in saved["autocast"].items():
        case = AUTOCAST_CASES[name]
        half_case = (case[0], torch.float16, *case[2:])
        half_inputs = {**inputs, **{k: inputs[k].half() for k in ("queries", "keys")}}
        results[name] = {
            "autocast": run_kernel(case, inputs, autocast_dtype=torch.float16),
            "float16_inputs": run_kernel(half_case, half_inputs),
            "float32": run_kernel(case, inputs),
        }
    results["available_cpu"] = available(torch.zeros(1))
    torch.save(results, outputs_path)


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    """All kernel results from one interpreter child process (~10 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("triton_loss")
    inputs = {
        "cases": {
            name: make_inputs(case, seed, name) for seed, (name, case) in enumerate(CASES.items())
        },
        "autocast": {name: make_inputs(case, 99) for name, case in AUTOCAST_CASES.items()},
    }
    torch.save(inputs, folder / "inputs.pt")
    completed = subprocess.run(
        [sys.executable, "-m", "tests.test_triton_loss", str(folder / "inputs.pt"),
         str(folder / "outputs.pt")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return inputs, torch.load(folder / "outputs.pt")


def _cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(F.cosine_similarity(actual.double().flatten(), expected.flatten(), dim=0))


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_float64_dense(kernel_results, name):
    """Value, dQ, dK, d logit_scale (and d logit_bias) agree with float64 dense math."""
    inputs, results = kernel_results
    case = CASES[name]
    actual, expected = results[name], reference(case, inputs["cases"][name])
    assert actual["value"].dtype == torch.float32 and actual["value"].dim() == 0
    needs_grad = case[-1]
    checked = [input_name for input_name, letter in GRAD_LETTERS.items() if letter in needs_grad]
    for grad_name in set(GRAD_LETTERS) - set(checked):
        assert actual[grad_name] is None, f"{grad_name} got a gradient it did not ask for"
    for grad_name in checked:
        assert actual[grad_name].dtype == inputs["cases"][name][grad_name].dtype, grad_name
    if case[1] == torch.float32:
        for key in ["value", *checked]:
            error = relative_error(actual[key], expected[key])
            assert error <= 1e-5, f"{key}: relative error {error:.2e}"
    else:
        # float16 matmul inputs: the value and the scalar gradients use float32 dot products
        # of exact products; dQ/dK multiply float16-rounded probabilities, hence the cosine.
        for key in ["value", "logit_scale", "logit_bias"]:
            if key in ("value", *checked):
                error = relative_error(actual[key], expected[key])
                assert error <= 1e-3, f"{key}: relative error {error:.2e}"
        for key in ("queries", "keys"):
            assert _cosine(actual[key], expected[key]) >= 0.999, key
            assert relative_error(actual[key], expected[key]) <= 2e-3, key


@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_autocast_computes_in_autocast_dtype(kernel_results, name):
    """float32 inputs under float16 autocast: exactly the float16-input result, float32 gradients."""
    inputs, results = kernel_results
    autocast, half, full = (results[name][k] for k in ("autocast", "float16_inputs", "float32"))
    assert torch.equal(autocast["value"], half["value"])
    assert autocast["value"] != full["value"]  # float16 rounding is visible: not computed in fp32
    for key in ("queries", "keys"):
        assert autocast[key].dtype == torch.float32
        # The same float16 products and float32 accumulators; only the output rounding differs.
        assert torch.equal(autocast[key].half(), half[key]), key
    for key in ("logit_scale", "logit_bias") if name.startswith("sigmoid") else ("logit_scale",):
        assert torch.equal(autocast[key], half[key]), key
    expected = reference(AUTOCAST_CASES[name], inputs["autocast"][name])
    assert relative_error(autocast["value"], expected["value"]) <= 1e-3


def test_available_in_interpreter_only(kernel_results):
    """CPU tensors run under TRITON_INTERPRET=1 (the child), not without it (this process)."""
    _, results = kernel_results
    assert results["available_cpu"] == (True, "")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this test process itself runs under the interpreter")
    ok, reason = available(torch.zeros(1))
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_entropy_rows(torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor(1.0), 0)
    ok, reason = available(torch.zeros(1, device="meta"))
    assert not ok and "meta" in reason


def _bad_inputs(**changes):
    """Valid cross_entropy_rows arguments with `changes` applied."""
    arguments = dict(
        queries=torch.zeros(4, 8), keys=torch.zeros(12, 8), logit_scale=torch.tensor(1.0),
        label_offset=4,
    )  # fmt: skip
    return {**arguments, **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(queries=torch.zeros(4, 8, 1)), "queries must be a 2-D"),
        (dict(keys=torch.zeros(12, 9)), "same feature size D"),
        (dict(queries=torch.zeros(4, 1025), keys=torch.zeros(12, 1025)), "D=1025"),
        (dict(queries=torch.zeros(4, 8).double(), keys=torch.zeros(12, 8).double()), "float64"),
        (dict(keys=torch.zeros(12, 8).half()), "share one dtype"),
        (dict(keys=torch.zeros(12, 8, device="meta")), "keys are on meta"),
        (dict(logit_scale=torch.ones(1)), "logit_scale must be a 0-dim"),
        (dict(label_offset=-1), r"label_offset=-1 .* \[0, 8\]"),
        (dict(label_offset=9), r"label_offset=9 .* \[0, 8\]"),
        (dict(queries=torch.zeros(0, 8)), "at least one row"),
        (dict(block_m=24), "block_m must be a power of two"),
        (dict(block_n=8), "block_n must be a power of two"),
    ],
)
def test_bad_input_names_the_argument(changes, message):
    """Each bad argument stops with a ValueError that names it, before any kernel runs."""
    with pytest.raises(ValueError, match=message):
        cross_entropy_rows(**_bad_inputs(**changes))


def test_sigmoid_bad_bias_and_empty_foils():
    """logit_bias is checked like logit_scale; zero foil keys give an exact zero with gradients."""
    queries = torch.zeros(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="logit_bias must be a 0-dim"):
        sigmoid_pairs_sum(queries, torch.zeros(4, 8), torch.tensor(1.0), None, 0)
    scale = torch.tensor(1.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    empty = sigmoid_pairs_sum(queries, torch.zeros(0, 8), scale, bias, None)
    empty.backward()
    assert empty.item() == 0.0 and empty.dtype == torch.float32
    assert queries.grad.abs().sum() == 0 and bias.grad == 0


# H100/H200 (sm_90): the most shared memory one block may use.
SM90_SHARED_LIMIT = 227 * 1024


def compile_for_sm90(kernel, launch: dict, feature_pointer: str) -> dict:
    """Compile one kernel for sm_90 without a GPU; its shared memory, registers and stack bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    options = {"num_warps": launch.pop("num_warps"), "num_stages": launch.pop("num_stages")}
    signature = {
        name: "constexpr" if name in launch
        else feature_pointer if name in ("queries_ptr", "keys_ptr")
        else "*fp32" if name.endswith("_ptr")
        else "i32"
        for name in names
    }  # fmt: skip
    constexprs = {(names.index(name),): value for name, value in launch.items()}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [cuobjdump, "-res-usage", cubin], capture_output=True, text=True
        ).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return {"shared": compiled.metadata.shared, "registers": registers, "stack": stack}


def assert_default_blocks_fit_sm90(dim: int, dtype: torch.dtype, spill_free: bool) -> None:
    """Every kernel at the default blocks compiles for sm_90 within shared memory (and no spills)."""
    config = triton_loss._KernelConfig(dim, dtype, None, None)
    feature_pointer = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    forward = config.launch(config.forward, "BLOCK_M", "BLOCK_N")
    kernels = [
        (triton_loss._cross_entropy_forward_kernel, forward),
        (triton_loss._sigmoid_forward_kernel, forward),
    ]
    for sigmoid in (False, True):
        kernels += [
            (
                triton_loss._backward_queries_kernel,
                {**config.launch(config.backward, "BLOCK_M", "BLOCK_N"), "SIGMOID": sigmoid},
            ),
            (
                triton_loss._backward_keys_kernel,
                {**config.launch(config.backward, "BLOCK_N", "BLOCK_M"), "SIGMOID": sigmoid},
            ),
        ]
    for kernel, launch in kernels:
        usage = compile_for_sm90(kernel, dict(launch), feature_pointer)
        where = f"{kernel.fn.__name__} D={dim} {dtype} {launch}: {usage}"
        assert usage["shared"] <= SM90_SHARED_LIMIT, where
        if spill_free:
            assert usage["stack"] == 0, where


needs_compiler = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted in this process"
)


@needs_compiler
def test_default_blocks_compile_for_h100_without_spills():
    """The training shape (D = 512, bf16) compiles for sm_90: no register spills, shared fits.

    The interpreter runs kernels as numpy and never meets the GPU compiler; this catches what
    only compilation reveals (typing of constexpr branches, register and shared-memory budgets).
    """
    assert_default_blocks_fit_sm90(512, torch.bfloat16, spill_free=True)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize(
    "dim, dtype",
    [(dim, torch.bfloat16) for dim in (64, 128, 256, 1024)]  # 512: the fast test above
    + [(dim, torch.float32) for dim in (64, 128, 256, 512, 1024)],
)
def test_every_default_block_row_compiles_for_h100(dim, dtype):
    """Slow (≈30 s a case): every row of the block table; float32 (IEEE, no tensor cores, a
    correctness path) must fit shared memory, 16-bit rows must also be spill-free."""
    assert_default_blocks_fit_sm90(dim, dtype, spill_free=dtype != torch.float32)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
