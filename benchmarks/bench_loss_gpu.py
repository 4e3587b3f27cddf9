"""Symmetric InfoNCE forward + backward on one GPU: open_clip's ClipLoss, clipscale dense, PyTorch
tiles and the fused Triton kernel (issue 9), at N = 32,768 / 65,536 / 131,072 / 1,048,576, D = 512.

    python benchmarks/bench_loss_gpu.py                    # CUDA; meant to fit in 3 min on an H200
    python benchmarks/bench_loss_gpu.py --cpu-smoke        # tiny sizes on CPU, same code paths
    TRITON_INTERPRET=1 python benchmarks/bench_loss_gpu.py --cpu-smoke --half float16
                                                           # ... with the kernel in the interpreter

Without CUDA (and without --cpu-smoke) it prints one line and exits 0 (run_all.py / make bench).

Each N runs two ways: the training path (float32 L2-normalised features, the loss called under
bf16 autocast, backward outside it, as CLIPModule does in a bf16-mixed run) and bf16 features.
Per row:
- extra GiB: torch.cuda.max_memory_allocated during forward + backward minus what was allocated
  before it (the features); includes the features' gradients, the same for every method.
- ms: forward + backward, median of 2 timed runs after one warm-up, between synchronisations.
  At 1,048,576 (the kernel alone) one timed run: the kernel was compiled at the smaller N.
- TFLOP/s: 6·2·N²·D / time, i.e. the useful matmuls of a dense loss (2 logit products forward,
  2 gradient products per direction backward), so rows are comparable as speed; the "mm" column
  says how many N²·D matmuls each method actually runs: open_clip 6, dense 6, PyTorch tiles 8
  (each backward tile recomputes its logits), Triton 10 (the dQ and dK kernels both recompute).
- rel err: |loss − float64| / float64. The float64 reference is clipscale's PyTorch tiled loss
  in float64 on the same inputs (float32 features, or the bf16 values widened), forward only. At
  1,048,576 a full float64 pass is too slow for the time budget, so the check is on rows: the
  kernel's sum over 256 consecutive query rows against all 1,048,576 keys, both directions,
  against float64 of the same rows ("rows" in the column says so).
- grad cosine vs float64 (image and text feature gradients, the smaller of the two) at the first N.
Targets (issue 9, training path): at 32,768 the kernel's time ≤ 1.0× open_clip's and its extra
memory ≤ 1/50 of open_clip's; at 1,048,576 ≤ 20 s and ≤ 4 GiB; rel err ≤ 1e-3, cosine ≥ 0.999.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

GIB = 2**30
USEFUL_MATMULS = 6
MATMULS = {"open_clip": 6, "clipscale dense": 6, "torch tiles": 8, "triton": 10}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--sizes", type=int, nargs="*", help="N values (last: kernel only)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None, help="torch tiles' chunk_size")
    parser.add_argument(
        "--half", default="bfloat16", choices=["bfloat16", "float16"], help="autocast dtype"
    )
    parser.add_argument("--scale", type=float, default=1 / 0.07, help="logit scale (CLIP init)")
    parser.add_argument("--check-rows", type=int, default=256, help="rows checked at the last N")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_features(num: int, dim: int, device, dtype, seed: int):
    """L2-normalised random features made in float32 on the device, then cast."""
    generator = torch.Generator(device=device).manual_seed(seed)
    features = torch.randn(num, dim, device=device, generator=generator)
    return F.normalize(features, dim=-1).to(dtype)


def loss_fn(method: str, chunk: int):
    """A callable (image, text, scale) -> loss for one method."""
    from clipscale.losses import ClipLoss

    if method == "open_clip":
        import open_clip.loss

        return open_clip.loss.ClipLoss()
    if method == "clipscale dense":
        return ClipLoss(chunk_size=None, kernel="torch")
    if method == "torch tiles":
        return ClipLoss(chunk_size=chunk, kernel="torch")
    return ClipLoss(chunk_size=chunk, kernel="triton")


def one_step(fn, image, text, scale, autocast_dtype):
    """Forward (under autocast when asked) and backward; returns the loss value as float."""
    image.grad = text.grad = None
    with torch.autocast(
        image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
    ):
        loss = fn(image, text, scale)
    loss.backward()
    return loss.detach()


def measure(fn, image, text, scale, autocast_dtype, timed_runs: int, warmup: bool):
    """(loss, median ms, extra GiB or None) of forward + backward."""
    device = image.device
    if warmup:
        one_step(fn, image, text, scale, autocast_dtype)
    times = []
    extra = None
    for _ in range(timed_runs):
        image.grad = text.grad = None
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        loss = one_step(fn, image, text, scale, autocast_dtype)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            extra = (torch.cuda.max_memory_allocated(device) - before) / GIB
    return float(loss), statistics.median(times), extra


@torch.no_grad()
def float64_loss(image, text, scale: float, chunk: int) -> float:
    """The symmetric loss in float64 through the PyTorch tiles (the same value as dense)."""
    from clipscale.tiled import tiled_cross_entropy_sum

    image, text = image.double(), text.double()
    scale64 = torch.tensor(scale, dtype=torch.float64, device=image.device)
    total = tiled_cross_entropy_sum(image, text, scale64, 0, chunk) + tiled_cross_entropy_sum(
        text, image, scale64, 0, chunk
    )
    return float(total) / (2 * image.shape[0])


def float64_grads(image, text, scale: float, chunk: int):
    """Feature gradients of the float64 loss (for the cosine check at the first N)."""
    from clipscale.losses import ClipLoss

    image = image.detach().double().requires_grad_()
    text = text.detach().double().requires_grad_()
    scale64 = torch.tensor(scale, dtype=torch.float64, device=image.device)
    ClipLoss(chunk_size=chunk, kernel="torch")(image, text, scale64).backward()
    return image.grad, text.grad


def cosine(first, second) -> float:
    return F.cosine_similarity(first.double().flatten(), second.double().flatten(), dim=0).item()


def rows_check(image, text, scale: float, autocast_dtype, rows: int) -> float:
    """Relative error of the kernel's row sums for `rows` consecutive rows vs float64, both ways.

    Forward only; the full float64 loss at this N does not fit the time budget.
    """
    from clipscale.tiled import tiled_cross_entropy_sum
    from clipscale.triton_loss import cross_entropy_rows

    num = image.shape[0]
    offset = (num // 2 // rows) * rows  # a block in the middle
    block = slice(offset, offset + rows)
    scale32 = torch.tensor(scale, device=image.device)
    scale64 = scale32.double()
    kernel_sum = reference_sum = 0.0
    with torch.no_grad():
        for queries, keys in ((image, text), (text, image)):
            with torch.autocast(
                image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                kernel_sum += float(cross_entropy_rows(queries[block], keys, scale32, offset))
            reference_sum += float(
                tiled_cross_entropy_sum(
                    queries[block].double(), keys.double(), scale64, offset, 8192
                )
            )
    return abs(kernel_sum - reference_sum) / abs(reference_sum)


def kernel_usable(device) -> tuple[bool, str]:
    from clipscale.triton_loss import available

    return available(torch.empty(1, device=device))


def run(args) -> int:
    if args.cpu_smoke:
        device = torch.device("cpu")
        sizes = args.sizes or [192, 384, 1024]
        dim, chunk = args.dim or 32, args.chunk or 64
    else:
        if not torch.cuda.is_available():
            print("bench_loss_gpu: skipped, no CUDA device (try --cpu-smoke)")
            return 0
        device = torch.device("cuda")
        sizes = args.sizes or [32_768, 65_536, 131_072, 1_048_576]
        dim, chunk = args.dim or 512, args.chunk or 8192
    half = getattr(torch, args.half)
    usable, why_not = kernel_usable(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"device: {name}; D={dim}; torch tiles chunk_size={chunk}; scale={args.scale:.4g}")
    if not usable:
        print(f"triton rows skipped: {why_not}")
    print()
    print("| N | features | method | mm | extra GiB | ms | TFLOP/s | rel err | grad cos |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for index, num in enumerate(sizes):
        last = index == len(sizes) - 1 and len(sizes) > 1
        methods = ["triton"] if last else ["open_clip", "clipscale dense", "torch tiles", "triton"]
        for mode in ("fp32 + autocast", args.half):
            autocast_dtype = half if mode == "fp32 + autocast" else None
            dtype = torch.float32 if autocast_dtype is not None else half
            image = make_features(num, dim, device, dtype, seed=1).requires_grad_()
            text = make_features(num, dim, device, dtype, seed=2).requires_grad_()
            scale = torch.tensor(args.scale, device=device, requires_grad=True)
            if last:
                reference, ref_kind = None, "rows"
            else:
                reference, ref_kind = float64_loss(image, text, args.scale, chunk), ""
            ref_grads = float64_grads(image, text, args.scale, chunk) if index == 0 else None
            for method in methods:
                cells = [f"{num:,}", mode, method, str(MATMULS[method])]
                if method == "triton" and not usable:
                    print("| " + " | ".join(cells + ["n/a"] * 5) + " |")
                    continue
                try:
                    fn = loss_fn(method, chunk)
                    loss, ms, extra = measure(
                        fn, image, text, scale, autocast_dtype,
                        timed_runs=1 if last else 2, warmup=not last,
                    )  # fmt: skip
                except torch.cuda.OutOfMemoryError:
                    image.grad = text.grad = scale.grad = None
                    torch.cuda.empty_cache()
                    print("| " + " | ".join(cells + ["OOM"] + ["-"] * 4) + " |")
                    continue
                tflops = USEFUL_MATMULS * 2 * num**2 * dim / (ms / 1e3) / 1e12
                if reference is None:
                    error = rows_check(image, text, args.scale, autocast_dtype, args.check_rows)
                else:
                    error = abs(loss - reference) / abs(reference)
                grad_cos = "-"
                if ref_grads is not None:
                    grad_cos = f"{min(cosine(image.grad, ref_grads[0]), cosine(text.grad, ref_grads[1])):.6f}"
                cells += [
                    "-" if extra is None else f"{extra:.2f}",
                    f"{ms:.1f}",
                    f"{tflops:.3g}",
                    f"{error:.1e}{' ' + ref_kind if ref_kind else ''}",
                    grad_cos,
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
                summary[(num, mode, method)] = (ms, extra, error)
            del image, text, scale, ref_grads
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.cpu_smoke:
        print("\n(smoke sizes on CPU: the targets below are checked only for the code path)")
    print_targets(summary, sizes)
    return 0


def print_targets(summary, sizes) -> None:
    """Ratios to open_clip and issue 9's targets, training path."""
    mode = "fp32 + autocast"
    print()
    for num in sizes:
        base = summary.get((num, mode, "open_clip"))
        for method in ("clipscale dense", "torch tiles", "triton"):
            row = summary.get((num, mode, method))
            if base is None or row is None:
                continue
            memory = ""
            if base[1] and row[1]:
                memory = f", memory 1/{base[1] / row[1]:.0f} of open_clip's"
            print(f"N={num:,} {method}: {row[0] / base[0]:.2f}× open_clip's time{memory}")
    first, last = sizes[0], sizes[-1]
    kernel_first = summary.get((first, mode, "triton"))
    base = summary.get((first, mode, "open_clip"))
    if kernel_first and base:
        ok_time = kernel_first[0] <= base[0]
        memory = (
            "n/a" if base[1] is None else "met" if kernel_first[1] * 50 <= base[1] else "NOT met"
        )
        print(
            f"target N={first:,}: time ≤ 1.0× open_clip [{'met' if ok_time else 'NOT met'}], "
            f"memory ≤ 1/50 [{memory}]"
        )
    kernel_last = summary.get((last, mode, "triton"))
    if kernel_last:
        ok_time = kernel_last[0] <= 20e3
        memory = "n/a" if kernel_last[1] is None else "met" if kernel_last[1] <= 4 else "NOT met"
        print(f"target N={last:,}: ≤ 20 s [{'met' if ok_time else 'NOT met'}], ≤ 4 GiB [{memory}]")
    errors = [row[2] for key, row in summary.items() if key[1] == mode]
    if errors:
        worst = max(errors)
        print(
            f"target rel err ≤ 1e-3 (training path): worst {worst:.1e} "
            f"[{'met' if worst <= 1e-3 else 'NOT met'}]"
        )
    if not math.isfinite(sum(errors) if errors else 0.0):
        print("warning: a non-finite loss")


def main() -> int:
    return run(parse_args())


if __name__ == "__main__":
    sys.exit(main())
