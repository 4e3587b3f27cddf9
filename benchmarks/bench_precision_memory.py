"""Bytes of parameters + optimizer state under trainer.precision=32-true and bf16-true.

bf16-true stores the weights, and so AdamW's two moments, in bfloat16; the logit scale and bias
stay float32 (CLIPModule._apply). This builds the real CLIPModule, casts it the way Lightning's
bf16-true plugin does (`module.to(dtype=torch.bfloat16)`), builds AdamW from configs/optim/adamw.yaml
over clipscale's parameter groups and takes one step on zero gradients, so the optimizer state is
allocated as in training; then it counts the bytes of every parameter and every state tensor.
CPU only, no forward pass: the counts do not depend on the device. bf16-true's GPU speed is not
measured here and is still open.

    python benchmarks/bench_precision_memory.py [--models clipscale-tiny ViT-B-32]
"""

import argparse

import torch
from omegaconf import OmegaConf

from clipscale.module import CLIPModule
from clipscale.optim import build_optimizer, parameter_groups
from clipscale.train import CONFIG_DIR

MIB = 2**20
PRECISION_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16}


def tensor_bytes(tensors) -> int:
    """Bytes held by `tensors` (floating tensors; AdamW's step counters are left out)."""
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())


def measure(model_name: str, precision: str) -> tuple[int, int]:
    """(parameter bytes, optimizer state bytes) of CLIPModule(model_name) under `precision`."""
    optim = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/optim/adamw.yaml"), resolve=True)
    optim["optimizer"]["fused"] = False  # fused AdamW is a CUDA kernel; the state is the same
    module = CLIPModule(
        model={"name": model_name},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim=optim,
    )
    module.to(dtype=PRECISION_DTYPES[precision])
    groups = parameter_groups(module.model, optim["optimizer"].get("weight_decay", 0.0))
    optimizer = build_optimizer(optim["optimizer"], groups)
    for param in module.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # AdamW allocates its moments at the first step
    module.zero_grad(set_to_none=True)
    states = [t for state in optimizer.state.values() for t in state.values()]
    return tensor_bytes(module.parameters()), tensor_bytes(states)


def main() -> None:
    """Print parameter and optimizer-state bytes of each model under both precisions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clipscale-tiny", "ViT-B-32"])
    args = parser.parse_args()
    print(
        f"{'model':<16} {'precision':<10} {'params MiB':>11} {'AdamW MiB':>10} {'total MiB':>10} "
        f"{'vs 32-true':>10}"
    )
    for model_name in args.models:
        baseline = None
        for precision in PRECISION_DTYPES:
            params, state = measure(model_name, precision)
            total = params + state
            baseline = baseline or total
            print(
                f"{model_name:<16} {precision:<10} {params / MIB:>11.1f} {state / MIB:>10.1f} "
                f"{total / MIB:>10.1f} {total / baseline:>10.3f}"
            )


if __name__ == "__main__":
    main()
