"""Compositional probe scoring: the CLI's metrics.json agrees with open_clip's own model from the
exported checkpoint and the strict "above every foil" rule; bad probe lines are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from clipscale.data.probe import write_probe
from clipscale.data.synthetic import CLASSNAMES, draw_sample
from clipscale.eval.callback import ValidationCallback
from clipscale.eval.compositional import caption_beats_foils, evaluate_compositional, read_probe
from clipscale.export import main as export_main
from clipscale.models import build_model, build_tokenizer, build_transforms
from tests.eval_fixtures import write_lightning_checkpoint

REPO = Path(__file__).resolve().parent.parent
MODEL = "clipscale-tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compositional")
    probe = write_probe(root / "probe", per_type=40, seed=3)
    # a second probe with several foils per sample, some types of our own naming
    lines = [json.loads(line) for line in (probe / "probe.jsonl").read_text().splitlines()]
    mixed = root / "mixed"
    (mixed / "images").mkdir(parents=True)
    records = []
    for number, line in enumerate(lines[::3]):
        Image.open(probe / line["image"]).save(mixed / line["image"])
        others = [other["caption"] for other in lines[number : number + 1 + number % 3]]
        foils = [f for f in line["foils"] + others if f != line["caption"]] or line["foils"]
        records.append({**line, "foils": foils, "type": f"kind{number % 2}"})
    (mixed / "probe.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for index in range(10):  # an ImageFolder-style zero-shot set, evaluated as it is
        image, _, label = draw_sample(0, "val", index)
        folder = root / "folders" / CLASSNAMES[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    torch.manual_seed(0)
    model = build_model(MODEL)
    checkpoint = write_lightning_checkpoint(root / "last.ckpt", model, MODEL)
    exported = root / "export" / "tiny.pt"
    export_main([f"checkpoint={checkpoint}", f"output={exported}"])
    return {
        "root": root,
        "probe": probe,
        "mixed": mixed,
        "checkpoint": checkpoint,
        "exported": exported,
    }


def reference_scores(exported: Path, folder: Path) -> dict:
    """Per-type accuracy/chance from open_clip's model, float64 cosines, the strict rule."""
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(exported))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    stats, near_ties = {}, 0
    for line in map(json.loads, (folder / "probe.jsonl").read_text().splitlines()):
        with torch.no_grad():
            image = model.encode_image(preprocess(Image.open(folder / line["image"]))[None])
            texts = model.encode_text(tokenizer([line["caption"], *line["foils"]]))
        image, texts = image.double(), texts.double()
        cosines = (texts @ image.T).flatten() / (texts.norm(dim=1) * image.norm())
        margin = (cosines[0] - cosines[1:].max()).item()
        near_ties += abs(margin) < 1e-5  # float32 encoders may order these either way
        for key in (line["type"], "overall"):
            total, hits, chance = stats.get(key, (0, 0, 0.0))
            stats[key] = (total + 1, hits + (margin > 0), chance + 1 / (1 + len(line["foils"])))
    return {k: (h / t, c / t, t) for k, (t, h, c) in stats.items()}, near_ties


def test_cli_metrics_agree_with_open_clip_and_the_strict_rule(setup):
    out = setup["root"] / "evaluation"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    command = [
        sys.executable,
        "-m",
        "clipscale.evaluate",
        f"checkpoint={setup['checkpoint']}",
        f"compositional=[{setup['probe']},{setup['mixed']}]",
        f"zeroshot=[{setup['root'] / 'folders'}]",
        f"paths.output_dir={out}",
        "device=cpu",
        "batch_size=16",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=setup["root"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"probe", "mixed", "folders"}
    assert metrics["folders"]["num_samples"] == 10 and 0 <= metrics["folders"]["top1"] <= 1
    for name in ("probe", "mixed"):
        expected, near_ties = reference_scores(setup["exported"], setup[name])
        ours = metrics[name]
        for key, (accuracy, chance, total) in expected.items():
            count_key = "num_samples" if key == "overall" else f"{key}_num_samples"
            assert ours[count_key] == total
            assert abs(ours[key] - accuracy) <= near_ties / total + 1e-12, (name, key)
            assert ours[f"{key}_chance"] == pytest.approx(chance, abs=1e-12)
    assert set(metrics["probe"]) >= {"attribute_swap", "relation_swap", "negation", "overall"}
    assert metrics["probe"]["negation_chance"] == 0.5
    assert metrics["mixed"]["kind0_chance"] < 0.5  # several foils: chance 1/(1+F) averaged
    assert "overall" in result.stdout


def test_ties_and_nonfinite_scores_fail():
    caption = torch.tensor([0.5, 0.5, 0.7, float("nan"), 0.9, 0.3])
    foils = torch.tensor(
        [[0.4, 0.5], [0.2, 0.1], [0.1, 0.6], [0.0, 0.0], [float("nan"), 0.1], [0.2, 9.0]]
    )
    mask = torch.tensor(
        [[True, True], [True, True], [True, True], [True, True], [True, True], [True, False]]
    )
    assert caption_beats_foils(caption, foils, mask).tolist() == [
        False,
        True,
        True,
        False,
        False,
        True,
    ]


def test_validation_callback_logs_per_type_numbers(setup):
    torch.manual_seed(0)
    model = build_model(MODEL)
    callback = ValidationCallback(
        every_n_steps=1, compositional=[str(setup["mixed"])], batch_size=8
    )
    logged = callback.compute(model, MODEL)
    direct = evaluate_compositional(
        model.eval(), build_tokenizer(MODEL), build_transforms(MODEL, False), setup["mixed"], 5
    )
    assert {f"val/compositional/mixed/{k}": float(v) for k, v in direct.items()} == logged
    assert {"val/compositional/mixed/kind0", "val/compositional/mixed/overall"} <= set(logged)


def _probe_with(tmp_path: Path, record: dict, extra_line: str | None = None) -> Path:
    (tmp_path / "a.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "caption": "a red circle", "foils": ["a blue circle"], "type": "t"}
    lines = [json.dumps(good), extra_line or json.dumps({**good, **record})]
    (tmp_path / "probe.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"foils": []}, "line 2: field 'foils'"),
        ({"foils": ["ok", ""]}, "line 2: field 'foils'"),
        ({"image": "missing.png"}, "line 2: field 'image' = 'missing.png'"),
        ({"caption": " "}, "line 2: field 'caption'"),
        ({"type": 3}, "line 2: field 'type'"),
        ({"type": "overall"}, "line 2: field 'type'"),
    ],
)
def test_bad_probe_lines_are_refused_naming_line_and_field(tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        read_probe(_probe_with(tmp_path, record))


def test_missing_field_and_bad_json_are_refused(tmp_path):
    with pytest.raises(ValueError, match="line 2: field 'foils' is missing"):
        read_probe(_probe_with(tmp_path, {}, '{"image": "a.png", "caption": "x", "type": "t"}'))
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_probe(_probe_with(tmp_path, {}, "{not json"))
    with pytest.raises(FileNotFoundError, match="probe.jsonl"):
        read_probe(tmp_path / "nowhere")


def test_train_config_passes_eval_compositional_to_the_callback(setup, compose_config, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    assert instantiate(cfg.callbacks.validation).compositional == []
    cfg = compose_config([f"eval.compositional=[{setup['mixed']}]", f"paths.output_dir={tmp_path}"])
    assert instantiate(cfg.callbacks.validation).compositional == [setup["mixed"]]
