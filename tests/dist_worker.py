"""Worker for tests/test_align.py::test_two_process_training_keeps_ranks_identical (run under accelerate launch).

Trains DenseVLM for a few steps on 2 CPU processes (gloo) and records, after every optimiser step, the largest
difference between this rank's weights and rank 0's. Writes ``<out>/rank<r>.json``.

tests/test_cuda.py runs it on one GPU (``loop.cpu: false`` in the config) with ``DENSEVLM_TEST_GLOO=1``: the
process group is then gloo (NCCL refuses two ranks on one GPU), set up before the trainer's own accelerate state,
and each process is started with LOCAL_RANK=0 and the one GPU visible, so both ranks train on cuda:0 (see
tests/test_preemption.py::single_device_env). The json then also says where the rank trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from densevlm.config import from_dict
from densevlm.config.align import AlignConfig
from densevlm.tasks import align


def bypass_ddp() -> None:
    """Reproduce the reference's defect: run the student on the unwrapped module, so DDP never syncs."""
    from densevlm.methods import densevlm as dv

    original = dv.DenseVLMObjective.__call__

    def call(self, step_model, batch):
        inner = step_model.module if hasattr(step_model, "module") else step_model
        return original(self, lambda fn, *a: fn(inner.model, *a), batch)

    dv.DenseVLMObjective.__call__ = call


def main(cfg_path: str, out: str) -> None:
    import os

    import yaml

    if os.environ.get("DENSEVLM_TEST_BYPASS_DDP") == "1":
        bypass_ddp()

    cfg = from_dict(AlignConfig, yaml.safe_load(Path(cfg_path).read_text()))
    gloo = os.environ.get("DENSEVLM_TEST_GLOO") == "1"
    if gloo:
        from accelerate import PartialState

        PartialState(cpu=cfg.loop.cpu, backend="gloo")
    diffs: list[float] = []
    info: dict = {"rank": 0, "world": 1}

    def on_step(step: int, model: torch.nn.Module) -> None:
        info["rank"], info["world"] = dist.get_rank(), dist.get_world_size()
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diffs.append(float((flat - ref).abs().max()))
        if gloo:  # where this rank trained, and how far its weights moved since the first step
            info["device"], info["backend"] = str(flat.device), dist.get_backend()
            first = info.setdefault("first", flat.cpu())
            info["moved"] = float((flat.cpu() - first).abs().max())

    result = align.run_align(cfg, overwrite=True, on_step=on_step)
    # (the process group is gone once training ends, so the rank was recorded during training)
    record = {"world": info["world"], "diffs": diffs, "steps": result.global_step}
    if gloo:
        record.update({k: info[k] for k in ("device", "backend", "moved")})
    Path(out, f"rank{info['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
