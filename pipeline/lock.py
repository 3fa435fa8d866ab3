"""One writer per run directory: an flock on run_dir/.lock, released by the kernel
when the process ends, however it ends.

The Hydra callback takes the lock before Hydra writes anything into the run
directory (.hydra/, the log), so a second run on a busy directory changes nothing
of the first; the runner takes it again (re-entrant within a process) for runs
that do not go through Hydra's command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

from pipeline.errors import PipelineError

LOCK_FILE = ".lock"

_held: dict[Path, list] = {}  # run directory -> [fd, depth]


class RunDirBusy(PipelineError):
    pass


def check_writable(run_dir: Path) -> None:
    """One line, before anything is created, when the run directory cannot be written:
    an existing file in its place (or above it), or a read-only folder or file system."""
    run_dir = Path(run_dir)
    nearest = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p.is_symlink())
    if not nearest.is_dir():
        where = "is" if nearest == run_dir else f"lies below {nearest}, which is"
        raise PipelineError(f"run directory {run_dir} {where} not a folder (an existing file): "
                            f"choose another hydra.run.dir")
    # access(2) also refuses root on a read-only mount or an immutable folder
    if not os.access(nearest, os.W_OK | os.X_OK):
        if nearest == run_dir:
            raise PipelineError(f"run directory {run_dir} is read-only for this user: choose a writable "
                                f"hydra.run.dir (copy a finished run somewhere writable to add stages to it)")
        raise PipelineError(f"run directory {run_dir} cannot be created: {nearest} is read-only for this user: "
                            f"choose a writable hydra.run.dir")


def acquire(run_dir: Path) -> None:
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    check_writable(key)
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # what access(2) could not foresee (a full disk, a race)
        raise PipelineError(f"cannot write into run directory {key} ({err.strerror or err}): "
                            f"choose another hydra.run.dir") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirBusy(f"run directory {key} is in use by process {holder}: wait for it to finish, "
                         f"or choose another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]


def release(run_dir: Path) -> None:
    key = Path(run_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor drops the flock


@contextlib.contextmanager
def holding(run_dir: Path):
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class LockRunDir(Callback):
    """Hydra callback: check and lock hydra.run.dir before the run writes into it."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            acquire(Path(str(config.hydra.run.dir)))
        except PipelineError as err:  # Hydra has not set up logging yet: the one line goes to stderr
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
