"""Kill training from outside (SIGKILL, SIGTERM; 1 process and 2 gloo processes), resume, and get identical weights.

Every run is a subprocess of tests/preempt_worker.py (a dropout model, gradient accumulation 2, ensembling, step
checkpoints every 2 steps), with the same thread count, so the uninterrupted run and the resumed one are computed
the same way and must agree bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from densevlm.engine.checkpoint import CKPT_DIR, LATEST
from densevlm.engine.preemption import PREEMPTED_EXIT_CODE

WORKER = Path(__file__).with_name("preempt_worker.py")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
STEPS_1P = 18  # 48 points, batch 4, accumulation 2: 6 steps per epoch, 3 epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(run_dir: Path, nproc: int, resume: bool = False, sleep: float = 0.0) -> list[str]:
    args = [str(WORKER), str(run_dir), "--sleep", str(sleep)] + (["--resume"] if resume else [])
    if nproc == 1:
        return [sys.executable] + args
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port())] + args


def _run(run_dir: Path, nproc: int = 1, resume: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(run_dir, nproc, resume), capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _interrupt(run_dir: Path, sig: int, at_step: int, nproc: int = 1, target_rank: Optional[int] = None
               ) -> tuple[int, int]:
    """Start a run, send ``sig`` once rank 0 reports ``at_step`` (to ``target_rank``'s process, or the whole
    group); return (exit code, last step reported)."""
    err = open(run_dir.parent / f"{run_dir.name}.stderr", "w")
    proc = subprocess.Popen(_cmd(run_dir, nproc, sleep=0.05), stdout=subprocess.PIPE, stderr=err,
                            text=True, env=ENV, start_new_session=True)
    pids, last, lines = {}, 0, []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"pid (\d+) rank (\d+)", line):
                pids[int(m.group(2))] = int(m.group(1))
            if m := re.match(r"step (\d+)", line):
                last = int(m.group(1))
                if last == at_step:
                    if target_rank is None:
                        os.killpg(proc.pid, sig)
                    else:
                        os.kill(pids[target_rank], sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        err.close()
    assert last >= at_step, "".join(lines[-30:]) + (run_dir.parent / f"{run_dir.name}.stderr").read_text()[-3000:]
    return rc, last


def _weights_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _pointer(run_dir: Path) -> dict:
    return json.loads((run_dir / CKPT_DIR / LATEST).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    _run(run)
    return run


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(uninterrupted, tmp_path):
    at = random.Random(11).choice([s for s in range(STEPS_1P) if s % 6 in (3, 4)])  # mid-epoch, between checkpoints
    run = tmp_path / "run"
    rc, last = _interrupt(run, signal.SIGKILL, at)
    assert rc == -signal.SIGKILL and not (run / "weights.safetensors").exists()
    saved = _pointer(run)["checkpoints"][-1]
    assert saved["step"] <= last and not saved["epoch_complete"]  # resumes inside the epoch
    proc = _run(run, resume=True)
    m = re.search(r"resumed from \S+ \(epoch (\d+), batch (\d+)/12, step (\d+)\) in ([\d.]+)s", proc.stdout)
    assert m and int(m.group(3)) == saved["step"], proc.stdout[-1000:]
    assert last - saved["step"] <= 3  # steps lost: at most the checkpoint interval plus the step in flight
    _weights_equal(uninterrupted, run)
    metrics = json.loads((run / "metrics.json").read_text())
    ref = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["history"] == ref["history"]  # the epoch's loss averages survive the kill too


def test_sigterm_checkpoints_the_step_and_exits_75_then_resume_is_bit_identical(uninterrupted, tmp_path):
    run = tmp_path / "run"
    rc, last = _interrupt(run, signal.SIGTERM, 9)
    assert rc == PREEMPTED_EXIT_CODE
    info = json.loads((tmp_path / "run.rank0.json").read_text())
    saved = _pointer(run)["checkpoints"][-1]
    # no step lost: the checkpoint is of the last step the run reported
    assert info["signal"] == "SIGTERM" and info["step"] == saved["step"] == last and saved["reason"] == "preempt"
    _run(run, resume=True)
    _weights_equal(uninterrupted, run)


def test_two_gloo_processes_agree_on_the_step_to_save_and_resume_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    _run(ref, nproc=2)
    run = tmp_path / "run"
    # only rank 1 is signalled (SIGUSR1, as SLURM's --signal sends): both ranks must stop after the same step
    rc, last = _interrupt(run, signal.SIGUSR1, 4, nproc=2, target_rank=1)
    assert rc != 0
    r0 = json.loads((tmp_path / "run.rank0.json").read_text())
    r1 = json.loads((tmp_path / "run.rank1.json").read_text())
    assert r0["step"] == r1["step"] == _pointer(run)["checkpoints"][-1]["step"] and r0["signal"] == "SIGUSR1"
    assert not _pointer(run)["checkpoints"][-1]["epoch_complete"] or r0["step"] % 3 == 0
    _run(run, nproc=2, resume=True)
    _weights_equal(ref, run)
