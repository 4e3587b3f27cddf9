"""Peak memory of the CLIP loss's forward+backward: open_clip's dense ClipLoss vs our tiled one.

Each case runs in a fresh subprocess so that one case's freed pages cannot hide another's peak.
The worker builds the inputs, warms both losses up on a tiny batch (library loading, thread pools),
then resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`) and reports
VmHWM - VmRSS: the memory the loss itself added, input gradients included. Linux only.

The dense case at the larger N is run only if its predicted peak (4× the measured one at N/2, the
matrices being N×N) fits in MemAvailable with a margin; otherwise the table says so.

Times are wall seconds on `--threads` threads (default: torch's); on a loaded machine two OpenMP
threads stall on each other, which taxes the tiled loss's many tile-sized operators most.

    python benchmarks/bench_loss_memory.py [--sizes 16384 32768] [--dim 512] [--chunk-size 1024]
                                           [--threads N]
"""

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MIB = 2**20
# Left free for the rest of the machine when deciding whether a dense case may run.
SAFETY_MARGIN_BYTES = 3 * 2**30


def status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status: this benchmark needs Linux")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS, which it returns in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_bytes("VmRSS")


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo: this benchmark needs Linux")


def _build_loss(implementation: str, chunk_size: int):
    if implementation == "open_clip":
        import open_clip

        return open_clip.loss.ClipLoss()
    from clipscale.losses import ClipLoss

    return ClipLoss(chunk_size=chunk_size)


def _features(num_samples: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (image_features, text_features), each [N, D] and requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    image_features = F.normalize(torch.randn(num_samples, dim, generator=generator), dim=-1)
    text_features = F.normalize(torch.randn(num_samples, dim, generator=generator), dim=-1)
    return image_features.requires_grad_(), text_features.requires_grad_()


def run_worker(implementation: str, num_samples: int, dim: int, chunk_size: int) -> dict:
    """Measure one case in this process; returns the JSON-able row."""
    with open("/proc/self/oom_score_adj", "w") as oom_score:
        oom_score.write("1000")  # if memory runs out, the kernel kills this worker first
    loss_fn = _build_loss(implementation, chunk_size)
    logit_scale = torch.tensor(1 / 0.07, requires_grad=True)
    warm_image, warm_text = _features(64, dim, seed=1)
    loss_fn(warm_image, warm_text, logit_scale).backward()
    del warm_image, warm_text

    image_features, text_features = _features(num_samples, dim, seed=0)
    logit_scale.grad = None
    baseline = reset_peak_rss()
    start = time.perf_counter()
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "peak_extra_bytes": status_bytes("VmHWM") - baseline,
        "seconds": seconds,
        "loss": loss.item(),
    }


def _run_case(implementation: str, num_samples: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", implementation, "--sizes", str(num_samples)]
    command += ["--dim", str(args.dim), "--chunk-size", str(args.chunk_size)]
    command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": f"exit {completed.returncode}: {completed.stderr.strip()[-200:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _predict_or_run_dense(num_samples: int, dense_peaks: dict, args) -> dict:
    """Run the dense case if its predicted peak fits in memory, else say why not."""
    smaller = [size for size in dense_peaks if size < num_samples]
    if smaller:
        size = max(smaller)
        predicted = dense_peaks[size] * (num_samples / size) ** 2
        basis = f"from N={size}"
    else:
        # Without a measurement: four float32 N×N matrices are alive at open_clip's peak.
        predicted, basis = 16 * num_samples**2, "4 N×N float32"
    available = _mem_available_bytes()
    if predicted + SAFETY_MARGIN_BYTES > available:
        return {
            "error": f"skipped: predicted peak {predicted / 2**30:.1f} GiB ({basis}) + "
            f"{SAFETY_MARGIN_BYTES / 2**30:.0f} GiB margin > {available / 2**30:.1f} GiB available"
        }
    row = _run_case("open_clip", num_samples, args)
    if "peak_extra_bytes" in row:
        dense_peaks[num_samples] = row["peak_extra_bytes"]
    return row


def main() -> None:
    """Run every case in its own process and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", choices=["open_clip", "tiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.sizes[0], args.dim, args.chunk_size)))
        return

    print(
        f"CLIP loss forward+backward, D={args.dim}, tiled chunk_size={args.chunk_size}, "
        f"{args.threads} CPU thread(s)"
    )
    header = f"{'N':>7} {'loss impl':>10} {'peak MiB':>10} {'seconds':>8} {'value':>10} "
    header += f"{'mem ratio':>10}"
    print(header)
    print("-" * len(header))
    dense_peaks = {}
    for num_samples in sorted(args.sizes):
        dense = _predict_or_run_dense(num_samples, dense_peaks, args)
        tiled = _run_case("tiled", num_samples, args)
        for name, row in (("open_clip", dense), ("tiled", tiled)):
            if "error" in row:
                print(f"{num_samples:>7} {name:>10} {row['error']}")
                continue
            ratio = ""
            if name == "tiled" and "peak_extra_bytes" in dense:
                ratio = f"{dense['peak_extra_bytes'] / row['peak_extra_bytes']:.1f}x less"
            print(
                f"{num_samples:>7} {name:>10} {row['peak_extra_bytes'] / MIB:>10.0f} "
                f"{row['seconds']:>8.1f} {row['loss']:>10.6f} {ratio:>10}"
            )
        if "loss" in dense and "loss" in tiled:
            print(
                f"{'':>7} |tiled - open_clip| / open_clip loss = "
                f"{abs(tiled['loss'] - dense['loss']) / dense['loss']:.1e}"
            )


if __name__ == "__main__":
    main()
