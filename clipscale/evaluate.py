"""Evaluate a checkpoint: `python -m clipscale.evaluate checkpoint=PATH zeroshot=[DIR] retrieval=[DIR]`.

Writes `<paths.output_dir>/metrics.json` = {dataset name: {metric: value}} and prints a table;
paths.output_dir defaults to `eval-<time>/` in the checkpoint's run (or beside an open_clip file).
Zero-shot datasets report `top1`, `top5` (fractions), `mean_per_class_recall`, `per_class_top1`
(and `coder_*` with coder.k); retrieval datasets report `image_to_text_R@1/5/10`,
`text_to_image_R@1/5/10`, mean/median ranks and the modality-gap metrics (clipscale.eval.geometry);
both count `nonfinite_features` (NaN/inf rows, scored as misses). Compositional probes
(clipscale.eval.compositional) report the accuracy of each foil type, `overall` and their chance.

A zero-shot folder is clip_benchmark's webdataset layout (python -m clipscale.data.shards
--layout zeroshot writes one) or an ImageFolder-style folder (one sub-folder of images per class,
class names from the folder names, default templates). MY_CLASSES below stands for such a
folder of your own (MY_CLASSES/<class name>/*.jpg); the other folders are written by the commands.
    python -m clipscale.data.probe --output data/eval/probe
    python -m clipscale.data.shards --layout zeroshot --images MY_CLASSES --output data/eval/mine
    python -m clipscale.evaluate checkpoint=runs/demo/checkpoints/last.ckpt \
        zeroshot=[data/eval/mine] compositional=[data/eval/probe] paths.output_dir=runs/demo/eval
    clip_benchmark_export_wds --dataset cifar10 --split test --dataset-root data/raw/cifar10 \
        --output data/eval/cifar10    # needs internet once: torchvision downloads CIFAR-10
    python -m clipscale.evaluate checkpoint=ViT-B-32.pt model_name=ViT-B-32 \
        zeroshot=[data/eval/cifar10]
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clipscale.cli import check_command_line, hydra_run_dir
from clipscale.data.decode import DECODE_MODES, DeviceTransform
from clipscale.data.probe import resolve_probe_dirs
from clipscale.errors import UserError, known_errors
from clipscale.eval.compositional import evaluate_compositional, read_probe
from clipscale.eval.datasets import read_dataset_info
from clipscale.eval.retrieval import evaluate_retrieval
from clipscale.eval.zeroshot import evaluate_zeroshot, zeroshot_dataset_info
from clipscale.models import (
    build_tokenizer,
    build_transforms,
    clip_from_checkpoint,
    read_model_checkpoint,
)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
TABLE_KEYS = (
    "top1",
    "top5",
    "coder_top1",
    "coder_fewshot_top1",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "text_to_image_R@1",
    "text_to_image_R@5",
    "modality_gap",
    "overall",
    "overall_chance",
)


def resolve_device(device: str) -> torch.device:
    """`auto` = the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_decode(decode: str, device: torch.device) -> str:
    """`worker` or `device` (as data.decode): `auto` decodes on the device when it is CUDA."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        return "device" if device.type == "cuda" else "worker"
    return decode


def check_request(cfg: DictConfig) -> None:
    """Refuse a missing checkpoint= and a dataset key given as a string instead of a list."""
    if cfg.checkpoint is None:
        raise UserError(
            "checkpoint= is required: a run's checkpoint (checkpoint=<run>/checkpoints/last.ckpt) "
            "or an open_clip state dict (checkpoint=FILE model_name=ViT-B-32)"
        )
    for key in ("zeroshot", "retrieval", "compositional"):
        value = cfg.get(key)
        if isinstance(value, str):
            raise UserError(f"{key}={value} must be a list of folders: write {key}=[{value}]")


def evaluate(cfg: DictConfig) -> dict[str, dict]:
    """Metrics of every configured dataset, keyed by dataset folder name."""
    check_request(cfg)
    checkpoint = read_model_checkpoint(cfg.checkpoint, cfg.model_name)  # refused before the data
    folders = [(root, "classification") for root in cfg.zeroshot]
    folders += [(root, "retrieval") for root in cfg.retrieval]
    probes = resolve_probe_dirs(cfg.get("compositional"))  # `builtin`: the default probe
    if not folders and not probes:
        raise ValueError(
            "nothing to evaluate: give zeroshot=[DIR,...], retrieval=[DIR,...] and/or "
            "compositional=[DIR,...]"
        )
    for root in probes:
        read_probe(root)  # refuse a bad probe.jsonl before loading the model
    infos = []
    for root, expected in folders:
        read_info = zeroshot_dataset_info if expected == "classification" else read_dataset_info
        info = read_info(root)  # a zero-shot entry may be imagenet:DIR
        if info.dataset_type != expected:
            listed = "zeroshot" if expected == "classification" else "retrieval"
            raise ValueError(
                f"{root!r} is a {info.dataset_type} dataset but is listed in {listed}="
            )
        infos.append(info)
    names = [info.name for info in infos] + [root.name for root in probes]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folder names must be distinct (they key metrics.json): {names}")

    device = resolve_device(cfg.device)
    model = clip_from_checkpoint(checkpoint, cfg.checkpoint).to(device)
    tokenizer = build_tokenizer(checkpoint.name)
    # a training checkpoint's recorded image preprocessing; open_clip's defaults for a weights file
    transform = build_transforms(checkpoint.name, False, preprocess=checkpoint.preprocess)
    if resolve_decode(cfg.get("decode", "worker"), device) == "device":
        transform = DeviceTransform(transform, device)  # the decoder of data.decode=device
    loader_kw = {"num_workers": cfg.num_workers, "max_samples": cfg.max_samples}
    results = {}
    for info in infos:
        if info.dataset_type == "classification":
            results[info.name] = evaluate_zeroshot(
                model, tokenizer, transform, info, cfg.batch_size, device,
                coder_k=cfg.coder.k, coder_shots=cfg.coder.shots, **loader_kw,
            )  # fmt: skip
        else:
            results[info.name] = evaluate_retrieval(
                model, tokenizer, transform, info.shards, cfg.batch_size, device, **loader_kw
            )
    for root in probes:
        results[root.name] = evaluate_compositional(
            model, tokenizer, transform, root, cfg.batch_size, device, cfg.max_samples
        )
    return results


def format_table(results: dict[str, dict]) -> str:
    """The headline numbers of every dataset as an aligned text table."""
    columns = [k for k in TABLE_KEYS if any(k in metrics for metrics in results.values())]
    width = max(len("dataset"), *(len(name) for name in results))
    lines = ["  ".join(["dataset".ljust(width), *(c.rjust(17) for c in columns)])]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}".rjust(17) if c in metrics else "-".rjust(17) for c in columns]
        lines.append("  ".join([name.ljust(width), *cells]))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@known_errors(hydra_run_dir)
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: evaluate, write metrics.json, print the table."""
    try:
        results = evaluate(cfg)
    except (ValueError, FileNotFoundError) as error:  # bad checkpoint, dataset folder or line
        raise UserError(str(error)) from error
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"checkpoint {cfg.checkpoint}")
    print(format_table(results))
    print(f"metrics    {output_dir / 'metrics.json'}")


def main() -> None:
    """`python -m clipscale.evaluate`: check the overrides as the shell passed them, then run Hydra."""
    check_command_line(CONFIG_DIR, "evaluate")
    hydra_main()


if __name__ == "__main__":
    main()
