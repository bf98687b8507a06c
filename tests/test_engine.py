"""The training loop: resume equals an uninterrupted run, run directories are protected, ensembling, DDP sync."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from densevlm.config import ConfigError
from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.engine.checkpoint import latest_checkpoint, load_checkpoint
from densevlm.engine.run_dir import RunDirError, prepare_run_dir
from densevlm.engine.trainer import Trainer
from densevlm.engine.optim import cosine_with_warmup
from densevlm.models.tuning import param_groups_for_adamw as param_groups
from densevlm.methods.base import ObjectiveOutput


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.norm(self.fc(x))).squeeze(-1)


def _forward(model, x):
    return model(x)


class MSE:
    def prepare(self, device):
        pass

    def __call__(self, step_model, batch):
        x, y = batch
        pred = step_model(_forward, x)
        return ObjectiveOutput(((pred - y) ** 2).mean(), {"mean_pred": float(pred.detach().mean())})


@dataclass
class RunCfg:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=3, batch_size=8, num_workers=0,
                                                                 log_every=1, keep_checkpoints=5, cpu=True))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-2, warmup_steps=2, weight_decay=0.0))


def _train(run_dir: Path, cfg: RunCfg, *, resume=False, stop=None, alpha=None) -> Path:
    torch.manual_seed(0)
    model = Net()
    prepare_run_dir(run_dir, cfg, resume=resume)
    trainer = Trainer(model=model, objective=MSE(), dataset=Points(), loop=cfg.loop, optim=cfg.optim,
                      run_dir=run_dir, ensemble_alpha=alpha)
    trainer.fit(resume=resume, stop_after_epoch=stop)
    return run_dir


def test_resume_gives_same_weights_as_uninterrupted(tmp_path):
    cfg = RunCfg()
    full = load_file(str(_train(tmp_path / "full", cfg) / "weights.safetensors"))
    part = tmp_path / "part"
    _train(part, cfg, stop=1)
    assert not (part / "weights.safetensors").exists()
    assert load_checkpoint(latest_checkpoint(part))["epoch"] == 0
    resumed = load_file(str(_train(part, cfg, resume=True) / "weights.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # the loss went down: the trained model fits better than its initialisation
    torch.manual_seed(0)
    init = Net()
    trained = Net()
    trained.load_state_dict(full)
    ds = Points()
    with torch.no_grad():
        assert ((trained(ds.x) - ds.y) ** 2).mean() < 0.5 * ((init(ds.x) - ds.y) ** 2).mean()


def test_run_dir_is_never_silently_overwritten(tmp_path):
    cfg = RunCfg()
    _train(tmp_path / "r", cfg, stop=1)
    with pytest.raises(RunDirError, match="already exists"):
        prepare_run_dir(tmp_path / "r", cfg)
    other = RunCfg()
    other.optim.lr = 0.5
    with pytest.raises(ConfigError, match=r"differs in 1 key\(s\): optim.lr \(0.05 -> 0.5\)"):
        prepare_run_dir(tmp_path / "r", other, resume=True)


def test_weight_space_ensembling(tmp_path):
    cfg = RunCfg()
    cfg.loop.epochs = 1
    run = _train(tmp_path / "e", cfg, alpha=0.25)
    saved = load_file(str(run / "weights.safetensors"))
    ckpt = load_checkpoint(latest_checkpoint(run))
    student, initial = ckpt["model"], ckpt["initial"]
    torch.manual_seed(0)
    assert torch.equal(initial["fc.weight"], Net().fc.weight.detach())
    for k in saved:
        assert torch.allclose(saved[k], 0.25 * student[k] + 0.75 * initial[k], atol=1e-7), k


def test_schedule_and_param_groups():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    groups = param_groups(Net(), 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    net = Net()
    names = {n for n, p in net.named_parameters()}
    assert len(groups[0]["params"]) == 2 and groups[0]["weight_decay"] == 0.1  # the two weight matrices
    assert len(groups[1]["params"]) == len(names) - 2 and groups[1]["weight_decay"] == 0.0
    assert decay.isdisjoint({id(p) for p in groups[1]["params"]})
