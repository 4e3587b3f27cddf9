"""What a training run shows of its validation: every metric on the console, one line per dataset,
and the compositional probe's scores (with their chance levels) in curves.png."""

from __future__ import annotations

import logging

import lightning as L
from torch.utils.data import DataLoader

from clipscale.data.probe import write_probe
from clipscale.eval.callback import ValidationCallback
from clipscale.eval.curves import CurvesCallback, curve_panels
from tests.eval_fixtures import write_classification_dataset
from tests.test_module_step import RandomPairs, make_module
from tests.test_strategies import validation_line


def test_validation_prints_every_metric_per_dataset_and_plots_the_probe(tmp_path, caplog):
    shapes = write_classification_dataset(tmp_path / "shapes", 24, per_shard=12)
    probe = write_probe(tmp_path / "probe", per_type=4, seed=0)
    validation = ValidationCallback(
        every_n_steps=2, zeroshot=[str(shapes)], compositional=[str(probe)], batch_size=16
    )
    curves = CurvesCallback(str(tmp_path / "run"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, log_every_n_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[validation, curves])  # fmt: skip
    # Lightning's messages go to its own logger, which may not propagate to the root's capture.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(caplog.handler)
    try:
        trainer.fit(make_module(), DataLoader(RandomPairs(length=16), batch_size=8))
    finally:
        rank_zero.removeHandler(caplog.handler)

    ((step, metrics),) = validation.history
    assert step == 2
    scores = {f"val/compositional/probe/{kind}" for kind in ("attribute_swap", "overall")}
    assert {"val/zeroshot/shapes/top1", *scores} <= set(metrics)
    # Printed: every logged metric, under its dataset's line, as logged (to 4 digits).
    assert validation_line(caplog.text) == {key: round(value, 4) for key, value in metrics.items()}

    # Plotted: the probe's panel holds every score and chance level, not the sample counts.
    probe_keys = {key for key in metrics if key.startswith("val/compositional/probe/")}
    drawn = set(curve_panels(metrics)["compositional probe"])
    assert drawn == {key for key in probe_keys if not key.endswith("num_samples")}
    assert {key + "_chance" for key in scores} < drawn
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
