"""Atomic file output: a reader never sees half a file, and a failed write never replaces a good one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from safetensors import SafetensorError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` can only set it, and
    setting it for a moment would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by ``tempfile`` the mode an ordinary ``open``/``mkdir`` would
    give it under the umask: tempfile makes them 0600/0700, which would hide exports from a shared cluster's
    other users."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_parents(target: Path) -> Optional[Path]:
    """Create ``target``'s parent folders; returns the outermost one this call created (None: all existed)."""
    top = None
    for folder in target.parents:
        if folder.exists():
            break
        top = folder
    target.parent.mkdir(parents=True, exist_ok=True)
    return top


def remove_empty_parents(target: Path, top: Optional[Path]) -> None:
    """Undo :func:`make_parents` after a failed write: remove the folders it created, if they are still empty."""
    if top is None:
        return
    for folder in target.parents:
        if top not in (folder, *folder.parents):
            break
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or gone: leave it
            break


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX).

    On any exception the temporary file (and any parent folder this call created) is removed and ``path`` is left
    untouched. The file gets the mode an ordinary ``open`` would give it under the umask.
    """
    target = Path(path)
    top = make_parents(target)
    done = False
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb") as fh:  # make sure the bytes are on disk before the rename
                os.fsync(fh.fileno())
            _normal_mode(tmp_path)
            os.replace(tmp_path, target)
            done = True
        except OSError as err:  # a full disk or quota: name the file (the writer's own error often does not)
            if err.filename is None and str(target) not in str(err):
                raise OSError(err.errno, f"cannot write {target}: {err.strerror or err}") from err
            raise
        except (RuntimeError, SafetensorError) as err:
            # torch.save and safetensors report a failed write (full disk, quota) as their own error types
            raise OSError(errno.EIO, f"cannot write {target}: {str(err).strip()[:300]}") from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        if not done:
            remove_empty_parents(target, top)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is moved aside first and deleted only after the new folder is in place, so a failure at
    any point leaves either the old folder or the new one under the final name, never a mix (and no parent folder
    this call created). The folder gets the mode an ordinary ``mkdir`` would give it under the umask.
    """
    target = Path(path)
    top = make_parents(target)
    done = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Optional[Path] = None
    try:
        _normal_mode(tmp, directory=True)
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if not done:
            remove_empty_parents(target, top)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` (e.g. ``safetensors.torch.save_file``) and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file with an error that names the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
