"""The output directory of a training run: one run at a time, and an earlier run replaced only once the new
one has saved something.

    with claim_output_dir(cfg, overwrite, is_main):       # lock; repair what a killed run left; refuse early
        ...load the model and the data...
        set_aside_previous_run(cfg, overwrite, is_main)   # --overwrite: the earlier run moves out of the way
        ...train...
        drop_previous_run(out)                            # after the first complete checkpoint / final model

- Lock: `output_dir/.lorakit.lock` (see dir_lock.py), held by rank 0 from start to end. A second run on the
  same directory is refused with the first one's pid, host, start time and command.
- --overwrite: when the new run's model and data have loaded, the earlier run's files are moved into
  `output_dir/.previous-run/` (renames: no copy, no space needed). They are deleted once the new run has
  published its first complete checkpoint, or its final adapter/model when it saves no checkpoints. Until
  then the earlier run is whole: if the new run fails (disk full, bad data, divergence) it is moved back at
  once; if the new run is killed, it is moved back by the next lorakit run on that directory.
  A kill can also come while files are being moved, so every phase is a directory name of its own, entered by
  one atomic rename, and the next run finishes whatever phase it finds:
    .previous-run.moving     setting aside (the new run has written nothing yet): move everything back
    .previous-run            the new run is training: drop it once the new run saved something, else restore
    .previous-run.restoring  putting the earlier run back: remove the new run's files, move the rest back
    .previous-run.discard    the new run saved something: delete
  `.names.json` inside lists the earlier run's files, so a half-done restore knows which files in output_dir
  are already the earlier run's again.
- Leftovers of a killed run (`checkpoint-N.tmp`, `adapter.tmp-<pid>`, `*.old-<pid>`) are removed, or put back
  when a swap was cut short, when the next run takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from lorakit.atomic import clean_interrupted_writes, remove_path
from lorakit.config import write_json_atomic
from lorakit.dir_lock import DirectoryLock
from lorakit.train.checkpoint import CHECKPOINT_RE, list_checkpoints
from lorakit.train.config import RunConfig
from lorakit.train.setup import RunError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lorakit.lock"
PREVIOUS_RUN = ".previous-run"
MOVING, RESTORING, DISCARD = (f"{PREVIOUS_RUN}.{phase}" for phase in ("moving", "restoring", "discard"))
NAMES_FILE = ".names.json"
RUN_FILES = ("run_config.yaml", "trainer_state.json", "metrics.jsonl", "train_results.json", "loss_curve.png",
             "adapter", "model")
FINAL_DIRS = ("adapter", "model")


@contextlib.contextmanager
def claim_output_dir(cfg: RunConfig, overwrite: bool, is_main: bool):
    """Hold output_dir for this run (rank 0 locks it; every rank checks it). Refuses at once a directory that
    holds a run, unless overwriting or resuming; the earlier run is only touched by set_aside_previous_run."""
    out = cfg.output_dir
    if os.path.isfile(out):
        raise RunError(f"output_dir {out!r} is a file; choose a directory")
    if not is_main:
        check_output_dir(cfg, overwrite)
        yield
        return
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    lock = DirectoryLock(os.path.join(out, LOCK_NAME), f"output_dir {out!r}")
    try:
        lock.acquire()
    except BaseException:
        _remove_if_empty(out, created)
        raise
    try:
        repair_output_dir(out)
        check_output_dir(cfg, overwrite)
        yield
    finally:
        try:
            settle_previous_run(out)  # a run that ends (or fails) without having saved gives the old one back
        finally:
            lock.release()
            _remove_if_empty(out, created)


def repair_output_dir(out: str) -> None:
    """With the lock held: clean up after a killed run (temporary files, a half-done swap, an unfinished
    --overwrite)."""
    cleaned = clean_interrupted_writes(out, only=_ours, owned=True)  # first: put back a swap cut short
    settle_previous_run(out)
    if cleaned:
        logger.warning("output_dir %r: removed what an interrupted run left unfinished: %s", out,
                       ", ".join(cleaned[:5]) + (" ..." if len(cleaned) > 5 else ""))


def run_files(out: str) -> list[str]:
    """Names of the files and directories of a run in `out` (the checkpoints included)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    return found + [os.path.basename(path) for path in list_checkpoints(out)]  # names: out may be relative


def check_output_dir(cfg: RunConfig, overwrite: bool) -> list[str]:
    """The earlier run's files in output_dir, to be replaced; refuses unless asked to (--overwrite) or resuming."""
    out = cfg.output_dir
    if os.path.isfile(out):
        raise RunError(f"output_dir {out!r} is a file; choose a directory")
    if cfg.train.resume_from_checkpoint:
        return []
    previous = run_files(out)
    if previous and not overwrite:
        if list_checkpoints(out) or any(name in previous for name in FINAL_DIRS):
            raise RunError(f"output_dir {out!r} already holds a run ({', '.join(previous[:4])}); "
                           "pass --overwrite to replace it, train.resume_from_checkpoint=latest to continue it, "
                           "or choose another output_dir")
        raise RunError(f"output_dir {out!r} holds a run that stopped before its first checkpoint "
                       f"({', '.join(previous[:4])}), so there is nothing to resume; pass --overwrite to start it "
                       "again, or choose another output_dir")
    return previous


def set_aside_previous_run(cfg: RunConfig, overwrite: bool, is_main: bool) -> None:
    """Create output_dir (also for a resume into a new one); when overwriting, move the earlier run's files into
    output_dir/.previous-run/ until the new run has saved something. Call it once the model and the data are
    ready, so bad input never touches the earlier run."""
    out = cfg.output_dir
    previous = check_output_dir(cfg, overwrite)
    os.makedirs(out, exist_ok=True)
    if not (previous and is_main):
        return
    moving = os.path.join(out, MOVING)
    os.makedirs(moving)
    write_json_atomic(os.path.join(moving, NAMES_FILE), {"names": previous})
    for name in previous:
        os.replace(os.path.join(out, name), os.path.join(moving, name))
    os.replace(moving, os.path.join(out, PREVIOUS_RUN))  # the set-aside is complete in one step


def drop_previous_run(out: str) -> None:
    """The new run has published a complete checkpoint or its final model: the earlier run can go."""
    aside, discard = os.path.join(out, PREVIOUS_RUN), os.path.join(out, DISCARD)
    if os.path.isdir(aside):
        os.replace(aside, discard)  # decided in one step; deleting may be cut short, the decision not
    remove_path(discard)


def new_run_saved(out: str) -> bool:
    """Whether the new run in `out` has a complete checkpoint or final model (while the earlier run is set aside,
    everything of a run in `out` is the new run's). Both are published by rename: present means complete."""
    return bool(list_checkpoints(out)) or any(os.path.isdir(os.path.join(out, name)) for name in FINAL_DIRS)


def settle_previous_run(out: str) -> None:
    """Finish whatever phase of an --overwrite a run (killed, failed or done) left: see the module docstring."""
    moving, aside, restoring = (os.path.join(out, name) for name in (MOVING, PREVIOUS_RUN, RESTORING))
    if os.path.isdir(moving):  # killed while setting aside: the new run has not written anything yet
        for name in os.listdir(moving):
            if not name.startswith(NAMES_FILE):
                os.replace(os.path.join(moving, name), os.path.join(out, name))
        remove_path(moving)
    if os.path.isdir(aside):
        if new_run_saved(out):
            drop_previous_run(out)
        else:
            os.replace(aside, restoring)  # decided in one step; a kill from here on resumes the restore
    remove_path(os.path.join(out, DISCARD))
    if os.path.isdir(restoring):
        _restore(out, restoring)


def _restore(out: str, restoring: str) -> None:
    """Put the earlier run back in place of the new run's unsaved files (run_config.yaml, metrics.jsonl, ...)."""
    with open(os.path.join(restoring, NAMES_FILE), encoding="utf-8") as fh:
        earlier = set(json.load(fh)["names"])
    waiting = set(os.listdir(restoring)) - {NAMES_FILE}
    for name in run_files(out):
        if name not in earlier or name in waiting:  # the new run's, not (yet) the earlier run's again
            remove_path(os.path.join(out, name))
    for name in sorted(waiting):
        os.replace(os.path.join(restoring, name), os.path.join(out, name))
    remove_path(restoring)
    logger.warning("output_dir %r: the new run stopped before saving a checkpoint or its final model; the earlier "
                   "run there was put back as it was", out)


def _ours(name: str) -> bool:
    """Names lorakit writes in output_dir (the leftovers of which repair_output_dir may remove)."""
    return name in RUN_FILES or bool(CHECKPOINT_RE.match(name))


def _remove_if_empty(out: str, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(out)  # only succeeds when empty: a refused or failed first run leaves nothing behind
