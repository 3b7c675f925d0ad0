"""Writing what users rely on: whole directories published by rename, leftovers of killed writers cleaned up,
and disk-full errors that say what could not be written and how much space it needs.

    temp = f"{final}.tmp-{os.getpid()}"
    with disk_full_says("the merged model", final, needed_bytes=size, cleanup=[temp]):
        write_everything_into(temp)
        replace_directory(temp, final)   # `final` stays the old directory until the new one is complete

A rename within one filesystem is atomic, so a reader (or a kill -9) sees the old directory or the new one,
never a mix. Temporary paths are therefore siblings of their target, named `<name>.tmp...` (being written)
and `<name>.old-<pid>` (the replaced directory, between the two renames of a swap); `clean_interrupted_writes`
removes those a killed writer left behind, and puts a replaced directory back when the swap was cut short.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# "<name>.tmp", "<name>.tmp-123", "<name>.tmp123" (write_json_atomic), "<name>.old", "<name>.old-123"
LEFTOVER_RE = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-?(?P<pid>\d+)?$")


class DiskFullError(OSError):
    """The disk (or the user's quota) is full. The message names what could not be written, where, and the space
    it needs; whatever was half-written has been removed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def format_bytes(size: float | None) -> str:
    if size is None:
        return "an unknown amount"
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - the loop returns at GB


def free_bytes(path: str) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tensor_bytes(tensors) -> int:
    """Bytes of a dict (or iterable) of tensors as safetensors stores them (the header aside)."""
    values = tensors.values() if hasattr(tensors, "values") else tensors
    return sum(t.numel() * t.element_size() for t in values)


def remove_path(path: str) -> None:
    """Remove a file or a directory tree; nothing there is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def disk_full_says(what: str, where: str, needed_bytes: int | None = None, cleanup=(), advice: str = ""):
    """Turn a disk-full OSError raised inside the block into a DiskFullError with a message for people, after
    removing the `cleanup` paths (the half-written temporary files). Other errors pass through unchanged.

    what: what could not be written ("checkpoint-6"); where: the directory; advice: what is still intact."""
    try:
        yield
    except OSError as err:
        if not is_disk_full(err) or isinstance(err, DiskFullError):
            raise
        for path in cleanup:
            remove_path(path)
        raise DiskFullError(disk_full_message(what, where, needed_bytes, advice)) from err


def disk_full_message(what: str, where: str, needed_bytes: int | None, advice: str = "") -> str:
    need = f"it needs about {format_bytes(needed_bytes)}, " if needed_bytes else ""
    advice = f" {advice.strip()}" if advice else ""
    return (f"disk full: could not write {what} in {where} ({need}{format_bytes(free_bytes(where))} free there); "
            f"the partial files were removed.{advice} Free some space (or choose a directory on another disk) "
            "and run again.")


def replace_directory(temp: str, final: str) -> None:
    """Put the finished directory `temp` at `final`. An existing `final` is only removed once `temp` has taken
    its place (swapped through `<final>.old-<pid>`, put back if the second rename fails)."""
    if not os.path.lexists(final):
        os.replace(temp, final)
        return
    old = f"{final}.old-{os.getpid()}"
    remove_path(old)
    os.replace(final, old)
    try:
        os.replace(temp, final)
    except BaseException:
        os.replace(old, final)
        raise
    remove_path(old)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_interrupted_writes(directory: str, only=None, owned: bool = False) -> list[str]:
    """Remove the leftovers of killed writers in `directory`; returns the names handled.

    `<name>.old-<pid>` without `<name>`: a swap (replace_directory) was cut between its two renames, so the old
    directory is put back; with `<name>` present it is removed. `<name>.tmp...`: removed.
    only: handle only leftovers of this name (a string), or of the names a function accepts: the caller's own
    files, never a user's `notes.old`. owned: the caller holds a lock on `directory`, so every leftover is
    stale; otherwise only those whose writer's pid (in the name) is no longer running."""
    if not os.path.isdir(directory):
        return []
    handled = []
    for entry in sorted(os.listdir(directory)):
        match = LEFTOVER_RE.match(entry)
        if not match or (only is not None and not (only(match["name"]) if callable(only) else match["name"] == only)):
            continue
        pid = match["pid"]
        if not owned and (pid is None or pid_alive(int(pid))):
            continue
        path, original = os.path.join(directory, entry), os.path.join(directory, match["name"])
        if match["kind"] == "old" and not os.path.lexists(original):
            os.replace(path, original)
        else:
            remove_path(path)
        handled.append(entry)
    return handled
