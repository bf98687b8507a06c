"""The method registry and the engine's explicit hooks: methods plug in without the engine knowing them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.engine.run_dir import prepare_run_dir
from densevlm.engine.trainer import Trainer
from densevlm.tasks.align import METHODS
from densevlm.tasks.methods import register_method
from test_engine import MSE, Net, Points, RunCfg

PACKAGE = Path(__file__).resolve().parents[1] / "densevlm"


def test_every_align_method_is_registered_and_the_engine_names_none():
    assert {"densevlm", "clipself"} <= set(METHODS)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("densevlm")(lambda cfg, student: None)
    for path in (PACKAGE / "engine").glob("*.py"):
        text = re.sub(r"densevlm\.[a-z_.]+", "", path.read_text())  # module paths of the package itself
        assert not re.search(r"(?i)\b(densevlm|clipself|talk2dino|teacher_cache)\b", text), path.name


class Recorder:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.calls.append(epoch)


def test_callbacks_get_on_epoch_start_every_epoch_and_do_not_change_training(tmp_path):
    cfg = RunCfg(loop=LoopConfig(epochs=3, batch_size=8, num_workers=0, log_every=1, cpu=True),
                 optim=OptimConfig(lr=5e-2, warmup_steps=2, weight_decay=0.0))
    weights = []
    for name, callbacks in [("plain", []), ("hooked", [Recorder()])]:
        torch.manual_seed(0)
        model = Net()
        prepare_run_dir(tmp_path / name, cfg)
        Trainer(model=model, objective=MSE(), dataset=Points(), loop=cfg.loop, optim=cfg.optim,
                run_dir=tmp_path / name, callbacks=callbacks).fit()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert callbacks[0].calls == [0, 1, 2]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_grid_dataset_set_epoch_has_no_side_effect_on_its_cache():
    from densevlm.data.regions import GridRegionDataset

    class Cache:
        def sync(self):  # the old hidden barrier; nothing may call it from the dataset any more
            raise AssertionError("GridRegionDataset.set_epoch synced the cache")

    ds = GridRegionDataset.__new__(GridRegionDataset)
    ds.teacher_cache, ds.epoch = Cache(), 0
    ds.set_epoch(3)
    assert ds.epoch == 3
