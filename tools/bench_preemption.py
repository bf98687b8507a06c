"""Kill and resume ``densevlm train`` for real: steps lost, time to stop, time to resume, and weight equality.

Runs the DenseVLM toy recipe (random-init toy CLIP student and teacher, a small toy world, data-loader workers on)
through the command line three times: uninterrupted; SIGKILL to the whole process group at a random step, then
``--resume``; SIGTERM to the whole process group (as a scheduler sends it) at a random step, then ``--resume``.
Prints JSON.

    python tools/bench_preemption.py
    python tools/bench_preemption.py --images 96 --checkpoint-every 5 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def make_world(root: Path, images: int) -> None:
    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld import generate_world

    generate_world(ToyWorldConfig(num_train=images, num_val=8, image_size=128, workers=0), root, progress=False)


def recipe(world: Path, out: Path, args: argparse.Namespace) -> dict:
    return {
        "output_dir": str(out), "method": "densevlm",
        "student": {"name": "ToyCLIP-ViT-T-16"}, "teacher": {"name": "ToyCLIP-ViT-T-16"},
        "student_text": {"vocabulary": str(world), "templates": "single"},
        "teacher_text": {"vocabulary": str(world), "templates": "single"},
        "exclude_novel": True, "densevlm": {"threshold": 0.0}, "ensemble_alpha": 0.9,
        "data": {"source": {"kind": "toyworld", "path": str(world), "split": "train"}, "image_size": 128,
                 "max_boxes": 16},
        "loop": {"epochs": 2, "batch_size": args.batch, "num_workers": 2, "cpu": True, "log_every": 1,
                 "checkpoint_every_steps": args.checkpoint_every, "keep_checkpoints": 2},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
    }


class Run:
    """``densevlm train`` in its own process group; follows the global step from the progress bars."""

    def __init__(self, cfg_file: Path, resume: bool = False) -> None:
        cmd = [sys.executable, "-m", "densevlm.cli", "train", "--config", str(cfg_file)] + (["--resume"] if resume else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.stdout, self.stderr, self.step, self.epoch_base, self.first_step_at = "", "", 0, 0, None
        self.steps_per_epoch, self.start_step = None, None
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.stdout += line
            if m := re.search(r"\((\d+)/epoch", line):
                self.steps_per_epoch = int(m.group(1))

    def _read_err(self) -> None:
        while chunk := self.proc.stderr.read(256):  # type: ignore[union-attr]
            self.stderr += chunk
            # tqdm: "epoch E/N:  40%|####| k/M [" -> global step = (E - 1) * steps_per_epoch + k
            for e, k in re.findall(r"epoch (\d+)/\d+:[^\r\n]*?\| *(\d+)/\d+ \[", chunk):
                if self.steps_per_epoch:
                    step = (int(e) - 1) * self.steps_per_epoch + int(k)
                    if self.start_step is None:  # the bar's first state: where this process starts
                        self.start_step = step
                    elif step > self.start_step and self.first_step_at is None:
                        self.first_step_at = time.time()
                    self.step = max(self.step, step)

    def signal_at(self, step: int, sig: int) -> float:
        while self.step < step and self.proc.poll() is None:
            time.sleep(0.005)
        os.killpg(self.proc.pid, sig)
        return time.time()

    def wait(self) -> int:
        rc = self.proc.wait(timeout=1800)
        time.sleep(0.2)  # let the reader threads drain the pipes
        return rc


def checkpoints(run_dir: Path) -> list[dict]:
    pointer = run_dir / "checkpoints" / "latest.json"
    return json.loads(pointer.read_text())["checkpoints"] if pointer.is_file() else []


def equal(a: Path, b: Path) -> tuple[bool, float]:
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    return all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys(), diff


def interrupted(tmp: Path, world: Path, args: argparse.Namespace, sig: int, at: int, ref: Path) -> dict:
    out = tmp / signal.Signals(sig).name
    cfg_file = tmp / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(recipe(world, out, args)))
    run = Run(cfg_file)
    t_sig = run.signal_at(at, sig)
    rc = run.wait()
    stop_s = time.time() - t_sig
    seen = run.step
    saved = checkpoints(out)[-1]
    resumed = Run(cfg_file, resume=True)
    rc2 = resumed.wait()
    m = re.search(r"resumed from \S+ \((.*?)\) in ([\d.]+)s", resumed.stdout)
    same, diff = equal(ref, out)
    return {
        "signal": signal.Signals(sig).name, "signalled_at_step": at, "steps_done_when_stopped": seen,
        "exit_code": rc, "seconds_signal_to_exit": round(stop_s, 2),
        "resumed_from_step": saved["step"], "checkpoint_reason": saved["reason"],
        "steps_lost": seen - saved["step"],
        "checkpoint_load_seconds": float(m.group(2)) if m else None,
        "seconds_launch_to_first_resumed_step": round(resumed.first_step_at - resumed.t0, 2)
        if resumed.first_step_at else None,
        "resume_exit_code": rc2, "bit_identical": same, "max_abs_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="picks the steps at which the signals are sent")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_preempt_"))
    world = tmp / "world"
    make_world(world, args.images)
    ref = tmp / "uninterrupted"
    cfg_file = tmp / "ref.yaml"
    cfg_file.write_text(yaml.safe_dump(recipe(world, ref, args)))
    run = Run(cfg_file)
    assert run.wait() == 0, run.stderr[-2000:]
    total = json.loads((ref / "metrics.json").read_text())["global_step"]
    spe = run.steps_per_epoch or 1
    rng = random.Random(args.seed)
    # inside an epoch and not on a checkpoint step, so that the kill lands between checkpoints
    choices = [s for s in range(2, total - 2) if s % spe and s % args.checkpoint_every]
    result = {
        "setup": {"model": "ToyCLIP-ViT-T-16 (random init) student and teacher", "images": args.images,
                  "image_size": 128, "batch": args.batch, "steps": total, "steps_per_epoch": spe,
                  "checkpoint_every_steps": args.checkpoint_every, "num_workers": 2,
                  "torch_threads": 2, "checkpoint_mb": round(next((ref / "checkpoints").glob("*.pt")).stat().st_size
                                                             / 2**20, 1)},
        "uninterrupted_seconds": round(time.time() - run.t0, 1),
        "runs": [interrupted(tmp, world, args, sig, rng.choice(choices), ref)
                 for sig in (signal.SIGKILL, signal.SIGTERM)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
