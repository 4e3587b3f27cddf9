"""Export a checkpoint as an open_clip state dict: `python -m clipscale.export checkpoint=PATH output=FILE`.

The file loads with `open_clip.create_model_and_transforms(NAME, pretrained=FILE, **KWARGS)`, NAME
being the architecture and KWARGS the model arguments the run used (e.g. `init_logit_bias` of a
SigLIP run; usually none), both printed by this command. For an architecture open_clip does not
ship (e.g. the demo's `clipscale-tiny`), its JSON config is written beside the file as
`NAME.json`; register it first with either
    import clipscale.models                      # registers every config in clipscale/model_configs
    open_clip.add_model_config("path/to/NAME.json")  # without clipscale installed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import torch

from clipscale.errors import UserError, known_errors
from clipscale.models import (
    MODEL_CONFIG_DIR,
    PREPROCESS_DEFAULTS,
    clip_from_checkpoint,
    read_model_checkpoint,
)

USAGE = "usage: python -m clipscale.export checkpoint=PATH output=FILE [model_name=NAME]"


def export_checkpoint(
    checkpoint: str, output: str, model_name: str | None = None
) -> tuple[Path, str, dict]:
    """Write the model's float32 state dict (open_clip keys) to `output`; return (path, name,
    the further open_clip model arguments it needs)."""
    contents = read_model_checkpoint(checkpoint, model_name)
    model = clip_from_checkpoint(contents, checkpoint)
    # fp32 and contiguous CPU tensors: loads with torch.load(weights_only=True) anywhere
    state_dict = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
                  for k, v in model.state_dict().items()}  # fmt: skip
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, output)
    shipped_config = MODEL_CONFIG_DIR / f"{contents.name}.json"
    if shipped_config.is_file():
        config = open_clip.get_model_config(contents.name)
        (output.parent / f"{contents.name}.json").write_text(json.dumps(config, indent=4) + "\n")
    # image preprocessing the run trained with, where it is not open_clip's default
    preprocess = {
        f"image_{key}": value
        for key, value in (contents.preprocess or {}).items()
        if value != PREPROCESS_DEFAULTS[key]
    }
    return output, contents.name, {**contents.kwargs, **preprocess}


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`key=value` arguments as a dict, refusing unknown keys and missing required ones."""
    allowed, required = {"checkpoint", "output", "model_name"}, {"checkpoint", "output"}
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise UserError(f"unrecognised argument {item!r}; {USAGE}")
        args[key] = value
    missing = required - set(args)
    if missing:
        raise UserError(f"missing {' and '.join(sorted(missing))}=...; {USAGE}")
    return args


@known_errors()
def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = parse_overrides(sys.argv[1:] if argv is None else argv)
    path, model_name, kwargs = export_checkpoint(
        args["checkpoint"], args["output"], args.get("model_name")
    )
    call = ", ".join([repr(model_name), f"pretrained={str(path)!r}"]
                     + [f"{key}={value!r}" for key, value in kwargs.items()])  # fmt: skip
    print(f"wrote {path} (open_clip architecture {model_name!r})")
    print(f"load: open_clip.create_model_and_transforms({call})")
    if (path.parent / f"{model_name}.json").is_file():
        print(
            f"first register the config: open_clip.add_model_config({str(path.parent / (model_name + '.json'))!r})"
        )


if __name__ == "__main__":
    main()
