"""One writer per directory: an OS-level lock (fcntl.flock) on a lock file that records who holds it.

    with DirectoryLock("runs/my-run/.lorakit.lock", "output_dir 'runs/my-run'"):
        ...   # a second process gets DirectoryInUse naming the first: pid, host, start time, command

The kernel drops a flock when its process dies (kill -9, the OOM killer, a crash), so a lock file left behind
by a dead run is stale by construction: the next run takes the lock over and says whose it was. The file is
deleted on release; because a waiting process may have opened it just before, a process that got the lock
checks that the file it locked is still the one at the path, and tries again if not.
On filesystems without flock (some network mounts) the recorded pid decides: a running process on this host
holds the directory, a dead one does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: only the pid check
    fcntl = None

from lorakit.atomic import pid_alive

logger = logging.getLogger(__name__)


class DirectoryInUse(BlockingIOError):
    """Another process holds the directory; the message names it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class DirectoryLock:
    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what  # what: how messages name the directory
        self._fd: int | None = None
        self.taken_over: dict | None = None  # the holder recorded in a stale lock file we took over

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(10):  # more than one retry only when several processes race for a just-released lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            holder = _read_holder(fd)
            if locked is False or (locked is None and _held_by_other(holder)):
                os.close(fd)
                raise DirectoryInUse(self._busy_message(holder))
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder deleted the file after we opened it: lock the new one
        else:  # pragma: no cover - ten lost races in a row
            raise DirectoryInUse(f"{self.what} is being claimed by other processes right now; try again")
        self._fd = fd
        if holder and holder.get("pid") != os.getpid():
            self.taken_over = holder
            logger.warning("%s: taking over the lock of pid %s (started %s), which is no longer running",
                           self.what, holder.get("pid"), holder.get("started", "at an unknown time"))
        _write_holder(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still holding the lock: see the module docstring
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def _busy_message(self, holder: dict | None) -> str:
        if holder:
            who = (f"pid {holder.get('pid')} on {holder.get('host', 'an unknown host')}, started "
                   f"{holder.get('started', 'at an unknown time')}")
            command = holder.get("command")
            who += f" ({command})" if command else ""
        else:
            who = "a process that has not recorded itself yet"
        return (f"{self.what} is in use by another lorakit process: {who}. Two runs writing one directory would "
                f"destroy each other's files; wait for it to finish (or stop it), or choose another directory. "
                f"Lock file: {self.path}")


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by another process; None: this filesystem has no flock."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: e.g. an NFS mount without a lock daemon
        return None
    return True


def _held_by_other(holder: dict | None) -> bool:
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", errors="replace")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int) -> None:
    from lorakit.cli.startup import running_as_command

    program = "lorakit" if running_as_command() else os.path.basename(sys.argv[0]) if sys.argv else ""
    command = " ".join([program, *sys.argv[1:]]) if program else ""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": command[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
