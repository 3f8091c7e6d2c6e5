"""Backups of the feedback database, and restoring one. Standard library only.

The feedback database is the one thing here that cannot be recomputed: adapters and
reward models can be retrained from it, but a lost or damaged `data/feedback.db` is
every user's feedback gone. So:

- `backup(db, to_dir, keep)` copies it with SQLite's online backup API
  (`sqlite3.Connection.backup`), which reads one consistent snapshot while the app
  goes on writing (the database runs in WAL mode, so the app's writes never wait for
  it). The copy is written under a temporary name, checked with `PRAGMA
  integrity_check`, fsynced and renamed to `feedback-YYYYMMDDTHHMMSS.ffffffZ.db`, so
  a backup that exists is a whole one. Only the newest `keep` backups stay.
- `restore(backup, db)` puts a backup back. It checks the backup's integrity first,
  refuses while any other connection has the database open (the app, an export, a
  trainer reading it), keeps the file it replaces as `feedback.db.before-restore-<time>`,
  and replaces the database with one `os.replace`.

    python -m trainer backup [--db data/feedback.db] [--to data/backups/] [--keep 7]   # --to: backups/ beside --db
    python -m trainer restore data/backups/feedback-20260102T030000.000000Z.db

What it is not: a schedule (`python -m trainer run` backs up every
--backup-every-hours) or the cycle lock (the `restore` command holds it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

BACKUP_RE = re.compile(r"^(?P<stem>.+)-(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.db$")


class BackupError(RuntimeError):
    """A backup or restore that did not happen; the message says why and what to do."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp() -> str:
    t = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def integrity(path: str | Path) -> str:
    """'ok', or what `PRAGMA integrity_check` (or opening the file) reports is wrong."""
    try:
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return f"cannot open it ({exc})"
    try:
        rows = [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
        tables = con.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    except sqlite3.Error as exc:
        return f"not a usable SQLite database ({exc})"
    finally:
        con.close()
    if rows != ["ok"]:
        return "; ".join(rows[:5])
    return "ok" if tables else "it holds no tables"


def default_dir(db: str | Path) -> Path:
    """Where backups of `db` go unless told otherwise: `backups/` beside it (data/backups)."""
    return Path(db).parent / "backups"


def backups(to_dir: str | Path, stem: str = "feedback") -> list[Path]:
    """The backups of database `stem` under `to_dir`, oldest first."""
    d = Path(to_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_file() and (m := BACKUP_RE.match(p.name)) and m["stem"] == stem]
    return sorted(found, key=lambda p: p.name)


def backup(db: str | Path, to_dir: str | Path | None = None, keep: int = 7) -> tuple[Path, list[Path]]:
    """Back up `db` into `to_dir` (default: `default_dir(db)`) while it may be in use;
    returns (the new backup, the old backups deleted to keep only `keep`). BackupError
    when there is nothing to back up or the copy fails its integrity check (no backup
    is left behind then)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    db = Path(db)
    d = Path(to_dir) if to_dir else default_dir(db)
    if not db.is_file():
        raise BackupError(f"no feedback database at {db}")
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{db.stem}-{_stamp()}.db"
    tmp = d / f".{final.name}.tmp"
    try:
        src = sqlite3.connect(db, timeout=30)  # read-write: reading a WAL database needs its shared-memory index
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # one step: one consistent snapshot; the app's writes carry on (WAL)
                dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        ok = integrity(tmp)
        if ok != "ok":
            raise BackupError(f"the backup of {db} failed its integrity check: {ok}")
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(d)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {db}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    removed = backups(d, db.stem)[:-keep]
    for old in removed:
        old.unlink(missing_ok=True)
    return final, removed


def _take_over(db: Path) -> None:
    """Prove no other connection has `db` open, and fold its write-ahead log into it.

    An exclusive lock is refused while any other connection (in any process) holds the
    database open in WAL mode; with the lock held, switching to rollback-journal mode
    checkpoints the log into the file and deletes it, so the file alone is the database."""
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        con.execute("PRAGMA locking_mode=EXCLUSIVE")
        con.execute("BEGIN EXCLUSIVE")
        con.execute("COMMIT")
        con.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise BackupError(f"{db} is in use (open in the app, an export or the trainer); "
                              "stop it first, then restore") from exc
        raise BackupError(f"cannot open {db} to replace it: {exc}") from exc
    except sqlite3.DatabaseError as exc:  # a damaged file: keep it aside as it is
        if "not a database" not in str(exc) and "malformed" not in str(exc):
            raise BackupError(f"cannot open {db} to replace it: {exc}") from exc
    finally:
        con.close()
    if Path(f"{db}-wal").exists() and Path(f"{db}-wal").stat().st_size:
        raise BackupError(f"{db} has a write-ahead log ({db}-wal) that could not be folded into it; "
                          "open the database once with the app or sqlite3, close it, then restore")
    with contextlib.suppress(FileNotFoundError):
        Path(f"{db}-wal").unlink()
    with contextlib.suppress(FileNotFoundError):
        Path(f"{db}-shm").unlink()  # only an index of the log; no connection is left to use it


def restore(backup_file: str | Path, db: str | Path) -> Path | None:
    """Replace `db` with `backup_file`; returns where the replaced database was kept
    (None when there was none). BackupError, with nothing changed, when the backup is
    damaged or the database is open elsewhere. Stop the app before restoring."""
    src, db = Path(backup_file), Path(db)
    if not src.is_file():
        raise BackupError(f"{src}: no such backup")
    ok = integrity(src)
    if ok != "ok":
        raise BackupError(f"{src} is not a usable backup: {ok}")
    db.parent.mkdir(parents=True, exist_ok=True)
    kept = None
    if db.exists():
        _take_over(db)
        kept = db.with_name(f"{db.name}.before-restore-{_stamp()}")
        try:
            os.link(db, kept)  # the same file under a second name: kept whole, whatever happens next
        except OSError:
            shutil.copy2(db, kept)
            _fsync(kept)
    tmp = db.with_name(f".{db.name}.restore-{_stamp()}")
    try:
        shutil.copyfile(src, tmp)
        _fsync(tmp)
        os.replace(tmp, db)
        _fsync(db.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return kept
