"""The trainer's side of the `data/` contract that the server reads: the cycle lock,
the cycles log and the reward-model manifests. Standard library only.

- `CycleLock(path)`: an exclusive, non-blocking flock that lets one training cycle run
  at a time across processes; its holder writes {pid, started_at, phase} into the file.
  `holder(path)` reads it back, or None when no cycle runs. The kernel drops a flock
  when its process dies (SIGKILL included), so a killed cycle never keeps the lock.
- `append(path, entry)` / `read(path)`: `data/cycles.jsonl`, one JSON object per
  finished cycle (decision, reasons, versions, feedback ids, evaluation, seconds).
- `reward_versions(dir)` / `reward_manifest(dir, version)`: the reward models under
  `data/reward/rNNNNNN/`, as the dashboard lists them.

The trainer writes these files (trainer/schedule.py, trainer/reward.py); the server
and the dashboard only read them, so neither imports trainer code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path

REWARD_VERSION_RE = re.compile(r"^r\d{6}$")


class Busy(RuntimeError):
    """Another cycle holds the lock."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class CycleLock:
    """An exclusive, non-blocking flock on `path`; the holder writes who it is and what it does."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = None
        self._info: dict = {}

    def __enter__(self) -> "CycleLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            who = holder(self.path) or {}
            raise Busy(f"another cycle is running (pid {who.get('pid', '?')}, started {who.get('started_at', '?')}, "
                       f"phase {who.get('phase', '?')}); not starting a second one") from None
        self._f = f
        self._info = {"pid": os.getpid(), "started_at": now(), "phase": "starting"}
        self._write()
        return self

    def phase(self, name: str) -> None:
        self._info["phase"] = name
        self._write()

    def _write(self) -> None:
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps(self._info))
        self._f.flush()

    def __exit__(self, *exc) -> None:
        self._f.seek(0)
        self._f.truncate()
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()
        self._f = None


def holder(path: str | Path) -> dict | None:
    """{pid, started_at, phase} of the running cycle, or None when no cycle runs."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def read(cycles_log: str | Path) -> list[dict]:
    """Finished cycles, oldest first (a torn last line is skipped)."""
    path = Path(cycles_log)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def append(cycles_log: str | Path, entry: dict) -> None:
    """Append one cycle's entry and fsync it."""
    path = Path(cycles_log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reward_versions(reward_dir: str | Path) -> list[str]:
    """Saved reward-model versions, oldest first."""
    d = Path(reward_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and REWARD_VERSION_RE.match(p.name))


def reward_manifest(reward_dir: str | Path, version: str) -> dict:
    return json.loads((Path(reward_dir) / version / "manifest.json").read_text())
