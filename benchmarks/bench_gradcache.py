"""Gradient caching on CPU with the tiny model: its time cost, and memory bounded by the chunk.

1. Cost: forward+backward time of `cached_backward` ÷ `full_batch_backward` on the same batch
   (one that fits both ways), interleaved in one process so machine load hits both alike; the
   optimizer update, identical both ways, is left out. Caching encodes every sample twice, so the
   floor is (1 + 1 + 2) / (1 + 2) = 4/3 for a backward costing two forwards.
2. Memory: one full optimizer step (cached, tiled loss) at growing batches with a fixed chunk,
   each in a fresh process; peak RSS above the RSS after building model, optimizer state and the
   input tensors (reported separately, they grow with the batch by construction). Without caching
   only the smallest batch is run, as the reference.

Every process runs on `--threads` CPU threads, 1 by default: on a shared machine, OpenMP barriers
between two threads stall whenever a core is taken, which taxes the cached step's smaller and
more numerous operators and turns the cost ratio into a measure of the machine's load.

    python benchmarks/bench_gradcache.py [--cost-batch 1024] [--cost-chunk 256] [--repeats 5]
                                         [--sizes 8192 32768] [--chunk-size 1024] [--threads 1]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from bench_loss_memory import reset_peak_rss, status_bytes

from clipscale.gradcache import cached_backward, full_batch_backward
from clipscale.losses import ClipLoss
from clipscale.models import build_model

MODEL_NAME = "clipscale-tiny"  # 32×32 images, context 32, embedding 64
MIB = 2**20


def _batch(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [N, 3, 32, 32] and token ids [N, 32]: the encoders' cost is data-blind."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49408, (num_samples, 32), generator=generator)
    return images, texts


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MODEL_NAME)


def measure_cost(batch_size: int, chunk_size: int, repeats: int) -> dict:
    """Median seconds of both ways and the largest relative gradient difference between them."""
    model, loss_fn = _model(), ClipLoss()
    images, texts = _batch(batch_size, seed=0)
    seconds = {"full": [], "cached": []}
    grads = {}
    for repeat in range(repeats + 1):  # the first round warms up and is not timed
        for mode in ("full", "cached"):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            if mode == "full":
                full_batch_backward(model, images, texts, loss_fn)
            else:
                cached_backward(model, images, texts, loss_fn, chunk_size)
            if repeat:
                seconds[mode].append(time.perf_counter() - start)
            grads[mode] = [param.grad.clone() for param in model.parameters()]
    grad_difference = max(
        ((cached - full).norm() / full.norm()).item()
        for full, cached in zip(grads["full"], grads["cached"], strict=True)
        if full.norm() > 0
    )
    return {mode: statistics.median(times) for mode, times in seconds.items()} | {
        "grad_difference": grad_difference
    }


def run_step_worker(num_samples: int, chunk_size: int | None) -> dict:
    """One optimizer step in this process (cached with tiled loss, or plain with dense loss)."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss(chunk_size=chunk_size)

    def step(images, texts, chunk):
        optimizer.zero_grad(set_to_none=True)
        if chunk is None:
            loss = full_batch_backward(model, images, texts, loss_fn)
        else:
            loss = cached_backward(model, images, texts, loss_fn, chunk)
        optimizer.step()
        return loss

    step(*_batch(64, seed=1), None if chunk_size is None else 32)  # allocates optimizer state
    images, texts = _batch(num_samples, seed=0)
    baseline = reset_peak_rss()
    start = time.perf_counter()
    loss = step(images, texts, chunk_size)
    return {
        "seconds": time.perf_counter() - start,
        "peak_extra_bytes": status_bytes("VmHWM") - baseline,
        "input_bytes": images.nbytes + texts.nbytes,
        "loss": loss.item(),
    }


def _run_step(num_samples: int, chunk_size: int | None, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", str(num_samples), str(chunk_size or 0)]
    command += ["--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": f"exit {completed.returncode}: {completed.stderr.strip()[-200:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _print_cost(args) -> None:
    cost = measure_cost(args.cost_batch, args.cost_chunk, args.repeats)
    print(
        f"Cost: {MODEL_NAME}, batch {args.cost_batch}, median of {args.repeats} fwd+bwd, "
        f"{args.threads} CPU thread(s)"
    )
    print(f"{'mode':>22} {'seconds':>8} {'ratio':>6}")
    print(f"{'full batch':>22} {cost['full']:>8.3f} {1:>6.2f}")
    ratio = cost["cached"] / cost["full"]
    print(f"{f'cached, chunk {args.cost_chunk}':>22} {cost['cached']:>8.3f} {ratio:>6.2f}")
    print(f"max relative gradient difference cached vs full: {cost['grad_difference']:.1e}\n")


def _print_memory(args) -> None:
    print(
        f"Memory: one AdamW step, {MODEL_NAME}, fresh process per row, {args.threads} CPU thread(s)"
    )
    header = (
        f"{'mode':>22} {'batch':>6} {'seconds':>8} {'peak MiB':>9} {'inputs MiB':>10} "
        f"{'peak/first':>10}"
    )
    print(header)
    print("-" * len(header))
    smallest = min(args.sizes)
    rows = [("full batch, dense loss", smallest, None)]
    rows += [(f"cached+tiled, chunk {args.chunk_size}", n, args.chunk_size) for n in args.sizes]
    first_cached_peak = None
    for name, num_samples, chunk_size in rows:
        result = _run_step(num_samples, chunk_size, args.threads)
        if "error" in result:
            print(f"{name:>22} {num_samples:>6} {result['error']}")
            continue
        peak = result["peak_extra_bytes"]
        relative = ""
        if chunk_size is not None:
            first_cached_peak = first_cached_peak or peak
            relative = f"{peak / first_cached_peak:.2f}"
        print(
            f"{name:>22} {num_samples:>6} {result['seconds']:>8.1f} {peak / MIB:>9.0f} "
            f"{result['input_bytes'] / MIB:>10.0f} {relative:>10}"
        )


def main() -> None:
    """Print the cost table, then the memory table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-batch", type=int, default=1024)
    parser.add_argument("--cost-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        num_samples, chunk_size = args.worker
        print(json.dumps(run_step_worker(num_samples, chunk_size or None)))
        return
    _print_cost(args)
    _print_memory(args)


if __name__ == "__main__":
    main()
