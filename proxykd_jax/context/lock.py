"""The run-directory lock: one stage at a time per run directory.

A stage that writes into a run directory first creates `<run>/proxykd.lock` (hard-linked into place from a
file already written, atomic on local and NFS file systems; `O_EXCL` where there are no hard links) holding
the owner's pid, host, stage, the artifact it writes, process start time and the time it was taken (a kill -9
never leaves it without them: `RunLock._create`). A second process finds the file and stops with
`RunLocked` (the CLI exits 2) naming the holder's pid, host and stage. A lock whose holder is gone
is stale: same host, and either no process with that pid exists or the pid now belongs to a process
started at another time (pid reuse). A stale lock is taken over with a warning, so a run killed with
`kill -9` resumes by running the same command again. A lock held from another host cannot be checked
from here; the message says which file to delete once that host's run is known to be over.

In a multi-process (jax.distributed) run only process 0 takes the lock; the others learn the
outcome from it (`context.RunContext` broadcasts it), so every process stops or goes on together.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import socket
import time

from proxykd_jax.errors import ProxyKDError

log = logging.getLogger(__name__)


class RunLocked(ProxyKDError):
    """Another live process holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised name


def process_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


class RunLock:
    """`<run>/proxykd.lock` for one stage; `acquire` or use as a context manager."""

    def __init__(self, path: pathlib.Path, stage: str, artifact: str = ""):
        self.path, self.stage, self.artifact = pathlib.Path(path), stage, artifact  # artifact: the path it writes
        self.held = False

    def _owner(self) -> dict:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": socket.gethostname(),
            "stage": self.stage,
            **({"artifact": self.artifact} if self.artifact else {}),
            "start_time": _start_time(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or damaged

    def acquire(self) -> None:
        """Takes the lock; raises RunLocked when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if self._create():
                self.held = True
                return
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            if not holder:
                time.sleep(0.02)  # the holder is writing its details: read them again
                continue
            self._check_holder(holder)
        raise RunLocked(f"{self.path}: could not take the run-directory lock; delete the file if no stage is running.")

    def _create(self) -> bool:
        """Creates the lock file holding this process's details; False when it exists. They are written to a file
        of this process's own and hard-linked into place, so no kill -9 leaves a lock without its owner (every
        later command would wait for the owner to be written, then refuse the run directory); on a file system
        without hard links the lock is created with O_EXCL and written, as before."""
        tmp = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            self._write(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
            os.link(tmp, self.path)
            self._tidy()
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
        finally:
            tmp.unlink(missing_ok=True)
        try:
            self._write(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        return True

    def _tidy(self) -> None:
        """Removes the owner files that processes of this host killed before they linked them left behind."""
        prefix = f"{self.path.name}.{socket.gethostname()}."
        for left in self.path.parent.iterdir():
            pid = left.name[len(prefix) : -len(".tmp")]
            if left.name.startswith(prefix) and left.name.endswith(".tmp") and pid.isdigit():
                if not process_alive(int(pid), None):
                    left.unlink(missing_ok=True)

    def _write(self, path: pathlib.Path, flags: int) -> None:
        """Creates `path` (`flags`) holding this process's details, on disk before it returns."""
        fd = os.open(path, flags, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._owner(), f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk: a lock without its owner would refuse every later command
            path.unlink(missing_ok=True)
            raise

    def _check_holder(self, holder: dict) -> None:
        """Raises RunLocked for a live holder; moves a stale lock aside (one process wins that race)."""
        pid, host = int(holder.get("pid", -1)), str(holder.get("host", "?"))
        here = socket.gethostname()
        if host != here or process_alive(pid, holder.get("start_time")):
            where = "this host" if host == here else f"host {host}"
            raise RunLocked(
                f"{self.path.parent} is in use: `{holder.get('stage', '?')}` runs there as pid {pid} on {where} "
                f"(since {holder.get('since', '?')}); wait for it to finish, use another run.dir, or delete "
                f"{self.path} if that process is gone."
            )
        stale = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            self.path.rename(stale)
        except FileNotFoundError:
            return  # another process moved it first
        try:
            moved = json.loads(stale.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != holder:  # another process took the stale lock over between our read and rename
            try:
                os.link(stale, self.path)  # put its live lock back (unless yet another one exists)
            except OSError:
                pass
            stale.unlink(missing_ok=True)
            return
        stale.unlink(missing_ok=True)
        log.warning(
            "%s: taking over a stale lock of `%s` (pid %d on %s is gone; it was killed or crashed)",
            self.path,
            holder.get("stage", "?"),
            pid,
            host,
        )

    def release(self) -> None:
        if self.held:
            holder = self._read() or {}
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
