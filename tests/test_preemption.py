"""Kill training from outside (SIGKILL, SIGTERM; 1 process and 2 gloo processes), resume, and get identical weights.

Every run is tests/preempt_worker.py (a dropout model, gradient accumulation 2, ensembling, step checkpoints every
2 steps) with one thread: the runs that are killed in subprocesses, the single-process reference and resumes in
this process (same numbers, no start-up cost), so they are computed the same way and must agree bit for bit.
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


def single_device_env(rank: int, nproc: int, port: int, device: str) -> dict[str, str]:
    """The environment of process ``rank`` of ``nproc`` that all train on ONE device (tests/test_cuda.py).

    Every process is started as the only one of its own node: LOCAL_RANK=0 and, on a GPU, only the test's one GPU
    visible (the first of CUDA_VISIBLE_DEVICES). accelerate then puts every rank on cuda:0 and gives DDP
    ``device_ids=[0]``, as on a job of ``nproc`` nodes with one GPU each; with LOCAL_RANK=rank, rank 1 would ask for
    cuda:1. The workers join a gloo process group themselves (NCCL refuses two ranks on one GPU). The inherited
    PYTHONPATH is kept behind the repository (the GPU machine installs some packages there). On the CPU (the dry
    run) the same topology runs on gloo as every CPU run does.
    """
    inherited = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([inherited] if inherited else []))}
    if nproc > 1:
        env.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    return env


def _start(run_dir: Path, nproc: int, resume: bool = False, sleep: float = 0.0, stdout=subprocess.PIPE,
           device: Optional[str] = None) -> list[subprocess.Popen]:
    """The worker on ``nproc`` processes, started directly with the env:// variables ``torchrun`` would set
    (without its agent process, which costs one more torch import). With ``device`` (tests/test_cuda.py) the
    processes all train on that one device (:func:`single_device_env`)."""
    cmd = [sys.executable, str(WORKER), str(run_dir), "--sleep", str(sleep)] + (["--resume"] if resume else [])
    if device is not None:
        cmd += ["--device", device]
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(ENV)
        if device is not None:
            env = single_device_env(rank, nproc, port, device)
        elif nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        err = open(run_dir.parent / f"{run_dir.name}.{'resume' if resume else 'run'}{rank}.stderr", "w")
        procs.append(subprocess.Popen(cmd, stdout=stdout if rank == 0 else subprocess.DEVNULL, stderr=err,
                                      text=True, env=env, start_new_session=True))
        err.close()
    return procs


def _stderr(run_dir: Path) -> str:
    return "".join(p.read_text()[-2000:] for p in sorted(run_dir.parent.glob(f"{run_dir.name}.*.stderr")))


def _run(run_dir: Path, nproc: int = 1, resume: bool = False, device: Optional[str] = None) -> str:
    """Run to the end; rank 0's stdout."""
    procs = _start(run_dir, nproc, resume, device=device)
    out = procs[0].communicate(timeout=240)[0]
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0] * nproc, out[-2000:] + _stderr(run_dir)
    return out


def _run_here(run_dir: Path, resume: bool = False, device: Optional[str] = None) -> None:
    """One process, run in this one with the subprocesses' single thread (same numbers, no start-up cost)."""
    sys.path.insert(0, str(WORKER.parent))
    import preempt_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert preempt_worker.main([str(run_dir)] + (["--resume"] if resume else [])
                                   + (["--device", device] if device is not None else [])) == 0
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(WORKER.parent))


def _interrupt(run_dir: Path, sig: int, at_step: int, nproc: int = 1, target_rank: Optional[int] = None,
               device: Optional[str] = None) -> tuple[list[int], int]:
    """Start a run and send ``sig`` once rank 0 reports ``at_step``, to ``target_rank``'s process or (None) to
    every process group; return (exit codes, last step reported)."""
    procs = _start(run_dir, nproc, sleep=0.05, device=device)
    last, lines = 0, []
    try:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            lines.append(line)
            if m := re.match(r"step (\d+)", line):
                last = int(m.group(1))
                if last == at_step:
                    for rank, p in enumerate(procs):
                        if target_rank is None:
                            os.killpg(p.pid, sig)
                        elif rank == target_rank:
                            os.kill(p.pid, sig)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert last >= at_step, "".join(lines[-30:]) + _stderr(run_dir)
    return codes, last


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
    _run_here(run)
    return run


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(uninterrupted, tmp_path, capsys):
    at = random.Random(11).choice([s for s in range(STEPS_1P) if s % 6 in (3, 4)])  # mid-epoch, between checkpoints
    run = tmp_path / "run"
    (rc,), last = _interrupt(run, signal.SIGKILL, at)
    assert rc == -signal.SIGKILL and not (run / "weights.safetensors").exists()
    saved = _pointer(run)["checkpoints"][-1]
    assert saved["step"] <= last and not saved["epoch_complete"]  # resumes inside the epoch
    _run_here(run, resume=True)
    out = capsys.readouterr().out
    m = re.search(r"resumed from \S+ \(epoch (\d+), batch (\d+)/12, step (\d+)\) in ([\d.]+)s", out)
    assert m and int(m.group(3)) == saved["step"], out[-1000:]
    assert last - saved["step"] <= 3  # steps lost: at most the checkpoint interval plus the step in flight
    _weights_equal(uninterrupted, run)
    metrics = json.loads((run / "metrics.json").read_text())
    ref = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["history"] == ref["history"]  # the epoch's loss averages survive the kill too


def test_sigterm_checkpoints_the_step_and_exits_75_then_resume_is_bit_identical(uninterrupted, tmp_path):
    run = tmp_path / "run"
    (rc,), last = _interrupt(run, signal.SIGTERM, 9)
    assert rc == PREEMPTED_EXIT_CODE
    info = json.loads((tmp_path / "run.rank0.json").read_text())
    saved = _pointer(run)["checkpoints"][-1]
    # no step lost: the checkpoint is of the last step the run reported
    assert info["signal"] == "SIGTERM" and info["step"] == saved["step"] == last and saved["reason"] == "preempt"
    _run_here(run, resume=True)
    _weights_equal(uninterrupted, run)


def test_two_gloo_processes_agree_on_the_step_to_save_and_resume_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    _run(ref, nproc=2)
    run = tmp_path / "run"
    # only rank 1 is signalled (SIGUSR1, as SLURM's --signal sends): both ranks must stop after the same step
    codes, last = _interrupt(run, signal.SIGUSR1, 4, nproc=2, target_rank=1)
    assert codes == [PREEMPTED_EXIT_CODE] * 2
    r0 = json.loads((tmp_path / "run.rank0.json").read_text())
    r1 = json.loads((tmp_path / "run.rank1.json").read_text())
    assert r0["step"] == r1["step"] == _pointer(run)["checkpoints"][-1]["step"] and r0["signal"] == "SIGUSR1"
    assert not _pointer(run)["checkpoints"][-1]["epoch_complete"] or r0["step"] % 3 == 0
    _run(run, nproc=2, resume=True)
    _weights_equal(ref, run)


def test_cli_train_exits_75_on_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    """The real ``densevlm train`` (DenseVLM, tiny toy CLIPs): SIGTERM -> checkpoint + exit 75; --resume -> same
    weights as a run that was never stopped."""
    import threading

    from densevlm import cli
    from test_bad_inputs import Env, train_argv

    sets = ("loop.epochs=4", "loop.checkpoint_every_steps=1", "loop.keep_checkpoints=2")
    ref_env, env = Env(tmp_path / "ref", tmp_path), Env(tmp_path / "run", tmp_path)
    for e in (ref_env, env):
        e.tmp.mkdir()
    assert cli.main(train_argv(ref_env, *sets)) == 0
    argv = train_argv(env, *sets)
    pointer = env.out / "run" / "checkpoints" / LATEST

    def terminate_after_first_checkpoint() -> None:
        while not pointer.exists():
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread: the flag is set mid-training

    threading.Thread(target=terminate_after_first_checkpoint, daemon=True).start()
    assert cli.main(argv) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    saved = _pointer(env.out / "run")["checkpoints"][-1]
    assert saved["reason"] == "preempt" and saved["step"] < 8  # 4 images, batch 2: 8 steps in all
    assert f"SIGTERM received: stopped after step {saved['step']} and saved {env.out}/run/checkpoints/" in err
    assert "rerun the same command with --resume" in err and not (env.out / "run" / "weights.safetensors").exists()
    assert cli.main(argv + ["--resume"]) == 0
    _weights_equal(ref_env.out / "run", env.out / "run")
