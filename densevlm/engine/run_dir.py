"""Run directories: created fresh, resumed explicitly, never silently overwritten."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from densevlm.config import ConfigError, config_diff, to_dict
from densevlm.utils.io import atomic_write_text, remove_empty_parents

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.json"


#: Settings a resumed run may change: how it is checkpointed, logged, fed and guarded, not what it computes (a run
#: stopped by a NaN can be resumed with loop.on_nonfinite=skip; a requeued job can checkpoint more often).
RESUME_MAY_CHANGE = ("loop.checkpoint_every", "loop.checkpoint_every_steps", "loop.keep_checkpoints",
                     "loop.handle_signals", "loop.on_nonfinite", "loop.log_every", "loop.num_workers")


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (exists, or belongs to another config)."""


def check_run_dir(run_dir: str | Path, cfg: Any, *, resume: bool = False, overwrite: bool = False,
                  ignore_keys: tuple[str, ...] = ()) -> list[str]:
    """Raise what :func:`prepare_run_dir` would refuse, creating nothing (commands call it before loading models
    and data, so a forgotten ``--resume`` fails at once). Returns the keys a resumed run changes."""
    path = Path(run_dir)
    saved = path / CONFIG_FILE
    exists = path.exists() and any(path.iterdir())
    if exists and resume:
        if not saved.is_file():
            raise RunDirError(f"cannot resume from {path}: it has no {CONFIG_FILE}")
        old = yaml.safe_load(saved.read_text()) or {}
        new = to_dict(cfg)
        diff = [k for k in config_diff(old, new) if not any(k == i or k.startswith(i + ".") for i in ignore_keys)]
        changed = [k for k in diff if k in RESUME_MAY_CHANGE]
        diff = [k for k in diff if k not in RESUME_MAY_CHANGE]
        if diff:
            details = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in diff[:10])
            raise ConfigError(f"cannot resume from {path}: its config differs in {len(diff)} key(s): {details}")
        return changed
    if exists and not overwrite:
        raise RunDirError(
            f"run directory {path} already exists and is not empty; pass resume (continue it) or overwrite "
            "(replace it), or choose another output_dir"
        )
    return []


def prepare_run_dir(run_dir: str | Path, cfg: Any, *, resume: bool = False, overwrite: bool = False,
                    ignore_keys: tuple[str, ...] = ()) -> Path:
    """Create ``run_dir`` for ``cfg``, or check that a resumed run was made with the same config.

    A non-empty directory is refused unless ``resume`` (same config required; differing keys are named) or
    ``overwrite`` (the caller explicitly asked to replace it) is set.
    """
    path = Path(run_dir)
    saved = path / CONFIG_FILE
    changed = check_run_dir(path, cfg, resume=resume, overwrite=overwrite, ignore_keys=ignore_keys)
    exists = path.exists() and any(path.iterdir())
    if exists and resume:
        if changed:
            old = yaml.safe_load(saved.read_text()) or {}
            new = to_dict(cfg)
            log.warning("resuming %s with %s", path, ", ".join(f"{k} {_get(old, k)!r} -> {_get(new, k)!r}"
                                                                for k in changed))
            atomic_write_text(saved, yaml.safe_dump(new, sort_keys=False))
        return path
    if exists and overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def prepare_run_dir_once(run_dir: str | Path, cfg: Any, *, cpu: bool = False, **kwargs: Any) -> Path:
    """:func:`prepare_run_dir` on the main process only (others wait), for runs started by ``accelerate launch``."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    error: Exception | None = None
    if state.is_main_process:
        try:
            prepare_run_dir(run_dir, cfg, **kwargs)
        except Exception as err:  # re-raised after the barrier so the other processes are not left waiting
            error = err
    state.wait_for_everyone()
    if error is not None:
        raise error
    return Path(run_dir)


def missing_top(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` (itself included) that does not exist yet; None when ``path`` exists."""
    top = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        top = folder
    return top


def worth_keeping(run_dir: Path) -> bool:
    """Whether a run directory holds something a failed run must not delete: a checkpoint or final weights."""
    ckpts = run_dir / "checkpoints"
    return (run_dir / WEIGHTS_FILE).exists() or (ckpts.is_dir() and any(p.is_file() for p in ckpts.rglob("*")))


def discard_failed_run(run_dir: Path, top: Optional[Path]) -> None:
    """Remove what a failed run created in ``run_dir`` (and the empty parents up to ``top`` it created), so that
    the corrected command can be run again as it was; a folder that existed (empty) before is kept, emptied."""
    if not run_dir.exists():
        return
    if top is None:  # the folder was there (and empty) before the run: keep the folder itself
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_empty_parents(run_dir, top)


@contextlib.contextmanager
def run_directory(run_dir: str | Path, cfg: Any, *, cpu: bool = False, resume: bool = False,
                  overwrite: bool = False) -> Iterator[Path]:
    """:func:`prepare_run_dir_once` for the body of a run; if the body fails before it wrote a checkpoint or the
    final weights, what this call created is removed again (main process), so the corrected rerun is not refused
    with "already exists". A run directory the user already had (``--resume``) is never touched.
    """
    path = Path(run_dir)
    fresh = overwrite or not (path.exists() and any(path.iterdir()))
    top = missing_top(path)
    prepare_run_dir_once(path, cfg, cpu=cpu, resume=resume, overwrite=overwrite)
    try:
        yield path
    except BaseException:
        from accelerate import PartialState

        if fresh and PartialState(cpu=cpu).is_main_process and not worth_keeping(path):
            log.info("the run failed before its first checkpoint: removing %s", path)
            discard_failed_run(path, top)
        raise
