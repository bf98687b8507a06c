"""The training loop: resume equals an uninterrupted run, run directories are protected, ensembling, DDP sync."""

from __future__ import annotations

import json
import math
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


def test_resume_may_change_how_a_run_is_checkpointed_and_guarded_not_what_it_computes(tmp_path, caplog):
    cfg = RunCfg()
    _train(tmp_path / "r", cfg, stop=1)
    cfg.loop.checkpoint_every_steps, cfg.loop.on_nonfinite = 2, "skip"
    with caplog.at_level("WARNING"):
        prepare_run_dir(tmp_path / "r", cfg, resume=True)
    assert "loop.checkpoint_every_steps None -> 2, loop.on_nonfinite 'stop' -> 'skip'" in caplog.text
    assert "checkpoint_every_steps: 2" in (tmp_path / "r" / "config.yaml").read_text()  # the record follows
    cfg.loop.batch_size = 4
    with pytest.raises(ConfigError, match=r"differs in 1 key\(s\): loop.batch_size \(8 -> 4\)"):
        prepare_run_dir(tmp_path / "r", cfg, resume=True)


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


def _step_cfg(**loop) -> RunCfg:
    cfg = RunCfg()
    cfg.loop.checkpoint_every_steps = 2
    cfg.loop.keep_checkpoints = 3
    for k, v in loop.items():
        setattr(cfg.loop, k, v)
    return cfg


def test_step_checkpoints_keep_the_last_n_with_checksums(tmp_path):
    from densevlm.utils.hashing import sha256_file

    run = _train(tmp_path / "r", _step_cfg())  # 48 points / batch 8: 6 steps per epoch, 18 in all
    pointer = json.loads((run / "checkpoints" / "latest.json").read_text())
    steps = [e["step"] for e in pointer["checkpoints"]]
    assert steps == [14, 16, 18] and pointer["latest"] == "step_00000018.pt"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [f"step_{s:08d}.pt" for s in steps]
    assert [e["epoch_complete"] for e in pointer["checkpoints"]] == [False, False, True]
    for e in pointer["checkpoints"]:
        assert e["sha256"] == sha256_file(run / "checkpoints" / e["file"])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupted_checkpoint_is_refused_and_resume_falls_back(tmp_path, caplog, damage):
    cfg = _step_cfg(epochs=2)
    full = load_file(str(_train(tmp_path / "full", cfg) / "weights.safetensors"))
    part = tmp_path / "part"
    _train(part, cfg, stop=1)  # epoch 1 done: step checkpoints 2, 4 and the epoch one at 6
    newest = latest_checkpoint(part)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="densevlm.engine.checkpoint"):
        resumed = load_file(str(_train(part, cfg, resume=True) / "weights.safetensors"))
    assert f"checkpoint {newest} is corrupted or truncated" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text
    assert "step_00000004.pt (step 4)" in caplog.text
    for k in full:  # resumed mid-epoch from step 4: still the uninterrupted result
        assert torch.equal(full[k], resumed[k]), k


def test_resume_refuses_when_every_checkpoint_is_bad_naming_them(tmp_path):
    from densevlm.engine.checkpoint import CheckpointError

    cfg = _step_cfg(epochs=2, keep_checkpoints=2)
    part = tmp_path / "part"
    _train(part, cfg, stop=1)
    for p in (part / "checkpoints").glob("*.pt"):
        p.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint: checkpoint .*step_00000004.pt is corrupted"):
        _train(part, cfg, resume=True)


class NaNAt(MSE):
    """MSE whose loss is NaN at the given (1-based) calls."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, step_model, batch):
        self.calls += 1
        out = super().__call__(step_model, batch)
        if self.calls in self.bad:
            out.loss = out.loss * float("nan")
        return out


class IndexedPoints(Points):
    def image_name(self, i: int) -> str:
        return f"point_{i:03d}.png"

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i], "index": i}


class DictMSE(NaNAt):
    def __call__(self, step_model, batch):
        return super().__call__(step_model, (batch["x"], batch["y"]))


def test_nonfinite_loss_stops_naming_step_images_and_last_checkpoint(tmp_path):
    from densevlm.engine.trainer import NonFiniteError

    cfg = _step_cfg()
    run = tmp_path / "nan"
    prepare_run_dir(run, cfg)
    torch.manual_seed(0)
    trainer = Trainer(model=Net(), objective=DictMSE({5}), dataset=IndexedPoints(), loop=cfg.loop, optim=cfg.optim,
                      run_dir=run)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "non-finite loss (loss nan) at step 5 (epoch 1, batch 5/6)" in msg
    assert f"last good checkpoint: {run / 'checkpoints' / 'step_00000004.pt'}" in msg
    # the batch's 8 images, by index and name, in the sampler's order for epoch 0
    order = list(__import__("densevlm.engine.trainer", fromlist=["EpochSampler"]).EpochSampler(48, 0))[32:40]
    assert "batch images on process 0: " + ", ".join(f"{i} (point_{i:03d}.png)" for i in order) in msg
    assert not (run / "weights.safetensors").exists()


class NaNGradientAt(DictMSE):
    """A finite loss whose gradient is NaN at the given calls: + sqrt(0 * pred) (0, with an infinite slope at 0)."""

    def __call__(self, step_model, batch):
        self.calls += 1
        x, y = batch["x"], batch["y"]
        pred = step_model(_forward, x)
        loss = ((pred - y) ** 2).mean()
        if self.calls in self.bad:
            loss = loss + (pred * 0.0).sum().sqrt()
        return ObjectiveOutput(loss, {})


def test_nonfinite_gradient_of_a_finite_loss_stops_training(tmp_path):
    from densevlm.engine.trainer import NonFiniteError

    cfg = _step_cfg()
    run = tmp_path / "nan_grad"
    prepare_run_dir(run, cfg)
    torch.manual_seed(0)
    model = Net()
    trainer = Trainer(model=model, objective=NaNGradientAt({3}), dataset=IndexedPoints(), loop=cfg.loop,
                      optim=cfg.optim, run_dir=run)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient \(loss [0-9.e-]+\) at step 3 "):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN gradient was never applied


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path):
    cfg = _step_cfg(on_nonfinite="skip", epochs=1)
    run = tmp_path / "skip"
    prepare_run_dir(run, cfg)
    torch.manual_seed(0)
    model = Net()
    trainer = Trainer(model=model, objective=DictMSE({2, 5}), dataset=IndexedPoints(), loop=cfg.loop,
                      optim=cfg.optim, run_dir=run)
    result = trainer.fit()
    metrics = json.loads((run / "metrics.json").read_text())
    assert result.global_step == 6 and metrics["nonfinite_skipped"] == 2
    assert metrics["history"][0]["nonfinite_skipped"] == 2
    assert math.isfinite(metrics["history"][0]["train"]["loss"])  # the skipped steps' NaN is not averaged in
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_process_trains_stages_of_different_precisions(tmp_path):
    """accelerate keeps one mixed precision per process; the trainer lets a later stage take another (the bf16
    parity benchmark trains fp32 then bf16 in one process), and the first stage's precision is not leaked."""
    precisions = []
    for name, precision in (("a", "no"), ("b", "bf16"), ("c", "no")):
        cfg = RunCfg()
        cfg.loop.epochs, cfg.loop.precision = 1, precision
        run_dir = tmp_path / name
        prepare_run_dir(run_dir, cfg)
        trainer = Trainer(model=Net(), objective=MSE(), dataset=Points(), loop=cfg.loop, optim=cfg.optim,
                          run_dir=run_dir)
        precisions.append(trainer.accelerator.mixed_precision)
    assert precisions == ["no", "bf16", "no"]
