"""The run folder, runs/<name>/: what keeps a run from being lost or mixed with another.

- A folder that holds a checkpoint is not reused without --resume (or an explicit --overwrite).
- A lock file (`lock`, the owner's host and pid) keeps a second process out of a live run; a lock left
  by a process that is gone is taken over, with a note.
- Checkpoints are written to a temporary file, then renamed; the previous checkpoint is kept beside the
  newest as `ckpt.prev.pt`, and `--resume auto` falls back to it when the newest cannot be read. A failed
  write removes its temporary file and says why in one sentence; the checkpoints already there survive.
- A resumed run whose flags differ from the checkpoint's names each change and appends it to
  `config_history.jsonl`; config.json always holds the config in force.
"""
from __future__ import annotations

import json
import os
import socket
import time

PREVIOUS = "ckpt.prev.pt"
# flags that may change on resume without changing what is computed (where, how often, how it is shown)
RUN_ONLY = {"resume", "progress", "out_dir", "name", "device", "workers", "eval_every", "log_every", "ckpt_every",
            "overwrite", "max_minutes", "max_steps", "eval_size"}


def guard_folder(run_dir: str, resuming: bool, overwrite: bool):
    """Refuse to start a fresh run in a folder that holds another run's checkpoint."""
    ckpt = os.path.join(run_dir, "ckpt.pt")
    if resuming or not os.path.isfile(ckpt):
        return
    if not overwrite:
        name = os.path.basename(os.path.normpath(run_dir))
        raise SystemExit(f"train.py: {run_dir}/ already holds a run (ckpt.pt); continue it with --resume auto, "
                         f"start another with a new --name (not {name!r}), or replace it with --overwrite")
    for f in ("ckpt.pt", PREVIOUS, "metrics.jsonl", "config_history.jsonl"):
        path = os.path.join(run_dir, f)
        if os.path.exists(path):
            os.remove(path)


class Lock:
    """runs/<name>/lock: {"host", "pid", "since"} of the process that owns the run (rank 0)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "lock")
        self.held = False

    def acquire(self, say=print):
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is None or self._gone(owner) or owner.get("pid") == os.getpid():
                    if owner is not None and owner.get("pid") != os.getpid():
                        say(f"note: taking over {self.path} from process {owner.get('pid')} on "
                            f"{owner.get('host')}, which is no longer running")
                    with open(self.path, "w") as fh:
                        json.dump(me, fh)
                    self.held = True
                    return
                raise SystemExit(f"train.py: {os.path.dirname(self.path)}/ is in use by process {owner.get('pid')} on "
                                 f"{owner.get('host')} (since {owner.get('since')}); wait for it, give another "
                                 f"--name, or delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as fh:
                owner = json.load(fh)
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _gone(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: it cannot be checked from here, so it counts as live
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError):
            return False
        return False

    def release(self):
        if self.held:
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid():
                os.remove(self.path)
            self.held = False


def save_checkpoint(obj, path: str):
    """The run's checkpoint, written atomically; the one it replaces becomes ckpt.prev.pt."""
    from tasks.base import atomic_save

    atomic_save(obj, path, previous=os.path.join(os.path.dirname(path), PREVIOUS), what="checkpoint",
                hint="continue with --resume auto")


def load_resume(resume: str, run_dir: str, say=None) -> tuple[dict | None, str]:
    """--resume auto: the run's newest checkpoint, else the previous one when the newest cannot be read (with
    a note); --resume PATH: that one; "": none. → (checkpoint, its path)."""
    from tasks.base import load_checkpoint

    if resume != "auto":
        return (load_checkpoint(resume), resume) if resume else (None, "")
    candidates = [p for p in (os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, PREVIOUS)) if os.path.isfile(p)]
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(path), path
        except SystemExit as e:
            if i + 1 == len(candidates):
                raise
            if say is not None:
                say(f"note: {e}; resuming from {candidates[i + 1]} instead")
    return None, ""


def changed_fields(old: dict, new: dict) -> dict:
    """{field: [checkpoint's value, this run's value]} for the fields that change what a resumed run computes."""
    return {k: [old[k], v] for k, v in new.items() if k in old and old[k] != v and k not in RUN_ONLY}


def record_config(run_dir: str, cfg: dict, step: int, changes: dict | None):
    """config.json: the config in force; config_history.jsonl: one line per start, with what changed."""
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(run_dir, "config_history.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "changed": changes or {}}) + "\n")
