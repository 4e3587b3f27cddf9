"""One training step on one GPU: open_clip's recipe vs clipscale's CLIPModule under a Lightning
Trainer, each speed option on and off, gradient caching, and host-staged giant batches.

    python benchmarks/bench_step_gpu.py               # on a CUDA machine; about 5 min on an H200
    python benchmarks/bench_step_gpu.py --cpu-smoke   # the same code paths, tiny model, on CPU

Without CUDA (and without --cpu-smoke) it prints one line and exits 0.

Every case runs in this one process on the same device, on the same random data (resident on the
GPU, float32 normalised images, unless the case says host uint8), bf16 autocast, AdamW,
gradient clipping at 1.0: 3 warm-up steps, then the median of 8 timed steps, each step timed
between device synchronisations (the same for both recipes). Reported per case: samples/s, step
ms, peak GiB allocated, MFU (model FLOPs: forward + backward per sample as FlopCounterMode counts
them, over the dense bf16 peak of the device from clipscale.flops; no MFU for an unknown device), the ratio to open_clip's samples/s on
the same model and batch, and for grad-cache cases the step time over the plain clipscale step.
Then a torch.profiler table of the top kernels of one clipscale step, and the peak GPU memory of
one host-staged, gradient-cached step at 65,536 / 131,072 / 262,144 samples (OOM printed).
The tables print as markdown, ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

GIB = 2**30


@dataclass
class Case:
    """One row: which recipe, model, per-GPU batch, and clipscale options."""

    label: str
    model: str
    batch: int
    recipe: str = "clipscale"  # or "open_clip"
    compile: bool = False
    fused: bool = True
    chunk: int | None = None  # grad_cache.chunk_size
    stage: bool = False  # grad_cache.stage_on_host (data given as uint8 in host memory)
    loss_chunk: int | None = None
    result: dict = field(default_factory=dict)


def gpu_cases(args) -> list[Case]:
    """The GPU matrix (issue 10): parity cases, each speed option on/off, grad caching."""
    b32, b16 = ("ViT-B-32", 1024), ("ViT-B-16", 512)
    cases = [
        Case("open_clip recipe", *b32, recipe="open_clip"),
        Case("clipscale, no speed options", *b32, fused=False),
        Case("clipscale + fused AdamW", *b32),
        Case("clipscale + fused + compile", *b32, compile=True),
        Case("grad cache 256", *b32, chunk=256),
        Case("grad cache 512", *b32, chunk=512),
        Case("grad cache 1024", *b32, chunk=1024),
        Case("grad cache 256 + compile", *b32, chunk=256, compile=True),
        Case("grad cache 1024 + compile", *b32, chunk=1024, compile=True),
        Case("grad cache 256, host uint8 staged", *b32, chunk=256, stage=True),
        Case("open_clip recipe", *b16, recipe="open_clip"),
        Case("clipscale, no speed options", *b16, fused=False),
        Case("clipscale + fused AdamW", *b16),
        Case("clipscale + fused + compile", *b16, compile=True),
    ]
    if args.skip_compile:
        cases = [c for c in cases if not c.compile]
    return cases


def smoke_cases() -> list[Case]:
    """Tiny model on CPU: every code path of the GPU matrix, one compile case left out (slow)."""
    tiny = ("clipscale-tiny", 16)
    return [
        Case("open_clip recipe", *tiny, recipe="open_clip"),
        Case("clipscale, no speed options", *tiny, fused=False),
        Case("clipscale + fused AdamW", *tiny),
        Case("grad cache 4", *tiny, chunk=4),
        Case("grad cache 8", *tiny, chunk=8),
        Case("grad cache 4, host uint8 staged", *tiny, chunk=4, stage=True),
    ]


# --- data and the open_clip recipe ----------------------------------------------------------------


def random_batch(model_name: str, batch: int, device, host_uint8: bool = False) -> dict:
    """Random images and token ids for `model_name`: float32 on `device`, or uint8 pinned host."""
    from clipscale.models import build_model

    probe = build_model(model_name)
    size = probe.visual.image_size
    size = size if isinstance(size, int) else size[0]
    context = probe.context_length
    del probe
    gen = torch.Generator(device=device).manual_seed(0)
    texts = torch.randint(1, 49407, (batch, context), device=device, generator=gen)
    if host_uint8:
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen,
                               device=device).cpu()  # fmt: skip
        texts = texts.cpu()
        if torch.cuda.is_available():
            images, texts = images.pin_memory(), texts.pin_memory()
    else:
        images = torch.randn(batch, 3, size, size, device=device, generator=gen)
    return {"images": images, "texts": texts}


def open_clip_step_times(case: Case, data: dict, device, steps: int, warmup: int) -> list[float]:
    """open_clip's training recipe: model(), its ClipLoss, AdamW (fused on CUDA), bf16 autocast,
    clip_grad_norm_ 1.0; the parameter groups of its main.py (no decay on gains and biases)."""
    import open_clip

    from clipscale.models import build_model

    torch.manual_seed(0)
    model = build_model(case.model).to(device).train()
    loss_fn = open_clip.loss.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda",
    )  # fmt: skip
    case.result["flops"] = training_flops(model)
    times = []
    for step in range(warmup + steps):
        start = synchronized(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            image_features, text_features, logit_scale = model(data["images"], data["texts"])
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= warmup:
            times.append(synchronized(device) - start)
    del model, optimizer
    return times


def training_flops(model) -> float:
    """Forward + backward FLOPs of one sample (the gradients it leaves are cleared by each step)."""
    from clipscale.flops import encoder_flops

    return encoder_flops(model, backward=True).per_sample(foils=0)


def synchronized(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --- clipscale under a Lightning Trainer ----------------------------------------------------------


class RepeatBatch(torch.utils.data.Dataset):
    """The same prepared batch `length` times (DataLoader(batch_size=None): no collation)."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def clipscale_module(case: Case):
    from clipscale.module import CLIPModule

    torch.manual_seed(0)
    loss = {"_target_": "clipscale.losses.ClipLoss", "chunk_size": case.loss_chunk}
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 5e-4,
                 "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2,
                 "fused": "auto" if case.fused else False}  # fmt: skip
    return CLIPModule(
        model={"name": case.model, "compile": case.compile},
        loss=loss,
        optim={"optimizer": optimizer, "warmup_steps": 1, "grad_clip_norm": 1.0},
        grad_cache={"chunk_size": case.chunk, "stage_on_host": case.stage},
    )


def clipscale_run(case: Case, data: dict, device, steps: int, warmup: int,
                  profile_step: int | None = None) -> tuple[list[float], object]:  # fmt: skip
    """Fit `warmup + steps` steps; per-step times from device-synchronised callbacks."""
    # Every case compiles afresh: dynamo keys its cache on `encode`'s code, shared by all modules,
    # and would fall back to eager past its recompile limit.
    torch._dynamo.reset()
    module = clipscale_module(case)
    timer = StepTimer(device, warmup, profile_step)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=warmup + steps,
        log_every_n_steps=warmup + steps,  # metrics read once, as a long run reads them
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(RepeatBatch(data, warmup + steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    case.result["flops"] = module.step_flops.model()  # counted in on_train_start
    return timer.times, timer.profile


class StepTimer(Callback):
    """Device-synchronised time of each step after `warmup`; a torch.profiler of one step."""

    def __init__(self, device, warmup: int, profile_step: int | None):
        self.device, self.warmup, self.profile_step = device, warmup, profile_step
        self.times, self.profile, self._profiler = [], None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.profile_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        self._start = synchronized(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = synchronized(self.device) - self._start
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.profile, self._profiler = self._profiler, None
        elif batch_idx >= self.warmup:
            self.times.append(elapsed)


# --- the run --------------------------------------------------------------------------------------


def run_case(case: Case, device, steps: int, warmup: int) -> None:
    data = random_batch(case.model, case.batch, device, host_uint8=case.stage)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        if case.recipe == "open_clip":
            times = open_clip_step_times(case, data, device, steps, warmup)
        else:
            times, _ = clipscale_run(case, data, device, steps, warmup)
    except torch.cuda.OutOfMemoryError as error:
        case.result["error"] = f"OOM: {str(error).splitlines()[0][:80]}"
        return
    finally:
        del data
        gc.collect()
    step = statistics.median(times)
    case.result.update(
        step_s=step,
        samples_per_s=case.batch / step,
        peak_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        wall_s=time.perf_counter() - started,
    )


def mfu(case: Case, peak_tflops: float | None) -> str:
    if not peak_tflops or "samples_per_s" not in case.result:
        return "—"
    achieved = case.result["samples_per_s"] * case.result["flops"] / 1e12
    return f"{100 * achieved / peak_tflops:.1f}%"


def print_table(cases: list[Case], peak_tflops: float | None, device_name: str, steps: int,
                warmup: int) -> None:  # fmt: skip
    print(f"\n### One training step, {device_name} (bf16 autocast, AdamW, clip 1.0; median of "
          f"{steps} steps after {warmup} warm-ups)\n")  # fmt: skip
    print("| model @ batch | case | samples/s | step ms | peak GiB | MFU | vs open_clip | "
          "÷ plain step |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        r = case.result
        key = f"{case.model} @ {case.batch:,}"
        if "error" in r:
            print(f"| {key} | {case.label} | {r['error']} | | | | | |")
            continue
        reference = next((c for c in cases if c.model == case.model and c.batch == case.batch
                          and c.recipe == "open_clip" and "samples_per_s" in c.result), None)  # fmt: skip
        plain = next((c for c in cases if c.model == case.model and c.batch == case.batch
                      and c.recipe == "clipscale" and c.chunk is None and c.fused
                      and c.compile == case.compile and "step_s" in c.result), None)  # fmt: skip
        ratio = (
            f"{r['samples_per_s'] / reference.result['samples_per_s']:.2f}×" if reference else "—"
        )
        cost = f"{r['step_s'] / plain.result['step_s']:.2f}" if case.chunk and plain else "—"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "—"
        print(f"| {key} | {case.label} | {r['samples_per_s']:,.0f} | {1000 * r['step_s']:.1f} | "
              f"{peak} | {mfu(case, peak_tflops)} | {ratio} | {cost} |")  # fmt: skip


def profile_table(model: str, batch: int, device, rows: int) -> None:
    """Top kernels (device time) of one clipscale step, the fused + compiled case."""
    case = Case("profile", model, batch, compile=device.type == "cuda")
    data = random_batch(model, batch, device)
    _, prof = clipscale_run(case, data, device, steps=1, warmup=3, profile_step=2)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### Top {rows} kernels of one clipscale step ({model} @ {batch:,}, {sort})\n")
    print("```")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))
    print("```")


def staged_memory(model: str, sizes: list[int], chunk: int, loss_chunk: int, device) -> None:
    """Peak GPU memory of one host-staged, gradient-cached step at each batch size: the images
    stay in pinned host memory (one allocation for the largest size, sliced for the others)."""
    print(f"\n### One host-staged step, {model}, grad_cache.chunk_size={chunk:,}, "
          f"loss.chunk_size={loss_chunk:,}\n")  # fmt: skip
    print("| per-GPU batch | host images GiB | peak GPU GiB | step s |")
    print("|---:|---:|---:|---:|")
    try:
        host = random_host_batch(model, max(sizes), device)
    except RuntimeError as error:  # pinning ~40 GB may fail on a small host
        print(f"| {max(sizes):,} | could not allocate host memory: {str(error)[:80]} | | |")
        return
    for size in sizes:
        data = {"images": host["images"][:size], "texts": host["texts"][:size]}
        case = Case("staged", model, size, chunk=chunk, stage=True, loss_chunk=loss_chunk)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times, _ = clipscale_run(case, data, device, steps=1, warmup=0)
        except torch.cuda.OutOfMemoryError as error:
            print(f"| {size:,} | {data['images'].nbytes / GIB:.1f} | OOM: "
                  f"{str(error).splitlines()[0][:60]} | |")  # fmt: skip
            continue
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        peak_text = f"{peak:.1f}" if peak is not None else "—"
        print(f"| {size:,} | {data['images'].nbytes / GIB:.1f} | {peak_text} | {times[0]:.1f} |",
              flush=True)  # fmt: skip


def random_host_batch(model_name: str, batch: int, device) -> dict:
    """uint8 images and tokens in pinned host memory, filled piecewise from the device's RNG."""
    from clipscale.models import build_model

    probe = build_model(model_name)
    size = probe.visual.image_size
    size = size if isinstance(size, int) else size[0]
    context = probe.context_length
    pin = device.type == "cuda"
    images = torch.empty((batch, 3, size, size), dtype=torch.uint8, pin_memory=pin)
    texts = torch.empty((batch, context), dtype=torch.long, pin_memory=pin)
    gen = torch.Generator(device=device).manual_seed(0)
    for start in range(0, batch, 8192):
        rows = min(8192, batch - start)
        images[start : start + rows].copy_(torch.randint(
            0, 256, (rows, 3, size, size), dtype=torch.uint8, device=device, generator=gen))  # fmt: skip
        texts[start : start + rows].copy_(
            torch.randint(1, 49407, (rows, context), device=device, generator=gen)
        )
    return {"images": images, "texts": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, all paths")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[65_536, 131_072, 262_144])
    args = parser.parse_args()

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_step_gpu: no CUDA device; skipped (python benchmarks/bench_step_gpu.py "
              "--cpu-smoke runs the code paths on CPU)")  # fmt: skip
        return 0
    import logging
    import warnings

    from clipscale.flops import peak_tflops

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    if args.cpu_smoke:
        device, cases = torch.device("cpu"), smoke_cases()
        steps, warmup = min(args.steps, 2), min(args.warmup, 1)
        memory = ("clipscale-tiny", [64, 128], 16, 32)
        profile = ("clipscale-tiny", 16)
        device_name, peak = "CPU (smoke test: tiny model)", None
    else:
        device, cases = torch.device("cuda"), gpu_cases(args)
        steps, warmup = args.steps, args.warmup
        memory = ("ViT-B-32", args.memory_sizes, 2048, 8192)
        profile = ("ViT-B-32", 1024)
        device_name, peak = torch.cuda.get_device_name(device), peak_tflops(device)

    for case in cases:
        run_case(case, device, steps, warmup)
        seconds = case.result.get("wall_s", 0)
        print(f"  {case.model} @ {case.batch} {case.label}: {seconds:.0f} s", file=sys.stderr,
              flush=True)  # fmt: skip
    print_table(cases, peak, device_name, steps, warmup)
    profile_table(*profile, device, rows=15)
    if not args.skip_memory:
        staged_memory(*memory, device)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
