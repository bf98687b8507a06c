"""Preemption: SIGTERM or SIGUSR1 asks the loop to finish its step, write a checkpoint and exit with a known code.

Cluster schedulers send SIGTERM (SLURM: SIGTERM, then SIGKILL after ``KillWait``; ``--signal=USR1@120`` sends
SIGUSR1 ahead of the time limit). The handler only sets a flag; the loop checks it after every optimiser step and,
on several processes, all-reduces it so that every rank stops after the same step, even when only one was
signalled.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

#: Exit code of a preempted run (EX_TEMPFAIL of sysexits.h: "temporary failure, try again"); rerun with --resume.
PREEMPTED_EXIT_CODE = 75

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint: Any) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"{signal_name} received: stopped after step {step} and saved {checkpoint}; "
                         "rerun the same command with --resume to continue")


class PreemptionWatch:
    """Context manager that turns SIGTERM/SIGUSR1 into a flag (previous handlers restored on exit).

    Outside the main thread signal handlers cannot be installed; the watch then never fires.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionWatch":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def code(self) -> int:
        """The received signal as a number for an all-reduce: 0 none, else 1 + its index in SIGNALS."""
        return 0 if self.signal_name is None else 1 + [s.name for s in SIGNALS].index(self.signal_name)

    @staticmethod
    def name_of(code: int) -> Optional[str]:
        return None if code == 0 else SIGNALS[code - 1].name

    def requested(self, accelerator: Any) -> Optional[str]:
        """The signal's name if any process was signalled (agreed by all ranks: the max code), else None."""
        if accelerator.num_processes == 1:
            return self.signal_name
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.code], device=accelerator.device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self.name_of(int(flag.item()))


def ignore_in_workers(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the preemption signals, which the main process handles.

    A scheduler signals every process of the job; a worker killed by SIGTERM would crash the loader before the
    main process could finish its step and save. Workers still exit when the main process goes away.
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
