"""`FeedbackStore`: writes and reads of the feedback database, one short transaction each.

What it is: a thin layer over one SQLite file (default `data/feedback.db`) reached
through sqlite-utils. It records users, conversations, user turns, and every assistant
reply together with what training needs to reuse it: the full context the reply was
generated from (system prompt included), generation parameters, model name, adapter
version, token counts and latency. On top of replies it records four kinds of
feedback: thumbs up/down votes with their reasons (current vote per user and reply,
plus the full history in `vote_events`), side-by-side comparisons, corrections (an
edited, better reply) and rankings of k replies (or, when the person could not rank
them, a tie of every pair). Preference pairs from public data sets come in through
`import_pair`: each is stored as a comparison by user "import", once, however often
its file is imported. Every argument is checked before anything is written.

How it behaves under load: the file runs in WAL mode with `synchronous=NORMAL`, so
the trainer can read while the chat server writes. Each thread gets its own
connection. Every write is one short `BEGIN IMMEDIATE` transaction (reads that decide
a write happen inside it), and writes from one process are also serialised by an
in-process lock that serves threads in arrival order, so many UI threads queue in
Python instead of in SQLite's sleeping busy handler. Bad input raises `FeedbackError`
(a `ValueError`); a database that is locked past the busy timeout, read-only, damaged
or unopenable raises `StoreUnavailable` (a `RuntimeError`) with a message a user can
read. A failed write stores nothing.

Accounts (assistant/accounts.py) keep their password hashes and log-ins here too, and
a signed-in user's conversations are saved as the page shows them
(`save_conversation_state`), so they can be listed and reopened.

To check the people who judge, it also keeps gold items (comparisons whose better
reply is known, written by administrators or imported), people's answers to them, and
second answers to comparisons shown again to the same person (`repeat_answers`);
these measure annotators (assistant/annotators.py) and never become training pairs.

What it is not: the tables themselves (schema.py), turning feedback into pairs
(pairs.py) or export files (export.py), hashing passwords (accounts.py). Rows are
never deleted; the only updates are a user's profile, a user's current vote on a
reply (its history stays in `vote_events`), a password hash, a log-in's end and open
conversation, an anonymous conversation claimed by its author on log-in, and a saved
conversation's transcript.

    store = FeedbackStore("data/feedback.db")
    uid = store.ensure_user("ada", profile="physician")
    cid = store.new_conversation(uid, system_prompt="You are helpful.")
    store.add_message(cid, "user", "Hi!")
    rid = store.add_reply(conversation_id=cid, context=[...], text="Hello!", ...)
    store.set_vote(rid, uid, 1, reason="friendly")
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

import assistant.feedback.schema as schema
from assistant.feedback.schema import CHOICES, ROLES, SOURCES, TABLES, VOTE_VALUES

DEFAULT_PATH = "data/feedback.db"
MAX_NAME_CHARS = 100


class FeedbackError(ValueError):
    """The caller asked for something the store refuses: unknown id, empty text, bad choice..."""


class StoreUnavailable(RuntimeError):
    """The database cannot be used right now: locked, read-only, missing or damaged."""


# ---------------------------------------------------------------------------
# Small pure helpers: time, JSON, input checks.


def _now() -> str:
    """ISO-8601 UTC timestamp with milliseconds, e.g. 2025-01-31T12:00:00.123+00:00."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _check_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeedbackError(f"{what} must be an integer id, got {value!r}")
    return value


def _check_str(value: Any, what: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise FeedbackError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FeedbackError(f"{what} is empty")
    return value


def _check_name(value: Any) -> str:
    """A user name: a non-empty string, stripped, at most MAX_NAME_CHARS long."""
    name = _check_str(value, "user name", allow_empty=False).strip()
    if len(name) > MAX_NAME_CHARS:
        raise FeedbackError(f"user name is {len(name)} characters long; the limit is {MAX_NAME_CHARS}")
    return name


def _iso(moment: datetime.datetime) -> str:
    """`moment` (timezone-aware) in the format of `_now`, so stored times compare as strings."""
    if moment.tzinfo is None:
        raise FeedbackError(f"a time must carry its timezone, got {moment!r}")
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FeedbackError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _check_ms(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise FeedbackError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_reply_ids(reply_ids: Any, what: str) -> list[int]:
    """A list of at least 2 distinct reply ids."""
    if not isinstance(reply_ids, (list, tuple)) or len(reply_ids) < 2:
        raise FeedbackError(f"{what} needs a list of at least 2 reply ids, got {reply_ids!r}")
    reply_ids = [_check_id(rid, "reply id") for rid in reply_ids]
    if len(set(reply_ids)) != len(reply_ids):
        raise FeedbackError(f"{what} lists each reply once, got {reply_ids}")
    return reply_ids


def _check_context(context: Any) -> list[dict[str, str]]:
    """A non-empty list of {role, content} messages, exactly those two keys."""
    if not isinstance(context, list) or not context:
        raise FeedbackError("context must be a non-empty list of {role, content} messages")
    for i, message in enumerate(context):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise FeedbackError(f"context[{i}] must be a dict with exactly the keys role and content, got {message!r}")
        if message["role"] not in ROLES:
            raise FeedbackError(f"context[{i}] has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise FeedbackError(f"context[{i}] content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in context]


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FeedbackError(f"{what} is not JSON-serialisable: {e}") from e


def _insert(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> int:
    """INSERT one row; returns its id. Plain SQL: writes run under a lock, so every
    statement saved there is latency saved for every waiting thread."""
    columns = ", ".join(row)
    marks = ", ".join("?" * len(row))
    return db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values())).lastrowid


def import_key(prompt: list[dict[str, str]], chosen: str, rejected: str) -> str:
    """The identity of an imported preference pair: sha256 of its canonical JSON."""
    canonical = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _FairLock:
    """A mutual-exclusion lock granted in arrival order, built on threading.Lock.

    A plain threading.Lock lets the thread that releases it take it straight back,
    so with 32 threads writing in a loop a few threads win over and over while the
    rest wait: p99 around 100 ms for a 0.1 ms write. Handing the lock to the
    longest waiter bounds every wait by the queue ahead of it.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards _held and _waiters
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=timeout):
            return True  # release() handed the lock to us
        with self._mutex:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                return False
        return True  # handed over just as the wait timed out: ours now

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # ownership passes on; _held stays True
            else:
                self._held = False


# ---------------------------------------------------------------------------


class FeedbackStore:
    """Replies and feedback in one SQLite file. Safe to share between threads.

    path: the database file; its parent directory is created if missing.
    busy_timeout_ms: how long a write waits for another process's lock (and for
        this process's write lock) before raising StoreUnavailable.
    readonly: open with SQLite `mode=ro` (for exports and the trainer); every
        write raises StoreUnavailable, the file must exist and be migrated.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, busy_timeout_ms: int = 5000, *, readonly: bool = False):
        if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be a non-negative integer, got {busy_timeout_ms!r}")
        self.path = Path(path).resolve()
        self.busy_timeout_ms = busy_timeout_ms
        self.readonly = readonly
        self._local = threading.local()                # .db: this thread's connection
        self._write_lock = _FairLock()                 # one writer at a time in this process, FIFO
        self._conns_lock = threading.Lock()            # guards _conns and _closed
        self._conns: list[tuple[threading.Thread, sqlite_utils.Database]] = []
        self._closed = False
        if readonly:
            if not self.path.is_file():
                raise StoreUnavailable(f"no feedback database at {self.path}")
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreUnavailable(f"cannot create the directory for the feedback database {self.path}: {e}") from e
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections and transactions ------------------------------------

    def db(self) -> sqlite_utils.Database:
        """This thread's connection, opened on first use. For read queries (the
        trainer's snapshots, tests); write through the methods below."""
        if self._closed:
            raise StoreUnavailable(f"feedback store {self.path} is closed")
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            with self._conns_lock:
                # Connections of threads that have ended would otherwise stay open.
                for thread, old in [c for c in self._conns if not c[0].is_alive()]:
                    old.close()
                self._conns = [c for c in self._conns if c[0].is_alive()]
                self._conns.append((threading.current_thread(), db))
            self._local.db = db
        return db

    def _connect(self) -> sqlite_utils.Database:
        # isolation_level=None: the driver opens no implicit transactions; every
        # transaction below is an explicit BEGIN. check_same_thread=False only so
        # close() can close every thread's connection; each is used by its own
        # thread alone.
        target = f"{self.path.as_uri()}?mode=ro" if self.readonly else str(self.path)
        with self._errors(write=False):
            conn = sqlite3.connect(
                target, uri=self.readonly, timeout=self.busy_timeout_ms / 1000,
                isolation_level=None, check_same_thread=False,
            )
            try:
                db = sqlite_utils.Database(conn, execute_plugins=False)
                db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                db.execute("PRAGMA foreign_keys = ON")
                db.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                conn.close()
                raise
        return db

    def _explain(self, e: sqlite3.Error, write: bool) -> str:
        outcome = "your feedback was not saved" if write else "nothing was read"
        msg = str(e).lower()
        if "locked" in msg or "busy" in msg:
            return (f"feedback database is locked (another process holds it) for more than "
                    f"{self.busy_timeout_ms} ms; {outcome}")
        if "readonly" in msg or "read-only" in msg:
            return f"feedback database {self.path} is read-only; {outcome}"
        if "unable to open" in msg:
            return f"cannot open feedback database {self.path} (check the path and its permissions); {outcome}"
        if "not a database" in msg or "malformed" in msg:
            return f"{self.path} is not a usable feedback database (damaged, or not SQLite); {outcome}"
        return f"feedback database {self.path} failed ({e}); {outcome}"

    @contextlib.contextmanager
    def _errors(self, *, write: bool) -> Iterator[None]:
        """Turn sqlite3 errors into FeedbackError (constraint) or StoreUnavailable (the rest)."""
        try:
            yield
        except sqlite3.IntegrityError as e:
            raise FeedbackError(f"the database refused this feedback: {e}") from e
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
            raise StoreUnavailable(self._explain(e, write)) from e

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One short write transaction: BEGIN IMMEDIATE ... COMMIT, or nothing at all.

        BEGIN IMMEDIATE takes SQLite's write lock up front, so the reads that decide
        a write see the rows the write will land next to. The in-process lock makes
        threads of this process queue here, in arrival order, rather than sleep in
        SQLite's busy handler, whose backoff grows to 100 ms per wait. Other
        processes (the trainer, the export CLI) still meet at SQLite's lock.
        """
        db = self.db()
        if not self._write_lock.acquire(timeout=self.busy_timeout_ms / 1000):
            raise StoreUnavailable(
                f"feedback store is busy (other writers in this process held it for more than "
                f"{self.busy_timeout_ms} ms); your feedback was not saved")
        try:
            with self._errors(write=True):
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.conn.in_transaction:
                        db.conn.execute("ROLLBACK")
                    raise
        finally:
            self._write_lock.release()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite_utils.Database]:
        """A read transaction: every query inside sees one snapshot of the database."""
        db = self.db()
        with self._errors(write=False):
            db.execute("BEGIN")
            try:
                yield db
            finally:
                if db.conn.in_transaction:
                    db.conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection. The store cannot be used afterwards."""
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for _, db in conns:
            db.close()

    # -- schema ------------------------------------------------------------

    @staticmethod
    def _schema_version(db: sqlite_utils.Database) -> int:
        if not db.table("schema_version").exists():
            return 0
        return db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    def schema_version(self) -> int:
        """The highest migration applied to the file (len(schema.MIGRATIONS) once open)."""
        with self._read() as db:
            return self._schema_version(db)

    def _migrate(self) -> None:
        if not self.readonly:
            with self._errors(write=True):
                self.db().enable_wal()  # persistent in the file; a no-op once set
        target = len(schema.MIGRATIONS)
        current = self.schema_version()
        if current > target:
            raise StoreUnavailable(
                f"feedback database {self.path} has schema version {current}, newer than this code "
                f"understands ({target}); update the code")
        if current == target:
            return
        if self.readonly:
            raise StoreUnavailable(
                f"feedback database {self.path} has schema version {current}, this code needs {target}; "
                f"open it once without readonly to migrate it")
        # Foreign keys are off while migrations run (SQLite ignores the pragma inside a
        # transaction, so it is set around it): a table rebuild drops the old table, which
        # would otherwise count as deleting every row the other tables point at. Every
        # reference is checked before the commit instead.
        conn = self.db()
        with self._errors(write=True):
            conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self._write() as db:
                db.execute("CREATE TABLE IF NOT EXISTS schema_version "
                           "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
                # Re-read under the write lock: another process may have migrated meanwhile.
                for version in range(self._schema_version(db) + 1, target + 1):
                    schema.MIGRATIONS[version - 1](db)
                    _insert(db, "schema_version", {"version": version, "applied_at": _now()})
                broken = db.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreUnavailable(
                        f"migrating feedback database {self.path} to schema version {target} would leave "
                        f"{len(broken)} broken reference(s) (first: {tuple(broken[0])}); nothing was changed")
        finally:
            with self._errors(write=True):
                conn.execute("PRAGMA foreign_keys = ON")

    # -- lookups used inside write transactions ----------------------------

    @staticmethod
    def _row(db: sqlite_utils.Database, table: str, pk: Any, what: str) -> dict:
        cursor = db.execute(f"SELECT * FROM {table} WHERE id = ?", [pk])
        row = cursor.fetchone()
        if row is None:
            raise FeedbackError(f"unknown {what} {pk!r}")
        return dict(zip([d[0] for d in cursor.description], row))

    def _replies_with_one_context(self, db: sqlite_utils.Database, reply_ids: list[int]) -> list[dict]:
        replies = [self._row(db, "replies", rid, "reply id") for rid in reply_ids]
        first = json.loads(replies[0]["context"])
        for reply in replies[1:]:
            if json.loads(reply["context"]) != first:
                raise FeedbackError(
                    f"replies {reply_ids[0]} and {reply['id']} answer different contexts; "
                    f"only replies to the same context can be compared or ranked")
        return replies

    @staticmethod
    def _refuse_judged_again(db: sqlite_utils.Database, reply_ids: list[int], user_id: int) -> None:
        """FeedbackError when `user_id` has already compared any two of `reply_ids` or
        ranked exactly this set of replies."""
        marks = ", ".join("?" * len(reply_ids))
        compared = db.execute(
            f"SELECT 1 FROM comparisons WHERE user_id = ? AND reply_a_id IN ({marks}) AND reply_b_id IN ({marks}) LIMIT 1",
            [user_id, *reply_ids, *reply_ids]).fetchone()
        ranked = any(set(json.loads(ids)) == set(reply_ids) for (ids,) in
                     db.execute("SELECT reply_ids FROM rankings WHERE user_id = ?", [user_id]).fetchall())
        if compared or ranked:
            raise FeedbackError("you have already judged these replies; each comparison or ranking takes one answer per person")

    # -- writes --------------------------------------------------------------

    def ensure_user(self, name: str, profile: str = "") -> int:
        """The id of the user called `name` (stripped), created if new. A non-empty
        profile replaces the stored one; an empty profile leaves it as it is."""
        name = _check_name(name)
        profile = _check_str(profile, "profile").strip()
        with self._write() as db:
            found = db.execute("SELECT id, profile FROM users WHERE name = ?", [name]).fetchone()
            if found:
                user_id, old_profile = found
                if profile and profile != old_profile:
                    db.execute("UPDATE users SET profile = ? WHERE id = ?", [profile, user_id])
                return user_id
            return _insert(db, "users", {"name": name, "profile": profile, "created_at": _now()})

    def new_conversation(self, user_id: int | None, system_prompt: str = "") -> str:
        """Start a conversation (user_id None: anonymous); returns its uuid4 hex id."""
        if user_id is not None:
            _check_id(user_id, "user id")
        system_prompt = _check_str(system_prompt, "system prompt")
        conversation_id = uuid.uuid4().hex
        with self._write() as db:
            if user_id is not None:
                self._row(db, "users", user_id, "user id")
            _insert(db, "conversations", {
                "id": conversation_id, "user_id": user_id,
                "system_prompt": system_prompt, "created_at": _now(),
            })
        return conversation_id

    def add_message(self, conversation_id: str, role: str, content: str) -> int:
        """Record a turn as sent (normally the user's); returns messages.id."""
        _check_str(conversation_id, "conversation id")
        if role not in ROLES:
            raise FeedbackError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        content = _check_str(content, "message", allow_empty=False)
        with self._write() as db:
            self._row(db, "conversations", conversation_id, "conversation id")
            return _insert(db, "messages", {
                "conversation_id": conversation_id, "role": role,
                "content": content, "created_at": _now(),
            })

    def add_reply(
        self, *, conversation_id: str, context: list[dict], text: str, params: dict, model: str,
        adapter_version: str, prompt_tokens: int, completion_tokens: int, latency_ms: float,
        ttft_ms: float | None, finish_reason: str, source: str = "chat",
    ) -> int:
        """Record an assistant reply with everything needed to train on it; returns replies.id.

        context: every message the reply was generated from, system prompt included.
        text may be empty (a model can stop at once, and that is worth a thumbs-down).
        """
        _check_str(conversation_id, "conversation id")
        if not isinstance(params, dict):
            raise FeedbackError(f"params must be a dict, got {type(params).__name__}")
        if source not in SOURCES:
            raise FeedbackError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        row = {
            "conversation_id": conversation_id,
            "context": _json(_check_context(context), "context"),
            "text": _check_str(text, "reply text"),
            "params": _json(params, "params"),
            "model": _check_str(model, "model", allow_empty=False),
            "adapter_version": _check_str(adapter_version, "adapter version", allow_empty=False),
            "prompt_tokens": _check_count(prompt_tokens, "prompt_tokens"),
            "completion_tokens": _check_count(completion_tokens, "completion_tokens"),
            "latency_ms": _check_ms(latency_ms, "latency_ms"),
            "ttft_ms": None if ttft_ms is None else _check_ms(ttft_ms, "ttft_ms"),
            "finish_reason": _check_str(finish_reason, "finish reason", allow_empty=False),
            "source": source,
            "created_at": _now(),
        }
        with self._write() as db:
            self._row(db, "conversations", conversation_id, "conversation id")
            return _insert(db, "replies", row)

    def get_reply(self, reply_id: int) -> dict:
        """One reply row as a dict, with context and params decoded from JSON."""
        _check_id(reply_id, "reply id")
        with self._read() as db:
            reply = self._row(db, "replies", reply_id, "reply id")
        reply["context"] = json.loads(reply["context"])
        reply["params"] = json.loads(reply["params"])
        return reply

    def set_vote(self, reply_id: int, user_id: int, value: int, reason: str = "") -> int:
        """Set this user's vote on a reply: 1 up, -1 down, 0 removed. Returns votes.id.

        A user has one vote row per reply, updated in place; every change to it is
        appended to vote_events. Repeating the current vote (a double click, a retry)
        changes nothing and records no event.
        """
        _check_id(reply_id, "reply id")
        _check_id(user_id, "user id")
        if isinstance(value, bool) or not isinstance(value, int) or value not in VOTE_VALUES:
            raise FeedbackError(f"vote value must be 1 (up), -1 (down) or 0 (removed), got {value!r}")
        reason = _check_str(reason, "reason").strip()
        now = _now()
        with self._write() as db:
            self._row(db, "replies", reply_id, "reply id")
            self._row(db, "users", user_id, "user id")
            found = db.execute("SELECT id, value, reason FROM votes WHERE reply_id = ? AND user_id = ?",
                               [reply_id, user_id]).fetchone()
            if found:
                vote_id, old_value, old_reason = found
                if (old_value, old_reason) == (value, reason):
                    return vote_id
                db.execute("UPDATE votes SET value = ?, reason = ?, updated_at = ? WHERE id = ?",
                           [value, reason, now, vote_id])
            else:
                vote_id = _insert(db, "votes", {
                    "reply_id": reply_id, "user_id": user_id, "value": value, "reason": reason,
                    "created_at": now, "updated_at": now,
                })
            _insert(db, "vote_events", {"vote_id": vote_id, "value": value, "reason": reason, "created_at": now})
            return vote_id

    def add_comparison(self, reply_a_id: int, reply_b_id: int, choice: str, user_id: int, *, once: bool = False) -> int:
        """Record a side-by-side choice between two replies to the same context:
        'a', 'b', 'tie' or 'both_bad'. Returns comparisons.id.

        once: refuse (FeedbackError) when this user has already judged these two replies,
        in either order (what the chat does: one choice per comparison per person)."""
        _check_id(reply_a_id, "reply id")
        _check_id(reply_b_id, "reply id")
        _check_id(user_id, "user id")
        if reply_a_id == reply_b_id:
            raise FeedbackError(f"a comparison needs two different replies, got {reply_a_id} twice")
        if choice not in CHOICES:
            raise FeedbackError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._write() as db:
            self._replies_with_one_context(db, [reply_a_id, reply_b_id])
            self._row(db, "users", user_id, "user id")
            if once:
                self._refuse_judged_again(db, [reply_a_id, reply_b_id], user_id)
            return _insert(db, "comparisons", {
                "reply_a_id": reply_a_id, "reply_b_id": reply_b_id, "choice": choice,
                "user_id": user_id, "created_at": _now(),
            })

    def add_correction(self, reply_id: int, text: str, user_id: int) -> int:
        """Record an edited, better version of a reply; the original stays as it was.
        Returns corrections.id."""
        _check_id(reply_id, "reply id")
        _check_id(user_id, "user id")
        text = _check_str(text, "corrected text", allow_empty=False)
        with self._write() as db:
            original = self._row(db, "replies", reply_id, "reply id")
            if text.strip() == original["text"].strip():
                raise FeedbackError(f"the corrected text is identical to reply {reply_id}; nothing was corrected")
            self._row(db, "users", user_id, "user id")
            return _insert(db, "corrections", {
                "reply_id": reply_id, "text": text, "user_id": user_id, "created_at": _now(),
            })

    def add_ranking(self, reply_ids: list[int], user_id: int, *, once: bool = False) -> int:
        """Record a best-first ranking of k >= 2 distinct replies to the same context.
        Returns rankings.id. once: as in `add_comparison`, for this set of replies."""
        reply_ids = _check_reply_ids(reply_ids, "a ranking")
        _check_id(user_id, "user id")
        with self._write() as db:
            self._replies_with_one_context(db, reply_ids)
            self._row(db, "users", user_id, "user id")
            if once:
                self._refuse_judged_again(db, reply_ids, user_id)
            return _insert(db, "rankings", {
                "reply_ids": json.dumps(reply_ids), "user_id": user_id, "created_at": _now(),
            })

    def add_ties(self, reply_ids: list[int], user_id: int, *, once: bool = False) -> list[int]:
        """Record that k >= 2 distinct replies to the same context are all about as good
        (the person could not rank them): one 'tie' comparison per pair, k(k-1)/2 in all,
        in one transaction. Like any tie they give no preference pair. Returns the
        comparisons' ids. once: as in `add_comparison`, for this set of replies."""
        reply_ids = _check_reply_ids(reply_ids, "a tie")
        _check_id(user_id, "user id")
        now = _now()
        with self._write() as db:
            self._replies_with_one_context(db, reply_ids)
            self._row(db, "users", user_id, "user id")
            if once:
                self._refuse_judged_again(db, reply_ids, user_id)
            return [_insert(db, "comparisons", {
                "reply_a_id": a, "reply_b_id": b, "choice": "tie", "user_id": user_id, "created_at": now,
            }) for i, a in enumerate(reply_ids) for b in reply_ids[i + 1:]]

    def import_pair(self, prompt: list[dict], chosen: str, rejected: str, source_file: str) -> bool:
        """Store one preference pair from a data set as a comparison that user "import" made.

        It becomes a conversation, two replies to `prompt` (reply a = chosen, model,
        adapter version and finish reason "import", token counts and latency 0,
        source "compare") and a comparison with choice 'a', all in one transaction.
        The pair's key (`import_key`) goes into `imports`; a pair whose key is
        already there is not stored again and the call returns False.
        source_file: the file's name; it becomes the "import" user's profile.
        """
        prompt = _check_context(prompt)
        chosen = _check_str(chosen, "chosen text", allow_empty=False)
        rejected = _check_str(rejected, "rejected text", allow_empty=False)
        if chosen.strip() == rejected.strip():
            raise FeedbackError("chosen and rejected are the same text; there is nothing to prefer")
        source_file = _check_str(source_file, "source file", allow_empty=False)
        key = import_key(prompt, chosen, rejected)
        context = _json(prompt, "prompt")
        system_prompt = prompt[0]["content"] if prompt[0]["role"] == "system" else ""
        now = _now()
        with self._write() as db:
            if db.execute("SELECT 1 FROM imports WHERE key = ?", [key]).fetchone():
                return False
            found = db.execute("SELECT id, profile FROM users WHERE name = 'import'").fetchone()
            if found is None:
                user_id = _insert(db, "users", {"name": "import", "profile": source_file, "created_at": now})
            else:
                user_id, profile = found
                if profile != source_file:
                    db.execute("UPDATE users SET profile = ? WHERE id = ?", [source_file, user_id])
            conversation_id = "import-" + key[:32]  # from the pair's content: the same file splits the same way in any store
            _insert(db, "conversations", {
                "id": conversation_id, "user_id": user_id, "system_prompt": system_prompt, "created_at": now,
            })
            reply_ids = [_insert(db, "replies", {
                "conversation_id": conversation_id, "context": context, "text": text, "params": "{}",
                "model": "import", "adapter_version": "import", "prompt_tokens": 0, "completion_tokens": 0,
                "latency_ms": 0.0, "ttft_ms": None, "finish_reason": "import", "source": "compare",
                "created_at": now,
            }) for text in (chosen, rejected)]
            comparison_id = _insert(db, "comparisons", {
                "reply_a_id": reply_ids[0], "reply_b_id": reply_ids[1], "choice": "a",
                "user_id": user_id, "created_at": now,
            })
            _insert(db, "imports", {"key": key, "comparison_id": comparison_id, "source_file": source_file,
                                    "created_at": now})
        return True

    # -- accounts and saved conversations ---------------------------------
    # Passwords are hashed and tokens digested by assistant/accounts.py; the store keeps
    # only what it is given and never sees a password or a session token.

    def credential(self, name: str) -> tuple[int, str | None] | None:
        """(user id, password hash) of the user called `name`, the hash None when that
        user has no password (feedback from before accounts); None when there is no such user."""
        name = _check_name(name)
        with self._read() as db:
            row = db.execute("SELECT u.id, c.hash FROM users u LEFT JOIN credentials c ON c.user_id = u.id "
                             "WHERE u.name = ?", [name]).fetchone()
        return None if row is None else (row[0], row[1])

    def create_account(self, name: str, profile: str, password_hash: str) -> int:
        """A new user called `name` with a password, in one transaction; returns the
        user id. FeedbackError when a user of that name exists, with or without a password."""
        name = _check_name(name)
        profile = _check_str(profile, "profile").strip()
        password_hash = _check_str(password_hash, "password hash", allow_empty=False)
        now = _now()
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise FeedbackError(f"the name {name!r} is taken")
            user_id = _insert(db, "users", {"name": name, "profile": profile, "created_at": now})
            _insert(db, "credentials", {"user_id": user_id, "hash": password_hash, "created_at": now, "updated_at": now})
            return user_id

    def set_password_hash(self, user_id: int, password_hash: str, *, end_logins: bool) -> None:
        """Give user `user_id` this password hash (replacing any other). end_logins: also
        end every log-in of theirs (a new password signs out every browser)."""
        _check_id(user_id, "user id")
        password_hash = _check_str(password_hash, "password hash", allow_empty=False)
        now = _now()
        with self._write() as db:
            self._row(db, "users", user_id, "user id")
            db.execute("INSERT INTO credentials (user_id, hash, created_at, updated_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (user_id) DO UPDATE SET hash = excluded.hash, updated_at = excluded.updated_at",
                       [user_id, password_hash, now, now])
            if end_logins:
                db.execute("UPDATE logins SET ended_at = ? WHERE user_id = ? AND ended_at IS NULL", [now, user_id])

    def add_login(self, token_sha256: str, user_id: int, expires_at: datetime.datetime) -> None:
        """Record a log-in of `user_id`, known by the digest of its token, valid until `expires_at`."""
        token_sha256 = _check_str(token_sha256, "token digest", allow_empty=False)
        _check_id(user_id, "user id")
        with self._write() as db:
            self._row(db, "users", user_id, "user id")
            _insert(db, "logins", {"token_sha256": token_sha256, "user_id": user_id, "conversation_id": None,
                                   "created_at": _now(), "expires_at": _iso(expires_at), "ended_at": None})

    def login(self, token_sha256: str, now: datetime.datetime) -> dict | None:
        """The log-in with this token digest if it is still valid at `now` (not expired,
        not ended): {user_id, name, profile, conversation_id}; None otherwise."""
        token_sha256 = _check_str(token_sha256, "token digest")
        with self._read() as db:
            row = db.execute(
                "SELECT l.user_id, u.name, u.profile, l.conversation_id FROM logins l JOIN users u ON u.id = l.user_id "
                "WHERE l.token_sha256 = ? AND l.ended_at IS NULL AND l.expires_at > ?", [token_sha256, _iso(now)]).fetchone()
        return None if row is None else dict(zip(("user_id", "name", "profile", "conversation_id"), row))

    def end_login(self, token_sha256: str) -> None:
        """Log-out: the log-in with this token digest is valid no more (unknown digests are ignored)."""
        token_sha256 = _check_str(token_sha256, "token digest")
        with self._write() as db:
            db.execute("UPDATE logins SET ended_at = ? WHERE token_sha256 = ? AND ended_at IS NULL", [_now(), token_sha256])

    def set_login_conversation(self, token_sha256: str, user_id: int, conversation_id: str | None) -> None:
        """Remember which conversation this log-in has open (None: a fresh one), so a
        reload of the page shows it again. Only the user's own conversations."""
        _check_id(user_id, "user id")
        with self._write() as db:
            if conversation_id is not None:
                self._own_conversation(db, conversation_id, user_id)
            db.execute("UPDATE logins SET conversation_id = ? WHERE token_sha256 = ? AND user_id = ?",
                       [conversation_id, token_sha256, user_id])

    def set_profile(self, user_id: int, profile: str) -> None:
        """Replace user `user_id`'s profile (empty clears it)."""
        _check_id(user_id, "user id")
        profile = _check_str(profile, "profile").strip()
        with self._write() as db:
            self._row(db, "users", user_id, "user id")
            db.execute("UPDATE users SET profile = ? WHERE id = ?", [profile, user_id])

    def claim_conversation(self, conversation_id: str, user_id: int) -> bool:
        """Give an anonymous conversation (one begun before its author logged in) to
        `user_id`; returns whether it was anonymous and is now theirs."""
        _check_id(user_id, "user id")
        with self._write() as db:
            self._row(db, "users", user_id, "user id")
            cursor = db.execute("UPDATE conversations SET user_id = ? WHERE id = ? AND user_id IS NULL",
                                [user_id, conversation_id])
            return cursor.rowcount == 1

    @staticmethod
    def _own_conversation(db: sqlite_utils.Database, conversation_id: str, user_id: int) -> dict:
        row = FeedbackStore._row(db, "conversations", conversation_id, "conversation id")
        if row["user_id"] != user_id:
            raise FeedbackError(f"conversation {conversation_id} is not yours")
        return row

    def save_conversation_state(self, conversation_id: str, user_id: int, title: str, state: dict) -> None:
        """Store the transcript of user `user_id`'s conversation as the page shows it
        (`state`: JSON-serialisable), replacing the one saved before."""
        _check_id(user_id, "user id")
        title = _check_str(title, "title")
        if not isinstance(state, dict):
            raise FeedbackError(f"a conversation state must be a dict, got {type(state).__name__}")
        encoded = _json(state, "conversation state")
        with self._write() as db:
            self._own_conversation(db, conversation_id, user_id)
            db.execute("INSERT INTO conversation_states (conversation_id, user_id, title, state, updated_at) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (conversation_id) DO UPDATE SET title = excluded.title, state = excluded.state, "
                       "updated_at = excluded.updated_at", [conversation_id, user_id, title, encoded, _now()])

    def conversation_state(self, conversation_id: str, user_id: int) -> dict | None:
        """User `user_id`'s saved conversation: {conversation_id, system_prompt, title,
        state, updated_at}, state decoded; None when there is none of theirs by that id."""
        _check_id(user_id, "user id")
        _check_str(conversation_id, "conversation id")
        with self._read() as db:
            row = db.execute(
                "SELECT s.conversation_id, c.system_prompt, s.title, s.state, s.updated_at FROM conversation_states s "
                "JOIN conversations c ON c.id = s.conversation_id WHERE s.conversation_id = ? AND s.user_id = ? "
                "AND c.user_id = ?", [conversation_id, user_id, user_id]).fetchone()
        if row is None:
            return None
        found = dict(zip(("conversation_id", "system_prompt", "title", "state", "updated_at"), row))
        found["state"] = json.loads(found["state"])
        return found

    def user_conversations(self, user_id: int, limit: int = 50) -> list[dict]:
        """User `user_id`'s saved conversations, most recently changed first:
        [{conversation_id, title, updated_at}]."""
        _check_id(user_id, "user id")
        _check_count(limit, "limit")
        with self._read() as db:
            rows = db.execute("SELECT conversation_id, title, updated_at FROM conversation_states WHERE user_id = ? "
                              "ORDER BY updated_at DESC, rowid DESC LIMIT ?", [user_id, limit]).fetchall()
        return [dict(zip(("conversation_id", "title", "updated_at"), row)) for row in rows]

    # -- annotator quality: gold items, repeats and their answers ------------
    # What the answers say about the people who give them, and how that weighs their
    # feedback in training, is assistant/annotators.py.

    def add_gold_item(self, prompt: list[dict], better: str, worse: str, source: str) -> tuple[int, bool]:
        """Store a comparison whose better reply is known (a "gold item"); returns
        (gold_items.id, added). The prompt must end with a user message: it is shown as
        the user turn above the two replies. The same (prompt, better, worse) is stored
        once; adding it again returns the stored id with added False.
        source: 'dashboard', or the name of the file it was imported from."""
        prompt = _check_context(prompt)
        if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
            raise FeedbackError("a gold item's prompt must end with a non-empty user message (it is shown as the question)")
        better = _check_str(better, "better reply", allow_empty=False)
        worse = _check_str(worse, "worse reply", allow_empty=False)
        if better.strip() == worse.strip():
            raise FeedbackError("the better and the worse reply are the same text; a gold item needs two different replies")
        source = _check_str(source, "source", allow_empty=False)
        key = import_key(prompt, better, worse)
        with self._write() as db:
            found = db.execute("SELECT id FROM gold_items WHERE key = ?", [key]).fetchone()
            if found:
                return found[0], False
            return _insert(db, "gold_items", {"key": key, "prompt": _json(prompt, "prompt"), "better": better,
                                              "worse": worse, "source": source, "created_at": _now()}), True

    def gold_item(self, gold_item_id: int) -> dict:
        """One gold item: {id, prompt (decoded), better, worse, source, created_at}."""
        _check_id(gold_item_id, "gold item id")
        with self._read() as db:
            item = self._row(db, "gold_items", gold_item_id, "gold item id")
        item["prompt"] = json.loads(item["prompt"])
        del item["key"]
        return item

    def gold_items(self) -> list[dict]:
        """Every gold item, oldest first, with how often it was answered and answered
        right: {id, prompt (decoded), better, worse, source, created_at, answers, correct}."""
        with self._read() as db:
            rows = list(db.query(
                """SELECT g.id, g.prompt, g.better, g.worse, g.source, g.created_at,
                          COUNT(a.id) AS answers, COALESCE(SUM(a.choice = a.better_side), 0) AS correct
                   FROM gold_items g LEFT JOIN gold_answers a ON a.gold_item_id = g.id
                   GROUP BY g.id ORDER BY g.id"""))
        for row in rows:
            row["prompt"] = json.loads(row["prompt"])
        return rows

    def unanswered_gold(self, user_id: int) -> list[int]:
        """Ids of the gold items `user_id` has not answered yet, oldest first."""
        _check_id(user_id, "user id")
        with self._read() as db:
            return [gid for (gid,) in db.execute(
                "SELECT id FROM gold_items WHERE id NOT IN (SELECT gold_item_id FROM gold_answers WHERE user_id = ?) "
                "ORDER BY id", [user_id]).fetchall()]

    def add_gold_answer(self, gold_item_id: int, user_id: int, better_side: str, choice: str) -> int:
        """Record `user_id`'s answer to a gold item shown with its better reply on
        `better_side` ('a' or 'b'); `choice` as shown. Returns gold_answers.id."""
        _check_id(gold_item_id, "gold item id")
        _check_id(user_id, "user id")
        if better_side not in ("a", "b"):
            raise FeedbackError(f"better_side must be 'a' or 'b', got {better_side!r}")
        if choice not in CHOICES:
            raise FeedbackError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._write() as db:
            self._row(db, "gold_items", gold_item_id, "gold item id")
            self._row(db, "users", user_id, "user id")
            return _insert(db, "gold_answers", {"gold_item_id": gold_item_id, "user_id": user_id,
                                                "better_side": better_side, "choice": choice, "created_at": _now()})

    def repeat_candidates(self, user_id: int, before: datetime.datetime) -> list[int]:
        """Ids of `user_id`'s comparisons made before `before` that may be shown to them
        again: made in Compare mode (two 'compare' replies, not imported, not a ranking's
        ties) and not repeated yet. Oldest first."""
        _check_id(user_id, "user id")
        with self._read() as db:
            return [cid for (cid,) in db.execute(
                """SELECT c.id FROM comparisons c
                   JOIN replies ra ON ra.id = c.reply_a_id JOIN replies rb ON rb.id = c.reply_b_id
                   WHERE c.user_id = ? AND c.created_at < ? AND ra.source = 'compare' AND rb.source = 'compare'
                     AND c.id NOT IN (SELECT comparison_id FROM imports)
                     AND c.id NOT IN (SELECT comparison_id FROM repeat_answers WHERE user_id = ?)
                   ORDER BY c.id""", [user_id, _iso(before), user_id]).fetchall()]

    def comparison(self, comparison_id: int) -> dict:
        """One comparison with both replies: {id, user_id, choice, created_at, reply_a, reply_b},
        each reply as `get_reply` returns it."""
        _check_id(comparison_id, "comparison id")
        with self._read() as db:
            row = self._row(db, "comparisons", comparison_id, "comparison id")
        return {"id": row["id"], "user_id": row["user_id"], "choice": row["choice"], "created_at": row["created_at"],
                "reply_a": self.get_reply(row["reply_a_id"]), "reply_b": self.get_reply(row["reply_b_id"])}

    def add_repeat_answer(self, comparison_id: int, user_id: int, choice: str) -> int:
        """Record `user_id`'s second answer to their own comparison `comparison_id`,
        `choice` in the original's terms ('a' = the original's reply A, whichever side
        it was shown on the second time). One per comparison and person. Returns
        repeat_answers.id."""
        _check_id(comparison_id, "comparison id")
        _check_id(user_id, "user id")
        if choice not in CHOICES:
            raise FeedbackError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._write() as db:
            original = self._row(db, "comparisons", comparison_id, "comparison id")
            if original["user_id"] != user_id:
                raise FeedbackError(f"comparison {comparison_id} was made by another user; only its author can repeat it")
            if db.execute("SELECT 1 FROM repeat_answers WHERE comparison_id = ? AND user_id = ?",
                          [comparison_id, user_id]).fetchone():
                raise FeedbackError(f"comparison {comparison_id} has been repeated already")
            return _insert(db, "repeat_answers", {"comparison_id": comparison_id, "user_id": user_id,
                                                  "choice": choice, "created_at": _now()})

    # -- reads and export --------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per table, from one snapshot."""
        with self._read() as db:
            return {table: db.table(table).count for table in TABLES}

    def export(self, fmt: str, out_path: str | os.PathLike) -> int:
        """Write one TRL-style JSONL file (`fmt`: preference, kto or sft) from one
        snapshot; returns the rows written. The formats, and which feedback each row
        comes from, are described in export.py."""
        # Imported here: export.py builds on this module (and on pairs.py, which reads
        # through a FeedbackStore), so a module-level import would be circular.
        from assistant.feedback.export import export
        return export(self, fmt, out_path)
