"""Accounts: sign-up, log-in and log-out with passwords, so feedback is given by who it says.

Why: feedback trains the model, so who gave it matters (one vote per reply per person,
profiles, annotator quality). A typed name (open mode, `--open`) lets anyone vote as
anyone; an account ties every vote, choice, ranking and correction to a password.

How:
- Passwords are hashed with scrypt (`hashlib.scrypt`, OpenSSL's; n=2**14, r=8, p=1,
  a 16-byte random salt per user) and stored as `scrypt$n$r$p$salt$hash`, so the
  parameters travel with the hash and can be raised later: a hash made with weaker ones
  is replaced at the user's next log-in. Hashes are compared with `hmac.compare_digest`.
- A log-in hands out a random session token (`secrets.token_urlsafe`). The browser keeps
  it; the database keeps only its sha256, with an expiry (`--session-hours`). Log-out
  ends it; a new password ends all of a user's log-ins.
- Failed log-ins back off per name and per client address: after 5 failures each
  further try must wait 1 s, then 2, 4, ... (at most 15 min); a try during the wait is
  refused without looking at the password, and the person is told how long to wait.
  The wait is the same whether the name exists or not, and so is the message.
- Names are checked as the store checks them (non-empty, at most 100 characters). A
  name that already has feedback from open mode but no password cannot be signed up
  for: an administrator gives it one with `set-password` (below), so nobody takes over
  someone else's history.

What it is not: the tables (assistant/feedback/schema.py, version 4), the page
(assistant/ui.py) or rate limits on messages and feedback (assistant/limits.py).
Failure counts are in memory: a restart forgets them.

    python -m assistant.accounts set-password NAME [--db data/feedback.db]
        # reads the new password from the terminal (or one line of stdin), never argv
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import getpass
import hashlib
import hmac
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from assistant.feedback import DEFAULT_PATH, MAX_NAME_CHARS, FeedbackError, FeedbackStore, StoreUnavailable

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB and some tens of ms per hash
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
MAX_PROFILE_CHARS = 300
RESERVED_NAMES = ("import",)  # the user that imported preference pairs are stored under
FREE_FAILURES = 5  # failed log-ins before the back-off starts
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 900.0
FORGET_S = 3600.0  # failures this old no longer count
WRONG = "Wrong name or password."


class AccountError(ValueError):
    """A sign-up, log-in or password change was refused; the message is for the person."""


# ---------------------------------------------------------------- passwords
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES,
                          maxmem=256 * n * r + (1 << 20))


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`password` hashed with scrypt and a fresh salt, as `scrypt$n$r$p$salt$hash`."""
    salt = secrets.token_bytes(SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown password hash scheme {scheme!r}")
    return int(n), int(r), int(p), base64.b64decode(salt), base64.b64decode(digest)


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` (from `hash_password`) was made from."""
    n, r, p, salt, digest = _parse(stored)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), digest)


def needs_rehash(stored: str) -> bool:
    """Whether `stored` was made with weaker parameters than today's."""
    n, r, p, _, _ = _parse(stored)
    return n < SCRYPT_N or r < SCRYPT_R or p < SCRYPT_P


@functools.cache
def _decoy() -> str:
    """A hash checked for names without a password, so they take as long as the others."""
    return hash_password(secrets.token_urlsafe(16))


def check_new_password(password) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"Choose a password of at least {MIN_PASSWORD_CHARS} characters.")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"A password can have at most {MAX_PASSWORD_CHARS} characters.")
    return password


def token_digest(token: str) -> str:
    """What the database keeps of a session token: its sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- back-off
class Backoff:
    """Failed attempts per key (a name, an address) and the wait they impose, in memory."""

    def __init__(self, free: int = FREE_FAILURES, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S,
                 forget_s: float = FORGET_S, clock: Callable[[], float] = time.monotonic):
        self.free, self.first_s, self.max_s, self.forget_s, self.clock = free, first_s, max_s, forget_s, clock
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, time of the last)
        self._lock = threading.Lock()

    def _wait(self, key: str, now: float) -> float:
        count, last = self._failures.get(key, (0, now))
        if now - last > self.forget_s:
            self._failures.pop(key, None)
            return 0.0
        if count < self.free:
            return 0.0
        return max(0.0, last + min(self.first_s * 2 ** (count - self.free), self.max_s) - now)

    def wait(self, keys: list[str]) -> float:
        """Seconds before any of `keys` may try again (0: now)."""
        with self._lock:
            now = self.clock()
            return max([self._wait(k, now) for k in keys], default=0.0)

    def failed(self, keys: list[str]) -> None:
        with self._lock:
            now = self.clock()
            for key in keys:
                self._wait(key, now)  # forgets an old streak first
                count, _ = self._failures.get(key, (0, now))
                self._failures[key] = (count + 1, now)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


# ---------------------------------------------------------------- accounts
@dataclass(frozen=True)
class Account:
    """A signed-in user, as a log-in token resolves."""

    user_id: int
    name: str
    profile: str
    conversation_id: str | None = None  # the conversation this log-in has open


def _backing_off(wait_s: float) -> str:
    return f"Too many failed log-ins: try again in {max(1, math.ceil(wait_s))} s."


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class Accounts:
    """Sign-up, log-in, log-out and token checks over the feedback store.

    store: where users, password hashes and log-ins live.
    session_hours: how long a token is valid after log-in.
    clock: the current time (timezone-aware), for tests of expiry."""

    def __init__(self, store: FeedbackStore, session_hours: float = 72.0, backoff: Backoff | None = None,
                 clock: Callable[[], datetime.datetime] = _utcnow):
        if not session_hours > 0:
            raise ValueError(f"session_hours must be positive, got {session_hours}")
        self.store = store
        self.session_hours = session_hours
        self.backoff = backoff or Backoff()
        self.clock = clock

    def _check_name(self, name) -> str:
        name = (name or "").strip() if isinstance(name, str) else ""
        if not name:
            raise AccountError("Enter a name.")
        if len(name) > MAX_NAME_CHARS:
            raise AccountError(f"A name can have at most {MAX_NAME_CHARS} characters; this one has {len(name)}.")
        return name

    def _log_in(self, user_id: int) -> str:
        token = secrets.token_urlsafe(32)
        expires = self.clock() + datetime.timedelta(hours=self.session_hours)
        self.store.add_login(token_digest(token), user_id, expires)
        return token

    def sign_up(self, name: str, password: str, profile: str = "") -> tuple[Account, str]:
        """Create an account and log it in: (account, session token). AccountError says why not."""
        name = self._check_name(name)
        check_new_password(password)
        profile = (profile or "").strip()
        if len(profile) > MAX_PROFILE_CHARS:
            raise AccountError(f"A profile can have at most {MAX_PROFILE_CHARS} characters.")
        if name.lower() in RESERVED_NAMES:
            raise AccountError(f"The name {name!r} is reserved; choose another.")
        found = self.store.credential(name)
        if found is not None and found[1] is None:
            raise AccountError(
                f"The name {name!r} already has feedback from before accounts, and no password. An administrator "
                f"can set one: `python -m assistant.accounts set-password {name!r}`. Or choose another name.")
        if found is not None:
            raise AccountError(f"The name {name!r} is taken; choose another, or log in if it is yours.")
        try:
            user_id = self.store.create_account(name, profile, hash_password(password))
        except FeedbackError:  # taken between the look-up and the write
            raise AccountError(f"The name {name!r} is taken; choose another, or log in if it is yours.") from None
        return Account(user_id, name, profile), self._log_in(user_id)

    def log_in(self, name: str, password: str, ip: str = "") -> tuple[Account, str]:
        """Check the password and log in: (account, session token). A wrong name and a
        wrong password fail alike (`WRONG`); repeated failures back off per name and per `ip`."""
        name = (name or "").strip() if isinstance(name, str) else ""
        password = password if isinstance(password, str) else ""
        keys = [f"name:{name}"] + ([f"ip:{ip}"] if ip else [])
        wait = self.backoff.wait(keys)
        if wait > 0:
            raise AccountError(_backing_off(wait))
        found = self.store.credential(name) if name and len(name) <= MAX_NAME_CHARS else None
        stored = found[1] if found is not None else None
        ok = verify_password(password[:MAX_PASSWORD_CHARS], stored or _decoy()) and stored is not None
        if not ok or len(password) > MAX_PASSWORD_CHARS:
            self.backoff.failed(keys)
            wait = self.backoff.wait(keys)
            raise AccountError(WRONG + (" " + _backing_off(wait) if wait else ""))
        self.backoff.succeeded(keys[0])
        user_id = found[0]
        if needs_rehash(stored):
            self.store.set_password_hash(user_id, hash_password(password), end_logins=False)
        token = self._log_in(user_id)
        return self.account(token), token

    def account(self, token) -> Account | None:
        """The account a session token belongs to, if it is valid now (not expired, not logged out)."""
        if not isinstance(token, str) or not token:
            return None
        row = self.store.login(token_digest(token), self.clock())
        return None if row is None else Account(**row)

    def log_out(self, token) -> None:
        if isinstance(token, str) and token:
            self.store.end_login(token_digest(token))

    def set_password(self, name: str, password: str) -> tuple[int, bool]:
        """Give the user called `name` this password (an administrator's job), creating the
        user if there is none; ends their log-ins. Returns (user id, whether it was created)."""
        name = self._check_name(name)
        check_new_password(password)
        found = self.store.credential(name)
        user_id = found[0] if found is not None else self.store.ensure_user(name)
        self.store.set_password_hash(user_id, hash_password(password), end_logins=True)
        return user_id, found is None


# ---------------------------------------------------------------- CLI
def _read_password(name: str) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(f"New password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise AccountError("The two passwords differ; nothing was changed.")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m assistant.accounts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    setpw = sub.add_parser("set-password", help="set a user's password (read from the terminal or stdin, never from argv); "
                                                "creates the user if there is none, ends their log-ins")
    setpw.add_argument("name", help="the user's name, as shown with their feedback")
    setpw.add_argument("--db", default=DEFAULT_PATH, help=f"the feedback database (default: {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        with FeedbackStore(args.db) as store:
            user_id, created = Accounts(store).set_password(args.name, _read_password(args.name.strip()))
    except (AccountError, FeedbackError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'Created user' if created else 'Password set for'} {args.name.strip()!r} (id {user_id}); they can log in now.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
