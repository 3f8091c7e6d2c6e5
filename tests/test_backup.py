"""Tests for assistant/backup.py and the `python -m trainer backup` / `restore` commands:
an online backup while another thread keeps writing through FeedbackStore, keeping
the newest N, restore refusing a database in use, a damaged backup or a running
cycle, and what restore keeps of the file it replaces. SQLite only, no model.

Run: python -m pytest tests/test_backup.py -q
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from assistant import backup, cycles
from assistant.feedback import FeedbackStore
from trainer.__main__ import main

WAIT_S = 30


def max_id(db: Path, table: str = "messages") -> int:
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return con.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0]  # noqa: S608
    finally:
        con.close()


def ids(db: Path, table: str = "messages") -> list[int]:
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute(f"SELECT id FROM {table} ORDER BY id")]  # noqa: S608
    finally:
        con.close()


class Writer:
    """A thread writing one message per transaction through its own FeedbackStore, as the app does."""

    def __init__(self, db: Path):
        self.store = FeedbackStore(db)
        self.conversation = self.store.new_conversation(self.store.ensure_user("writer"))
        self.stop, self.written, self.error = threading.Event(), 0, None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            while not self.stop.is_set():
                self.store.add_message(self.conversation, "user", f"message {self.written} " + "x" * 200)
                self.written += 1
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.written < n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"the writer wrote only {self.written} rows"
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        self.store.close()
        assert self.error is None, self.error


def small_db(path: Path, rows: int = 3) -> Path:
    with FeedbackStore(path) as store:
        cid = store.new_conversation(store.ensure_user("ada"))
        for i in range(rows):
            store.add_message(cid, "user", f"hello {i}")
    return path


def test_a_backup_taken_while_the_app_writes_holds_every_row_committed_before_it_and_restores(tmp_path):
    db = tmp_path / "feedback.db"
    writer = Writer(db)
    writer.thread.start()
    try:
        writer.wait_for(50)
        committed = max_id(db)  # every row up to here was committed before the backup started
        path, removed = backup.backup(db, tmp_path / "backups", keep=3)
        writer.wait_for(writer.written + 50)  # the app went on writing during and after it
        with pytest.raises(backup.BackupError, match="is in use"):  # the writer still has the database open
            backup.restore(path, db)
    finally:
        writer.close()

    assert path.parent == tmp_path / "backups" and removed == []
    assert backup.BACKUP_RE.match(path.name)["stem"] == "feedback"
    assert backup.integrity(path) == "ok"
    in_backup = ids(path)
    assert in_backup[:committed] == list(range(1, committed + 1))  # nothing committed before the backup is missing
    assert in_backup == list(range(1, len(in_backup) + 1))  # and what it holds is one consistent snapshot
    after = max_id(db)
    assert after >= committed + 50 and len(in_backup) < after
    assert not list(path.parent.glob(".*"))  # no temporary file left

    kept = backup.restore(path, db)
    assert backup.integrity(db) == "ok"
    assert ids(db) == in_backup  # the database is the backup again
    assert kept.name.startswith("feedback.db.before-restore-") and kept.parent == tmp_path
    assert max_id(kept) == after and backup.integrity(kept) == "ok"  # the replaced database, whole
    with FeedbackStore(db) as store:  # and the app can write to the restored one
        store.add_message(store.new_conversation(None), "user", "after the restore")
    assert max_id(db) == len(in_backup) + 1


def test_backup_keeps_the_newest_n_and_touches_nothing_else(tmp_path):
    db = small_db(tmp_path / "feedback.db")
    to = tmp_path / "backups"
    to.mkdir()
    (to / "notes.txt").write_text("mine")
    (to / "other-20200101T000000.000000Z.db").write_text("another database's backup")
    made = [backup.backup(db, to, keep=2)[0] for _ in range(4)]
    assert backup.backups(to) == made[-2:]
    assert sorted(p.name for p in to.iterdir()) == sorted([made[2].name, made[3].name, "notes.txt", "other-20200101T000000.000000Z.db"])
    with pytest.raises(ValueError, match="at least 1"):
        backup.backup(db, to, keep=0)


def test_backup_of_a_missing_or_unusable_database_is_refused(tmp_path):
    with pytest.raises(backup.BackupError, match="no feedback database at"):
        backup.backup(tmp_path / "nope.db", tmp_path / "backups")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all\n" * 500)
    with pytest.raises(backup.BackupError, match="cannot back up"):
        backup.backup(junk, tmp_path / "backups")
    assert backup.backups(tmp_path / "backups", "junk") == [] and not list((tmp_path / "backups").glob(".*"))


def test_restore_refuses_a_damaged_backup_and_changes_nothing(tmp_path):
    db = small_db(tmp_path / "feedback.db", rows=200)
    good, _ = backup.backup(db, tmp_path / "backups")
    damaged = tmp_path / "damaged.db"
    con = sqlite3.connect(good)
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    con.close()
    data = bytearray(good.read_bytes())
    start = (root - 1) * page_size
    data[start : start + page_size] = b"\x0d\xff" * (page_size // 2)  # the messages table's root page overwritten
    damaged.write_bytes(bytes(data))
    before = db.read_bytes()
    with pytest.raises(backup.BackupError, match="is not a usable backup"):
        backup.restore(damaged, db)
    with pytest.raises(backup.BackupError, match="no such backup"):
        backup.restore(tmp_path / "missing.db", db)
    assert db.read_bytes() == before and not list(tmp_path.glob("feedback.db.before-restore-*"))


def test_restore_into_a_place_without_a_database(tmp_path):
    path, _ = backup.backup(small_db(tmp_path / "feedback.db"), tmp_path / "backups")
    fresh = tmp_path / "new" / "feedback.db"
    assert backup.restore(path, fresh) is None
    assert ids(fresh) == [1, 2, 3]


# -- the commands -------------------------------------------------------------------------


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_backup_and_restore_commands(tmp_path, capsys):
    db = small_db(tmp_path / "feedback.db")
    lock = ["--lock-file", str(tmp_path / "trainer.lock")]
    code, out, err = run_main(capsys, "backup", "--db", str(db), "--to", str(tmp_path / "backups"), "--keep", "1")
    assert code == 0, err
    made = backup.backups(tmp_path / "backups")
    assert len(made) == 1 and f"backed up {db} to {made[0]}" in out and "integrity ok" in out
    with FeedbackStore(db) as store:
        store.add_message(store.new_conversation(None), "user", "written after the backup")

    with cycles.CycleLock(tmp_path / "trainer.lock"):
        code, _, err = run_main(capsys, "restore", str(made[0]), "--db", str(db), *lock)
    assert code == 3 and "not started: another cycle is running" in err
    assert max_id(db) == 4

    code, out, err = run_main(capsys, "restore", str(made[0]), "--db", str(db), *lock)
    assert code == 0, err
    assert max_id(db) == 3
    kept = next(tmp_path.glob("feedback.db.before-restore-*"))
    assert f"restored {db} from {made[0]}; the database it replaced is kept as {kept}" in out and max_id(kept) == 4

    code, _, err = run_main(capsys, "restore", str(tmp_path / "nope.db"), "--db", str(db), *lock)
    assert code == 2 and "no such backup" in err and "nothing was changed" in err
    code, _, err = run_main(capsys, "backup", "--db", str(tmp_path / "missing.db"), "--to", str(tmp_path / "backups"))
    assert code == 2 and "no feedback database at" in err
    code, _, err = run_main(capsys, "backup", "--db", str(db), "--keep", "0")
    assert code == 2 and "--keep must be at least 1" in err
    elsewhere = small_db(tmp_path / "elsewhere" / "feedback.db")
    code, out, err = run_main(capsys, "backup", "--db", str(elsewhere))  # no --to: backups/ beside the database
    assert code == 0 and len(backup.backups(tmp_path / "elsewhere" / "backups")) == 1, err
